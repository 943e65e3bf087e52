"""What the function itself can see of its frame is the same with capture on.

Capture loads each name with a guarded load (see visualizer._rewrite); these
tests pin down what that buys: `locals()` dicts are left alone, the code object
keeps its layout, and a debugger's edits to the frame (`del x`, a `jump`) do not
turn into errors at return.
"""
import sys

import pytest

from tests.core import shapes
from visualizer import MISSING


def returns_its_locals(p):
    seen = locals()
    if p:
        attn = p * 2
    total = 1
    return seen, total


def returns_locals_of_a_cell(p):
    seen = locals()
    attn = p

    def inner():
        return attn

    return seen, inner


@pytest.mark.parametrize("function", [returns_its_locals, returns_locals_of_a_cell])
@pytest.mark.parametrize("p", [0, 3])
def test_locals_dict_the_function_returns_is_unchanged(gl, function, p):
    # Before, names that might be unbound were read from frame.f_locals, and on
    # 3.9-3.12 that writes every local into the dict locals() returned.
    expected = function(p)[0].copy()
    gl("attn")(function)
    gl.activate()
    with _any_warnings():
        seen = function(p)[0]
    assert seen == expected
    if function is returns_locals_of_a_cell:
        expected_capture = p
    else:
        expected_capture = p * 2 if p else MISSING
    assert gl.cache[function.__qualname__] == [expected_capture]


class _any_warnings:
    """Let RuntimeWarnings about MISSING values through without failing the test."""

    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_instrumented_code_keeps_the_layout_of_locals(gl, name):
    # list(locals()) and debuggers list locals in co_varnames order.
    function, names, _ = shapes.SHAPES[name]
    target = getattr(function, "__wrapped__", function)
    before = target.__code__
    gl(*names)(function)
    gl.activate()
    after = target.__code__
    assert after is not before
    for attribute in ("co_varnames", "co_cellvars", "co_freevars", "co_nlocals", "co_argcount"):
        assert getattr(after, attribute) == getattr(before, attribute), attribute


def edited_by_debugger(p):
    attn = p  # noqa: F841 - captured
    marker = p + 1
    return marker


def jumped_over_by_debugger(p):
    start = p
    attn = p * 2  # noqa: F841 - captured
    landed = start + 1
    return landed


def _line_of(function, text):
    import inspect

    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _run_under_debugger(function, action):
    """Call function(5) under a tracer that edits its frame as pdb's commands do."""
    code = function.__code__

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line":
            action(frame)
        return tracer

    sys.settrace(tracer)
    try:
        return function(5)
    finally:
        sys.settrace(None)


def _delete_attn(frame):
    # pdb's `del attn` (or `!del attn`): an edit of f_locals written back to the
    # frame after the trace function returns (3.9-3.11; 3.12 writes None back
    # and 3.13 refuses deletion, so there the name stays bound).
    if frame.f_lineno == _line_of(edited_by_debugger, "return marker") and "attn" in frame.f_locals:
        try:
            del frame.f_locals["attn"]
        except TypeError:  # 3.13: FrameLocalsProxy cannot remove variables
            pass


def _jump_over_attn(frame):
    # pdb's `jump`: skip the line that binds attn.
    if frame.f_lineno == _line_of(jumped_over_by_debugger, "attn = p * 2"):
        frame.f_lineno = _line_of(jumped_over_by_debugger, "landed = start + 1")


@pytest.mark.parametrize("function,action", [
    (edited_by_debugger, _delete_attn),
    (jumped_over_by_debugger, _jump_over_attn),
])
def test_debugger_edits_of_the_frame_do_not_break_the_call(gl, function, action):
    with _any_warnings():
        expected = _run_under_debugger(function, action)
    gl("attn")(function)
    gl.activate()
    with _any_warnings():
        got = _run_under_debugger(function, action)
    assert got == expected == 6
    (captured,) = gl.cache[function.__qualname__]
    if sys.version_info < (3, 12):
        assert captured is MISSING  # the edit unbound it, as the original code saw
    elif function is edited_by_debugger:
        assert captured in (5, None)  # 3.13 keeps the value; 3.12 writes None back
    else:
        assert captured is None  # 3.12+ binds jumped-over locals to None
