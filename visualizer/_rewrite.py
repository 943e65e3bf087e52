"""Bytecode instrumentation: call a recorder with chosen locals before every return.

The rewrite touches nothing but the code in front of return instructions:

    ...                                ...
    RETURN_VALUE          becomes      LOAD_CONST recorder; <load each name>; CALL; POP_TOP
                                       RETURN_VALUE

Every return is instrumented (not "the last instruction"): compilers duplicate
returns into branches and put exception handlers last. No wrapper and no
try/except is added, so the function object stays the same object and
swapping `__code__` back restores the original exactly.

Loading a local is only safe where it is bound: from 3.12 on, LOAD_FAST of an
unbound local pushes NULL and can crash the interpreter (before, it raises
UnboundLocalError, which would break the user's function just the same). A
definite-assignment analysis over the control flow decides, per return, which
names are proven bound. The others are passed as READ_FROM_FRAME, and the
recorder reads them from the frame's locals, where an unbound name is simply
absent.
"""
import dis

from bytecode import Bytecode, CellVar, FreeVar, Instr, Label, TryBegin, TryEnd

from ._compat import (
    DELETE_ONE,
    RETURN_OPCODES,
    SAVE_AND_CLEAR,
    SETUP_HANDLER_OPCODES,
    STORE_BOTH_OF_PAIR,
    STORE_FIRST_OF_PAIR,
    STORE_ONE,
    recorder_call,
)


class _ReadFromFrame:
    """Placeholder argument: "this local may be unbound here; read it from the frame"."""

    __slots__ = ()

    def __repr__(self):
        return "READ_FROM_FRAME"


READ_FROM_FRAME = _ReadFromFrame()


def local_names(code):
    """Every name a function can capture: fast locals, cell and free variables."""
    return set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)


def instrument(code, names, recorder):
    """Return a copy of `code` that calls `recorder(*values)` before every return.

    Args:
        code: the function's code object.
        names: local variable names, in the order `recorder` receives them.
        recorder: called as `recorder(value_0, ..., value_n)`; a value is
            READ_FROM_FRAME where the name may be unbound at that return.
    """
    bytecode = Bytecode.from_code(code)
    items = list(bytecode)
    bound_before = _definitely_bound(items, code, frozenset(names))
    rewritten = []
    for item, bound in zip(items, bound_before):
        if isinstance(item, Instr) and item.name in RETURN_OPCODES:
            loads = [_load(name, code, bound) for name in names]
            rewritten.extend(recorder_call(recorder, loads, item.location))
        rewritten.append(item)
    bytecode.clear()
    bytecode.extend(rewritten)
    return bytecode.to_code()


def _load(name, code, bound):
    if (
        name in code.co_freevars
        or bound is None
        or name not in bound
        or name in _deleted_by_nested_functions(code)
    ):
        # A free variable may be unbound in the enclosing scope, and a cell
        # variable by a nested function (`nonlocal attn; del attn`): no
        # analysis of this function's own code can prove them bound.
        return Instr("LOAD_CONST", READ_FROM_FRAME)
    if name in code.co_cellvars:
        # From 3.11 LOAD_FAST on a cell returns the cell object, and before 3.11
        # a cell argument's fast slot keeps the stale argument value.
        return Instr("LOAD_DEREF", CellVar(name))
    return Instr("LOAD_FAST", name)


def _deleted_by_nested_functions(code):
    """Cell variables of `code` that a function nested in it (at any depth) deletes."""
    deleted = set()
    for constant in code.co_consts:
        if isinstance(constant, type(code)):
            deleted.update(
                instruction.argval
                for instruction in dis.get_instructions(constant)
                if instruction.opname == "DELETE_DEREF"
            )
            deleted.update(_deleted_by_nested_functions(constant))
    return deleted & set(code.co_cellvars)


def _variable_name(arg):
    return arg.name if isinstance(arg, (CellVar, FreeVar)) else arg


def _argument_names(code):
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & 0x04)  # CO_VARARGS
    count += bool(code.co_flags & 0x08)  # CO_VARKEYWORDS
    return frozenset(code.co_varnames[:count])


def _definitely_bound(items, code, tracked):
    """For each item of the abstract bytecode, the tracked names bound before it.

    A forward "must" data-flow analysis: a name is bound at a point if it is
    bound on every path to it. Returns None for items no path reaches.
    Exception edges are included, so handlers see only what every raising
    instruction had bound.
    """
    label_index = {item: i for i, item in enumerate(items) if isinstance(item, Label)}
    instructions = [(i, item) for i, item in enumerate(items) if isinstance(item, Instr)]

    # Names whose STORE_FAST may store NULL (3.12+ comprehension restore) are
    # never proven bound.
    never_proven = {item.arg for _, item in instructions if item.name == SAVE_AND_CLEAR}
    deleted_anywhere = {
        _variable_name(item.arg) for _, item in instructions if item.name in DELETE_ONE
    } | never_proven
    handler_of = _table_handlers(items, label_index)

    def transfer(instr, state):
        name = instr.name
        if name in STORE_ONE:
            stored = (_variable_name(instr.arg),)
        elif name in STORE_FIRST_OF_PAIR:
            stored = instr.arg[:1]
        elif name in STORE_BOTH_OF_PAIR:
            stored = instr.arg
        elif name in DELETE_ONE or name == SAVE_AND_CLEAR:
            return state - {_variable_name(instr.arg)}
        else:
            return state
        added = {n for n in stored if n in tracked and n not in never_proven}
        return state | added if added else state

    states = [None] * len(items)
    states[0] = _argument_names(code) & tracked
    pending = [0]
    while pending:
        i = pending.pop()
        before = states[i]
        item = items[i]
        successors = []
        if isinstance(item, Instr):
            after = transfer(item, before)
            if item.name in SETUP_HANDLER_OPCODES:
                # 3.9/3.10: the handler can be entered from anywhere in the
                # block; on the way there names can only be gained, or lost
                # through an explicit delete.
                successors.append((label_index[item.arg], before - deleted_anywhere))
            elif item.has_jump():
                successors.append((label_index[item.arg], after))
            if not item.is_final():
                successors.append((i + 1, after))
            if handler_of[i] is not None:
                # The instruction may raise before its own effect happens.
                successors.append((handler_of[i], before))
        else:
            successors.append((i + 1, before))
        for j, state in successors:
            if j >= len(items):
                continue
            old = states[j]
            new = state if old is None else old & state
            if new != old:
                states[j] = new
                pending.append(j)
    return states


def _table_handlers(items, label_index):
    """3.11+: the handler index protecting each instruction (exception-table ranges)."""
    handler_of = [None] * len(items)
    current = None
    for i, item in enumerate(items):
        if isinstance(item, TryBegin):
            current = item
        elif isinstance(item, TryEnd):
            if item.entry is current:
                current = None
        elif current is not None and isinstance(item, Instr):
            handler_of[i] = label_index[current.target]
    return handler_of
