"""capture_attention on transformers' own models, built small from configs, default settings.

The oracle is transformers itself: `output_attentions=True` of the same
weights loaded with `attn_implementation="eager"` (tests/hf_models.py maps each
returned tensor to the module path that computed it). For every model, with
the eager and the sdpa implementation: keys are exactly those module paths,
every entry is (B, H_query, Q, K) and equals the reference on every query row
that is not padding, and the model's outputs are bitwise the same with
capture on and off.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.hf_models import (  # noqa: E402
    CASES,
    llama_generate_case,
    reference_attentions,
    valid_rows_for,
)
from visualizer import analysis, capture_attention, get_local, plot  # noqa: E402
from visualizer.fused import sdpa_capture  # noqa: E402

IMPLEMENTATIONS = ["eager", "sdpa"]


pytestmark = pytest.mark.usefixtures("capture_left_off")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny forwards: torch's intra-op threads only add contention on 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors_of(output):
    """Every tensor in a transformers ModelOutput (or a tensor), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    found = []
    for value in output.values() if hasattr(output, "values") else output:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)) or hasattr(value, "values"):
            found.extend(tensors_of(value))
    return found


def max_difference(got, want, valid_rows):
    """Largest difference over the query rows that are not padding."""
    difference = (torch.as_tensor(got).double() - want.double()).abs()
    if valid_rows is not None:
        difference = difference[valid_rows[:, None, :].expand(-1, difference.shape[1], -1)]
    return difference.max().item()


@pytest.fixture(scope="module")
def references():
    """Module path -> eager output_attentions, per case: computed once."""
    found = {}
    for name, case in CASES.items():
        found[name] = reference_attentions(case, case.build("eager"), case.inputs())
    return found


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(CASES))
def test_maps_equal_output_attentions_and_outputs_are_unchanged(name, implementation, references):
    case = CASES[name]
    model, inputs = case.build(implementation), case.inputs()
    with torch.no_grad():
        plain = model(**inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # nothing to warn about here
            with capture_attention(model) as maps:
                captured = model(**inputs)
    plain, captured = tensors_of(plain), tensors_of(captured)
    assert len(plain) == len(captured) and all(map(torch.equal, plain, captured))
    assert sorted(maps) == sorted(case.paths())
    assert set(maps) <= dict(model.named_modules()).keys()
    tolerance = 1e-6 if implementation == "eager" else 1e-5
    for attribute, paths in case.references:
        valid_rows = valid_rows_for(case, inputs, attribute)
        for path in paths:
            (entry,) = maps[path]
            (want,) = references[name][path]
            assert entry.shape == tuple(want.shape), path
            difference = max_difference(entry, want, valid_rows)
            assert difference <= tolerance, f"{name} {path}: max difference {difference}"


@pytest.mark.parametrize("name", ["vit", "llama_gqa", "t5"])
def test_rows_and_heads_select_from_every_implementation(name):
    case = CASES[name]
    inputs = case.inputs()
    for implementation in IMPLEMENTATIONS:
        model = case.build(implementation)
        with torch.no_grad(), capture_attention(model) as full:
            model(**inputs)
        with torch.no_grad(), capture_attention(model, rows=0, heads=[1, 3]) as part:
            model(**inputs)
        for key in full:
            expected = np.asarray(full[key][0])[:, [1, 3], :1]
            np.testing.assert_allclose(part[key][0], expected, atol=1e-6)


def test_generate_with_a_padded_batch_and_grouped_query_attention():
    build, inputs, generation = llama_generate_case()
    captured = {}
    for implementation in IMPLEMENTATIONS:
        model = build(implementation)
        with torch.no_grad(), capture_attention(model) as maps:
            tokens = model.generate(**inputs, **generation)
        captured[implementation] = (tokens, maps)
    (eager_tokens, eager), (sdpa_tokens, sdpa) = captured["eager"], captured["sdpa"]
    assert torch.equal(eager_tokens, sdpa_tokens)
    assert list(sdpa) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    real = inputs["attention_mask"].bool()  # left padding: these query rows are real tokens
    for key in sdpa:
        # Prefill, then one query row per new token, with 4 QUERY heads: the
        # (B, Hkv, n_rep, S) packing of single-token GQA steps is undone.
        assert [entry.shape for entry in sdpa[key]] == [(2, 4, 8, 8), (2, 4, 1, 9), (2, 4, 1, 10)]
        prefill = max_difference(sdpa[key][0], torch.as_tensor(eager[key][0]), real)
        steps = max(np.abs(got - want).max() for got, want in zip(sdpa[key][1:], eager[key][1:]))
        assert prefill <= 1e-5 and steps <= 1e-5, (key, prefill, steps)


@pytest.mark.parametrize(
    "class_name, config, implementations",
    [
        ("BloomForCausalLM", dict(vocab_size=100, hidden_size=64, n_layer=2, n_head=4), ["eager"]),
        (
            "FalconForCausalLM",
            dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
            IMPLEMENTATIONS,
        ),
        ("MptForCausalLM", dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4), ["eager"]),
    ],
)
def test_models_that_compute_attention_inside_their_module(class_name, config, implementations):
    """Bloom, Falcon and MPT have no shared attention function; probabilities come back."""
    model_class = getattr(transformers, class_name)
    config_class = model_class.config_class
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    torch.manual_seed(0)
    eager = model_class._from_config(config_class(**config), attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True).attentions
    for implementation in implementations:
        torch.manual_seed(0)
        model = model_class._from_config(
            config_class(**config), attn_implementation=implementation
        ).eval()
        with torch.no_grad(), capture_attention(model) as maps:
            model(ids, attention_mask=mask)
        assert len(maps) == 2
        for entry, want in zip(maps.values(), reference):
            (entry,) = entry
            assert entry.shape == (2, 4, 6, 6)
            np.testing.assert_allclose(entry.sum(-1)[0], 1, atol=1e-5)  # probabilities
            difference = max_difference(entry, want, mask.bool())
            assert difference <= 1e-5, f"{class_name} {implementation}: {difference}"


