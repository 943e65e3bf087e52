"""Warnings that point at the user's code, however deep inside the library they start."""
import sys
import warnings
from types import FrameType
from typing import Optional

# Top-level packages whose frames are skipped to reach the user's code: hooks
# and recorders run deep inside torch's Module.__call__ and transformers' code.
_INTERNAL = frozenset({"visualizer", "torch", "contextlib", "transformers"})


def warn_user(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside this library and the
    frameworks it runs inside (torch, transformers, contextlib)."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level + 1)
