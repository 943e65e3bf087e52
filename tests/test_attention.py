"""capture_attention on torch's own modules and timm-style ones: maps, keys, outputs, messages.

Oracles: `nn.MultiheadAttention` with `need_weights=True,
average_attn_weights=False` (torch's own weights), attention computed by hand
from a module's projections, and the torch profiler (which native fast-path
kernel ran). Invariants: the model's outputs and gradients are bitwise the
same with capture on and off; keys are `named_modules()` names; every entry
is (B, H_query, Q, K).
"""

import contextlib
import math
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from examples.toy_vit import VisionTransformer  # noqa: E402
from visualizer import AttentionMaps, VisualizerError, capture_attention, get_local  # noqa: E402
from visualizer import _torch_internals, analysis  # noqa: E402
from visualizer.fused import sdpa_capture  # noqa: E402


pytestmark = pytest.mark.usefixtures("capture_left_off")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def as_tensor(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value.detach().cpu()


def assert_close(actual, expected, atol=1e-6, what="maps"):
    actual, expected = as_tensor(actual), as_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= atol, f"{what}: max difference {difference}"


def ran_kernels(run):
    """Names of the aten operators `run()` executed."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.name for event in profile.events()}


# -- a timm-style ViT: decorated forward, fused or explicit softmax ---------------------


def toy_vit(fused, depth=3):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=(16, 24), patch_size=4, dim=32, depth=depth, num_heads=4, fused=fused
    ).eval()


def by_hand(model, images):
    """Each block's softmax(q kᵀ scale), from its own projections and its input."""
    inputs = []
    handles = [
        block.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    maps = []
    for block, x in zip(model.blocks, inputs):
        attention = block.attn
        batch, tokens, dim = x.shape
        qkv = attention.qkv(x).reshape(batch, tokens, 3, attention.num_heads, -1)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        maps.append(((q @ k.transpose(-2, -1)) * attention.scale).softmax(-1))
    return maps


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_timm_style_vit_maps_by_block_path(fused):
    model = toy_vit(fused)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        plain = model(images)
        with capture_attention(model) as maps:
            captured = model(images)
    assert torch.equal(plain, captured)
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert set(maps) <= dict(model.named_modules()).keys()
    for key, expected in zip(maps, by_hand(model, images)):
        assert len(maps[key]) == 1
        assert maps[key][0].shape == (2, 4, 25, 25)
        assert_close(maps[key][0], expected, atol=2e-6, what=key)
    assert maps.stack().shape == (3, 2, 4, 25, 25)


def test_fused_and_explicit_paths_give_the_same_maps():
    images = torch.randn(2, 3, 16, 24)
    stacks = []
    for fused in (False, True):
        model = toy_vit(fused)
        with torch.no_grad(), capture_attention(model) as maps:
            model(images)
        stacks.append(maps.stack())
    assert_close(stacks[0], stacks[1], atol=1e-5, what="explicit vs fused")


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_rows_and_heads_are_rows_and_heads_of_the_full_maps(fused):
    model = toy_vit(fused)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad(), capture_attention(model) as full:
        model(images)
    for rows, heads, row_index, head_index in [
        (0, None, [0], slice(None)),
        ([0, -1], [1, 3], [0, 24], [1, 3]),
        (slice(2, 5), 2, [2, 3, 4], [2]),
    ]:
        with torch.no_grad(), capture_attention(model, rows=rows, heads=heads) as part:
            model(images)
        for key in full:
            expected = as_tensor(full[key][0])[:, head_index][:, :, row_index]
            assert_close(part[key][0], expected, atol=1e-6, what=f"{key} rows={rows} heads={heads}")


def test_cls_row_on_the_fused_path_never_forms_the_full_matrix():
    model = toy_vit(fused=True, depth=1)
    images = torch.randn(1, 3, 16, 24)
    shapes = []

    # Every matmul the recomputation runs goes through torch.matmul.
    original = torch.matmul

    def spy(a, b, **kwargs):
        result = original(a, b, **kwargs)
        shapes.append(tuple(result.shape))
        return result

    torch.matmul = spy
    try:
        with torch.no_grad(), capture_attention(model, rows=0) as maps:
            model(images)
    finally:
        torch.matmul = original
    assert maps["blocks.0.attn"][0].shape == (1, 4, 1, 25)
    assert (1, 4, 25, 25) not in shapes and (1, 4, 1, 25) in shapes


def test_outputs_and_gradients_are_bitwise_unchanged_in_training():
    model = toy_vit(fused=True).train()
    images = torch.randn(2, 3, 16, 24)
    model(images).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    recorder = capture_attention(model)
    recorder.start()
    try:
        model(images).sum().backward()
    finally:
        recorder.stop()
    assert all(torch.equal(a, b.grad) for a, b in zip(plain, model.parameters()))
    assert not recorder.is_active and len(recorder.maps) == 3
    recorder.start()
    with torch.no_grad():
        model(images)
    recorder.stop()
    assert [len(calls) for calls in recorder.maps.values()] == [2, 2, 2]


# -- get_local on a module's forward: the user says what the map is ----------------------


class SigmoidAttention(nn.Module):
    """Attention without a softmax: only the decorator says where the map is."""

    def __init__(self, dim=16, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, 2 * dim)

    @get_local("gates")
    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k = self.qk(x).reshape(batch, tokens, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        gates = torch.sigmoid(q @ k.transpose(-2, -1))
        return (gates @ x.unsqueeze(1)).mean(1)


def test_decorated_forward_without_softmax_gives_what_get_local_captured():
    model = nn.Sequential(SigmoidAttention(), SigmoidAttention())
    x = torch.randn(2, 5, 16)
    get_local.activate()
    with torch.no_grad(), capture_attention(model, rows=[1]) as maps:
        model(x)
    # get_local's own cache keeps its entries, whole: they are read, not taken.
    user_entries = get_local.cache["SigmoidAttention.forward"]
    assert [entry.shape for entry in user_entries] == [(2, 2, 5, 5)] * 2
    assert list(maps) == ["0", "1"]
    hidden = x
    for index, layer in enumerate(model):
        q, k = layer.qk(hidden).reshape(2, 5, 2, 2, -1).permute(2, 0, 3, 1, 4)
        expected = torch.sigmoid(q @ k.transpose(-2, -1))[:, :, 1:2]
        assert_close(maps[str(index)][0], expected, what=f"layer {index}")
        hidden = layer(hidden)


def test_decorated_forward_is_read_only_while_get_local_is_on():
    model = nn.Sequential(SigmoidAttention())
    with pytest.warns(
        RuntimeWarning,
        match=r"module '0' computed no softmax or SDPA attention; "
        r"its forward SigmoidAttention.forward is decorated with get_local, which "
        r"is off. Switch it on \(get_local.activate\(\)\)",
    ), pytest.warns(RuntimeWarning, match=r"the Sequential ran .* no attention was captured"):
        with torch.no_grad(), capture_attention(model) as maps:
            model(torch.randn(1, 5, 16))
    assert not maps


class Mixer(nn.Module):
    """A decorated forward whose captured name is not an attention map."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)

    @get_local("out")
    def forward(self, x):
        out = x + self.mix(x)
        return out


def test_decorated_forward_holding_no_map_says_so():
    model = Mixer()
    get_local.activate()
    with pytest.warns(RuntimeWarning) as caught, capture_attention(model) as maps:
        model(torch.randn(2, 3, 8))
    messages = [str(w.message) for w in caught]
    assert any(
        "Mixer.forward is decorated with get_local, but its first captured name held a "
        "ndarray of shape (2, 3, 8), not a (B, H, Q, K) attention map; nothing was "
        "recorded for ''" in m
        for m in messages
    ), messages
    assert any("but no attention was captured" in m for m in messages), messages
    assert not maps


# -- nn.MultiheadAttention and the encoder layer: fast paths kept ---------------------


def mha_reference(module, query, key, value, **masks):
    with torch.no_grad():
        weights = module(query, key, value, need_weights=True, average_attn_weights=False, **masks)[
            1
        ]
    return weights.unsqueeze(0) if weights.dim() == 3 else weights


def test_multihead_attention_fast_path_is_kept_and_recomputed():
    module = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = module(x, x, x, need_weights=False)[0]
        maps = {}

        def captured():
            with capture_attention(module) as found:
                maps["output"] = module(x, x, x, need_weights=False)[0]
            maps.update(found)

        kernels = ran_kernels(captured)
    assert "aten::_native_multi_head_attention" in kernels, "capture pushed MHA off its fast path"
    assert torch.equal(plain, maps["output"])
    assert_close(maps[""][0], mha_reference(module, x, x, x))


MHA_CASES = {
    "batch_first, key padding": (
        dict(embed_dim=16, num_heads=4, batch_first=True),
        lambda: (torch.randn(2, 5, 16),) * 3,
        lambda: dict(key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2])),
    ),
    "causal bool mask": (
        dict(embed_dim=16, num_heads=4, batch_first=True),
        lambda: (torch.randn(2, 5, 16),) * 3,
        lambda: dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1)),
    ),
    "float (B*H, L, S) mask": (
        dict(embed_dim=16, num_heads=4, batch_first=True),
        lambda: (torch.randn(2, 5, 16),) * 3,
        lambda: dict(attn_mask=torch.randn(8, 5, 5)),
    ),
    "sequence-first, kdim/vdim, bias_kv, zero_attn, no bias": (
        dict(
            embed_dim=16,
            num_heads=4,
            kdim=8,
            vdim=12,
            bias=False,
            add_bias_kv=True,
            add_zero_attn=True,
        ),
        lambda: (torch.randn(5, 2, 16), torch.randn(7, 2, 8), torch.randn(7, 2, 12)),
        lambda: dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)),
    ),
    "unbatched": (
        dict(embed_dim=16, num_heads=2),
        lambda: (torch.randn(4, 16),) * 3,
        lambda: {},
    ),
}


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_weights_equal_torch_weights(case, training, need_weights):
    options, make_inputs, make_masks = MHA_CASES[case]
    module = nn.MultiheadAttention(**options, dropout=0.0).train(training)
    inputs, masks = make_inputs(), make_masks()
    plain = module(*inputs, need_weights=need_weights, **masks)[0]
    with capture_attention(module) as maps:
        output = module(*inputs, need_weights=need_weights, **masks)[0]
    assert torch.equal(plain, output)
    assert list(maps) == [""]
    assert_close(maps[""][0], mha_reference(module, *inputs, **masks), atol=1e-6)


def test_encoder_layer_fast_path_is_kept_and_maps_go_to_self_attn():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    results = {}
    with torch.no_grad():
        plain = layer(x)

        def captured():
            with capture_attention(layer) as maps:
                results["output"] = layer(x)
            results["maps"] = maps

        kernels = ran_kernels(captured)
    assert "aten::_transformer_encoder_layer_fwd" in kernels
    assert torch.equal(plain, results["output"])
    assert list(results["maps"]) == ["self_attn"]
    assert_close(results["maps"]["self_attn"][0], mha_reference(layer.self_attn, x, x, x))


def test_norm_first_encoder_and_decoder_layers_off_the_fast_path():
    torch.manual_seed(0)
    model = nn.Transformer(
        16,
        2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=True,
        norm_first=True,
    ).eval()
    source, target = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        plain = model(source, target)
        with capture_attention(model) as maps:
            output = model(source, target)
    assert torch.equal(plain, output)
    assert list(maps) == [
        "encoder.layers.0.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn",
    ]
    encoder_in = model.encoder.layers[0].norm1(source)
    assert_close(
        maps["encoder.layers.0.self_attn"][0],
        mha_reference(model.encoder.layers[0].self_attn, encoder_in, encoder_in, encoder_in),
    )
    assert maps["decoder.layers.0.multihead_attn"][0].shape == (2, 2, 4, 6)


def test_nested_tensor_encoder_says_it_cannot_be_captured():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own nested-tensor prototype notice
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = encoder(x, src_key_padding_mask=padding)
        with capture_attention(encoder) as maps:
            output = encoder(x, src_key_padding_mask=padding)
    assert torch.equal(plain, output)
    messages = [str(w.message) for w in caught if "capture_attention" in str(w.message)]
    assert any(
        "ran on nested tensors" in m and "enable_nested_tensor=False" in m for m in messages
    ), messages
    assert any("but no attention was captured" in m for m in messages), messages
    assert not maps


class FunctionalMultiHead(nn.Module):
    """Code that calls F.multi_head_attention_forward itself (no MultiheadAttention module)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.MultiheadAttention(16, 4)

    def forward(self, x):
        inner = self.inner
        return F.multi_head_attention_forward(
            x,
            x,
            x,
            16,
            4,
            inner.in_proj_weight,
            inner.in_proj_bias,
            None,
            None,
            False,
            0.0,
            inner.out_proj.weight,
            inner.out_proj.bias,
            training=False,
            need_weights=False,
        )[0]


def test_functional_multi_head_attention_call_is_recorded():
    model = FunctionalMultiHead().eval()
    x = torch.randn(5, 2, 16)
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    assert list(maps) == [""]
    assert_close(maps[""][0], mha_reference(model.inner, x, x, x))


# -- selection, storage, stacking ----------------------------------------------------


def test_modules_glob_selects_and_submodule_maps_go_to_the_selected_ancestor():
    model = toy_vit(fused=True)
    images = torch.randn(1, 3, 16, 24)
    with torch.no_grad(), capture_attention(model, modules="blocks.[02].attn") as maps:
        model(images)
    assert list(maps) == ["blocks.0.attn", "blocks.2.attn"]
    with torch.no_grad(), capture_attention(model, modules=["blocks.1"]) as maps:
        model(images)
    assert list(maps) == ["blocks.1"]  # computed in blocks.1.attn, recorded for blocks.1
    assert maps["blocks.1"][0].shape == (1, 4, 25, 25)


def test_storage_policy_and_bound():
    model = toy_vit(fused=True, depth=2)
    images = torch.randn(1, 3, 16, 24)
    with torch.no_grad(), capture_attention(model, keep_on_device=True, dtype="float16") as maps:
        model(images)
    entry = maps["blocks.0.attn"][0]
    assert isinstance(entry, torch.Tensor) and entry.dtype == torch.float16
    assert isinstance(maps.stack(), torch.Tensor)
    with pytest.warns(
        RuntimeWarning, match=r"'blocks.0.attn' hold at most 2 entries \(max_entries\)"
    ), pytest.warns(
        RuntimeWarning, match=r"'blocks.1.attn' hold at most 2 entries \(max_entries\)"
    ):
        with torch.no_grad(), capture_attention(model, max_entries=2) as maps:
            for _ in range(5):
                model(images)
    assert [len(calls) for calls in maps.values()] == [2, 2]
    assert maps.dropped == {"blocks.0.attn": 3, "blocks.1.attn": 3}
    assert isinstance(maps["blocks.0.attn"][0], np.ndarray)


def test_stack_separates_calls_from_layers():
    model = toy_vit(fused=True, depth=2)
    first, second = torch.randn(1, 3, 16, 24), torch.randn(1, 3, 16, 24)
    with torch.no_grad(), capture_attention(model) as maps:
        model(first)
        model(second)
    with pytest.raises(
        VisualizerError,
        match=r"'blocks.0.attn' has 2 calls, expected one per "
        r"module .* pass call=i",
    ):
        maps.stack()
    with torch.no_grad(), capture_attention(model) as only_second:
        model(second)
    np.testing.assert_array_equal(maps.stack(call=-1), only_second.stack())
    np.testing.assert_array_equal(maps.stack(modules="blocks.1*", call=1), only_second.stack()[1:])
    with pytest.raises(
        VisualizerError, match="call=5 is out of range for 'blocks.0.attn', which has 2 calls"
    ):
        maps.stack(call=5)
    with pytest.raises(VisualizerError, match="modules='decoder.*' matched none of the 2 keys"):
        maps.stack(modules="decoder.*")
    mixed = AttentionMaps()
    mixed["encoder"] = [np.zeros((1, 2, 3, 3))]
    mixed["cross"] = [np.zeros((1, 2, 4, 3))]
    with pytest.raises(
        VisualizerError,
        match=r"different shapes .*encoder: \(1, 2, 3, 3\), "
        r"cross: \(1, 2, 4, 3\).*modules=",
    ):
        mixed.stack()


def test_stack_feeds_analysis():
    model = VisionTransformer(
        img_size=(16, 24), patch_size=4, dim=32, depth=3, num_heads=4, num_registers=2, fused=True
    ).eval()
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad(), capture_attention(model) as maps:
        model(images)
    stack = maps.stack()
    distances = analysis.mean_attention_distance(
        stack, grid_size=(4, 6), patch_size=4, num_prefix_tokens=3
    )
    assert distances.shape == (3, 4)
    rollout = analysis.attention_rollout(stack)
    assert rollout.shape == (2, 27, 27)
    cls = analysis.cls_attention(stack[-1], grid_size=(4, 6), num_prefix_tokens=3)
    assert cls.shape == (2, 4, 4, 6)


# -- errors and warnings: named, and never silently empty ----------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: capture_attention("model"),
            "capture_attention: model must be a torch.nn.Module; got str",
        ),
        (
            lambda m: capture_attention(m, modules="decoder.*"),
            r"modules='decoder.\*' matches none of the model's 14 module paths; expected a glob "
            r"over names such as \['patch_embed', 'blocks'",
        ),
        (
            lambda m: capture_attention(m, modules=[3]),
            "modules must be a glob or a non-empty list of globs",
        ),
        (
            lambda m: capture_attention(m, rows="cls"),
            "capture_attention: rows must be None, an int, a slice or a sequence of ints; "
            "got 'cls'",
        ),
        (
            lambda m: capture_attention(m, heads=[]),
            "capture_attention: heads must select at least one index",
        ),
        (
            lambda m: capture_attention(m, dtype="float17"),
            "capture_attention: dtype must name a dtype numpy and torch can both store",
        ),
        (
            lambda m: capture_attention(m, max_entries=0),
            "capture_attention: max_entries must be a positive int",
        ),
    ],
)
def test_bad_arguments_are_named(call, message):
    model = toy_vit(fused=True, depth=1)
    with pytest.raises(VisualizerError, match=message):
        call(model)


