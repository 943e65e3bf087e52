"""A drop-in for the original: a pickled cache loads where this package is not
installed, and reading a just-cleared cache says nothing."""
import pickle
import warnings

import numpy as np
import pytest

from .isolation import shape_loaded_elsewhere

def test_a_pickled_cache_loads_as_plain_dicts_and_lists_without_the_package(gl, tmp_path):
    @gl("attn")
    def attention(x):
        attn = np.full((2, 2), float(x))
        return attn

    @gl("attn", "q")
    def two_names(x):
        q = np.zeros(3) + x
        attn = np.ones(2) * x
        return attn

    gl.activate(max_entries=2)  # bounded lists too
    with pytest.warns(RuntimeWarning, match="holds at most 2 entries"):
        for call in range(3):
            attention(call)
            two_names(call)
    cache = gl.cache
    array = "numpy.ndarray"
    assert shape_loaded_elsewhere(tmp_path, cache) == {"dict": {
        attention.__qualname__: {"list": [array, array]},
        two_names.__qualname__: {"list": [{"dict": {"attn": array, "q": array}}] * 2},
    }}
    loaded = pickle.loads(pickle.dumps(cache))
    assert type(loaded) is dict and type(loaded[attention.__qualname__]) is list
    np.testing.assert_array_equal(loaded[attention.__qualname__][1], np.full((2, 2), 2.0))


def test_reading_a_cleared_cache_before_anything_ran_says_nothing(gl):
    @gl("attn")
    def attention(x):
        attn = x
        return attn

    gl.activate()
    attention(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gl.clear()
        assert len(gl.cache[attention.__qualname__]) == 0  # nothing ran since the clear
        attention(2)
        assert gl.cache[attention.__qualname__] == [2]


def test_an_empty_list_after_other_functions_ran_still_says_why(gl):
    @gl("attn")
    def called(x):
        attn = x
        return attn

    @gl("attn")
    def never_called(x):
        attn = x
        return attn

    gl.activate()
    gl.clear()
    called(1)  # something ran since the clear, and never_called was not part of it

    with pytest.warns(RuntimeWarning, match="nothing was captured for .*never_called"):
        assert gl.cache[never_called.__qualname__] == []


def test_a_function_made_without_a_module_name_says_why_its_list_is_empty(gl):
    # exec() in a namespace without __name__ (generated code): its __module__ is None.
    namespace = {}
    exec("def generated(x):\n    attn = x\n    return attn\n", namespace)
    generated = gl("attn")(namespace["generated"])
    assert generated.__module__ is None
    gl.activate()
    with pytest.warns(RuntimeWarning, match="nothing was captured for generated"):
        assert gl.cache["generated"] == []  # an AttributeError before
    assert generated(3) == 3
    assert gl.cache["generated"] == [3]
