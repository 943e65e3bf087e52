"""visualizer.analysis against hand-derived values and plain-loop oracles."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

from visualizer import analysis
from visualizer._errors import VisualizerError


def random_maps(shape, seed=0, scale=2.0):
    """Row-stochastic random attention (softmax of Gaussian logits), float64."""
    logits = np.random.default_rng(seed).normal(scale=scale, size=shape)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def loop_mean_distance(attn, grid, num_prefix, patch_size):
    """Plain-Python oracle for one map (H, N, N): per query, the distance to
    each patch weighted by the renormalized patch attention, averaged over queries."""
    height, width = grid
    per_head = []
    for head in attn:
        per_query = []
        for query in range(height * width):
            row = head[num_prefix + query, num_prefix:]
            query_y, query_x = divmod(query, width)
            total = 0.0
            for key in range(height * width):
                key_y, key_x = divmod(key, width)
                total += row[key] * math.hypot(query_y - key_y, query_x - key_x) * patch_size
            per_query.append(total / row.sum())
        per_head.append(sum(per_query) / len(per_query))
    return np.array(per_head)


# ---------------------------------------------------------------- import rules


def test_importing_analysis_imports_neither_torch_nor_matplotlib():
    code = (
        "import sys, visualizer.analysis;print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- cls_attention


@pytest.mark.parametrize("num_prefix, grid", [(1, (2, 3)), (5, (3, 2)), (1, (4, 4))])
def test_cls_attention_is_row_zero_without_prefix_on_grid(num_prefix, grid):
    tokens = num_prefix + grid[0] * grid[1]
    attn = random_maps((2, 3, tokens, tokens))
    result = analysis.cls_attention(attn, grid_size=grid, num_prefix_tokens=num_prefix)
    assert result.shape == (2, 3, *grid)
    for batch, head, row, col in itertools.product(
        range(2), range(3), range(grid[0]), range(grid[1])
    ):
        assert (
            result[batch, head, row, col] == attn[batch, head, 0, num_prefix + row * grid[1] + col]
        )


def test_cls_attention_keeps_layout_and_accepts_cls_row_only():
    attn = random_maps((3, 17, 17))
    unbatched = analysis.cls_attention(attn)
    assert unbatched.shape == (3, 4, 4)
    np.testing.assert_array_equal(analysis.cls_attention(attn[:, :1]), unbatched)
    np.testing.assert_array_equal(analysis.cls_attention(attn[None])[0], unbatched)


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        (
            (4, 5),
            {},
            "cls_attention: attn must have shape (B, H, N, N) or (H, N, N); got shape (4, 5)",
        ),
        ((2, 3, 11, 11), {}, "cannot infer a square grid_size from 10 patch tokens"),
        (
            (2, 3, 11, 11),
            {"grid_size": (3, 3)},
            "grid_size (3, 3) has 9 patches but attn has 11 tokens",
        ),
        ((2, 3, 4, 11), {"grid_size": (2, 5)}, "(B, H, 1, N) (CLS row only)"),
        ((2, 3, 10, 10), {"num_prefix_tokens": 0}, "num_prefix_tokens must be >= 1"),
        ((2, 3, 10, 10), {"num_prefix_tokens": 10}, "num_prefix_tokens must be an int in [0, 10)"),
    ],
)
def test_cls_attention_errors_say_what_was_expected_and_got(shape, kwargs, message):
    with pytest.raises(VisualizerError) as raised:
        analysis.cls_attention(np.full(shape, 1 / shape[-1]), **kwargs)
    assert message in str(raised.value)


# ------------------------------------------------------- mean attention distance


def test_uniform_attention_distance_is_mean_pairwise_patch_distance():
    grid, patch_size = (3, 5), 14
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    pairwise = [math.dist(a, b) * patch_size for a in cells for b in cells]
    expected = sum(pairwise) / len(pairwise)
    tokens = 1 + len(cells)
    uniform = np.full(
        (2, 4, tokens, tokens), 1 / tokens
    )  # CLS gets a share too: renormalization removes it
    result = analysis.mean_attention_distance([uniform] * 3, grid_size=grid, patch_size=patch_size)
    assert result.shape == (3, 4)
    np.testing.assert_allclose(result, expected, rtol=1e-12)


def test_attending_only_to_itself_has_distance_zero():
    eye = np.broadcast_to(np.eye(1 + 12), (2, 3, 13, 13))
    np.testing.assert_array_equal(
        analysis.mean_attention_distance(eye, grid_size=(3, 4)), np.zeros(3)
    )


def test_hand_derived_distance_with_anisotropic_patches():
    # grid 1x2: query 0 looks only at patch 1 (one 8 px wide patch to the right),
    # query 1 at itself.
    attn = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    assert (
        analysis.mean_attention_distance(
            attn, grid_size=(1, 2), num_prefix_tokens=0, patch_size=(16, 8)
        )[0]
        == 4.0
    )
    # Same on a 2x1 grid: the neighbour is one 16 px row down.
    assert (
        analysis.mean_attention_distance(
            attn, grid_size=(2, 1), num_prefix_tokens=0, patch_size=(16, 8)
        )[0]
        == 8.0
    )


@pytest.mark.parametrize("grid, num_prefix", [((3, 5), 1), ((4, 2), 5), ((3, 3), 0)])
def test_vectorized_distance_equals_loop_reference(grid, num_prefix):
    tokens = num_prefix + grid[0] * grid[1]
    layers = [random_maps((2, 3, tokens, tokens), seed=layer) for layer in range(2)]
    result = analysis.mean_attention_distance(
        layers, grid_size=grid, num_prefix_tokens=num_prefix, patch_size=16, average_batch=False
    )
    assert result.shape == (2, 2, 3)
    for layer, batch in itertools.product(range(2), range(2)):
        expected = loop_mean_distance(layers[layer][batch], grid, num_prefix, 16)
        np.testing.assert_allclose(result[layer, batch], expected, rtol=1e-10)
    averaged = analysis.mean_attention_distance(
        np.stack(layers), grid_size=grid, num_prefix_tokens=num_prefix
    )
    np.testing.assert_allclose(averaged, result.mean(axis=1), rtol=1e-12)


def test_distance_layouts_single_map_unbatched_and_list():
    attn = random_maps((4, 10, 10))
    single = analysis.mean_attention_distance(attn)
    assert single.shape == (4,)
    np.testing.assert_allclose(single, loop_mean_distance(attn, (3, 3), 1, 16))
    assert analysis.mean_attention_distance([attn, attn]).shape == (2, 4)
    assert analysis.mean_attention_distance(attn[None], average_batch=False).shape == (1, 4)


def test_distance_rejects_layers_of_different_shapes():
    with pytest.raises(VisualizerError, match="every layer of maps must have the same shape"):
        analysis.mean_attention_distance([random_maps((2, 10, 10)), random_maps((3, 10, 10))])


# ------------------------------------------------------------------- entropy


def test_entropy_hand_cases():
    uniform = np.full((1, 2, 4, 4), 0.25)
    one_hot = np.broadcast_to(np.eye(4), (1, 2, 4, 4))
    half = np.zeros((1, 1, 2, 4))  # two query rows only, as when just a few rows are captured
    half[..., :2] = 0.5
    np.testing.assert_allclose(analysis.attention_entropy(uniform), [math.log(4)] * 2)
    np.testing.assert_array_equal(analysis.attention_entropy(one_hot), [0.0, 0.0])
    np.testing.assert_allclose(analysis.attention_entropy(half), [math.log(2)])
    stacked = analysis.attention_entropy([uniform, one_hot], average_batch=False)
    np.testing.assert_allclose(stacked, [[[math.log(4)] * 2], [[0.0, 0.0]]])


# ------------------------------------------------------------------- rollout


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("add_identity", [True, False])
def test_rollout_of_identity_maps_is_identity(fusion, add_identity):
    eye = np.broadcast_to(np.eye(7), (2, 3, 7, 7))
    result = analysis.attention_rollout([eye] * 5, head_fusion=fusion, add_identity=add_identity)
    assert result.shape == (2, 7, 7)
    np.testing.assert_allclose(result, np.broadcast_to(np.eye(7), (2, 7, 7)))


def test_rollout_hand_cases():
    swap = np.array([[[0.0, 1.0], [1.0, 0.0]]])  # (H=1, 2, 2)
    # Without the residual, swapping twice is the identity.
    np.testing.assert_allclose(
        analysis.attention_rollout([swap, swap], add_identity=False), np.eye(2)
    )
    # With it, each layer is (swap + I) / 2 = all 0.5, and so is their product.
    np.testing.assert_allclose(analysis.attention_rollout([swap, swap]), np.full((2, 2), 0.5))
    heads = np.stack([np.eye(2), swap[0]])  # (H=2, 2, 2)
    np.testing.assert_allclose(
        analysis.attention_rollout(heads, head_fusion="max", add_identity=False),
        np.full((2, 2), 0.5),
    )
    # min over heads is all zeros; adding I/2 and renormalizing gives I.
    np.testing.assert_allclose(analysis.attention_rollout(heads, head_fusion="min"), np.eye(2))
    # Order: result = A2 @ A1. A1 sends everything to token 0, A2 swaps.
    to_first = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    np.testing.assert_allclose(
        analysis.attention_rollout([to_first, swap], add_identity=False), [[1.0, 0.0], [1.0, 0.0]]
    )
    np.testing.assert_allclose(
        analysis.attention_rollout([swap, to_first], add_identity=False), [[0.0, 1.0], [0.0, 1.0]]
    )


def test_rollout_discard_spares_cls_to_cls():
    attn = np.array([[[0.05, 0.95], [0.4, 0.6]]])
    # 25% of 4 entries = 1 discarded: the lowest is 0.05 at (0, 0), which is spared; 0.4 goes.
    np.testing.assert_allclose(
        analysis.attention_rollout(attn, discard_ratio=0.25, add_identity=False),
        [[0.05, 0.95], [0.0, 1.0]],
    )


def test_rollout_batch_items_are_independent_and_rows_sum_to_one():
    layers = [random_maps((3, 2, 6, 6), seed=layer) for layer in range(4)]
    batched = analysis.attention_rollout(layers, discard_ratio=0.3)
    for item in range(3):
        alone = analysis.attention_rollout([layer[item] for layer in layers], discard_ratio=0.3)
        np.testing.assert_allclose(batched[item], alone)
    np.testing.assert_allclose(batched.sum(axis=-1), 1.0)


def test_rollout_cls_attention_is_row_zero_on_grid():
    rollout = random_maps((2, 1 + 6, 1 + 6))
    result = analysis.rollout_cls_attention(rollout, grid_size=(2, 3))
    np.testing.assert_array_equal(result, rollout[:, 0, 1:].reshape(2, 2, 3))
    np.testing.assert_array_equal(
        analysis.rollout_cls_attention(rollout[1], grid_size=(2, 3)), result[1]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head_fusion": "median"}, "head_fusion must be one of"),
        ({"discard_ratio": 1.0}, "discard_ratio must be in [0, 1)"),
    ],
)
def test_rollout_option_errors(kwargs, message):
    with pytest.raises(VisualizerError) as raised:
        analysis.attention_rollout(np.ones((1, 2, 2)), **kwargs)
    assert message in str(raised.value)


def test_gradient_rollout_hand_cases():
    layers = [random_maps((2, 3, 5, 5), seed=layer) for layer in range(3)]
    # Unit gradients weight nothing: equal to mean-fused attention rollout.
    ones = [np.ones_like(layer) for layer in layers]
    np.testing.assert_allclose(
        analysis.gradient_rollout(layers, ones), analysis.attention_rollout(layers)
    )
    # Negative gradients are clamped away, leaving only the residual identity.
    minus = [-layer for layer in ones]
    np.testing.assert_allclose(
        analysis.gradient_rollout(layers, minus), np.broadcast_to(np.eye(5), (2, 5, 5))
    )
    # Positive part only: mean over heads of max(g * a, 0), by hand for one layer, no identity.
    grads = np.array([[[1.0, -1.0], [2.0, 0.0]], [[-1.0, 1.0], [0.0, 2.0]]])  # (H=2, 2, 2)
    attn = np.full((2, 2, 2), 0.5)
    fused = np.array([[0.25, 0.25], [0.5, 0.5]])  # rows then renormalize to 0.5
    np.testing.assert_allclose(
        analysis.gradient_rollout(attn, grads, add_identity=False),
        fused / fused.sum(-1, keepdims=True),
    )


def test_gradient_rollout_errors():
    attn = np.full((1, 2, 2), 0.5)
    with pytest.raises(VisualizerError, match="pass exactly one of grads and score; got neither"):
        analysis.gradient_rollout(attn)
    with pytest.raises(VisualizerError, match="grads must have one entry per layer of maps"):
        analysis.gradient_rollout([attn, attn], [attn])
    with pytest.raises(VisualizerError, match="maps must be torch tensors that require grad"):
        analysis.gradient_rollout([attn], score=1.0)


def test_gradient_rollout_from_score_matches_autograd():
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 5, 5, generator=generator, requires_grad=True) for _ in range(3)]
    maps = [
        layer.softmax(-1) for layer in logits
    ]  # non-leaf tensors with their graph, as captured on device
    weights = torch.randn(5, 5, generator=generator)
    score = sum((layer * weights).sum() * (index + 1) for index, layer in enumerate(maps))
    grads = torch.autograd.grad(score, maps, retain_graph=True)
    expected = analysis.gradient_rollout(
        [layer.detach().numpy() for layer in maps],
        [grad.numpy() for grad in grads],
        discard_ratio=0.2,
    )
    np.testing.assert_allclose(
        analysis.gradient_rollout(maps, score=score, discard_ratio=0.2), expected
    )
    stacked = torch.stack(maps)
    stacked_score = (stacked * weights).sum()
    stacked_grad = torch.autograd.grad(stacked_score, stacked, retain_graph=True)[0]
    np.testing.assert_allclose(
        analysis.gradient_rollout(stacked, score=stacked_score),
        analysis.gradient_rollout(stacked.detach().numpy(), stacked_grad.numpy()),
    )


# ------------------------------------------------------------ threshold masks


def brute_force_minimal_size(values, fraction):
    """Size of the smallest subset of values holding fraction of the total, by enumeration."""
    total = sum(values)
    for size in range(len(values) + 1):
        if any(sum(subset) >= fraction * total for subset in itertools.combinations(values, size)):
            return size
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.9, 1.0])
def test_threshold_mask_holds_the_mass_and_is_minimal(seed, fraction):
    attention = analysis.cls_attention(random_maps((2, 3, 7, 7), seed=seed), grid_size=(2, 3))
    mask = analysis.threshold_mask(attention, fraction=fraction)
    assert mask.shape == attention.shape and mask.dtype == bool
    for index in np.ndindex(*attention.shape[:2]):
        values, kept = attention[index].ravel(), mask[index].ravel()
        assert values[kept].sum() >= fraction * values.sum() * (1 - 1e-12)
        assert kept.sum() == brute_force_minimal_size(list(values), fraction)
        # Kept patches are the strongest ones.
        if kept.any() and (~kept).any():
            assert values[kept].min() >= values[~kept].max()


def test_threshold_mask_hand_case_and_errors():
    attention = np.array([[0.4, 0.1], [0.3, 0.2]])
    np.testing.assert_array_equal(
        analysis.threshold_mask(attention, 0.7), [[True, False], [True, False]]
    )
    np.testing.assert_array_equal(
        analysis.threshold_mask(attention, 0.71), [[True, False], [True, True]]
    )
    # Exactly reaching the mass is enough (binary fractions: no rounding).
    exact = np.array([[0.5, 0.125], [0.25, 0.125]])
    np.testing.assert_array_equal(
        analysis.threshold_mask(exact, 0.75), [[True, False], [True, False]]
    )
    # Ties are broken by patch index, so the mask is deterministic and still minimal.
    np.testing.assert_array_equal(
        analysis.threshold_mask(np.full((2, 2), 0.25), 0.5), [[True, True], [False, False]]
    )
    with pytest.raises(VisualizerError, match=r"fraction must be in \(0, 1\]; got 0"):
        analysis.threshold_mask(attention, 0)
    with pytest.raises(VisualizerError, match="attention must be non-negative"):
        analysis.threshold_mask(-attention)


# ----------------------------------------------------------- artifact tokens


def inject(attn, token, share):
    """Move ``share`` of every query's attention onto ``token`` (what artifact tokens look like)."""
    spiked = attn * (1 - share)
    spiked[..., token] += share
    return spiked


