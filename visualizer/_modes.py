"""The one TorchFunctionMode recorders watch torch calls with, and its place on the mode stack.

`sdpa_capture` (fused) and `capture_attention` (attention) both record through
a `WatchMode`: it runs every torch function unchanged and then tells its
recorder about the calls it watches. Both must take theirs off the stack even
when other modes were entered after it and are still open.
"""

from typing import Any, Callable, Collection, Dict, FrozenSet, List, Optional, Tuple

from torch.overrides import TorchFunctionMode

from ._torch_internals import compiling_check, mode_stack, pop_mode, push_mode

# Told (func, args, kwargs, output) after a watched call ran.
Listener = Callable[[Callable[..., Any], Tuple[Any, ...], Dict[str, Any], Any], None]


class WatchMode(TorchFunctionMode):
    """Runs every torch function as is; shows the watched ones to `listener` after.

    `on` False passes every call through untouched (a mode switched off from
    another thread may still sit on this thread's stack). `calls` counts the
    torch calls seen while on, so a recorder can tell "none of them was
    attention" from "nothing ran". Calls are counted only where Dynamo is not
    tracing: Dynamo (torch 2.6-2.8) traces this method into compiled graphs, and a
    count it read and changed there failed its own guard check.
    """

    def __init__(self, watched: FrozenSet[Any], listener: Listener) -> None:
        super().__init__()
        self.watched = watched
        self.listener = listener
        self.on = True
        self.calls = 0
        self._compiling = compiling_check()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        # The real call first, with the original arguments: the model's output
        # is exactly what it computes, and an invalid call raises torch's own
        # error. Inside this method torch has taken the mode off the stack, so
        # neither this call nor what the listener computes comes back here.
        output = func(*args, **kwargs)
        if self.on:
            if not self._compiling():
                self.calls += 1
            if func in self.watched:
                self.listener(func, args, kwargs, output)
        return output


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take `mode` off this thread's torch function mode stack, wherever it is.

    Modes entered after it (a user's own `with SomeMode():` still open) are
    put back in their order, so their own exits still find them on top.
    Returns whether `mode` was on the stack.
    """
    if not any(entry is mode for entry in mode_stack()):
        return False
    above: List[TorchFunctionMode] = []
    while True:
        top = pop_mode()
        if top is mode:
            break
        above.append(top)
    for entry in reversed(above):
        push_mode(entry)
    return True
