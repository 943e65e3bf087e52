"""Every function shape x every Python: same outcome, captures equal the oracle's."""
import asyncio
import sys
import warnings

import pytest

from tests.core import shapes
from tests.core.oracle import run_with_oracle, same


def run(call):
    try:
        return ("value", call())
    except Exception as error:
        return ("raise", type(error), str(error))


def check(gl, decorate, code, names, call, key):
    """Capture off under the oracle, then capture on; compare outcome and values."""
    decorate(gl)
    expected_outcome, expected = run_with_oracle(call, code, names)
    gl.activate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outcome = run(call)
    gl.deactivate()
    assert outcome[0] == expected_outcome[0] and all(
        same(a, b) for a, b in zip(outcome[1:], expected_outcome[1:])
    ), f"{key}: outcome {outcome} != {expected_outcome}"
    captured = gl.cache.get(key, [])
    assert len(captured) == len(expected), f"{key}: {len(captured)} captures, oracle saw {len(expected)}"
    for index, (entry, values) in enumerate(zip(captured, expected)):
        entry = (entry,) if len(names) == 1 else tuple(entry[n] for n in names)
        for name, got, want in zip(names, entry, values):
            assert same(got, want), f"{key} call {index}: {name}={got!r}, oracle read {want!r}"


TABLE = [
    (name, args, kwargs)
    for name, (_, _, calls) in shapes.SHAPES.items()
    for args, kwargs in calls
]


@pytest.mark.parametrize("name,args,kwargs", TABLE, ids=[f"{n}-{a}" for n, a, _ in TABLE])
def test_shape(gl, name, args, kwargs):
    function, names, _ = shapes.SHAPES[name]
    check(
        gl,
        lambda g: g(*names)(function),
        function.__code__,
        names,
        lambda: function(*args, **kwargs),
        function.__qualname__,
    )


@pytest.mark.parametrize("n", [0, 3])
def test_generator(gl, n):
    check(
        gl,
        lambda g: g("acc", "final", "i")(shapes.generator),
        shapes.generator.__code__,
        ("acc", "final", "i"),
        lambda: list(shapes.generator(n)),
        "generator",
    )


def test_coroutine(gl):
    check(
        gl,
        lambda g: g("x", "y")(shapes.coroutine),
        shapes.coroutine.__code__,
        ("x", "y"),
        lambda: asyncio.run(shapes.coroutine(4)),
        "coroutine",
    )


@pytest.mark.parametrize("attribute", ["method", "static", "klass"])
def test_methods(gl, attribute):
    raw = shapes.Model.__dict__[attribute]  # function, staticmethod or classmethod
    function = getattr(raw, "__func__", raw)
    check(
        gl,
        lambda g: g("attn")(raw),
        function.__code__,
        ("attn",),
        lambda: getattr(shapes.Model(), attribute)(5),
        function.__qualname__,
    )


def test_staticmethod_decorated_below(gl):
    class Holder:
        @staticmethod
        @gl("attn")
        def compute(x):
            attn = x * 3
            return attn

    function = Holder.__dict__["compute"].__func__
    check(gl, lambda g: None, function.__code__, ("attn",), lambda: Holder.compute(2),
          function.__qualname__)


def test_functools_wraps_wrapper_follows_wrapped(gl):
    wrapper = shapes.wraps_decorator(shapes.wrapped_target)
    assert gl("attn")(wrapper) is wrapper
    check(gl, lambda g: None, shapes.wrapped_target.__code__, ("attn",), lambda: wrapper(2),
          "wrapped_target")


def test_free_variable_of_nested_function(gl):
    inner = shapes.inner_free_variable_factory(3)
    check(gl, lambda g: g("outer", "total")(inner), inner.__code__, ("outer", "total"),
          lambda: inner(4), inner.__qualname__)


def test_nested_function_decorated_on_every_call_reuses_instrumented_code(gl):
    def outer(x):
        @gl("y")
        def inner(v):
            y = v + 1
            return y

        return inner(x), inner.__code__

    gl.activate()
    first, code_a = outer(1)
    second, code_b = outer(2)
    assert (first, second) == (2, 3)
    assert code_a is code_b
    assert gl.cache["test_nested_function_decorated_on_every_call_reuses_instrumented_code"
                    ".<locals>.outer.<locals>.inner"] == [2, 3]


def test_deactivated_function_runs_its_original_code_object(gl):
    original = shapes.straight.__code__
    gl("y")(shapes.straight)
    assert shapes.straight.__code__ is original
    gl.activate()
    assert shapes.straight.__code__ is not original
    gl.deactivate()
    assert shapes.straight.__code__ is original


def test_line_events_are_unchanged(gl):
    def lines_of(call, code):
        seen = []

        def trace(frame, event, arg):
            if frame.f_code.co_name == code.co_name and event in ("line", "return"):
                seen.append((event, frame.f_lineno))
            return trace

        sys.settrace(trace)
        try:
            call()
        finally:
            sys.settrace(None)
        return seen

    for function, args in [(shapes.nested_try, (2,)), (shapes.loops_with_returns, ([1, 42],))]:
        gl("a" if function is shapes.nested_try else "found")(function)
        before = lines_of(lambda: function(*args), function.__code__)
        gl.activate()
        after = lines_of(lambda: function(*args), function.__code__)
        gl.deactivate()
        assert after == before and before