def test_injected_artifact_token_is_found_and_clean_maps_have_none():
    clean = random_maps((2, 6, 1 + 64, 1 + 64), seed=3)
    assert [tokens.tolist() for tokens in analysis.find_artifact_tokens(clean)] == [[], []]
    spiked = clean.copy()
    spiked[0] = inject(clean[0], 23, 0.3)
    spiked[1] = inject(inject(clean[1], 7, 0.2), 50, 0.2)
    assert [tokens.tolist() for tokens in analysis.find_artifact_tokens(spiked)] == [[23], [7, 50]]
    assert analysis.find_artifact_tokens(spiked[1]).tolist() == [7, 50]


def test_artifact_found_from_the_cls_row_alone():
    # One query row per head is noisier than the mean over all queries, so the
    # clean rows here are less peaky (logit spread 1 instead of 2).
    clean_rows = random_maps((2, 12, 1, 1 + 196), seed=4, scale=1.0)
    assert [tokens.tolist() for tokens in analysis.find_artifact_tokens(clean_rows)] == [[], []]
    spiked = clean_rows.copy()
    spiked[1] = inject(clean_rows[1], 100, 0.3)
    assert [tokens.tolist() for tokens in analysis.find_artifact_tokens(spiked)] == [[], [100]]


def test_a_spike_in_a_minority_of_heads_is_not_an_artifact():
    attn = random_maps((6, 1 + 64, 1 + 64), seed=5)
    attn[:2] = inject(attn[:2], 30, 0.5)  # two heads of six attend to token 30: a head's preference
    assert analysis.find_artifact_tokens(attn).tolist() == []
    attn[2] = inject(attn[2], 30, 0.5)  # half of the heads
    assert analysis.find_artifact_tokens(attn).tolist() == [30]