def test_get_local_on_an_attention_function_the_model_never_calls_says_why():
    from transformers.models.vit import modeling_vit
    if not hasattr(modeling_vit, "eager_attention_forward"):
        pytest.skip(f"transformers {transformers.__version__}'s ViT has no module-level "
                    "eager_attention_forward (checked: 4.48.0 lacks it, 4.52.4 has it)")

    case = CASES["vit"]
    model = case.build("sdpa")  # transformers 5's default: eager_attention_forward never runs
    get_local("attn_weights")(modeling_vit.eager_attention_forward)
    get_local.activate()
    with torch.no_grad():
        model(**case.inputs())
    with pytest.warns(
        RuntimeWarning,
        match=r"get_local: nothing was captured for "
        r"eager_attention_forward: it is switched on, but no call of it was recorded .* "
        r"attn_implementation='sdpa'.*capture_attention\(model\)",
    ) as caught:
        entries = get_local.cache["eager_attention_forward"]
    assert entries == [] and caught[0].filename == __file__


def test_sdpa_capture_around_an_eager_model_says_nothing_was_recorded():
    case = CASES["bert"]
    model = case.build("eager")
    with pytest.warns(RuntimeWarning, match="none of them F.scaled_dot_product_attention"):
        with torch.no_grad(), sdpa_capture.capture():
            model(**case.inputs())


def test_flash_attention_implementation_is_named_at_entry():
    case = CASES["bert"]
    model = case.build("eager")
    model.config._attn_implementation = "flash_attention_2"  # as loading with it would set
    with pytest.warns(
        RuntimeWarning,
        match=r"module '' \(BertModel\) runs "
        r"attn_implementation='flash_attention_2'",
    ), pytest.warns(RuntimeWarning, match="nothing was captured: no module .* ran"):
        capture_attention(model).start().stop()


def test_maps_feed_analysis_and_plots():
    vit = CASES["vit"]
    model = vit.build("sdpa")
    images = vit.inputs()["pixel_values"]
    with torch.no_grad(), capture_attention(model) as maps:
        model(pixel_values=images)
    stack = maps.stack()  # (L, B, H, 17, 17): CLS + 4x4 patches of 8 px
    assert stack.shape == (2, 2, 4, 17, 17)
    assert analysis.mean_attention_distance(stack, grid_size=(4, 4), patch_size=8).shape == (2, 4)
    assert analysis.attention_rollout(stack).shape == (2, 17, 17)
    figure = plot.plot_cls_attention(stack[-1], images, grid_size=(4, 4), threshold=0.6)
    assert len(figure.axes) >= 4

    detr = CASES["detr"]
    model, inputs = detr.build("sdpa"), detr.inputs()
    with (
        torch.no_grad(),
        capture_attention(model, modules="model.decoder.layers.*.encoder_attn") as maps,
    ):
        model(**inputs)
    cross = maps["model.decoder.layers.1.encoder_attn"][0]  # (B, H, queries, 8*8 features)
    assert cross.shape == (2, 4, 10, 64)
    figure = plot.plot_cross_attention(cross, [0, 3], inputs["pixel_values"], grid_size=(8, 8))
    assert len(figure.axes) == 2 * (2 + 4)


def test_keys_follow_forward_order_and_unselected_modules_compute_nothing():
    case = CASES["t5"]
    model, inputs = case.build("sdpa"), case.inputs()
    with torch.no_grad(), capture_attention(model) as maps:
        model(**inputs)
    assert list(maps) == [
        "encoder.block.0.layer.0.SelfAttention",
        "encoder.block.1.layer.0.SelfAttention",
        "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.1.EncDecAttention",
        "decoder.block.1.layer.0.SelfAttention",
        "decoder.block.1.layer.1.EncDecAttention",
    ]
    # Row 7 exists in the encoder (8 tokens), not in the decoder (5): the
    # decoder is not selected, so its maps are not even computed.
    with torch.no_grad(), capture_attention(model, modules="encoder.*", rows=7) as maps:
        model(**inputs)
    assert list(maps) == case.paths()[:2]
    assert maps.stack().shape == (2, 2, 4, 1, 8)
