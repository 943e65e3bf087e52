"""Bring the captures of every rank of a `torch.distributed` job to one process.

    get_local.activate(ranks=[0])               # or capture_attention(model, ranks=[0])
    ...
    everything = gather(get_local.cache)        # rank 0: {0: cache, 1: cache, ...}; else None
    everywhere = all_gather(maps)               # on every rank

Each rank's cache (a `get_local.cache` dict, or the `AttentionMaps` of
`capture_attention`) arrives whole, keys unchanged, under its rank: the rank is
the outer level, so nothing from two ranks is ever merged or confused. Values
keep their exact values and dtypes (numpy arrays stay numpy arrays; torch
tensors arrive as CPU tensors, since another rank's device may not exist here).

It uses `torch.distributed.gather_object` / `all_gather_object`, which pickle
the cache: use it between the processes of your own job. Memory: it moves
every captured byte, so the destination holds world_size caches at once (and,
with NCCL, each is staged through GPU memory); capture only what you need
(`rows=0`, `ranks=`, `max_entries=`) before gathering.
"""

import collections
from typing import Any, Dict, List, Optional, Union, overload

import numpy as np
import torch
import torch.distributed as dist

from ._errors import VisualizerError
from .maps import AttentionMaps

# A rank's cache: `get_local.cache` (key -> list of entries) or `AttentionMaps`.
Cache = Dict[str, List[Any]]
# What a cache holds per key: a list, or a BoundedEntries under max_entries.
_ENTRY_LISTS = (list, tuple, collections.deque)
# What one rank sends: {"entries": key -> entries, "dropped": key -> count}.
_Payload = Dict[str, Dict[str, Any]]


@overload
def gather(
    cache: AttentionMaps, dst: int = 0, group: "Optional[dist.ProcessGroup]" = None
) -> Optional[Dict[int, AttentionMaps]]: ...


@overload
def gather(
    cache: Cache, dst: int = 0, group: "Optional[dist.ProcessGroup]" = None
) -> Optional[Dict[int, Cache]]: ...


def gather(
    cache: Cache, dst: int = 0, group: "Optional[dist.ProcessGroup]" = None
) -> Union[Optional[Dict[int, AttentionMaps]], Optional[Dict[int, Cache]]]:
    """Every rank's cache, on rank `dst`.

    Args:
        cache: `get_local.cache` (a dict key -> list of entries) or the
            `AttentionMaps` of `capture_attention`; each rank passes its own.
        dst: the rank that receives.
        group: the process group (default: the world).

    Returns:
        On `dst`: a dict rank -> that rank's cache (same type as given). On
        every other rank: None.
    """
    _check_arguments("gather", cache, group)
    if isinstance(dst, bool) or not isinstance(dst, (int, np.integer)):
        raise VisualizerError(f"gather: dst must be an int (a global rank); got {dst!r}")
    dst = int(dst)
    world = _world("gather", group)
    members = _ranks_of(group, world)
    if dst not in members:
        raise VisualizerError(
            f"gather: dst must be the global rank of a process in the group, one of "
            f"{_ranks_text(members)}; got {dst}"
        )
    payload = _portable(cache)
    if dist.get_rank() == dst:
        received: List[Any] = [None] * world
        dist.gather_object(payload, received, dst=dst, group=group)
        return {rank: _restore(part, cache) for rank, part in enumerate(received)}
    dist.gather_object(payload, None, dst=dst, group=group)
    return None


@overload
def all_gather(
    cache: AttentionMaps, group: "Optional[dist.ProcessGroup]" = None
) -> Dict[int, AttentionMaps]: ...


@overload
def all_gather(cache: Cache, group: "Optional[dist.ProcessGroup]" = None) -> Dict[int, Cache]: ...


def all_gather(
    cache: Cache, group: "Optional[dist.ProcessGroup]" = None
) -> Union[Dict[int, AttentionMaps], Dict[int, Cache]]:
    """Every rank's cache, on every rank: a dict rank -> that rank's cache."""
    _check_arguments("all_gather", cache, group)
    world = _world("all_gather", group)
    received: List[Any] = [None] * world
    dist.all_gather_object(received, _portable(cache), group=group)
    return {rank: _restore(part, cache) for rank, part in enumerate(received)}


def _check_arguments(who: str, cache: object, group: object) -> None:
    """Refuse a cache or group of the wrong kind before any communication."""
    if not isinstance(cache, dict):
        raise VisualizerError(
            f"{who}: cache must be get_local.cache or the maps of capture_attention (a dict of "
            f"key -> list of entries); got {type(cache).__qualname__}"
        )
    for key, entries in cache.items():
        if not isinstance(entries, _ENTRY_LISTS):
            raise VisualizerError(
                f"{who}: cache must map each key to a list of entries; got "
                f"cache[{key!r}] = {type(entries).__qualname__}"
            )
    process_group = getattr(dist, "ProcessGroup", None)
    if group is not None and (process_group is None or not isinstance(group, process_group)):
        raise VisualizerError(
            f"{who}: group must be a torch.distributed process group or None (the world); "
            f"got {type(group).__qualname__}"
        )


def _world(who: str, group: "Optional[dist.ProcessGroup]") -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise VisualizerError(
            f"{who}: torch.distributed is not initialised; expected a process group "
            "(torch.distributed.init_process_group, or a torchrun / mp.spawn launch) before "
            "gathering captures"
        )
    return dist.get_world_size(group)


def _ranks_of(group: "Optional[dist.ProcessGroup]", world: int) -> List[int]:
    """The global ranks of ``group``'s processes (the world's when None)."""
    if group is None:
        return list(range(world))
    return list(dist.get_process_group_ranks(group))


def _ranks_text(ranks: List[int]) -> str:
    if ranks == list(range(len(ranks))):
        return f"0..{len(ranks) - 1}" if len(ranks) > 1 else "0"
    return str(ranks)


def _portable(cache: Cache) -> _Payload:
    """What one rank sends: plain containers, tensors on the CPU (exact copies)."""
    entries = {key: [_to_cpu(entry) for entry in values] for key, values in cache.items()}
    dropped = dict(getattr(cache, "dropped", {}))
    return {"entries": entries, "dropped": dropped}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {name: _to_cpu(item) for name, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _restore(payload: _Payload, like: Cache) -> Cache:
    """A received cache, as the type the caller passed."""
    if isinstance(like, AttentionMaps):
        return AttentionMaps.restored(payload["entries"], payload["dropped"])
    return dict(payload["entries"])