def test_prefix_tokens_are_never_artifacts():
    attn = inject(
        random_maps((4, 1 + 4 + 36, 1 + 4 + 36)), 2, 0.5
    )  # a register soaking up attention is by design
    assert analysis.find_artifact_tokens(attn, num_prefix_tokens=5).tolist() == []
    assert analysis.find_artifact_tokens(attn, num_prefix_tokens=1).tolist() == [2]


def test_uniform_map_has_no_artifacts():
    assert analysis.find_artifact_tokens(np.full((3, 50, 50), 1 / 50)).tolist() == []


# ------------------------------------------------------------------ upsample


def test_nearest_upsampling_is_kron_for_integer_factors():
    grid = random_maps((3, 2, 5))
    np.testing.assert_array_equal(
        analysis.upsample_to_image(grid, (8, 20), mode="nearest"), np.kron(grid, np.ones((4, 4)))
    )


def test_bilinear_upsampling_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    grid = random_maps((2, 3, 4, 5))
    for size in [(8, 10), (13, 7), (37, 50)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(grid), size=size, mode="bilinear", align_corners=False
        )
        np.testing.assert_allclose(
            analysis.upsample_to_image(grid, size), expected.numpy(), atol=1e-12
        )
    constant = np.full((3, 4), 0.7)
    np.testing.assert_allclose(analysis.upsample_to_image(constant, (10, 9)), 0.7)


