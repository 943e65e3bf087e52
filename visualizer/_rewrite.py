"""Bytecode instrumentation: call a recorder with chosen locals before every return.

The rewrite touches nothing but the code in front of return instructions:

    ...                                ...
    RETURN_VALUE          becomes      LOAD_CONST recorder; <load each name>; CALL; POP_TOP
                                       RETURN_VALUE

Every return is instrumented (not "the last instruction"): compilers duplicate
returns into branches and put exception handlers last. No wrapper is added, so
the function object stays the same object and swapping `__code__` back
restores the original exactly.

A name may be unbound at a return: never assigned on the path taken, deleted
(also by a nested function's `nonlocal x; del x`), or removed by a debugger
(`del x` in pdb, a `jump` past the assignment). Each name is therefore loaded
by a *guarded load*: a checking load (`LOAD_FAST_CHECK` from 3.12, where plain
`LOAD_FAST` of an unbound local pushes NULL and can crash the interpreter)
inside a one-instruction exception region whose handler, placed after the
function's last instruction, replaces the error with MISSING and jumps back.
On 3.11+ the region costs nothing when the name is bound (exception tables are
zero-cost); on 3.9/3.10 it is a SETUP_FINALLY/POP_BLOCK pair.

Where the recorder is a `Global` (functions without `select`, where torch is
loaded and records inside compiled graphs), the code loads it by name from the
function's globals instead of as a constant, and skips the call while that
global is None:

    LOAD_GLOBAL R; POP_JUMP_IF_NONE done; R(<loads>); done: RETURN_VALUE

torch.compile's Dynamo traces a global (it cannot trace a function held as a
code constant) and guards its compiled code on the global's value: code
compiled while R is the recorder records from inside its graph, code compiled
while R is None runs without capture, and switching R picks one or the other
with no recompilation (see `capture.py`). Measured (benchmarks/run_all.py,
section a): with R None, +3-8 ns a call on 3.9-3.13; with R the recorder, the
fast path's loads by name cost +10-20 ns a call over constants without torch,
which is why code without torch keeps the constants form.

With one name and no `select`, the call takes a fast path for values that
need no copy (int, float, str, ...: see `FastPath`):

    type(v) in TYPES ? sink.call(v) : recorder(v)

where `sink.call` is, most of the time, the C-level `append` of the cache's
list: no Python frame runs, which halves the cost of capture for such values
(benchmarks/run_all.py, section a). The store re-points the sink whenever the
list or the rules change (see `visualizer.cache.FastSink`). `type`, TYPES and
the sink are loaded by name too (TYPE_NAME, NEXT_NAME, `FastPath`'s names).

Why not a proof of boundness plus a fallback read of `frame.f_locals` (what
this module did before): no static proof survives a debugger's edits, and on
3.9-3.12 reading `f_locals` writes every local into the dict that `locals()`
returned to the function, changing a value the user holds. The guarded load
reads nothing but the one slot, and the function's own semantics never change.
"""
from types import CodeType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from bytecode import Bytecode, CellVar, FreeVar, Instr, Label, TryBegin, TryEnd

from ._compat import (
    RETURN_OPCODES,
    call,
    guarded_load,
    jump_if_false,
    jump_if_none,
    load_attribute,
    load_global,
    recorder_call,
)

if TYPE_CHECKING:
    from bytecode.instr import InstrLocation


def local_names(code: CodeType) -> Set[str]:
    """Every name a function can capture: fast locals, cell and free variables."""
    return set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)


# The names instrumented code loads the builtins `type` and `next` by: a module
# may bind `type` or `next` to something else. The installer binds them.
TYPE_NAME = "__visualizer_type__"
NEXT_NAME = "__visualizer_next__"


class Global(NamedTuple):
    """The recorder as a global of the function: its name (see the module docstring)."""

    name: str


class FastPath(NamedTuple):
    """Send values of some types to `sink.call(value)` instead of the recorder.

    For values that need no snapshot: the type test is inline and `sink.call`
    can be a C function (a list's append), so no Python frame is entered.
    `counted`: call `next(sink.ticks)` before `sink.call` (a bounded cache
    counts its appends; `next` of an iterator is the cheapest C call there is).
    `types` (a frozenset of types) and `sink` are loaded as constants, or as
    globals where they are `Global`s (with a `Global` recorder).
    """

    types: Any
    sink: Any
    counted: bool


