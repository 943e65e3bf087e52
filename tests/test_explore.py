"""explore(): what the page embeds, checked in Python against the maps (the browser side is
tests/test_explore_browser.py).

The page's data is decoded here by tests/explore_cases.payload, written from
the encoding's definition, not by the module's own decoder.
"""
import doctest
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.explore_cases import (  # noqa: E402
    BOUND_PER_ROW_MAX,
    bart_case,
    detr_case,
    payload,
    softmax_maps,
    vit_case,
)
from visualizer import AttentionMaps, VisualizerError, explore, get_local  # noqa: E402
from visualizer.analysis import ImageGeometry, attention_rollout  # noqa: E402
from visualizer.explorer import ERROR_BOUND_PER_ROW_MAX, decode_rows, encode_rows  # noqa: E402


@pytest.fixture(scope="module")
def vit():
    return vit_case()


def assert_within_bound(shown, original):
    """Every shown value within the page's stated bound of the captured one."""
    original = np.asarray(original, dtype=np.float64)
    bound = original.max(axis=-1, keepdims=True) * BOUND_PER_ROW_MAX
    error = np.abs(np.asarray(shown) - original)
    assert (error <= bound).all(), f"max error {error.max():.3g} over bound {bound.max():.3g}"


# ------------------------------------------------------------------ encoding


def test_encoding_keeps_every_value_within_the_stated_bound_and_zeros_exact():
    rows = softmax_maps((6, 50, 300), sharpness=4.0).astype(np.float64)
    rows[:, :, 250:] = 0.0  # masked keys
    rows[0, 0] = 0.0  # a fully masked row
    codes, peaks = encode_rows(rows)
    shown = decode_rows(codes, peaks)
    assert codes.dtype == np.uint8 and peaks.dtype == np.float32
    assert_within_bound(shown, rows)
    assert (shown[rows == 0] == 0).all() and (codes[rows == 0] == 0).all()
    assert (codes[rows > 0] >= 1).all()  # a tiny weight is never shown as masked
    # The bound is tight: half a step of 254, reached by some value.
    worst = (np.abs(shown - rows) / rows.max(axis=-1, keepdims=True).clip(1e-30)).max()
    assert 0.9 * ERROR_BOUND_PER_ROW_MAX < worst <= ERROR_BOUND_PER_ROW_MAX + 1e-6


def test_the_page_embeds_every_layer_head_and_row_within_the_bound(vit):
    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    data = payload(page.html)
    names = list(vit.maps)
    assert page.layer_names == names + ["rollout (mean of heads, 3 layers)"]
    assert [layer["name"] for layer in data["layers"]] == page.layer_names
    for layer in data["layers"][:3]:
        original = vit.maps[layer["name"]][0][0]  # (H, Q, K) of item 0
        assert layer["kind"] == "image" and layer["grid"] == [8, 8]
        assert layer["heads"] == [0, 1, 2, 3] and layer["rows"] == list(range(67))
        assert_within_bound(layer["values"], original)
    assert data["prefix"] == 3
    assert page.error_bound <= ERROR_BOUND_PER_ROW_MAX


def test_rollout_is_the_analysis_rollout_of_the_layers(vit):
    data = payload(explore(vit.maps, image=vit.image, geometry=vit.geometry).html)
    rollout = data["layers"][-1]
    expected = attention_rollout([vit.maps[name][0] for name in vit.maps])[0]  # (N, N)
    assert rollout["heads"] == [-1]
    assert_within_bound(rollout["values"][0], expected)


# ------------------------------------------------------------------ input forms


def layer_values(page):
    return [layer["values"] for layer in payload(page.html)["layers"]]


def test_every_input_form_gives_the_same_page_data(vit):
    stack = vit.maps.stack()  # (L, B, H, N, N) numpy
    reference = layer_values(explore(vit.maps, rollout=False))
    forms = {
        "list of per-call maps": [vit.maps[name][0] for name in vit.maps],
        "(L, B, H, Q, K)": stack,
        "(L, H, Q, K)": stack[:, 0],
        "torch float32": torch.from_numpy(stack),
        "torch bfloat16 with grad": torch.from_numpy(stack).bfloat16().requires_grad_(),
        "torch float16": torch.from_numpy(stack).half(),
        "get_local cache dict": {"Attention.forward": [vit.maps[name][0] for name in vit.maps]},
    }
    for form, maps in forms.items():
        values = layer_values(explore(maps, rollout=False))
        assert len(values) == 3, form
        low_precision = "16" in form
        for got, want in zip(values, reference):
            # bf16/fp16 inputs differ from the float32 maps by their own rounding.
            tolerance = 0.01 if low_precision else 1e-6
            np.testing.assert_allclose(got, want, atol=tolerance, err_msg=form)
    single = layer_values(explore(stack[0, 0]))  # (H, Q, K)
    np.testing.assert_allclose(single[0], reference[0], atol=1e-6)


