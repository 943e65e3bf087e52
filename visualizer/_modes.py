"""Putting torch function modes on and off this thread's mode stack, wherever they sit.

`fused` (sdpa_capture) and `attention` (capture_attention) both record through
a `TorchFunctionMode`, and both must take theirs off the stack even when other
modes were entered after it and are still open.
"""

from typing import List

import torch
from torch.overrides import TorchFunctionMode


def push_mode(mode: TorchFunctionMode) -> None:
    """Put `mode` on top of this thread's torch function mode stack."""
    torch.overrides._push_mode(mode)


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take `mode` off this thread's torch function mode stack, wherever it is.

    Modes entered after it (a user's own `with SomeMode():` still open) are
    put back in their order, so their own exits still find them on top.
    Returns whether `mode` was on the stack.
    """
    stack = torch.overrides._get_current_function_mode_stack()
    if not any(entry is mode for entry in stack):
        return False
    above: List[TorchFunctionMode] = []
    while True:
        top = torch.overrides._pop_mode()
        if top is mode:
            break
        above.append(top)
    for entry in reversed(above):
        torch.overrides._push_mode(entry)
    return True
