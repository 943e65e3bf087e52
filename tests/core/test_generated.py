"""Property test: random functions, capture on vs off, captures vs the settrace oracle.

The generator writes small functions out of the constructs that decide
whether a name is bound at a return: branches, loops with break/continue,
try/except/finally, with blocks that may suppress, early returns, raises,
del, comprehensions reusing a name, and nested functions that turn a name
into a cell variable.
"""
import textwrap
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.oracle import run_with_oracle, same
from tests.core.shapes import Resource
from visualizer.capture import GetLocal

NAMES = ("v0", "v1", "v2", "v3")

name = st.sampled_from(NAMES)
small = st.integers(min_value=0, max_value=3)


@st.composite
def expression(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return "p0"
    if kind == 1:
        return f"p1 + {draw(small)}"
    if kind == 2:
        return f"{draw(name)} + 1"  # may read an unbound name: same error both ways
    if kind == 3:
        reused = draw(name)
        return f"[{reused} for {reused} in range(p0 % 3)]"
    return f"len([{draw(name)}])"


@st.composite
def block(draw, depth, in_loop):
    statements = draw(st.lists(statement(depth, in_loop), min_size=1, max_size=4))
    return [line for lines in statements for line in lines]


def indent(lines):
    return ["    " + line for line in lines]


@st.composite
def statement(draw, depth, in_loop):
    simple = ["assign", "assign", "return", "raise", "del", "closure"]
    nested = ["if", "for", "try", "with"] if depth < 3 else []
    loop_only = ["break", "continue"] if in_loop else []
    kind = draw(st.sampled_from(simple + nested + loop_only))
    if kind == "assign":
        return [f"{draw(name)} = {draw(expression())}"]
    if kind == "return":
        return [f"if p1 == {draw(small)}:", f"    return {draw(expression())}"]
    if kind == "raise":
        return [f"if p0 == {draw(small)}:", f"    raise ValueError({draw(small)})"]
    if kind == "del":
        return [f"del {draw(name)}"]
    if kind == "closure":
        captured = draw(name)
        return [f"def inner_{captured}():", f"    return {captured}"]
    if kind in ("break", "continue"):
        return [f"if p1 == {draw(small)}:", f"    {kind}"]
    body = draw(block(depth + 1, in_loop or kind == "for"))
    if kind == "if":
        other = draw(block(depth + 1, in_loop))
        return [f"if p0 > {draw(small)}:"] + indent(body) + ["else:"] + indent(other)
    if kind == "for":
        return [f"for {draw(name)} in range(p1 % 3):"] + indent(body)
    if kind == "with":
        suppress = draw(st.booleans())
        return [f"with Resource({suppress}) as {draw(name)}:"] + indent(body)
    handler = draw(block(depth + 1, in_loop))
    lines = ["try:"] + indent(body) + [f"except ValueError as {draw(name)}:"] + indent(handler)
    if draw(st.booleans()):
        lines += ["finally:"] + indent(draw(block(depth + 1, in_loop)))
    return lines


@st.composite
def program(draw):
    body = draw(block(0, False))
    if draw(st.booleans()):
        body.append(f"return {draw(expression())}")
    # Make every name a local even if the drawn body never assigns it.
    body.append("if p0 is None:")
    body.append("    " + " = ".join(NAMES) + " = None")
    source = "def generated(p0, p1):\n" + textwrap.indent("\n".join(body), "    ") + "\n"
    return source


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(source=program(), inputs=st.lists(st.tuples(small, small), min_size=1, max_size=3))
def test_random_function(source, inputs):
    namespace = {"Resource": Resource}
    exec(compile(source, "<generated>", "exec"), namespace)
    function = namespace["generated"]
    gl = GetLocal()
    gl(*NAMES)(function)
    for p0, p1 in inputs:
        expected_outcome, expected = run_with_oracle(
            lambda: function(p0, p1), function.__code__, NAMES
        )
        gl.activate()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    outcome = ("value", function(p0, p1))
                except Exception as error:
                    outcome = ("raise", type(error), str(error))
        finally:
            gl.deactivate()
        context = f"\n{source}\ninputs p0={p0} p1={p1}"
        assert outcome[0] == expected_outcome[0], f"{outcome} != {expected_outcome}{context}"
        assert all(same(a, b) for a, b in zip(outcome[1:], expected_outcome[1:])), context
        captured = gl.cache["generated"]
        assert len(captured) == len(expected), context
        if expected:
            for n in NAMES:
                assert same(captured[0][n], expected[0][NAMES.index(n)]), f"{n}: {context}"
        gl.clear()
