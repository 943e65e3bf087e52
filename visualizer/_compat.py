"""Python-version flags and the opcode differences the rewrite depends on.

Every branch on the interpreter version lives here, so `_rewrite` reads as one
algorithm and a new CPython release means editing one small file.
"""
import sys

from bytecode import Instr

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)

# Instructions that leave the frame with a value. 3.12 added RETURN_CONST.
RETURN_OPCODES = frozenset({"RETURN_VALUE", "RETURN_CONST"})

# Before 3.11 a handler is entered through a runtime block stack that these
# instructions push; from 3.11 on, handlers come from the exception table,
# which `bytecode` shows as TryBegin/TryEnd pseudo-instructions.
SETUP_HANDLER_OPCODES = frozenset({"SETUP_FINALLY", "SETUP_WITH", "SETUP_ASYNC_WITH"})

# Instructions that bind or unbind a local. 3.13 superinstructions carry two
# names in a tuple: (stored, stored) and (stored, loaded).
STORE_ONE = frozenset({"STORE_FAST", "STORE_DEREF"})
STORE_FIRST_OF_PAIR = frozenset({"STORE_FAST_LOAD_FAST"})
STORE_BOTH_OF_PAIR = frozenset({"STORE_FAST_STORE_FAST"})
DELETE_ONE = frozenset({"DELETE_FAST", "DELETE_DEREF"})

# 3.12+ inlined comprehensions save the outer value of the loop variable with
# LOAD_FAST_AND_CLEAR and put it back with a plain STORE_FAST afterwards. That
# STORE_FAST may store NULL (the name was unbound before), so a later store
# does not prove such a name bound.
SAVE_AND_CLEAR = "LOAD_FAST_AND_CLEAR"


def recorder_call(recorder, argument_loads, location):
    """Instructions that call `recorder(*arguments)` and discard its result.

    The stack is left exactly as it was, so the sequence can sit in front of
    any return instruction. Every instruction gets the return's location, so
    tracebacks and `sys.settrace` line events do not change.
    """
    count = len(argument_loads)

    def instr(name, *arg):
        return Instr(name, *arg, location=location)

    if PY313:
        # 3.13 pushes the callable first, then NULL (the "self" slot).
        head = [instr("LOAD_CONST", recorder), instr("PUSH_NULL")]
        call = [instr("CALL", count)]
    elif PY312:
        head = [instr("PUSH_NULL"), instr("LOAD_CONST", recorder)]
        call = [instr("CALL", count)]
    elif PY311:
        head = [instr("PUSH_NULL"), instr("LOAD_CONST", recorder)]
        call = [instr("PRECALL", count), instr("CALL", count)]
    else:
        head = [instr("LOAD_CONST", recorder)]
        call = [instr("CALL_FUNCTION", count)]
    return head + list(argument_loads) + call + [instr("POP_TOP")]
