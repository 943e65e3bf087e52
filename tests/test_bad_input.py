"""Bad input to plots, the explorer and capture options: a clear error, never a raw one.

The torch-free sweep of analysis and files is tests/core/test_bad_input.py.
"""
import contextlib
import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
matplotlib = pytest.importorskip("matplotlib")


from tests.core.sweep import (  # noqa: E402
    Case,
    check_coverage,
    index_in,
    is_bool,
    number_in,
    one_of,
    positive_int,
    sweep_test,
)
from tests.core.test_bad_input import EXPLORER  # noqa: E402
from visualizer import (  # noqa: E402
    VisualizerError,
    all_gather,
    attention,
    capture_attention,
    distributed,
    explore,
    explorer,
    gather,
    plot,
)
from visualizer.capture import GetLocal  # noqa: E402
from visualizer.fused import SdpaCapture  # noqa: E402

MAP = np.full((2, 3, 5, 5), 0.2)  # (B=2, H=3, N=1 + 2x2)
IMAGE = np.zeros((32, 32, 3))
TOKENS = ["[CLS]", "a", "b", "c", "[SEP]"]


def finite_positive(value):
    return number_in(0, np.inf, low_open=True)(value) and np.isfinite(value)


def is_colormap(value):
    return isinstance(value, str) and value in matplotlib.colormaps


OVERLAY = {
    "batch_index": index_in(2),
    "mode": one_of("nearest", "bilinear"),
    "alpha": number_in(0, 1),
    "cmap": is_colormap,
}

PLOTS = [
    Case(
        plot.head,
        lambda: {"attn": MAP, "head": 0, "batch_index": 0, "layer": 3, "ax": None,
                 "cmap": "viridis"},
        {"head": index_in(3), "batch_index": index_in(2), "cmap": is_colormap},
    ),
    Case(
        plot.heads,
        lambda: {"attn": MAP, "batch_index": 0, "layer": 3, "ncols": 4, "fig": None,
                 "cmap": "viridis"},
        {"ncols": positive_int, "batch_index": index_in(2), "cmap": is_colormap},
    ),
    Case(
        plot.tokens,
        lambda: {"attn": MAP, "tokens": TOKENS, "head": None, "batch_index": 0,
                 "query_tokens": None, "hide_tokens": None, "layer": None, "ax": None,
                 "cmap": "viridis"},
        {"batch_index": index_in(2), "cmap": is_colormap},
    ),
    Case(
        plot.head_view,
        lambda: {"attn": MAP, "tokens": TOKENS, "heads": None, "batch_index": 0,
                 "query_tokens": None, "hide_tokens": None, "renormalize": False,
                 "layer": None, "linewidth": 4.0, "ax": None},
        {"batch_index": index_in(2), "renormalize": is_bool, "linewidth": finite_positive},
    ),
    Case(
        plot.query,
        lambda: {"attn": MAP, "query": (0, 1), "image": IMAGE, "grid_size": None,
                 "num_prefix_tokens": None, "head": None, "batch_index": 0, "show_cls": True,
                 "layer": None, "mode": "bilinear", "alpha": 0.6, "cmap": "inferno",
                 "mean": None, "std": None, "geometry": None, "fig": None},
        {**OVERLAY, "show_cls": is_bool},
    ),
    Case(
        plot.cls_attention,
        lambda: {"attn": MAP, "image": IMAGE, "grid_size": None, "num_prefix_tokens": None,
                 "batch_index": 0, "heads": None, "mode": "bilinear", "threshold": 0.6,
                 "mask_artifacts": False, "layer": None, "alpha": 0.6, "cmap": "inferno",
                 "ncols": 4, "mean": None, "std": None, "geometry": None, "fig": None},
        {**OVERLAY, "ncols": positive_int,
         "threshold": lambda v: v is None or number_in(0, 1, low_open=True)(v)},
    ),
    Case(
        plot.mean_attention_distance,
        lambda: {"distances": np.array([[10.0, 50.0], [80.0, 90.0]]), "ax": None,
                 "title": "t"},
    ),
    Case(
        plot.cross_attention,
        lambda: {"cross_attn": np.full((2, 3, 4, 6), 1 / 6), "queries": [0, 2], "image": IMAGE,
                 "grid_size": (2, 3), "boxes": None, "batch_index": 0, "per_head": True,
                 "cmap": "viridis", "mean": None, "std": None, "geometry": None, "fig": None},
        {"batch_index": index_in(2), "per_head": is_bool, "cmap": is_colormap},
    ),
    Case(
        plot.rollout,
        lambda: {"rollout": np.full((2, 5, 5), 0.2), "image": IMAGE, "grid_size": None,
                 "num_prefix_tokens": None, "batch_index": 0, "mode": "bilinear", "alpha": 0.6,
                 "cmap": "inferno", "mean": None, "std": None, "geometry": None,
                 "title": "t", "ax": None},
        OVERLAY,
    ),
    Case(
        explore,
        lambda: {"maps": [MAP, MAP], "image": IMAGE, "geometry": None, "tokens": None,
                 "query_tokens": None, "boxes": None, "batch": 0, "layers": None,
                 "heads": None, "rows": None, "rollout": True, "max_bytes": 10_000_000},
        {"batch": index_in(2), "rollout": is_bool, "max_bytes": positive_int},
    ),
]