def test_layer_names_are_module_paths_and_calls():
    maps = AttentionMaps()
    maps["encoder.0.attn"] = [softmax_maps((1, 2, 4, 4), 0), softmax_maps((1, 2, 4, 4), 1)]
    maps["decoder.0.attn"] = [softmax_maps((1, 2, 4, 4), 2)]
    page = explore(maps)
    calls = ["encoder.0.attn [call 0]", "encoder.0.attn [call 1]"]
    assert page.layer_names == [*calls, "decoder.0.attn"]
    assert explore(maps, layers="decoder.*").layer_names == ["decoder.0.attn"]
    assert explore(maps, layers=[2, 0]).layer_names == ["encoder.0.attn [call 0]", "decoder.0.attn"]


def test_batch_heads_and_rows_select_what_is_embedded(vit):
    maps = softmax_maps((2, 3, 4, 10, 10))
    data = payload(explore(maps, batch=1, heads=[3, 1], rows=[0, 5]).html)
    for index, layer in enumerate(data["layers"]):
        assert layer["heads"] == [1, 3] and layer["rows"] == [0, 5]
        assert_within_bound(layer["values"], maps[index, 1][[1, 3]][:, [0, 5]])


def test_a_cls_row_capture_is_shown_as_the_rows_it_has():
    case = vit_case(rows=0)  # (B, H, 1, N)
    page = explore(case.maps, image=case.image, geometry=case.geometry)
    data = payload(page.html)
    assert page.layer_names == list(case.maps)  # no rollout without full maps
    for layer in data["layers"]:
        assert layer["kind"] == "image" and layer["rows"] == [0]
        assert_within_bound(layer["values"], case.maps[layer["name"]][0][0])


def test_views_follow_the_inputs():
    pytest.importorskip("transformers")
    bart = bart_case()
    page = explore(bart.maps, tokens=bart.tokens, query_tokens=bart.query_tokens, batch=1)
    data = payload(page.html)
    labels = {layer["name"]: (layer["queryLabels"], layer["keyLabels"]) for layer in data["layers"]}
    assert set(page.views) == {"tokens"}
    assert labels["model.encoder.layers.0.self_attn"] == ("tokens", "tokens")
    assert labels["model.decoder.layers.0.self_attn"] == ("query_tokens", "query_tokens")
    assert labels["model.decoder.layers.0.encoder_attn"] == ("query_tokens", "tokens")
    detr = detr_case()
    page = explore(detr.maps, image=detr.image, geometry=detr.geometry, boxes=detr.boxes)
    views = dict(zip(page.layer_names, page.views))
    assert views["encoder.layers.0.self_attn"] == "image"
    assert views["decoder.0.cross_attn"] == "cross"
    assert views["decoder.0.self_attn"] == "tokens"
    assert payload(page.html)["boxes"] == detr.boxes.tolist()


# ------------------------------------------------------------------ bad input


def error_of(call, name):
    try:
        call()
    except VisualizerError as error:
        return str(error)
    pytest.fail(f"{name}: no VisualizerError")


def test_bad_input_is_refused_saying_what_was_expected_and_got(vit):
    maps = softmax_maps((2, 1, 2, 5, 5))
    cases = {
        "shape": (lambda: explore(np.ones((5, 5)) / 5), ["(H, Q, K)", "got shape (5, 5)"]),
        "entry shape": (lambda: explore([np.ones((2, 5)) / 5]), ["(B, H, Q, K)", "(2, 5)"]),
        "tokens": (lambda: explore(maps, tokens=["a", "b"]), ["5 keys", "tokens has 2"]),
        "nan": (lambda: explore(np.full((1, 3, 3), np.nan)), ["NaN", "expected attention"]),
        "negative": (lambda: explore(np.full((1, 3, 3), -0.1)), ["-0.1", "expected post-softmax"]),
        "empty": (lambda: explore(AttentionMaps()), ["no attention map", "empty AttentionMaps"]),
        "empty list": (lambda: explore([]), ["no attention map", "empty list"]),
        "batch": (lambda: explore(maps, batch=1), ["batch", "[-1, 1)", "got 1"]),
        "layers": (lambda: explore(maps, layers="enc*"), ["matches none", "layer 0"]),
        "heads": (lambda: explore(maps, heads=[5]), ["heads", "got 5"]),
        "image size": (
            lambda: explore(vit.maps, image=torch.zeros(1, 3, 40, 32), geometry=vit.geometry),
            ["32x32 pixels", "got 40x32"],
        ),
        "image aspect": (
            lambda: explore(vit.maps, image=np.zeros((64, 32, 3)), geometry=ImageGeometry(8, 3)),
            ["aspect", "got 64x32"],
        ),
        "image unused": (
            lambda: explore(vit.maps, image=np.zeros((32, 32, 3)), geometry=ImageGeometry(3)),
            ["no map has the geometry's tokens", "[67] keys"],
        ),
        "geometry": (lambda: explore(maps, geometry=(8, 8)), ["ImageGeometry", "tuple"]),
        "max_bytes": (lambda: explore(maps, max_bytes=0), ["max_bytes", "got 0"]),
        "boxes": (
            lambda: explore(detr_case().maps, image=detr_case().image,
                            geometry=detr_case().geometry, boxes=np.zeros((2, 4))),
            ["(Q, 4)", "got shape (2, 4)"],
        ),
    }
    for name, (call, parts) in cases.items():
        message = error_of(call, name)
        assert message.startswith("explore:"), (name, message)
        for part in parts:
            assert part in message, (name, part, message)