def test_upsample_errors():
    with pytest.raises(VisualizerError, match="mode must be 'nearest' or 'bilinear'; got 'cubic'"):
        analysis.upsample_to_image(np.ones((2, 2)), (4, 4), mode="cubic")


# --------------------------------------------------------------- DETR boxes


def test_box_conversion_and_mass_inside_boxes():
    np.testing.assert_allclose(
        analysis.box_cxcywh_to_xyxy([[0.25, 0.5, 0.5, 0.2]], (100, 200)), [[0, 40, 100, 60]]
    )
    # 2x4 feature grid over a 20x40 image: cells are 10x10 pixels.
    cross = np.zeros((1, 3, 8))
    cross[0, 0, [0, 1]] = 0.5  # two top-left cells
    cross[0, 1, :] = 1 / 8  # uniform
    cross[0, 2, 5] = 1.0  # bottom row, second cell
    boxes = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [15, 10, 20, 20]])
    shares = analysis.attention_mass_in_boxes(cross, boxes, image_size=(20, 40), grid_size=(2, 4))
    # query 0: one of two cells; query 1: 4 of 8 cells; query 2: half of cell 5's area.
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.5]])
    with_heads = np.stack([cross, cross], axis=1)  # (B, H, Q, S)
    np.testing.assert_allclose(
        analysis.attention_mass_in_boxes(with_heads, boxes[None], (20, 40), (2, 4)), shares
    )
    with pytest.raises(VisualizerError, match=r"boxes must have shape \(1, 3, 4\) or \(3, 4\)"):
        analysis.attention_mass_in_boxes(cross, boxes[:2], (20, 40), (2, 4))


