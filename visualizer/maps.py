"""Attention maps by module path: `AttentionMaps`, what `capture_attention` fills.

Its entries enter through a store `Scope`, as `get_local`'s do: one bound
(`max_entries`, O(1) per call), one exact count of dropped entries, one
recycle path for cleared maps. Module paths are matched with globs
(`module_globs`, `matching`).
"""

import copy
import fnmatch
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import torch

from ._errors import VisualizerError
from ._pool import BufferPool
from ._warnings import WarnOnce
from .policy import StoragePolicy
from .store import Scope

# One recorded map: a numpy array, or a torch tensor with keep_on_device=True.
MapEntry = Union[np.ndarray, torch.Tensor]
# What `modules=` accepts: a glob or a list of globs over module paths.
Globs = Union[str, Iterable[str]]

if TYPE_CHECKING:
    _MapsBase = Dict[str, List[MapEntry]]
else:
    _MapsBase = dict


class AttentionMaps(_MapsBase):
    """Module path -> list of (B, H, Q, K) maps, one per call, in call order.

    Keys are names from `model.named_modules()`, in the order their modules
    first computed attention (forward order). Values are numpy arrays, or
    torch tensors with `keep_on_device=True`. Under `max_entries` each list
    is a `BoundedEntries` (a deque that drops its oldest entry in O(1) and
    reads like a list).

    Args:
        policy: how the recorder stores entries; its `max_entries` bounds each list.

    Attributes:
        dropped: module path -> entries dropped by `max_entries`.
        pool: while a recorder records into these maps, the BufferPool its
            copies take memory from (clear() hands the cleared maps to it);
            None otherwise, and in a copy (clear() then frees).
    """

    def __init__(self, policy: Optional[StoragePolicy] = None) -> None:
        super().__init__()
        self._scope = Scope(self, policy or StoragePolicy(), self._warn_bound)
        self._warn_once = WarnOnce()
        self.pool: Optional[BufferPool] = None

    @property
    def policy(self) -> StoragePolicy:
        """How entries are stored (the recorder's `keep_on_device`, `dtype`, `max_entries`)."""
        return self._scope.policy

    @property
    def dropped(self) -> Dict[str, int]:
        """Module path -> entries dropped by `max_entries` since the last clear()."""
        return self._scope.dropped

    def add(self, path: str, entry: MapEntry) -> None:
        """Append one call's map (already stored as the policy says) under a module path."""
        self._scope.append(path, entry)

    def clear(self) -> None:
        """Drop every map and the counts of dropped entries.

        While the recorder records, arrays nothing else references (nor a
        view, nor a tensor sharing their memory) become the destinations of
        the next maps' copies: a record/look/clear loop copies into warm
        memory instead of faulting fresh pages in on every forward. Lists a
        user took before clear() keep their contents.
        """
        taken = self._scope.clear(keep_keys=False)
        if self.pool is not None:
            self.pool.give_back(taken)

    def __reduce__(self) -> Tuple[Any, ...]:
        # Pickled, the maps are a plain dict of plain lists (as the original
        # Visualizer's cache): they load wherever numpy (or torch, for tensors)
        # is installed, this package or not. Drop counts stay behind.
        return (dict, ({path: list(calls) for path, calls in self.items()},))

    def __copy__(self) -> "AttentionMaps":
        # A copy is no recorder's: plain lists, its drop counts, no pool.
        return AttentionMaps.restored(self, self.dropped)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "AttentionMaps":
        entries = {path: copy.deepcopy(list(calls), memo) for path, calls in self.items()}
        return AttentionMaps.restored(entries, self.dropped)

    def stack(self, modules: Optional[Globs] = None, call: Optional[int] = None) -> MapEntry:
        """The maps of several modules as one (L, B, H, Q, K) array, in key order.

        Args:
            modules: a glob or list of globs over the keys (e.g. "encoder.*");
                None takes every key.
            call: which call of each module to take (e.g. -1 for the last
                forward). None requires exactly one call per module, so layers
                and calls are never confused.

        Returns:
            numpy array (or torch tensor for tensors kept on device) of shape
            (L, B, H, Q, K), L the number of modules taken.
        """
        keys = list(self) if modules is None else matching(list(self), module_globs(modules, "AttentionMaps.stack"))
        if not keys:
            raise VisualizerError(
                f"AttentionMaps.stack: no module to stack; modules={modules!r} matched none of "
                f"the {len(self)} keys {list(self)[:6]}"
            )
        entries: List[MapEntry] = []
        for key in keys:
            calls = dict.__getitem__(self, key)
            if call is None:
                if len(calls) != 1:
                    raise VisualizerError(
                        f"AttentionMaps.stack: {key!r} has {len(calls)} calls, expected one per "
                        "module (several forwards, generate() or a module used twice); pass "
                        "call=i to stack the i-th call of every module, e.g. call=-1 for the last"
                    )
                entries.append(calls[0])
            else:
                try:
                    entries.append(calls[call])
                except IndexError:
                    raise VisualizerError(
                        f"AttentionMaps.stack: call={call} is out of range for {key!r}, which has "
                        f"{len(calls)} calls"
                    ) from None
        shapes = {tuple(entry.shape) for entry in entries}
        if len(shapes) > 1:
            described = ", ".join(f"{key}: {tuple(e.shape)}" for key, e in zip(keys, entries))
            raise VisualizerError(
                f"AttentionMaps.stack: the maps have different shapes and cannot be stacked "
                f"({described}); select modules of one kind with modules='...', e.g. "
                "modules='encoder.*'"
            )
        if isinstance(entries[0], np.ndarray):
            return np.stack(entries)
        # One storage policy: all entries are tensors when the first is.
        return torch.stack(cast(List[torch.Tensor], entries))

    def __repr__(self) -> str:
        parts = []
        for key, calls in self.items():
            shapes = sorted({tuple(entry.shape) for entry in calls})
            shown = ", ".join(str(shape) for shape in shapes[:2]) + (
                ", ..." if len(shapes) > 2 else ""
            )
            parts.append(f"  {key!r}: {len(calls)} x {shown}")
        return "AttentionMaps({\n" + "\n".join(parts) + "\n})" if parts else "AttentionMaps({})"

    def _warn_bound(self, path: str, limit: int) -> None:
        self._warn_once(
            ("bound", path),
            f"capture_attention: the maps of {path!r} hold at most {limit} entries "
            "(max_entries); older entries are dropped, counted in maps.dropped",
        )

    @classmethod
    def restored(
        cls, entries: Mapping[str, Sequence[MapEntry]], dropped: Mapping[str, int]
    ) -> "AttentionMaps":
        """Maps rebuilt from their entries and drop counts (a copy, another rank's)."""
        maps = cls()
        for path, calls in entries.items():
            dict.__setitem__(maps, path, list(calls))
        maps._scope.count_dropped(dropped)
        return maps


def module_globs(modules: Globs, who: str) -> List[str]:
    candidates = [modules] if isinstance(modules, str) else modules
    globs: Optional[List[str]]
    try:
        globs = list(candidates)
    except TypeError:
        globs = None
    if not globs or not all(isinstance(glob, str) for glob in globs):
        raise VisualizerError(
            f"{who}: modules must be a glob or a non-empty list of globs over module paths, "
            f"e.g. 'encoder.*'; got {modules!r}"
        )
    return globs


def matching(paths: Iterable[str], globs: Sequence[str]) -> List[str]:
    return [path for path in paths if any(fnmatch.fnmatchcase(path, glob) for glob in globs)]
