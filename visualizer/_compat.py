"""Python-version flags and the opcode differences the rewrite depends on.

Every branch on the interpreter version lives here, so `_rewrite` reads as one
algorithm and a new CPython release means editing one small file.
"""
import sys
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

from bytecode import Instr, Label, TryBegin, TryEnd
from bytecode.instr import UNSET

if TYPE_CHECKING:
    from bytecode.instr import InstrLocation

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)

# Instructions that leave the frame with a value. 3.12 added RETURN_CONST.
RETURN_OPCODES = frozenset({"RETURN_VALUE", "RETURN_CONST"})


def recorder_call(
    recorder: Callable[..., object],
    argument_loads: Sequence[Any],
    count: int,
    location: "Optional[InstrLocation]",
) -> List[Any]:
    """Instructions that call `recorder` with `count` arguments and discard its result.

    `argument_loads` pushes the arguments (labels and exception-region
    markers may sit between the loads).

    The stack is left exactly as it was, so the sequence can sit in front of
    any return instruction. Every instruction gets the return's location, so
    tracebacks and `sys.settrace` line events do not change.
    """
    def instr(name: str, *arg: Any) -> Instr:
        return Instr(name, *arg, location=location)

    return call([instr("LOAD_CONST", recorder)], argument_loads, count, location) + [
        instr("POP_TOP")]


def call(
    callee_loads: Sequence[Any],
    argument_loads: Sequence[Any],
    count: int,
    location: "Optional[InstrLocation]",
) -> List[Any]:
    """Instructions that call what `callee_loads` pushes and push the result."""
    def instr(name: str, *arg: Any) -> Instr:
        return Instr(name, *arg, location=location)

    if PY313:
        # 3.13 pushes the callable first, then NULL (the "self" slot).
        head = list(callee_loads) + [instr("PUSH_NULL")]
        tail = [instr("CALL", count)]
    elif PY312:
        head = [instr("PUSH_NULL")] + list(callee_loads)
        tail = [instr("CALL", count)]
    elif PY311:
        head = [instr("PUSH_NULL")] + list(callee_loads)
        tail = [instr("PRECALL", count), instr("CALL", count)]
    else:
        head = list(callee_loads)
        tail = [instr("CALL_FUNCTION", count)]
    return head + list(argument_loads) + tail


def load_global(name: str, location: "Optional[InstrLocation]") -> Instr:
    """Push the global (or builtin) `name`."""
    # 3.11 gave LOAD_GLOBAL a flag that also pushes NULL: not used (see `call`).
    return Instr("LOAD_GLOBAL", (False, name) if PY311 else name, location=location)


def jump_if_none(target: Label, location: "Optional[InstrLocation]") -> List[Instr]:
    """Pop the top of the stack and jump forward to `target` if it is None."""
    if PY312:
        return [Instr("POP_JUMP_IF_NONE", target, location=location)]
    if PY311:
        return [Instr("POP_JUMP_FORWARD_IF_NONE", target, location=location)]
    none = Instr("LOAD_CONST", None, location=location)  # type: ignore[arg-type]
    return [none, Instr("IS_OP", 0, location=location),
            Instr("POP_JUMP_IF_TRUE", target, location=location)]


def load_attribute(name: str, location: "Optional[InstrLocation]") -> Instr:
    """Replace the object on top of the stack by its attribute `name`."""
    # 3.12 merged LOAD_METHOD into LOAD_ATTR: its argument says which it is.
    return Instr("LOAD_ATTR", (False, name) if PY312 else name, location=location)


def jump_if_false(target: Label, location: "Optional[InstrLocation]") -> Instr:
    """Pop the top of the stack (a bool) and jump forward to `target` if it is false."""
    name = "POP_JUMP_FORWARD_IF_FALSE" if PY311 and not PY312 else "POP_JUMP_IF_FALSE"
    return Instr(name, target, location=location)


def guarded_load(
    load: "Tuple[str, Any]",
    fallback: object,
    location: "Optional[InstrLocation]",
    region: Optional[TryBegin],
) -> "Tuple[List[Any], List[Any], Optional[TryBegin]]":
    """A load of one local that pushes `fallback` where the local is unbound.

    `load` is (opcode, argument) of the plain load; `region` is the 3.11+
    exception-table region (a TryBegin) the load sits in, or None.

    Returns (inline, handler, region_after): `inline` replaces the load,
    `handler` goes after the function's last instruction (off the path of a
    bound name), and `region_after` is the region the code after the load is
    in: a region that was open is closed around the load and opened again as
    a new TryBegin with the same handler, because 3.11+ regions cannot nest.
    """
    opcode, argument = load

    def instr(name: str, *arg: Any) -> Instr:
        return Instr(name, *arg, location=location)

    if PY312 and opcode == "LOAD_FAST":
        opcode = "LOAD_FAST_CHECK"  # raises UnboundLocalError instead of pushing NULL
    caught, resume = Label(), Label()
    inline: List[Any]
    handler: List[Any]
    if PY311:
        ours = TryBegin(caught, push_lasti=False, stack_depth=UNSET)
        inline = [ours, instr(opcode, argument), TryEnd(ours), resume]
        if PY313:
            # 3.13 looks up the handler of an error raised inside a called
            # frame at the code unit BEFORE the call: without this NOP an
            # error from the recorder (or the next load) would land in our
            # handler, which then calls the wrong object.
            inline.append(instr("NOP"))
        region_after = region
        if region is not None:
            region_after = TryBegin(region.target, region.push_lasti, region.stack_depth)
            inline = [TryEnd(region)] + inline + [region_after]
        # The handler finds the stack as before the load plus the exception.
        handler = [caught, instr("POP_TOP"), instr("LOAD_CONST", fallback),
                   instr("JUMP_BACKWARD", resume)]
        return inline, handler, region_after
    # 3.9/3.10: the handler gets the previous and the new exception (3 values
    # each) and a handler block; POP_EXCEPT restores the previous exception.
    inline = [instr("SETUP_FINALLY", caught), instr(opcode, argument), instr("POP_BLOCK"), resume]
    handler = [caught] + [instr("POP_TOP")] * 3 + [
        instr("POP_EXCEPT"), instr("LOAD_CONST", fallback), instr("JUMP_ABSOLUTE", resume)]
    return inline, handler, region
