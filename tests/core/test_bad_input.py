"""Bad input to analysis, files and capture options: a clear error, never a raw one.

Torch-free (tests/core): the plots and the explorer are swept in tests/test_bad_input.py.
"""
import functools
import inspect
import os
import tempfile
import types
from types import SimpleNamespace

import numpy as np
import pytest

from tests.core.sweep import (
    Case,
    check,
    check_class_coverage,
    check_coverage,
    index_in,
    is_bool,
    is_int,
    number_in,
    one_of,
    positive_int,
    sweep_test,
)
from visualizer import (
    StoragePolicy,
    VisualizerError,
    analysis,
    files,
    load_cache,
    policy,
    save_cache,
)
from visualizer import explorer
from visualizer.capture import GetLocal
from visualizer.analysis import ImageGeometry
from visualizer.explorer import Explorer, decode_rows, encode_rows, explore

# One forward of a 2-layer model: (B=2, H=3, N=1 + 2x2) per layer.
MAP = np.full((2, 3, 5, 5), 0.2)


def _maps():
    return [MAP.copy(), MAP.copy()]


def _timm_like(grid_size, patch_size, num_prefix_tokens):
    """ImageGeometry.from_model of a timm-like model with these attributes: what a model
    holds is swept as the arguments are."""
    model = SimpleNamespace(
        patch_embed=SimpleNamespace(grid_size=grid_size, patch_size=patch_size),
        num_prefix_tokens=num_prefix_tokens,
    )
    geometry = ImageGeometry.from_model(model)
    assert geometry.num_prefix_tokens == num_prefix_tokens
    return geometry


def _grid_of_model(value):
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iu" and value.size == 2 and bool((value > 0).all())
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(positive_int(side) for side in value)
    return positive_int(value)


ANALYSIS = [
    Case(
        analysis.cls_attention,
        lambda: {"attn": MAP, "grid_size": None, "num_prefix_tokens": None, "geometry": None},
    ),
    Case(
        analysis.mean_attention_distance,
        lambda: {
            "maps": _maps(),
            "grid_size": None,
            "num_prefix_tokens": None,
            "patch_size": None,
            "average_batch": True,
            "geometry": None,
            "num_layers": None,
        },
        {"average_batch": is_bool},
    ),
    Case(
        analysis.attention_entropy,
        lambda: {"maps": _maps(), "average_batch": True, "num_layers": 2},
        {"average_batch": is_bool, "num_layers": lambda v: v is None or (is_int(v) and v == 2)},
    ),
    Case(
        analysis.attention_rollout,
        lambda: {
            "maps": _maps(),
            "head_fusion": "mean",
            "discard_ratio": 0.0,
            "add_identity": True,
            "num_layers": None,
        },
        {
            "head_fusion": one_of("mean", "max", "min"),
            "discard_ratio": number_in(0, 0.999999),
            "add_identity": is_bool,
        },
    ),
    Case(
        analysis.gradient_rollout,
        lambda: {
            "maps": _maps(),
            "grads": _maps(),
            "score": None,
            "discard_ratio": 0.0,
            "add_identity": True,
            "num_layers": None,
        },
        {"discard_ratio": number_in(0, 0.999999), "add_identity": is_bool},
    ),
    Case(
        analysis.rollout_cls_attention,
        lambda: {
            "rollout": np.full((2, 5, 5), 0.2),
            "grid_size": (2, 2),
            "num_prefix_tokens": 1,
            "geometry": None,
        },
    ),
    Case(
        analysis.threshold_mask,
        lambda: {"attention": np.full((3, 2, 2), 0.25), "fraction": 0.6},
        {"fraction": number_in(0, 1, low_open=True)},
    ),
    Case(
        analysis.find_artifact_tokens,
        lambda: {"attn": MAP, "num_prefix_tokens": 1, "z_threshold": 10.0, "geometry": None},
        {"z_threshold": lambda v: number_in(-np.inf, np.inf)(v) and np.isfinite(v)},
    ),
    Case(
        analysis.upsample_to_image,
        lambda: {"attention": np.full((3, 2, 2), 0.25), "image_size": (4, 6), "mode": "bilinear"},
        {"mode": one_of("nearest", "bilinear")},
    ),
    Case(
        analysis.box_cxcywh_to_xyxy,
        lambda: {"boxes": np.full((3, 4), 0.5), "image_size": (10, 20)},
    ),
    Case(
        analysis.attention_mass_in_boxes,
        lambda: {
            "cross_attn": np.full((2, 3, 4, 6), 1 / 6),
            "boxes": np.tile([0.0, 0.0, 5.0, 5.0], (4, 1)),
            "image_size": (20, 30),
            "grid_size": (2, 3),
            "geometry": None,
        },
    ),
    Case(
        ImageGeometry,
        lambda: {
            "grid_size": (2, 2),
            "num_prefix_tokens": 1,
            "patch_size": 16,
            "mean": (0.5, 0.5, 0.5),
            "std": (0.2, 0.2, 0.2),
        },
    ),
    Case(
        ImageGeometry.resolve,
        lambda: {
            "geometry": ImageGeometry(grid_size=2, num_prefix_tokens=1, patch_size=16),
            "caller": "f",
            "grid_size": None,
            "num_prefix_tokens": None,
            "patch_size": None,
            "mean": None,
            "std": None,
        },
        {"geometry": lambda v: v is None or isinstance(v, ImageGeometry)},
    ),
    Case(
        ImageGeometry.from_model,
        lambda: {
            "model": SimpleNamespace(
                patch_embed=SimpleNamespace(grid_size=(2, 2), patch_size=(16, 16)),
                num_prefix_tokens=1,
            ),
            "image_size": None,
            "num_prefix_tokens": None,
            "mean": None,
            "std": None,
        },
    ),
    Case(_timm_like, lambda: {"grid_size": (2, 2), "patch_size": (16, 16),
                              "num_prefix_tokens": 1},
         {"grid_size": _grid_of_model, "num_prefix_tokens": lambda v: is_int(v) and v >= 0}),
    Case(
        ImageGeometry.from_config,
        lambda: {
            "config": type("Config", (), {"image_size": 32, "patch_size": 16})(),
            "image_size": None,
            "num_prefix_tokens": 1,
            "mean": None,
            "std": None,
        },
    ),
]

