"""An independent reader of locals: sys.settrace at each frame's return.

Runs a function with its original (uninstrumented) code and records, for every
frame of the given code object that returns normally, the values of the
requested names in `frame.f_locals` at that moment, in the order the frames
returned. Frames that leave by an exception are not recorded, matching
get_local, which records only calls that return.
"""
import dis
import sys

import numpy as np

from visualizer import MISSING


def copy_value(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return list(value)
    return value


def run_with_oracle(call, code, names, on_line=None):
    """Call `call()` and return (outcome, captures).

    outcome: ("value", result) or ("raise", exception type, message).
    captures: one tuple of values per returning frame of `code`; MISSING for
    names not bound at return.
    on_line: called with the frame at each 'line' event of `code`'s frames (a
    debugger's edits; see `debugging`).
    """
    # The trace's 'return' event also fires when a frame yields or unwinds
    # with an exception; the instruction it stopped at tells them apart.
    opnames = {instruction.offset: instruction.opname for instruction in dis.get_instructions(code)}
    captures = []
    previous = sys.gettrace()

    def local_trace(frame, event, arg):
        if event == "line" and on_line is not None:
            on_line(frame)
        if event == "return" and opnames.get(frame.f_lasti) in ("RETURN_VALUE", "RETURN_CONST"):
            captures.append(tuple(copy_value(frame.f_locals.get(n, MISSING)) for n in names))
        return local_trace

    def global_trace(frame, event, arg):
        return local_trace if frame.f_code is code else None

    sys.settrace(global_trace)
    try:
        result = call()
        outcome = ("value", copy_value(result))
    except Exception as error:  # the outcome to compare, not a failure of the test
        outcome = ("raise", type(error), str(error))
    finally:
        sys.settrace(previous)
    return outcome, captures


def same(a, b):
    if a is MISSING or b is MISSING:
        return a is b
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b)
        )
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b) and a.args == b.args
    return type(a) is type(b) and a == b


def debugging(code, on_line):
    """A context in which `on_line(frame)` runs at each 'line' event of `code`'s frames."""
    import contextlib

    def local_trace(frame, event, arg):
        if event == "line":
            on_line(frame)
        return local_trace

    def global_trace(frame, event, arg):
        return local_trace if frame.f_code is code else None

    @contextlib.contextmanager
    def context():
        previous = sys.gettrace()
        sys.settrace(global_trace)
        try:
            yield
        finally:
            sys.settrace(previous)

    return context()