# ------------------------------------------------------------- torch inputs


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_torch_inputs_of_any_float_dtype_and_with_grad(dtype_name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    reference = random_maps((2, 3, 10, 10)).astype(np.float32)
    tensor = torch.from_numpy(reference).to(dtype).requires_grad_(True)
    as_float = tensor.detach().float().numpy()  # the values the library should see
    np.testing.assert_allclose(analysis.cls_attention(tensor), analysis.cls_attention(as_float))
    expected_distance = np.mean(
        [loop_mean_distance(item, (3, 3), 1, 16) for item in as_float], axis=0
    )
    np.testing.assert_allclose(
        analysis.mean_attention_distance([tensor, tensor])[1], expected_distance, rtol=1e-5
    )
    np.testing.assert_allclose(
        analysis.attention_rollout([tensor]), analysis.attention_rollout([as_float]), rtol=1e-6
    )
    assert analysis.attention_entropy(tensor).shape == (3,)
    assert analysis.threshold_mask(analysis.cls_attention(tensor)).shape == (2, 3, 3, 3)
    assert [tokens.tolist() for tokens in analysis.find_artifact_tokens(tensor)] == [[], []]


# -- what is not attention is refused, with a reason ------------------------------------


def pre_softmax_scores(shape, seed=0):
    return np.random.default_rng(seed).normal(scale=3.0, size=shape)


@pytest.mark.parametrize(
    "call",
    [
        lambda maps: analysis.cls_attention(maps[0], grid_size=(3, 3)),
        lambda maps: analysis.mean_attention_distance(maps, grid_size=(3, 3)),
        lambda maps: analysis.attention_rollout(maps),
        lambda maps: analysis.attention_entropy(maps),
        lambda maps: analysis.find_artifact_tokens(maps[0]),
    ],
    ids=["cls_attention", "mean_attention_distance", "rollout", "entropy", "artifacts"],
)
def test_scores_nan_and_oversized_rows_are_refused(call):
    scores = pre_softmax_scores((2, 1, 2, 10, 10))
    with pytest.raises(VisualizerError, match=r"has a value of -\d.*expected post-softmax "
                       r"attention probabilities .* This looks like pre-softmax scores"):
        call(scores)
    maps = random_maps((2, 1, 2, 10, 10))
    with pytest.raises(VisualizerError, match=r"has a row summing to 2; expected post-softmax"):
        call(maps * 2)
    broken = maps.copy()
    broken[0, 0, 1, 3, :] = np.nan
    with pytest.raises(VisualizerError, match=r"holds 10 NaN or infinite values of 200; "
                       r"expected attention probabilities"):
        call(broken)


def test_rows_that_sum_to_less_than_one_are_attention_too():
    # Rows restricted to some keys (here: half the mass kept) are still attention.
    maps = random_maps((1, 2, 10, 10)) / 2
    assert analysis.cls_attention(maps, grid_size=(3, 3)).shape == (1, 2, 3, 3)


def test_cross_attention_scores_are_refused():
    with pytest.raises(VisualizerError, match="attention_mass_in_boxes: cross_attn has a value"):
        analysis.attention_mass_in_boxes(pre_softmax_scores((1, 2, 3, 4)), [[0, 0, 1, 1]] * 3,
                                         image_size=(4, 4), grid_size=(2, 2))


# ------------------------------------------------------------------ geometry


def test_geometry_normalizes_and_derives_sizes():
    geometry = analysis.ImageGeometry(4, num_prefix_tokens=5, patch_size=14, mean=[0.5], std=[0.25])
    assert geometry.grid_size == (4, 4) and geometry.patch_size == (14, 14)
    assert geometry.num_patches == 16 and geometry.num_tokens == 21
    assert geometry.image_size == (56, 56)
    assert geometry.mean == (0.5,) and geometry.std == (0.25,)
    # Frozen and hashable: a value, safe to share between calls.
    assert hash(geometry) == hash(analysis.ImageGeometry((4, 4), 5, (14, 14), (0.5,), (0.25,)))
    with pytest.raises(AttributeError):
        geometry.num_prefix_tokens = 1
    unknown = analysis.ImageGeometry()
    assert (unknown.grid_size, unknown.num_prefix_tokens, unknown.image_size) == (None, 1, None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid_size": (2, 2.5)}, "ImageGeometry: grid_size must be (h, w), an int or None"),
        ({"grid_size": (0, 3)}, "ImageGeometry: grid_size must be positive; got (0, 3)"),
        ({"num_prefix_tokens": -1}, "ImageGeometry: num_prefix_tokens must be an int >= 0"),
        ({"patch_size": 0}, "ImageGeometry: patch_size must be positive"),
        ({"std": [0.2, 0.0, 0.2]}, "ImageGeometry: std must hold one positive number per channel"),
    ],
)
def test_geometry_errors(kwargs, message):
    with pytest.raises(VisualizerError) as raised:
        analysis.ImageGeometry(**kwargs)
    assert message in str(raised.value)