def test_selection_out_of_range_names_the_module_and_leaves_no_hooks():
    model = toy_vit(fused=True, depth=1)
    with pytest.raises(
        VisualizerError,
        match=r"capture_attention: rows=30 is out of range for "
        r"the 25 query rows of the attention computed in module 'blocks.0.attn'",
    ):
        with torch.no_grad(), capture_attention(model, rows=30):
            model(torch.randn(1, 3, 16, 24))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_start_twice_is_an_error():
    recorder = capture_attention(toy_vit(fused=True, depth=1))
    recorder.start()
    try:
        with pytest.raises(VisualizerError, match="already started"):
            recorder.start()
    finally:
        with pytest.warns(RuntimeWarning, match="nothing was captured: no module .* ran"):
            recorder.stop()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_start_that_fails_part_way_leaves_nothing_behind():
    # The warning about a TorchScript submodule, turned into an error, stops
    # start() half way: no hook may stay on the model, and the recorder must
    # be stoppable and startable again.
    class WithScripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.scripted = torch.jit.script(torch.nn.Linear(8, 8))

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = WithScripted()
    recorder = capture_attention(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="TorchScript"):
            recorder.start()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert hooks == 0 and get_local.store.fused_recorders == 0
    recorder.stop()  # a no-op, not an AttributeError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with capture_attention(model) as maps, torch.no_grad():
            model(torch.randn(1, 3, 8))
    assert list(maps) == ["attn"]


