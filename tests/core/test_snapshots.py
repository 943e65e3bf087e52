"""Snapshots mean snapshots: containers copied recursively, never stored live (no torch)."""
import collections
import dataclasses
import warnings

import numpy as np
import pytest

from visualizer import NOT_CAPTURED, load_cache, save_cache

Pair = collections.namedtuple("Pair", "query key")


@dataclasses.dataclass
class Output:
    attn: np.ndarray
    layer: int


@dataclasses.dataclass(frozen=True)
class FrozenOutput:
    attn: np.ndarray


class Opaque:
    """An object that cannot be copied: it holds a lock."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()


class Plain:
    def __init__(self):
        self.values = [1, 2]


def captured(gl, make):
    """Capture `value = make()`, change every array in it in place, return the entry."""
    def f():
        value = make()
        return value

    gl("value")(f)
    gl.activate()
    value = f()
    return value, gl.cache[f.__qualname__][0]


@pytest.mark.parametrize(
    "make, arrays",
    [
        (lambda: Pair(np.zeros(2), np.ones(2)), lambda v: [v.query, v.key]),
        (lambda: Output(np.zeros(2), 3), lambda v: [v.attn]),
        (lambda: FrozenOutput(np.zeros(2)), lambda v: [v.attn]),
        (lambda: collections.OrderedDict(a=np.zeros(2)), lambda v: [v["a"]]),
        (lambda: collections.defaultdict(list, a=np.zeros(2)), lambda v: [v["a"]]),
        (lambda: {"nested": [Pair(np.zeros(2), {"deep": np.ones(2)})]},
         lambda v: [v["nested"][0].query, v["nested"][0].key["deep"]]),
    ],
    ids=["namedtuple", "dataclass", "frozen dataclass", "OrderedDict", "defaultdict", "nested"],
)
def test_containers_are_copied_recursively_keeping_their_type(gl, make, arrays):
    original, entry = captured(gl, make)
    assert type(entry) is type(original)
    before = [array.copy() for array in arrays(entry)]
    for array in arrays(original):
        array += 7  # the caller changes its arrays after the call
    for kept, expected in zip(arrays(entry), before):
        np.testing.assert_array_equal(kept, expected)
    if isinstance(original, Output):
        assert entry.layer == 3


def test_an_object_that_cannot_be_copied_is_a_marker_with_a_warning(gl):
    with pytest.warns(RuntimeWarning, match=r"get_local: 'value' in .*f could not be stored "
                      r"\(a Opaque cannot be copied \(TypeError: cannot pickle '_thread.lock'"
                      r".*\); its cache entry is visualizer.NOT_CAPTURED"):
        original, entry = captured(gl, Opaque)
    assert isinstance(original, Opaque) and entry is NOT_CAPTURED and not entry


def test_other_objects_are_deep_copies_never_the_live_object(gl):
    original, entry = captured(gl, Plain)
    original.values.append(3)
    assert type(entry) is Plain and entry is not original and entry.values == [1, 2]


def test_numpy_scalars_are_kept(gl):
    _, entry = captured(gl, lambda: np.float32(1.5))
    assert entry == np.float32(1.5)


def test_not_captured_round_trips_through_files(tmp_path):
    save_cache({"f": [NOT_CAPTURED, 1]}, tmp_path / "c.npz")
    assert load_cache(tmp_path / "c.npz")["f"][0] is NOT_CAPTURED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import copy
        import pickle

        assert pickle.loads(pickle.dumps(NOT_CAPTURED)) is NOT_CAPTURED
        assert copy.deepcopy(NOT_CAPTURED) is NOT_CAPTURED
