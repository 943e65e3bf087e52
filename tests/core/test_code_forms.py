"""The globals form of instrumented code (see visualizer._rewrite.Global): the recorder, and
the fast path's objects, loaded by name from the function's globals. torch.compile traces
this form; here it is checked on every Python without torch, against values known by hand.

While the recorder's global is None the call is skipped: that is how a function stays
instrumented while capture is off once compiled code may have traced it (GetLocal._settle).
"""
import numpy as np
import pytest

from visualizer import MISSING

from .isolation import defined


# The globals form only (tests/core/conftest.py): the constants form has no global to switch.
pytestmark = pytest.mark.parametrize("gl", ["globals"], indirect=True)


def _switch_recorder(gl, function, on):
    """What GetLocal does for a function that stays instrumented while capture is off."""
    registration = gl._registrations.get(function)
    assert registration.template is not None, "installed in the globals form"
    registration.template.bind(function.__globals__, on)


@pytest.mark.parametrize("value", [3, np.arange(3)], ids=["fast path", "recorder"])
def test_a_none_recorder_global_skips_the_call_and_changes_nothing(gl, value):
    namespace = defined(
        """
        def double(x):
            y = x * 2
            return y
        """
    )
    double = gl("y")(namespace["double"])
    gl.activate()
    assert np.array_equal(double(value), value * 2)
    _switch_recorder(gl, double, False)
    assert np.array_equal(double(value), value * 2)  # not recorded
    _switch_recorder(gl, double, True)
    assert np.array_equal(double(value + 1), (value + 1) * 2)
    entries = gl.cache["double"]
    assert len(entries) == 2
    assert np.array_equal(entries[0], value * 2) and np.array_equal(entries[1], (value + 1) * 2)


def test_several_names_and_an_unbound_one_under_a_switched_global(gl):
    namespace = defined(
        """
        def split(x, early):
            a = x + 1
            if early:
                return a
            b = a * 10
            return b
        """
    )
    split = gl("a", "b")(namespace["split"])
    gl.activate()
    with pytest.warns(RuntimeWarning, match="'b' was not bound when split returned"):
        assert split(1, True) == 2 and split(1, False) == 20
    _switch_recorder(gl, split, False)
    assert split(5, True) == 6 and split(5, False) == 60
    _switch_recorder(gl, split, True)
    assert split(2, False) == 30
    assert gl.cache["split"] == [{"a": 2, "b": MISSING}, {"a": 2, "b": 20}, {"a": 3, "b": 30}]


def test_the_functions_own_type_and_next_globals_are_not_the_ones_it_calls(gl):
    # The fast path calls type() and next(): loaded under names of their own, so a
    # module that binds `type` or `next` (or deletes builtins' names) changes nothing.
    namespace = defined(
        """
        type = "not the builtin"
        next = None

        def plus(x):
            y = x + 1
            return y
        """
    )
    plus = gl("y")(namespace["plus"])
    gl.activate(max_entries=5)  # a bounded cache: the fast path also calls next(ticks)
    with pytest.warns(RuntimeWarning, match="holds at most 5 entries"):
        assert [plus(i) for i in range(7)] == list(range(1, 8))
    assert gl.cache["plus"] == [3, 4, 5, 6, 7]
    assert namespace["type"] == "not the builtin" and namespace["next"] is None