def test_model_not_run_in_the_block_warns():
    model = toy_vit(fused=True, depth=1)
    with (
        pytest.warns(
            RuntimeWarning,
            match=r"nothing was captured: no module of the "
            r"VisionTransformer ran while recording \(call the model inside the block\)",
        ) as caught,
        capture_attention(model),
    ):
        pass
    assert caught[0].filename == __file__


def test_model_without_attention_warns_with_what_was_searched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with (
        pytest.warns(
            RuntimeWarning,
            match=r"the Sequential ran \(3 module calls\) but no "
            r"attention was captured. Searched all 3 modules for "
            r"F.scaled_dot_product_attention calls, softmax over the last axis",
        ) as caught,
        capture_attention(model),
    ):
        model(torch.randn(2, 4))
    assert caught[0].filename == __file__


class FlashAttention(nn.Module):
    def forward(self, x):
        return flash_attn_func(x, x, x)  # noqa: F821 - never called


class Configured(nn.Module):
    def __init__(self, implementation):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()
        self.attn = FlashAttention()

    def forward(self, x):
        return x


def test_modules_that_cannot_be_seen_are_named_at_entry():
    model = Configured("flash_attention_2")
    with pytest.warns(RuntimeWarning) as caught, capture_attention(model):
        model(torch.randn(1))
    messages = [str(w.message) for w in caught]
    assert any(
        "module '' (Configured) runs attn_implementation='flash_attention_2'" in m
        and "attn_implementation='sdpa' or 'eager'" in m
        for m in messages
    ), messages
    assert any(
        "module 'attn' (FlashAttention) calls flash_attn_func (flash-attn or xformers)" in m
        for m in messages
    ), messages
    assert any("Modules whose attention cannot be seen: ['', 'attn']" in m for m in messages)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_module_is_named_at_entry():
    scripted = torch.jit.script(nn.MultiheadAttention(8, 2))
    model = nn.ModuleDict({"scripted": scripted})
    with pytest.warns(RuntimeWarning) as caught:
        capture_attention(model).start().stop()
    messages = [str(w.message) for w in caught]
    assert messages[0] == (
        "capture_attention: module 'scripted' (RecursiveScriptModule) is TorchScript, which runs "
        "no Python code; its attention cannot be captured"
    )
    assert not any("scripted.out_proj" in m for m in messages), messages
    assert all(w.filename == __file__ for w in caught)


