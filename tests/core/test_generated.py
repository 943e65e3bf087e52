"""Property test: random functions, capture on vs off, captures vs the settrace oracle.

The generator writes small functions out of the constructs that decide
whether a name is bound at a return: branches, loops with break/continue,
try/except/finally, with blocks that may suppress, early returns, raises,
del, comprehensions reusing a name, nested functions that turn a name into a
cell variable (and `nonlocal` ones that assign or delete it), `locals()` dicts
the function returns, and a debugger's edits of the frame (`del` through
`f_locals`, `jump` over an assignment) made by a trace function in every run.
"""
import textwrap
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.oracle import debugging, run_with_oracle, same
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
    simple = ["assign", "assign", "return", "raise", "del", "closure", "nonlocal", "locals",
              "debugger del"]
    if depth == 0:
        # Jumps only where the value stack is empty: CPython 3.10 itself
        # crashes on some jumps inside with/try/for blocks, capture or not.
        simple.append("debugger jump")
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
    if kind == "nonlocal":
        edited = draw(name)
        change = f"del {edited}" if draw(st.booleans()) else f"{edited} = p0"
        return [f"def edit_{edited}():", f"    nonlocal {edited}", f"    {change}",
                f"if p1 == {draw(small)}:", f"    edit_{edited}()"]
    if kind == "locals":
        return ["seen = locals()"]
    if kind == "debugger del":
        return [f'debugger("del {draw(name)}")']
    if kind == "debugger jump":
        return ['debugger("jump")', f"{draw(name)} = {draw(expression())}", 'debugger("landed")']
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
    if any(line.strip() == "seen = locals()" for line in body) and draw(st.booleans()):
        body.append("return seen")  # the dict itself: nothing may write into it
    elif draw(st.booleans()):
        body.append(f"return {draw(expression())}")
    # Make every name a local even if the drawn body never assigns it.
    body.append("if p0 is None:")
    body.append("    " + " = ".join(NAMES) + " = None")
    source = "def generated(p0, p1):\n" + textwrap.indent("\n".join(body), "    ") + "\n"
    return source


def debugger(command):
    """Marks a line where the test's trace function edits the frame, as pdb would."""


def debugger_edits(source):
    """line number -> edit, for the debugger(...) lines of a generated function."""
    edits = {}
    for number, line in enumerate(source.splitlines(), start=1):
        if 'debugger("del ' in line:
            edits[number] = ("del", line.split('"')[1].split()[1])
        elif 'debugger("jump")' in line:
            edits[number] = ("jump", number + 2)  # over the assignment below it
    return edits


def editing(edits):
    def on_line(frame):
        edit = edits.get(frame.f_lineno)
        if edit is None:
            return
        kind, argument = edit
        if kind == "del":
            if argument not in frame.f_locals:
                return
            try:
                # Written back to the frame after the trace function returns
                # (3.9-3.11; 3.12 writes None instead of unbinding).
                del frame.f_locals[argument]
            except TypeError:
                pass  # 3.13: a FrameLocalsProxy cannot remove variables
        else:
            frame.f_lineno = argument

    return on_line


def _comparable(value, container):
    if value is container:
        return "<itself>"
    if isinstance(value, dict):  # an earlier locals() dict (3.13 returns snapshots)
        return {k: _comparable(v, value) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__"):  # a new inner function each call
        return f"<function {value.__qualname__}>"
    if isinstance(value, BaseException):  # a new exception object each call
        return (type(value), value.args)
    return value


def outcome_of(call):
    try:
        value = call()
        if isinstance(value, dict):  # a locals() dict, which may hold itself
            value = {k: _comparable(v, value) for k, v in value.items()}
        return ("value", value)
    except Exception as error:  # the outcome to compare, not a failure of the test
        return ("raise", type(error), str(error))


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(source=program(), inputs=st.lists(st.tuples(small, small), min_size=1, max_size=3))
def test_random_function(source, inputs):
    namespace = {"Resource": Resource, "debugger": debugger}
    exec(compile(source, "<generated>", "exec"), namespace)
    function = namespace["generated"]
    original = function.__code__
    on_line = editing(debugger_edits(source))
    gl = GetLocal()
    gl(*NAMES)(function)
    with warnings.catch_warnings():
        # 3.12+ warns when a jump leaves a local unbound (it binds None).
        warnings.simplefilter("ignore", RuntimeWarning)
        for p0, p1 in inputs:
            # The outcome from a run without the oracle: its reads of f_locals
            # would write into a locals() dict the function returns.
            with debugging(original, on_line):
                expected_outcome = outcome_of(lambda: function(p0, p1))
            _, expected = run_with_oracle(lambda: function(p0, p1), original, NAMES, on_line)
            gl.activate()
            try:
                with debugging(function.__code__, on_line):
                    outcome = outcome_of(lambda: function(p0, p1))
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