def _in_a_temporary_folder(func):
    """``func`` run in an empty folder of its own: the sweep's strings become file names."""

    @functools.wraps(func)
    def run(**kwargs):
        with tempfile.TemporaryDirectory() as folder:
            previous = os.getcwd()
            os.chdir(folder)
            try:
                return func(**kwargs)
            finally:
                os.chdir(previous)

    return run


FILES = [
    Case(
        _in_a_temporary_folder(save_cache),
        lambda: {"cache": {"f": [np.zeros(2), {"attn": np.ones(2)}]}, "path": "cache.npz"},
    ),
    Case(_in_a_temporary_folder(load_cache), lambda: {"path": "/dev/null"}),
]


@functools.wraps(GetLocal.activate)
def _activate(**kwargs):
    get_local = GetLocal()
    try:
        get_local.activate(**kwargs)
    finally:
        get_local.deactivate()
    assert not get_local.is_active  # the sweep leaves capture off


@functools.wraps(GetLocal.capture)
def _capture_block(**kwargs):
    get_local = GetLocal()
    with get_local.capture(**kwargs) as cache:
        assert cache == {}
    assert not get_local.is_active  # the block leaves capture off


def _attend(x):
    attn = x + 1
    return attn


@functools.wraps(GetLocal.__call__)
def _decorate(names, select):
    """``get_local(*names, select=select)`` on a function whose locals are x and attn; a
    name that is not a tuple is given as the one name."""
    get_local = GetLocal()
    function = types.FunctionType(_attend.__code__, _attend.__globals__, "attend")
    decorated = get_local(*(names if isinstance(names, tuple) else (names,)), select=select)(
        function
    )
    assert decorated is function  # decorating never wraps
    with get_local.capture() as cache:
        assert function(1) == 2
    assert not get_local.is_active
    (entry,) = cache[get_local.key_of(function)]  # one call, one entry
    return entry


def _names(value):
    names = value if isinstance(value, tuple) else (value,)
    return bool(names) and all(isinstance(name, str) and name in ("x", "attn") for name in names)


def _select(value):
    return value is None or callable(value) or (
        isinstance(value, dict) and all(name == "attn" and callable(f) for name, f in value.items())
    )


def _decorated_attend():
    """A fresh GetLocal, and a copy of _attend it decorated with get_local('attn')."""
    get_local = GetLocal()
    decorated = types.FunctionType(_attend.__code__, _attend.__globals__, "attend")
    get_local("attn")(decorated)
    return get_local, decorated


@functools.wraps(GetLocal.key_of)
def _key_of(function):
    get_local, decorated = _decorated_attend()
    key = get_local.key_of(function)
    assert key is None or key == get_local.key_of(decorated)
    return key