def test_sdpa_capture_and_capture_attention_record_together():
    model = toy_vit(fused=True, depth=2)
    images = torch.randn(1, 3, 16, 24)
    with (
        torch.no_grad(),
        sdpa_capture.capture(rows=0) as cache,
        capture_attention(model, rows=0) as maps,
    ):
        model(images)
    assert len(cache["Attention.forward"]) == 2
    for index, key in enumerate(maps):
        np.testing.assert_array_equal(maps[key][0], cache["Attention.forward"][index])


def test_capture_in_two_threads_keeps_each_threads_calls():
    import threading

    model = toy_vit(fused=True, depth=2)
    images = [torch.randn(1, 3, 16, 24) for _ in range(2)]
    with torch.no_grad(), capture_attention(model) as maps:
        threads = [threading.Thread(target=model, args=(x,)) for x in images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [len(calls) for calls in maps.values()] == [2, 2]
    for key, layer in zip(maps, range(2)):
        expected = [by_hand(model, x)[layer].detach().numpy() for x in images]
        matches = [
            [np.allclose(entry, want, atol=1e-5) for want in expected] for entry in maps[key]
        ]
        assert sorted(row.index(True) for row in matches) == [0, 1], f"{key}: {matches}"


def test_sdpa_capture_on_an_eager_model_says_nothing_was_recorded():
    model = toy_vit(fused=False, depth=1)
    with pytest.warns(
        RuntimeWarning,
        match=r"sdpa_capture: \d+ torch function calls ran while "
        r"it was on, none of them F.scaled_dot_product_attention",
    ) as caught:
        with torch.no_grad(), sdpa_capture.capture() as cache:
            model(torch.randn(1, 3, 16, 24))
    assert caught[0].filename == __file__
    assert not any(cache.values())


class BatchedHeads(nn.Module):
    """Old-style attention: one (B*H, Q, K) softmax; the module says H."""

    num_heads = 2

    def forward(self, q, k):
        return torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1)