def test_geometry_from_the_example_vit():
    torch = pytest.importorskip("torch")
    from examples.toy_vit import VisionTransformer

    model = VisionTransformer(img_size=(32, 48), patch_size=8, depth=1, num_registers=2)
    geometry = analysis.ImageGeometry.from_model(model)
    # By hand: 32/8 x 48/8 patches, CLS + 2 registers.
    assert (geometry.grid_size, geometry.num_prefix_tokens, geometry.patch_size) == (
        (4, 6),
        3,
        (8, 8),
    )
    # The oracle: the map the model computes has that many tokens.
    with torch.no_grad():
        tokens = model.patch_embed(torch.zeros(1, 3, 32, 48)).flatten(2).shape[-1]
    assert geometry.num_tokens == tokens + 3


def timm_like(**attributes):
    """A stand-in with timm VisionTransformer's attribute names (timm itself is not installed)."""
    from types import SimpleNamespace

    defaults = dict(
        patch_embed=SimpleNamespace(grid_size=(14, 14), patch_size=(16, 16), img_size=(224, 224)),
        cls_token=np.zeros((1, 1, 8)),
        reg_token=None,
        pretrained_cfg={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    )
    return SimpleNamespace(**{**defaults, **attributes})


@pytest.mark.parametrize(
    "attributes, grid, prefix",
    [
        ({}, (14, 14), 1),
        ({"reg_token": np.zeros((1, 4, 8))}, (14, 14), 5),  # registers, counted
        ({"cls_token": None}, (14, 14), 0),  # global pooling, no class token
        ({"num_prefix_tokens": 2, "dist_token": np.zeros((1, 1, 8))}, (14, 14), 2),  # declared
        ({"dist_token": np.zeros((1, 1, 8))}, (14, 14), 2),  # DeiT: CLS + distillation
    ],
)
def test_geometry_from_a_timm_like_model(attributes, grid, prefix):
    geometry = analysis.ImageGeometry.from_model(timm_like(**attributes))
    assert (geometry.grid_size, geometry.num_prefix_tokens, geometry.patch_size) == (
        grid,
        prefix,
        (16, 16),
    )
    assert geometry.mean == geometry.std == (0.5, 0.5, 0.5)


def test_geometry_from_a_model_run_at_another_size():
    geometry = analysis.ImageGeometry.from_model(timm_like(), image_size=(320, 160))
    assert geometry.grid_size == (20, 10) and geometry.image_size == (320, 160)


def test_geometry_from_model_says_what_it_looked_for():
    from types import SimpleNamespace

    with pytest.raises(VisualizerError) as raised:
        analysis.ImageGeometry.from_model(SimpleNamespace(weight=1))
    message = str(raised.value)
    assert message.startswith("ImageGeometry.from_model: cannot infer the patch grid of")
    for looked_for in ("model.config", "patch_embed.grid_size", "img_size", "patch_size"):
        assert looked_for in message
    no_prefix = SimpleNamespace(grid_size=(2, 2), patch_size=4)
    with pytest.raises(VisualizerError, match="looked for num_prefix_tokens, cls_token"):
        analysis.ImageGeometry.from_model(no_prefix)
    assert analysis.ImageGeometry.from_model(no_prefix, num_prefix_tokens=0).num_tokens == 4


HF_CASES = {
    # name: (config factory, model class, (grid, prefix, patch)) written out by hand
    "vit": ("ViTConfig", "ViTModel", ((4, 4), 1, (8, 8))),
    "deit": ("DeiTConfig", "DeiTModel", ((4, 4), 2, (8, 8))),
    "dinov2_registers": (
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersModel",
        ((4, 4), 5, (8, 8)),
    ),
}


def small_config(transformers, name, **extra):
    config = getattr(transformers, name)(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        **extra,
    )
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_geometry_from_hugging_face_models_matches_their_maps(case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_name, model_name, expected = HF_CASES[case]
    extra = {"num_register_tokens": 4} if case == "dinov2_registers" else {}
    model = getattr(transformers, model_name)(small_config(transformers, config_name, **extra))
    geometry = analysis.ImageGeometry.from_model(model.eval())
    assert (geometry.grid_size, geometry.num_prefix_tokens, geometry.patch_size) == expected
    # The oracle: transformers' own attention map has num_tokens rows.
    with torch.no_grad():
        outputs = model(pixel_values=torch.zeros(1, 3, 32, 32), output_attentions=True)
    assert outputs.attentions[0].shape[-1] == geometry.num_tokens
    assert analysis.cls_attention(outputs.attentions[0], geometry=geometry).shape == (
        1,
        2,
        *expected[0],
    )


def test_geometry_from_hugging_face_configs():
    transformers = pytest.importorskip("transformers")
    clip = transformers.CLIPConfig(
        vision_config=dict(image_size=64, patch_size=16), text_config=dict()
    )
    assert analysis.ImageGeometry.from_config(clip).num_tokens == 1 + 16  # via vision_config
    siglip = transformers.SiglipVisionConfig(image_size=64, patch_size=16)
    assert analysis.ImageGeometry.from_config(siglip).num_prefix_tokens == 0
    dinov2 = transformers.Dinov2Config(patch_size=14)  # built for 518, often run at 224
    assert analysis.ImageGeometry.from_config(dinov2, image_size=224).grid_size == (16, 16)
    with pytest.raises(VisualizerError) as raised:
        analysis.ImageGeometry.from_config(transformers.BertConfig())
    assert "looked for config.image_size and config.patch_size" in str(raised.value)
    assert "'bert'" in str(raised.value)
    swin = transformers.SwinConfig(image_size=32, patch_size=4)
    with pytest.raises(VisualizerError, match="model_type 'swin'.*pass num_prefix_tokens="):
        analysis.ImageGeometry.from_config(swin)
    assert analysis.ImageGeometry.from_config(swin, num_prefix_tokens=0).grid_size == (8, 8)


def test_geometry_and_explicit_arguments_are_two_spellings_of_one_call():
    geometry = analysis.ImageGeometry((2, 3), num_prefix_tokens=5, patch_size=(16, 8))
    explicit = dict(grid_size=(2, 3), num_prefix_tokens=5)
    attn = random_maps((2, 4, 11, 11))
    np.testing.assert_array_equal(
        analysis.cls_attention(attn, geometry=geometry), analysis.cls_attention(attn, **explicit)
    )
    np.testing.assert_array_equal(
        analysis.mean_attention_distance([attn], geometry=geometry),
        analysis.mean_attention_distance([attn], patch_size=(16, 8), **explicit),
    )
    rollout = analysis.attention_rollout([attn])
    np.testing.assert_array_equal(
        analysis.rollout_cls_attention(rollout, geometry=geometry),
        analysis.rollout_cls_attention(rollout, **explicit),
    )
    spiked = attn * 0.5
    spiked[..., 7] += 0.5
    found = analysis.find_artifact_tokens(spiked, geometry=geometry)
    assert [list(tokens) for tokens in found] == [[7], [7]]
    # Explicit values that agree with the geometry, or fill what it leaves None, are fine.
    analysis.cls_attention(attn, grid_size=(2, 3), geometry=geometry)
    filled = analysis.mean_attention_distance(
        attn, patch_size=(16, 8), geometry=analysis.ImageGeometry((2, 3), 5)
    )
    np.testing.assert_array_equal(
        filled, analysis.mean_attention_distance(attn, patch_size=(16, 8), **explicit)
    )


def test_geometry_patch_size_reaches_mean_attention_distance_by_hand():
    # The 1x2 hand case above: the neighbour is one 8 px wide patch away, for half the queries.
    attn = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    geometry = analysis.ImageGeometry((1, 2), num_prefix_tokens=0, patch_size=(16, 8))
    assert analysis.mean_attention_distance(attn, geometry=geometry)[0] == 4.0


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda geometry: analysis.cls_attention(
                random_maps((2, 11, 11)), num_prefix_tokens=1, geometry=geometry
            ),
            "cls_attention: num_prefix_tokens=1 conflicts with geometry.num_prefix_tokens=5; "
            "pass one of them",
        ),
        (
            lambda geometry: analysis.mean_attention_distance(
                random_maps((2, 11, 11)), patch_size=16, geometry=geometry
            ),
            "mean_attention_distance: patch_size=(16, 16) conflicts with "
            "geometry.patch_size=(16, 8)",
        ),
        (
            lambda geometry: analysis.rollout_cls_attention(
                np.eye(11), grid_size=3, geometry=geometry
            ),
            "rollout_cls_attention: grid_size=(3, 3) conflicts with geometry.grid_size=(2, 3)",
        ),
        (
            lambda geometry: analysis.cls_attention(random_maps((2, 11, 11)), geometry=(2, 3)),
            "cls_attention: geometry must be an ImageGeometry or None; got tuple",
        ),
    ],
)
def test_geometry_conflicting_with_an_explicit_argument_is_an_error(call, message):
    geometry = analysis.ImageGeometry((2, 3), num_prefix_tokens=5, patch_size=(16, 8))
    with pytest.raises(VisualizerError) as raised:
        call(geometry)
    assert message in str(raised.value)