class _OneAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


MODEL = _OneAttention().eval()


@functools.wraps(capture_attention)
def _capture(**kwargs):
    with capture_attention(**kwargs):
        MODEL(torch.randn(1, 5, 8))


@functools.wraps(SdpaCapture.activate)
def _sdpa_activate(**kwargs):
    recorder = SdpaCapture(GetLocal())
    try:
        recorder.activate(**kwargs)
        q = torch.randn(1, 2, 5, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    finally:
        recorder.deactivate()


CAPTURE = [
    Case(_sdpa_activate, lambda: {"rows": 0, "heads": None, "ranks": None}),
    Case(
        _capture,
        lambda: {"model": MODEL, "modules": None, "rows": 0, "heads": None,
                 "keep_on_device": False, "dtype": None, "max_entries": None, "ranks": None},
        {"keep_on_device": is_bool},
    ),
]


@contextlib.contextmanager
def _one_process_group():
    """A gloo process group of this process alone (world size 1), for as long as the block."""
    dist = torch.distributed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gathered(result, cache):
    """A gathered cache of one process: {0: the cache, same keys and entries}."""
    assert list(result) == [0] and list(result[0]) == list(cache)
    assert all(list(result[0][key]) == list(cache[key]) for key in cache)
    return result


@functools.wraps(gather)
def _gather(**kwargs):
    with _one_process_group():
        return _gathered(gather(**kwargs), kwargs["cache"])


@functools.wraps(all_gather)
def _all_gather(**kwargs):
    with _one_process_group():
        return _gathered(all_gather(**kwargs), kwargs["cache"])


def _a_cache(value):
    return isinstance(value, dict) and all(isinstance(e, (list, tuple)) for e in value.values())


def _no_group(value):
    return value is None


GATHER = [
    Case(
        _gather,
        lambda: {"cache": {"f": [1, 2.0]}, "dst": 0, "group": None},
        {"cache": _a_cache, "dst": lambda v: index_in(1)(v) and v == 0, "group": _no_group},
    ),
    Case(
        _all_gather,
        lambda: {"cache": {"f": [1, 2.0]}, "group": None},
        {"cache": _a_cache, "group": _no_group},
    ),
]

test_every_argument_is_checked = sweep_test(PLOTS + CAPTURE + GATHER, max_examples=15)


def test_the_sweep_covers_every_function_and_argument():
    check_coverage(PLOTS, plot)
    check_coverage(CAPTURE, attention)
    check_coverage(GATHER, distributed)
    check_coverage([case for case in PLOTS if case.func is explore] + EXPLORER[:2], explorer)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: plot.heads(MAP, ncols=0), r"plot.heads: ncols must be a positive int; got 0"),
        (lambda: plot.heads(MAP, ncols=-2), r"ncols must be a positive int; got -2"),
        (lambda: plot.heads(MAP, ncols="4"), r"ncols must be a positive int; got '4'"),
        (lambda: plot.cls_attention(MAP, ncols=0), r"ncols must be a positive int"),
        (
            lambda: plot.cls_attention(MAP, IMAGE, mean=(0.5, 0.5), std=(0.2, 0.2)),
            r"plot.cls_attention: mean has 2 values.* image has 3 channels",
        ),
        (lambda: plot.cls_attention(MAP, IMAGE, std=(0.2, 0.2)), r"std has 2 values"),
        (lambda: plot.rollout(np.eye(5), alpha=2.0), r"alpha must be in \[0, 1\]; got 2.0"),
        (lambda: plot.rollout(np.eye(5), cmap="nope"), r"cmap must be a matplotlib colormap"),
        (lambda: plot.head_view(MAP, TOKENS, renormalize="yes"), r"renormalize must be True"),
        (lambda: plot.cls_attention(MAP, threshold=np.nan), r"threshold must be in \(0, 1\]"),
        (lambda: plot.head(MAP, head=True), r"head must be an int"),
        (lambda: explore([MAP], rollout="no"), r"rollout must be True or False"),
    ],
)
def test_named_bad_inputs_are_refused(call, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image/grid registration warning is not the point
        with pytest.raises(VisualizerError, match=message):
            call()


def test_gather_checks_its_arguments_before_any_communication():
    """Without a process group, the wrong kind of argument is named first."""
    with pytest.raises(VisualizerError, match=r"gather: cache must map each key to a list of "
                       r"entries; got cache\['f'\] = int"):
        gather({"f": 3})
    with pytest.raises(VisualizerError, match=r"all_gather: cache must map each key to a list"):
        all_gather({"f": "ab"})  # a string is not its characters' list
    with pytest.raises(VisualizerError, match=r"all_gather: cache must be get_local.cache"):
        all_gather([])
    with pytest.raises(VisualizerError, match=r"gather: dst must be an int \(a global rank\); "
                       r"got '0'"):
        gather({}, dst="0")
    with pytest.raises(VisualizerError, match=r"gather: dst must be an int.*got True"):
        gather({}, dst=True)
    with pytest.raises(VisualizerError, match=r"all_gather: group must be a torch.distributed "
                       r"process group or None \(the world\); got str"):
        all_gather({}, group="world")


def test_gather_in_a_group_of_one_checks_dst_and_returns_the_cache():
    with _one_process_group():
        with pytest.raises(VisualizerError, match=r"gather: dst must be the global rank of a "
                           r"process in the group, one of 0; got 1"):
            gather({}, dst=1)
        with pytest.raises(VisualizerError, match=r"one of 0; got -1"):
            gather({}, dst=-1)
        cache = {"f": [np.arange(3.0), {"attn": np.ones(2)}]}
        (got,) = gather(cache, dst=np.int64(0)).values()
        assert list(got) == ["f"] and np.array_equal(got["f"][0], np.arange(3.0))
        assert got["f"][0].dtype == np.float64 and np.array_equal(got["f"][1]["attn"], np.ones(2))
        assert all_gather({"g": (1, 2)}) == {0: {"g": [1, 2]}}


@pytest.mark.parametrize("channels", [1, 3])
def test_a_grey_image_takes_one_value_or_an_rgb_models_three(channels):
    mean, std = (0.5,) * channels, (0.2,) * channels
    fig = plot.cls_attention(MAP, np.zeros((32, 32)), mean=mean, std=std)
    assert len(fig.axes) == 4
    with pytest.raises(VisualizerError, match=r"mean has 2 values.*expected 1 or 3 values"):
        plot.cls_attention(MAP, np.zeros((32, 32)), mean=(0.5, 0.5))


# ------------------------------------------------------------- capture options


def test_a_selected_row_kept_with_its_graph_owns_its_storage(gl):
    """detach=False with select: the row is stored as its own copy, not a view of the map."""

    @gl("attn", select=lambda a: a[:, 0])
    def attend(x):
        attn = (x @ x.transpose(-1, -2)).softmax(-1)
        return attn.sum()

    x = torch.randn(4, 64, 8, requires_grad=True)
    gl.activate(keep_on_device=True, detach=False)
    attend(x)
    (row,) = gl.cache[attend.__qualname__]
    assert row.shape == (4, 64) and row.is_contiguous()
    assert row.untyped_storage().nbytes() == row.numel() * row.element_size()
    assert row.requires_grad  # still in the graph: gradients flow to x through it
    (grad,) = torch.autograd.grad(row.sum(), x)
    assert grad.shape == x.shape


def test_the_unselected_map_kept_with_its_graph_is_the_graphs_tensor(gl):
    """Without select, detach=False keeps the very tensor, so gradients w.r.t. it exist."""

    @gl("attn")
    def attend(x):
        attn = (x @ x.transpose(-1, -2)).softmax(-1)
        return (attn * 2).sum()

    x = torch.randn(2, 5, 3, requires_grad=True)
    gl.activate(keep_on_device=True, detach=False)
    out = attend(x)
    (attn,) = gl.cache[attend.__qualname__]
    (grad,) = torch.autograd.grad(out, attn)
    assert torch.equal(grad, torch.full_like(attn, 2.0))


def test_the_users_own_dynamo_marker_survives_activate_and_deactivate(gl):
    def marked(x):
        attn = x + 1
        return attn

    marked._torchdynamo_disable = True  # the user's own: Dynamo must keep skipping it
    def unmarked(x):
        attn = x + 1
        return attn

    gl("attn")(marked)
    gl("attn")(unmarked)
    gl.activate()
    gl.deactivate()
    assert marked.__dict__.get("_torchdynamo_disable") is True
    gl.activate()
    gl.deactivate()
    assert marked.__dict__.get("_torchdynamo_disable") is True
    assert "_torchdynamo_disable" not in unmarked.__dict__  # the library's own is removed


def test_a_function_under_torch_dynamo_disable_is_captured_and_stays_disabled(gl):
    @gl("attn")
    @torch._dynamo.disable
    def attend(x):
        attn = x + 1
        return attn

    gl.activate()
    attend(torch.ones(2))
    gl.deactivate()
    assert len(gl.cache[attend.__wrapped__.__qualname__]) == 1
    assert attend._torchdynamo_disable is True