def test_three_dimensional_softmax_is_split_by_the_modules_head_count():
    model = BatchedHeads()
    q, k = torch.randn(6, 3, 4), torch.randn(6, 5, 4)
    with capture_attention(model) as maps:
        expected = model(q, k)
    assert_close(maps[""][0], expected.reshape(3, 2, 3, 5))


class ChangesItsMapInPlace(nn.Module):
    """Uses its softmax output, then overwrites it in place (as an in-place dropout would)."""

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        out = attn @ v
        attn.zero_()
        return out


@pytest.mark.parametrize("rows", [None, 0])
def test_entries_are_snapshots_of_the_models_tensors(rows):
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    model = ChangesItsMapInPlace()
    with capture_attention(model, rows=rows) as maps:
        model(q, k, v)
    expected = (q @ k.transpose(-2, -1)).softmax(-1)
    assert_close(maps[""][0], expected if rows is None else expected[:, :, :1])


@pytest.mark.skipif(
    not _torch_internals.has(_torch_internals.SET_STANCE),
    reason="capturing compiled models needs torch.compiler.set_stance, new in torch 2.6"
)
@pytest.mark.parametrize("compiled_before", [True, False], ids=["warm", "first call inside"])
@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_compiled_model_gives_eager_maps_without_the_wrapper_prefix(fused, compiled_before):
    model = toy_vit(fused)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad(), capture_attention(model) as expected:
        model(images)
    compiled = torch.compile(model, backend="eager")
    # Where torch's Dynamo cannot record inside the graph, the compiled model runs
    # eagerly while recording, and says so naming the torch it needs.
    in_graph = _torch_internals.has(_torch_internals.IN_GRAPH_CAPTURE)
    fallback = contextlib.nullcontext() if in_graph else pytest.warns(
        RuntimeWarning, match=r"runs eagerly while recording: recording inside compiled graphs"
        rf".* needs torch>=2\.11; this is torch {re.escape(torch.__version__)}"
    )
    with torch.no_grad():
        if compiled_before:
            compiled(images)
        with fallback, capture_attention(compiled) as maps:
            output = compiled(images)
        assert torch.equal(output, model(images))
    assert list(maps) == list(expected)  # no "_orig_mod." prefix
    for key in expected:
        np.testing.assert_array_equal(maps[key][0], expected[key][0])
    assert torch._dynamo.eval_frame._stance.stance == "default"  # compiled again afterwards


@pytest.mark.skipif(
    _torch_internals.has(_torch_internals.SET_STANCE), reason="torch>=2.6 captures compiled models"
)
def test_compiled_model_on_torch_before_2_6_is_refused_naming_both_versions():
    compiled = torch.compile(toy_vit(False), backend="eager")
    message = (
        "capture_attention: cannot capture a torch.compile'd model (it runs its Python only under "
        f"a Dynamo stance): torch.compiler.set_stance needs torch>=2.6; this is torch "
        f"{torch.__version__}. Capture the model itself, before torch.compile"
    )
    with pytest.raises(VisualizerError, match=re.escape(message)):
        capture_attention(compiled)
