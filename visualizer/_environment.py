"""Capture switched on from the environment, for processes a script does not start itself.

torchrun workers, `torch.multiprocessing.spawn` children and DataLoader
workers import the library afresh and do not inherit `get_local.activate()`.
They do inherit the environment: with `VISUALIZER_CAPTURE=1`, `import
visualizer` switches `get_local` on, with these options:

    VISUALIZER_RANKS=0,1            ranks= (only these ranks capture)
    VISUALIZER_KEEP_ON_DEVICE=1     keep_on_device=True
    VISUALIZER_DTYPE=float16        dtype=
    VISUALIZER_MAX_ENTRIES=12       max_entries=

A value that cannot be read is an error naming the variable, raised at import.
"""

import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Protocol

from ._errors import VisualizerError
from ._ranks import current_rank


class Switch(Protocol):
    """What this module switches on: `get_local` (imported by the package, not here)."""

    @property
    def activate(self) -> Callable[..., None]: ...

    @property
    def is_active(self) -> bool: ...

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def switch_on_from_environment(
    get_local: Switch, environ: Mapping[str, str] = os.environ
) -> bool:
    """Activate `get_local` as the VISUALIZER_* variables say; return whether it did."""
    if not _flag(environ, "VISUALIZER_CAPTURE"):
        return False
    options: Dict[str, Any] = {"keep_on_device": _flag(environ, "VISUALIZER_KEEP_ON_DEVICE")}
    if environ.get("VISUALIZER_DTYPE", "").strip():
        options["dtype"] = environ["VISUALIZER_DTYPE"].strip()
    if environ.get("VISUALIZER_MAX_ENTRIES", "").strip():
        options["max_entries"] = _integers(environ, "VISUALIZER_MAX_ENTRIES", several=False)[0]
    if environ.get("VISUALIZER_RANKS", "").strip():
        options["ranks"] = _integers(environ, "VISUALIZER_RANKS", several=True)
        if current_rank() is None:
            warnings.warn(
                f"visualizer: VISUALIZER_RANKS={environ['VISUALIZER_RANKS']} but this child "
                "process's rank is not known at import (no RANK or LOCAL_RANK, torch.distributed "
                "not initialised), so capture stays off here; call get_local.activate(ranks=...) "
                "after torch.distributed.init_process_group",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
    try:
        get_local.activate(**options)
    except VisualizerError as error:
        raise VisualizerError(f"VISUALIZER_* environment variables: {error}") from None
    return get_local.is_active


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise VisualizerError(
        f"{name} must be one of {_TRUE + _FALSE[1:]} or empty; got {environ[name]!r}"
    )


def _integers(environ: Mapping[str, str], name: str, several: bool) -> List[int]:
    parts = environ[name].split(",") if several else [environ[name]]
    if not all(part.strip().isdigit() for part in parts):
        expected = "comma-separated non-negative integers" if several else "a non-negative integer"
        raise VisualizerError(f"{name} must be {expected}; got {environ[name]!r}")
    return [int(part) for part in parts]