@functools.wraps(GetLocal.records_in_graphs)
def _records_in_graphs(function):
    get_local, _ = _decorated_attend()
    answer = get_local.records_in_graphs(function)
    assert answer is False  # switched off: nothing records, whatever was asked about
    return answer


STORAGE_OPTIONS = {"keep_on_device": False, "dtype": None, "max_entries": None, "detach": True}
CAPTURE = [
    Case(
        StoragePolicy,
        lambda: {**STORAGE_OPTIONS, "who": "get_local"},
        {"keep_on_device": is_bool, "detach": is_bool},
    ),
    Case(policy.dtype_name, lambda: {"dtype": "float32", "who": "get_local"}),
    Case(
        _activate,
        lambda: {**STORAGE_OPTIONS, "ranks": None},
        {"keep_on_device": is_bool, "detach": is_bool},
    ),
    Case(
        _capture_block,
        lambda: {**STORAGE_OPTIONS, "ranks": None},
        {"keep_on_device": is_bool, "detach": is_bool},
    ),
]
DECORATOR = [
    Case(_decorate, lambda: {"names": ("attn",), "select": None},
         {"names": _names, "select": _select}),
    Case(_key_of, lambda: {"function": _attend}),
    Case(_records_in_graphs, lambda: {"function": _attend}),
]


