"""The user's call never fails because capture is on, under warnings-as-errors too.

A warning the library says while a user's function runs, which the warning
filters make an error, is raised at the next handover point (reading
get_local.cache, get_local.dropped, activate/deactivate, a capture block's exit):
the call returns its result, and the cache holds exactly one entry per call.
"""
import importlib
import warnings

import pytest

from visualizer import MISSING


@pytest.fixture
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_an_unbound_name_never_fails_the_call(gl, warnings_are_errors):
    @gl("maybe")
    def f(flag):
        if flag:
            maybe = 1
        return 7

    gl.activate()
    assert [f(False), f(False), f(True)] == [7, 7, 7]  # the calls return; nothing raised
    with pytest.raises(RuntimeWarning, match="'maybe' was not bound when .*f returned"):
        gl.cache  # the first handover point
    assert gl.cache[f.__qualname__] == [MISSING, MISSING, 1]  # raised once


@pytest.mark.parametrize("path", ["fast", "recorder", "several names"])
def test_the_first_dropped_entry_of_a_bounded_cache_never_fails_the_call(
    gl, warnings_are_errors, path
):
    names = ("value", "other") if path == "several names" else ("value",)
    select = (lambda v: v) if path == "recorder" else None

    def work(i):
        value = other = i  # an int: the fast path appends it without the recorder
        return value + other

    gl(*names, select=select)(work)
    gl.activate(max_entries=2)
    assert [work(i) for i in range(5)] == [0, 2, 4, 6, 8]
    with pytest.raises(RuntimeWarning, match="holds at most 2 entries"):
        gl.dropped
    want = [3, 4] if len(names) == 1 else [{"value": 3, "other": 3}, {"value": 4, "other": 4}]
    assert gl.cache[work.__qualname__] == want and gl.dropped == {work.__qualname__: 3}


def test_two_classes_with_one_name_made_during_a_call_never_fail_it(
    gl, module_dir, warnings_are_errors
):
    source = """
        def make(gl):
            class Attention:
                @gl("attn")
                def forward(self, x):
                    attn = x * 2
                    return attn
            return Attention
        """
    module_dir("factory_a", source)
    module_dir("factory_b", source)
    first = importlib.import_module("factory_a").make(gl)
    second = importlib.import_module("factory_b").make(gl)  # decorated inside a user's call
    with pytest.raises(RuntimeWarning, match="'factory_b.make.<locals>.Attention.forward'"):
        gl.activate()  # the handover point after it
    assert first().forward(1) == 2 and second().forward(3) == 6
    assert gl.cache["make.<locals>.Attention.forward"] == [2]
    assert gl.cache["factory_b.make.<locals>.Attention.forward"] == [6]


def test_a_handover_point_raises_what_a_call_left(gl, warnings_are_errors):
    @gl("maybe")
    def f(flag):
        if flag:
            maybe = 1
        return 0

    gl.activate()
    f(False)
    with pytest.raises(RuntimeWarning, match="'maybe' was not bound"):
        gl.deactivate()
    assert not gl.is_active  # it did its work first

    @gl("maybe")
    def g(flag):
        if flag:
            maybe = 1
        return 0

    with pytest.raises(RuntimeWarning, match="'maybe' was not bound"):
        with gl.capture() as cache:
            assert g(False) == 0
    assert cache[g.__qualname__] == [MISSING] and not gl.is_active