# ------------------------------------------------------------------ the page


def test_token_strings_are_data_never_markup():
    evil = ["</script><script>window.__injected = 1</script>", "<b>bold</b>", "a&b"]
    page = explore(softmax_maps((1, 3, 3)), tokens=evil)
    # One data element, one script element, nothing a token could open or close.
    assert page.html.count("<script") == 2 and page.html.count("</script>") == 2
    assert payload(page.html)["tokens"] == evil


def test_the_page_loads_nothing_from_anywhere(vit):
    page = explore(vit.maps, image=vit.image, geometry=vit.geometry)
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page.html, flags=re.S)
    assert not re.search(r"\b(src|href)\s*=", markup)
    for loader in ("http://", "https://", "fetch(", "XMLHttpRequest", "import(", "require(",
                   "@import", "url(", "WebSocket"):
        assert loader not in page.html, loader


def test_instances_have_their_own_ids_and_the_fragment_is_in_the_page():
    first, second = explore(softmax_maps((1, 3, 3))), explore(softmax_maps((1, 3, 3)))
    assert first.id != second.id
    assert f'id="{first.id}"' in first._repr_html_() and first._repr_html_() in first.html
    assert first.html.startswith("<!DOCTYPE html>")


def test_save_writes_the_page(tmp_path):
    page = explore(softmax_maps((1, 3, 3)))
    path = page.save(tmp_path / "attention.html")
    assert path.read_text(encoding="utf-8") == page.html and page.nbytes == path.stat().st_size


def test_a_page_over_budget_says_what_was_left_out_and_how_to_choose():
    maps = softmax_maps((6, 1, 4, 100, 100))  # 6 layers x 4 heads x 40 kB
    with pytest.warns(RuntimeWarning, match="left out") as caught:
        page = explore(maps, max_bytes=250_000)
    assert page.nbytes <= 250_000
    kept = payload(page.html)["layers"]
    assert 0 < len(kept) < 6 and page.left_out is not None
    assert "layers=" in page.left_out and "heads=" in page.left_out and "rows=" in page.left_out
    assert str(caught[0].message).endswith(page.left_out)
    assert page.left_out in json.loads(json.dumps(payload(page.html)["leftOut"]))
    # What is kept is a prefix, in order, every kept value within the bound.
    for index, layer in enumerate(kept):
        assert layer["name"] == f"layer {index}"
        assert_within_bound(layer["values"], maps[index, 0][layer["heads"]])
    last = kept[-1]
    named_as_left_out = [f"layer {index}" for index in range(len(kept), 6)]
    for name in named_as_left_out:
        assert repr(name) in page.left_out
    if len(last["heads"]) < 4:
        assert f"'{last['name']}': heads" in page.left_out


def test_a_single_map_larger_than_the_budget_keeps_its_first_rows():
    maps = softmax_maps((1, 2, 600, 600))
    with pytest.warns(RuntimeWarning, match="query rows"):
        page = explore(maps, max_bytes=300_000)
    (layer,) = payload(page.html)["layers"]
    assert layer["heads"] == [0] and layer["rows"] == list(range(len(layer["rows"])))
    assert 0 < len(layer["rows"]) < 600 and page.nbytes <= 300_000
    assert_within_bound(layer["values"], maps[0, :1, : len(layer["rows"])])


def test_explore_is_exported_and_its_docstring_example_runs():
    import visualizer

    assert "explore" in visualizer.__all__ and visualizer.explore is explore
    import visualizer.explorer as module

    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner()
    for test in finder.find(module):
        test.globs["np"] = np
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_get_local_cache_entries_are_layers():
    from examples.toy_vit import VisionTransformer

    model = VisionTransformer(depth=2).eval()
    with get_local.capture() as cache, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    page = explore(cache["Attention.forward"])
    assert page.layer_names == ["layer 0", "layer 1"]
    assert_within_bound(payload(page.html)["layers"][1]["values"], cache["Attention.forward"][1][0])