def _rows_of(value, keys=True):
    """Whether ``value`` is what encode_rows takes: finite numbers >= 0, (..., K >= 1)."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype.kind in "iuf"
        and (not keys or (value.ndim >= 1 and value.shape[-1] > 0))
        and bool(np.isfinite(value).all())
        and not (value < 0).any()
    )


ROWS = np.array([[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]])
PAGE = explore(np.full((2, 3, 3), 1 / 3), tokens=["a", "b", "c"])


@_in_a_temporary_folder
@functools.wraps(Explorer.save)
def _save(path):
    written = PAGE.save(path)
    assert written.read_text(encoding="utf-8") == PAGE.html
    return written


EXPLORER = [
    Case(encode_rows, lambda: {"array": ROWS}, {"array": _rows_of}),
    Case(
        decode_rows,
        lambda: {"codes": encode_rows(ROWS)[0], "peaks": encode_rows(ROWS)[1]},
        {"peaks": lambda v: _rows_of(v, keys=False) and v.shape == (2,)},
    ),
    Case(_save, lambda: {"path": "page.html"}),
]


test_every_argument_is_checked = sweep_test(
    ANALYSIS + FILES + CAPTURE + DECORATOR + EXPLORER, max_examples=40
)


def test_the_sweep_covers_every_function_and_argument():
    check_coverage(ANALYSIS, analysis)
    check_coverage(FILES, files)
    check_coverage(CAPTURE, policy)
    check_class_coverage(CAPTURE + DECORATOR, GetLocal, also=("__call__",))
    check_class_coverage(ANALYSIS, ImageGeometry, also=("__init__",))
    # explore itself is swept with the plots (tests/test_bad_input.py, which checks the
    # whole module); here the rest of the explorer's functions.
    public = {name for name in vars(explorer) if not name.startswith("_")
              and inspect.isfunction(getattr(explorer, name))
              and getattr(explorer, name).__module__ == explorer.__name__}
    assert public - {"explore"} == {case.func.__name__ for case in EXPLORER[:2]}
    check_class_coverage(EXPLORER, Explorer)


# The cases met in use, each also in the sweep's reach; kept by name so that a
# regression says which.
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: analysis.threshold_mask(np.full((2, 2), np.nan)), r"attention.*NaN"),
        (lambda: analysis.threshold_mask(np.full((2, 2), 0.25), fraction=np.nan), "fraction"),
        (lambda: analysis.upsample_to_image(np.zeros((0, 0)), (4, 4)), r"attention.*empty"),
        (lambda: analysis.upsample_to_image(np.zeros((2, 0)), (4, 4)), r"attention.*empty"),
        (lambda: analysis.upsample_to_image(np.zeros((2, 2)), (0.4, 4)), "image_size"),
        (lambda: analysis.box_cxcywh_to_xyxy(np.zeros((2, 4)), (np.nan, 3)), "image_size"),
        (lambda: analysis.attention_rollout(_maps(), discard_ratio=np.nan), "discard_ratio"),
        (lambda: analysis.attention_rollout(_maps(), add_identity="no"), "add_identity"),
        (lambda: analysis.attention_entropy(_maps(), average_batch="no"), "average_batch"),
        (lambda: analysis.find_artifact_tokens(MAP, z_threshold="10"), "z_threshold"),
        (lambda: save_cache([np.zeros(2)], "/dev/null"), r"cache must be a dict.*got list"),
        (lambda: save_cache({"f": [{1: np.zeros(2)}]}, "/dev/null"), r"names must be strings"),
        (lambda: save_cache({"f": [np.zeros(2)]}, 3.5), r"path"),
        (lambda: load_cache(None), r"path"),
        (lambda: _timm_like("ab", 16, 1), r"from_model: the model's grid_size must be \(h, w\)"),
        (lambda: _timm_like(object(), 16, 1), r"model's grid_size must be \(h, w\), ints"),
        (lambda: _timm_like(np.array([1.5, 2.0]), 16, 1), r"model's grid_size must be"),
        (lambda: _timm_like(2, 16, "x"), r"from_model: the model's num_prefix_tokens must be an "
                                         r"int >= 0; got 'x'"),
        (lambda: _timm_like(2, 16, 1.7), r"model's num_prefix_tokens must be an int >= 0"),
        (lambda: _timm_like(2, 16, True), r"model's num_prefix_tokens must be an int >= 0"),
        (lambda: encode_rows(None), r"encode_rows: array must be a numpy array of real numbers"),
        (lambda: encode_rows([[0.5, 0.5]]), r"array must be a numpy array.*got list"),
        (lambda: encode_rows(np.array([[np.nan, 1.0]])), r"array must hold finite numbers >= 0"),
        (lambda: encode_rows(np.array([[-0.5, 1.0]])), r"array must hold finite numbers >= 0"),
        (lambda: encode_rows(np.zeros((2, 0))), r"array must have shape \(..., K\) with K >= 1"),
        (lambda: encode_rows(np.float64(0.5)), r"array must be a numpy array.*got float64"),
        (lambda: decode_rows(*encode_rows(ROWS)[:1], encode_rows(ROWS)[1][:1]),
         r"decode_rows: peaks must have the shape of codes without its last axis, \(2,\); "
         r"got shape \(1,\)"),
        (lambda: decode_rows(ROWS, encode_rows(ROWS)[1]), r"codes must be the uint8 array"),
        (lambda: PAGE.save(""), r"Explorer.save: path must be a file path.*got str ''"),
        (lambda: PAGE.save(None), r"Explorer.save: path must be a file path"),
        (lambda: GetLocal()()(_attend), r"get_local: expected at least one variable name.*got no "
                                        r"names"),
        (lambda: GetLocal()("mean")(_attend), r"'mean' is not a local variable of _attend; "
                                              r"expected one of its locals: \['attn', 'x'\] "
                                              r"\(names given: \['mean'\]\)"),
    ],
)
def test_named_bad_inputs_are_refused(call, message):
    with pytest.raises(VisualizerError, match=message):
        call()


def test_entry_names_round_trip_or_are_refused(tmp_path):
    path = tmp_path / "cache.npz"
    save_cache({"f": [{"attn": np.zeros(2), "q": 1}]}, path)
    assert list(load_cache(path)["f"][0]) == ["attn", "q"]
    with pytest.raises(VisualizerError, match=r"save_cache: .*\[1\].*names must be strings"):
        save_cache({"f": [{1: np.zeros(2)}]}, path)


@pytest.mark.parametrize("dtype", ["f4", "<f2", "i8", "?", "float", "int", "double"])
def test_dtype_codes_are_refused_with_the_names(gl, dtype):
    with pytest.raises(VisualizerError, match=r"dtype must .*'float32'.*got " + repr(dtype)):
        gl.activate(dtype=dtype)


def test_numpy_and_torch_dtype_objects_are_accepted(gl):
    gl.activate(dtype=np.dtype("<f2"))
    assert gl.policy.dtype == "float16"
    gl.activate(dtype=np.float32)
    assert gl.policy.dtype == "float32"
    gl.activate(dtype="float64")
    assert gl.policy.dtype == "float64"


def test_sweep_catches_a_silent_pass():
    """The sweep itself can fail: a function that ignores a bad value is caught."""
    case = Case(lambda ncols=1: None, lambda: {"ncols": 1}, {"ncols": positive_int})
    with pytest.raises(AssertionError, match="accepted an invalid value silently"):
        check(case, "ncols", 0)
    raw = Case(lambda index=0: [1][index], lambda: {"index": 0}, {"index": index_in(1)})
    with pytest.raises(IndexError):
        check(raw, "index", 5)
