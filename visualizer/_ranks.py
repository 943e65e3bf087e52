"""Which process of a distributed job this is, for `ranks=`; torch is never imported here.

A process's rank comes from `torch.distributed` once it is initialised, and
before that from the launcher's environment (`RANK`, then `LOCAL_RANK`, as
torchrun sets them). A process that is neither, and was not started by another
Python process, is a plain single-process run: rank 0. A child process
(`torch.multiprocessing.spawn`) with no rank anywhere yet cannot be placed:
switching capture on there with `ranks=` is an error that says what to do.
"""

import multiprocessing
import operator
import os
import sys
from typing import AbstractSet, FrozenSet, Iterable, Optional, SupportsIndex, Union

from ._errors import VisualizerError

# What `ranks=` accepts: None (every process), one rank, or several.
Ranks = Optional[Union[int, Iterable[SupportsIndex]]]


def validate_ranks(ranks: Ranks, who: str) -> Optional[FrozenSet[int]]:
    """`ranks=` as given: None (every process), an int or a sequence of ints >= 0."""
    if ranks is None:
        return None
    items = (ranks,) if isinstance(ranks, int) else ranks
    try:
        checked = frozenset(_rank(item) for item in items)
    except TypeError:
        raise VisualizerError(
            f"{who}: ranks must be None, an int or a sequence of ints >= 0; got {ranks!r}"
        ) from None
    if not checked:
        raise VisualizerError(f"{who}: ranks must name at least one rank; got {ranks!r}")
    return checked


def _rank(item: SupportsIndex) -> int:
    if isinstance(item, bool) or operator.index(item) < 0:
        raise TypeError("not a rank")
    return operator.index(item)


def current_rank() -> Optional[int]:
    """This process's global rank, or None when it cannot be known yet."""
    torch = sys.modules.get("torch")
    distributed = getattr(torch, "distributed", None) if torch is not None else None
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    if multiprocessing.parent_process() is None:
        return 0
    return None


def captures_here(ranks: Optional[AbstractSet[int]], who: str) -> bool:
    """Whether this process captures under `ranks` (checked by `validate_ranks`)."""
    if ranks is None:
        return True
    rank = current_rank()
    if rank is None:
        raise VisualizerError(
            f"{who}: ranks={sorted(ranks)} needs this process's rank, but torch.distributed "
            "is not initialised and neither RANK nor LOCAL_RANK is set in this child process; "
            "switch capture on after torch.distributed.init_process_group, or set RANK"
        )
    return rank in ranks
