"""Warnings that point at the user's code, however deep inside the library they start.

A warning said while a user's function runs (a recorder, a hook, a decorator
applied inside a call) must never interrupt that function, also where the
warning filters make warnings errors (`pytest -W error`, `filterwarnings =
error`): raised there, the error would lose the call's result, leave the cache
with an entry for a call that raised, and, the warning being said once, fail
only the first call. So such a warning that the filters turn into an error is
held and raised at the next handover point, where the user's code meets the
library (`raise_pending`): get_local's activate/deactivate, a capture block's
exit, reading `get_local.cache`, sdpa_capture's and capture_attention's
start and stop.
"""
import collections
import sys
import threading
import warnings
from types import FrameType
from typing import Deque, Hashable, Optional, Set

# Top-level packages whose frames are skipped to reach the user's code: hooks
# and recorders run deep inside torch's Module.__call__ and transformers' code.
_INTERNAL = frozenset({"visualizer", "torch", "contextlib", "transformers"})


# Warnings the filters turned into errors while a user's function ran, oldest first.
_pending: Deque[Warning] = collections.deque()


def _user_stacklevel() -> int:
    """The stacklevel, for a warnings.warn() in the function that calls this one, of the
    first frame outside this library and the frameworks it runs inside."""
    frame: Optional[FrameType] = sys._getframe(2)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    return level + 1


def warn_user(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside this library and the
    frameworks it runs inside (torch, transformers, contextlib)."""
    warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


def warn_during_call(message: str) -> None:
    """`warn_user` from code that runs inside a user's call: if the filters make the
    warning an error, the error waits for the next handover point (`raise_pending`)."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())
    except Warning as error:
        _pending.append(error)


def raise_pending() -> None:
    """At a handover point: raise the first warning the filters made an error since the
    last one (the ones after it are dropped, as the first error would have stopped the
    code that said them)."""
    if not _pending:
        return
    try:
        first = _pending.popleft()
    except IndexError:  # another thread raised it meanwhile
        return
    _pending.clear()
    raise first


class WarnOnce:
    """`warn_during_call`, once per token: what a recorder says about one function or module.

    Each recorder has its own (a new recorder may say again what an old one
    said); the tokens name what the warning is about, e.g. ("missing", key, name).
    """

    def __init__(self) -> None:
        self._said: Set[Hashable] = set()
        self._lock = threading.Lock()

    def __call__(self, token: Hashable, message: str, *, now: bool = False) -> None:
        """Say `message` unless `token` was said; `now`: at a handover point, not in a call."""
        with self._lock:
            if token in self._said:
                return
            self._said.add(token)
        if now:
            warn_user(message)
        else:
            warn_during_call(message)