def test_mass_in_boxes_takes_grid_and_image_size_from_the_geometry():
    cross = np.zeros((1, 1, 8))
    cross[0, 0, [0, 1]] = 0.5
    boxes = np.array([[0, 0, 10, 10]])
    features = analysis.ImageGeometry((2, 4), num_prefix_tokens=0, patch_size=10)
    np.testing.assert_allclose(
        analysis.attention_mass_in_boxes(cross, boxes, geometry=features), [[0.5]]
    )
    with pytest.raises(VisualizerError, match="feature-map cells only, with no prefix tokens"):
        analysis.attention_mass_in_boxes(cross, boxes, geometry=analysis.ImageGeometry((2, 4)))
    with pytest.raises(VisualizerError, match="image_size is required unless geometry has"):
        analysis.attention_mass_in_boxes(cross, boxes, grid_size=(2, 4))


# ------------------------------------------------------ calls are not layers

STACK_FUNCTIONS = {
    "mean_attention_distance": lambda maps, **kw: analysis.mean_attention_distance(maps, **kw),
    "attention_entropy": lambda maps, **kw: analysis.attention_entropy(maps, **kw),
    "attention_rollout": lambda maps, **kw: analysis.attention_rollout(maps, **kw),
    "gradient_rollout": lambda maps, **kw: analysis.gradient_rollout(
        maps, grads=[np.ones_like(np.asarray(layer)) for layer in maps], **kw
    ),
}