def instrument(
    code: CodeType,
    names: Sequence[str],
    recorder: Union[Callable[..., object], Global],
    missing: object,
    fast: Optional[FastPath] = None,
) -> CodeType:
    """Return a copy of `code` that calls `recorder(*values)` before every return.

    Args:
        code: the function's code object.
        names: local variable names, in the order `recorder` receives them.
        recorder: called as `recorder(value_0, ..., value_n)`; a `Global`: the
            function's global of that name, not called while it is None.
        missing: the value passed for a name that is unbound at that return.
        fast: with one name, where values of `fast.types` go instead (see FastPath).
    """
    if fast is not None and len(names) != 1:
        raise ValueError(f"a fast path takes one name; got {list(names)}")
    bytecode = Bytecode.from_code(code)
    rewritten: List[Any] = []
    handlers: List[Any] = []
    # 3.11+: the exception-table region the scan is in, and the TryBegin of the
    # function's code it continues. A guarded load inside a region closes it
    # and opens a copy after the load (regions do not nest): the region's
    # TryEnd then ends the copy.
    region: Optional[TryBegin] = None
    continued: Optional[TryBegin] = None
    for item in bytecode:
        if isinstance(item, TryBegin):
            region = continued = item
        elif isinstance(item, TryEnd):
            if region is not None and item.entry is continued:
                item.entry = region
            region = continued = None
        elif isinstance(item, Instr) and item.name in RETURN_OPCODES:
            location = item.location

            def loads() -> List[Any]:
                nonlocal region
                pushed = []
                for name in names:
                    inline, handler, region = guarded_load(
                        _load(name, code), missing, location, region
                    )
                    pushed.extend(inline)
                    handlers.extend(handler)
                return pushed

            if isinstance(recorder, Global):
                rewritten.extend(_global_call(recorder, fast, loads, len(names), location))
            elif fast is None:
                rewritten.extend(recorder_call(recorder, loads(), len(names), location))
            else:
                rewritten.extend(_fast_path_call(fast, recorder, loads, location))
        rewritten.append(item)
    bytecode.clear()
    bytecode.extend(rewritten + handlers)
    # `bytecode` numbers locals in order of first use after the arguments, which
    # can reorder co_varnames (seen on 3.13): list(locals()) and debuggers would
    # show another order. It seeds the numbering with `argnames`: seed all.
    bytecode.argnames = list(code.co_varnames)
    return bytecode.to_code()


def _global_call(
    recorder: Global,
    fast: Optional[FastPath],
    loads: Callable[[], List[Any]],
    count: int,
    location: "Optional[InstrLocation]",
) -> List[Any]:
    """`if R is not None:` R(values), or the fast path's sink, for a `Global` recorder R."""
    def instr(name: str, *arg: Any) -> Instr:
        return Instr(name, *arg, location=location)

    def the_recorder() -> List[Any]:
        return [load_global(recorder.name, location)]

    done = Label()
    off = the_recorder() + jump_if_none(done, location)
    if fast is None:
        return off + call(the_recorder(), loads(), count, location) + [instr("POP_TOP"), done]
    return off + _fast_path_call(fast, recorder, loads, location) + [done]


def _fast_path_call(
    fast: FastPath,
    recorder: Union[Callable[..., object], Global],
    loads: Callable[[], List[Any]],
    location: "Optional[InstrLocation]",
) -> List[Any]:
    """[`next(sink.ticks)`] `sink.call(v)` if type(v) in fast.types, else `recorder(v)`.

    `loads()` gives a new guarded load of v each time: measured faster than
    loading v once and copying it on the stack, on every Python (3.9-3.13).
    """
    def instr(name: str, *arg: Any) -> Instr:
        return Instr(name, *arg, location=location)

    by_name = isinstance(recorder, Global)

    def push(value: Any, name: str = "") -> Instr:
        """A constant, or with a Global recorder, a global (`name`, or the value's own)."""
        if isinstance(value, Global):
            return load_global(value.name, location)
        if by_name and name:
            return load_global(name, location)
        return instr("LOAD_CONST", value)

    def sink(attribute: str) -> List[Any]:
        return [push(fast.sink), load_attribute(attribute, location)]

    slow, done = Label(), Label()
    test = call([push(type, TYPE_NAME)], loads(), 1, location) + [
        push(fast.types), instr("CONTAINS_OP", 0), jump_if_false(slow, location)]
    to_sink = call(sink("call"), loads(), 1, location) + [instr("POP_TOP")]
    if fast.counted:
        # The tick comes first: a `call` that is the recorder counts by itself,
        # and may re-point the sink (the tick read after it would count again).
        to_sink = call([push(next, NEXT_NAME)], sink("ticks"), 1, location) + [
            instr("POP_TOP")] + to_sink
    to_recorder = [instr("JUMP_FORWARD", done), slow] + call(
        [push(recorder)], loads(), 1, location) + [instr("POP_TOP"), done]
    return test + to_sink + to_recorder


def _load(name: str, code: CodeType) -> Tuple[str, Any]:
    if name in code.co_cellvars:
        # From 3.11 LOAD_FAST on a cell returns the cell object, and before 3.11
        # a cell argument's fast slot keeps the stale argument value.
        return "LOAD_DEREF", CellVar(name)
    if name in code.co_freevars:
        return "LOAD_DEREF", FreeVar(name)
    return "LOAD_FAST", name