@pytest.mark.parametrize("name", sorted(STACK_FUNCTIONS))
def test_one_forward_passes_num_layers_unchanged(name):
    call = STACK_FUNCTIONS[name]
    forward = [random_maps((2, 3, 10, 10), seed=layer) for layer in range(3)]
    np.testing.assert_array_equal(call(forward, num_layers=3), call(forward))


@pytest.mark.parametrize("name", sorted(STACK_FUNCTIONS))
def test_two_forwards_of_a_model_are_refused_with_how_to_pick_one(name):
    call = STACK_FUNCTIONS[name]
    two_forwards = [random_maps((2, 3, 10, 10), seed=layer % 3) for layer in range(6)]
    with pytest.raises(VisualizerError) as raised:
        call(two_forwards, num_layers=3)
    message = str(raised.value)
    assert message.startswith(f"{name}: maps holds 6 maps for a model of num_layers=3: 2 forwards")
    assert "maps[-3:] is the last" in message
    # Following the advice works: the last forward is the three maps of one call each.
    np.testing.assert_array_equal(
        call(two_forwards[-3:], num_layers=3), call(two_forwards[:3])
    )


@pytest.mark.parametrize("name", sorted(STACK_FUNCTIONS))
def test_a_stack_that_is_no_whole_forward_is_refused(name):
    call = STACK_FUNCTIONS[name]
    partial = [random_maps((2, 3, 10, 10), seed=layer) for layer in range(4)]
    with pytest.raises(VisualizerError) as raised:
        call(partial, num_layers=3)
    assert "maps holds 4 maps, not a whole number of forwards of a model of num_layers=3" in str(
        raised.value
    )


@pytest.mark.parametrize("num_layers", [0, -2, 1.5, True])
def test_num_layers_must_be_a_positive_int(num_layers):
    with pytest.raises(VisualizerError, match="num_layers must be a positive int"):
        analysis.attention_entropy([random_maps((2, 4, 4))], num_layers=num_layers)


def test_num_layers_counts_the_layer_axis_of_a_stacked_array():
    stacked = np.stack([random_maps((1, 2, 5, 5), seed=layer) for layer in range(4)])
    assert analysis.attention_rollout(stacked, num_layers=4).shape == (1, 5, 5)
    with pytest.raises(VisualizerError, match="2 forwards"):
        analysis.attention_rollout(stacked, num_layers=2)
