"""Warm memory for the copies of captured maps: arrays of cleared entries, reused.

torch is never imported here: the pool handles tensors only when a caller
gives it one, so torch is then in `sys.modules`.
"""
import math
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

# Free arrays by (shape, dtype).
_Free = Dict[Tuple[Tuple[int, ...], np.dtype], List[np.ndarray]]


class BufferPool:
    """Arrays of cleared cache entries, reused as destinations of the next copies.

    Why: a large array allocated fresh has its pages faulted in by the copy
    that first writes it, which costs many times the copy itself (for the
    12 maps of a 518 px ViT-S forward, 516 MiB, about 25x; see benchmarks/).
    In a capture/look/clear loop the next forward copies maps of the same
    shapes, so clear() hands its arrays here and copies go to warm memory.

    Tensors kept on the CPU (`keep_on_device=True`) are recycled too: their
    copies are made by `lend()` into a numpy array, with `torch.from_numpy`,
    so the array's reference count says whether any tensor still uses its
    memory (every view of the tensor shares a storage that references the
    array; torch offers no public count of a storage's users).

    A buffer is handed out only when nothing else references it (a user's
    reference, a view or a tensor sharing its memory keeps it out: checked
    with the reference count when the cache is cleared and again when it is
    taken), so an entry a user holds is never written. Each `give_back()`
    first lets go of the buffers the previous one gave that no copy used, so
    the pool never holds more than one clear's worth of arrays.

    Whoever copies into the pool holds it (`hold()`, `let_go()`: get_local
    while on, a capture block, a recording model); a clear while nobody does
    frees its arrays instead (nothing would copy into them), and the last
    `let_go()` frees what the pool holds.
    """

    # Smaller arrays come from warm allocator memory anyway.
    MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self._free: _Free = {}
        self._lock = threading.Lock()
        self._holders = 0
        self._numpy_dtypes: Dict["torch.dtype", Optional[np.dtype]] = {}
        # id(tensor) -> (a weak reference to it, the array under its memory),
        # for the tensors empty() made that are alive.
        self._lent: Dict[int, Tuple[Any, np.ndarray]] = {}

    # -- who copies into it -------------------------------------------------

    def hold(self) -> None:
        """Say that copies into the pool follow (until the matching `let_go()`)."""
        with self._lock:
            self._holders += 1

    def let_go(self) -> None:
        """Undo one `hold()`; the last one frees every array the pool holds."""
        with self._lock:
            self._holders -= 1
            if self._holders <= 0:
                self._holders = 0
                self._free = {}

    @property
    def held(self) -> bool:
        """Whether anything copies into the pool: a clear() then recycles instead of freeing."""
        return self._holders > 0

    # -- what it holds (for tests and benchmarks) ----------------------------

    def free_count(self) -> int:
        """How many arrays wait for the next copies."""
        with self._lock:
            return sum(len(arrays) for arrays in self._free.values())

    def lent_count(self) -> int:
        """How many tensors made in the pool's memory are alive."""
        return len(self._lent)

    # -- copies -------------------------------------------------------------

    def _numpy_dtype(self, torch_dtype: "torch.dtype") -> Optional[np.dtype]:
        """numpy's dtype for a torch dtype; None where numpy has none (bfloat16)."""
        try:
            return self._numpy_dtypes[torch_dtype]
        except KeyError:
            pass
        torch = sys.modules["torch"]
        try:
            numpy_dtype: Optional[np.dtype] = torch.empty((), dtype=torch_dtype).numpy().dtype
        except (TypeError, RuntimeError):  # bfloat16; quantized dtypes
            numpy_dtype = None
        self._numpy_dtypes[torch_dtype] = numpy_dtype
        return numpy_dtype

    def _pop(self, shape: Tuple[int, ...], numpy_dtype: np.dtype) -> Optional[np.ndarray]:
        with self._lock:
            free = self._free.get((shape, numpy_dtype))
            while free:
                buffer = free.pop()
                # References: `buffer`'s and getrefcount's own. One more is a
                # tensor lend() made (or a view of it) that a user still holds.
                if sys.getrefcount(buffer) == 2:
                    return buffer
        return None

    def take(
        self, tensor: "torch.Tensor", dtype: "Optional[torch.dtype]"
    ) -> Optional[np.ndarray]:
        """A free array for a copy of `tensor` as `dtype` (None: its own), or None."""
        if not self._free:
            return None
        numpy_dtype = self._numpy_dtype(dtype if dtype is not None else tensor.dtype)
        if numpy_dtype is None:
            return None
        return self._pop(tuple(tensor.shape), numpy_dtype)

    def lend(
        self, tensor: "torch.Tensor", dtype: "Optional[torch.dtype]"
    ) -> "Optional[torch.Tensor]":
        """A copy of CPU `tensor` as `dtype` (None: its own) into `empty()`'s memory; None
        where the pool cannot help (see there) or a clone differs (a strided tensor keeps
        its strides, a subclass or sparse tensor its kind).
        """
        torch = sys.modules["torch"]
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout != torch.strided
            or not tensor.is_contiguous()
        ):
            return None
        lent = self.empty(tuple(tensor.shape), dtype if dtype is not None else tensor.dtype)
        if lent is not None:
            lent.copy_(tensor)
        return lent

    def empty(
        self, shape: Tuple[int, ...], torch_dtype: "torch.dtype"
    ) -> "Optional[torch.Tensor]":
        """A new CPU tensor, uninitialised, whose memory the pool can take back at a clear():
        a cleared entry's where one fits. None for a small tensor (warm memory anyway) and
        a dtype numpy has not (bfloat16).
        """
        numpy_dtype = self._numpy_dtype(torch_dtype)
        if numpy_dtype is None or math.prod(shape) * numpy_dtype.itemsize < self.MIN_BYTES:
            return None
        torch = sys.modules["torch"]
        buffer = self._pop(shape, numpy_dtype) if self._free else None
        if buffer is None:
            # From torch's allocator, as a clone would be: numpy asks for
            # transparent huge pages, whose first touch costs more on some machines.
            buffer = torch.empty(shape, dtype=torch_dtype).numpy()
        tensor = torch.from_numpy(buffer)
        key = id(tensor)

        def forget(_: Any) -> None:
            # The tensor died: its id may be reused. The array lives on while a view uses it.
            self._lent.pop(key, None)

        self._lent[key] = (weakref.ref(tensor, forget), buffer)
        return tensor

    def array_of(self, tensor: "torch.Tensor") -> Optional[np.ndarray]:
        """The array under the memory of a tensor `empty()` made and no one resized; or None.

        Stored instead of `tensor.numpy()`, it keeps a recycled buffer the same
        array object: each `.numpy()` wraps the last, a chain that would grow by
        one array and one tensor per clear().
        """
        lent = self._lent.get(id(tensor))
        if lent is None or lent[1].shape != tuple(tensor.shape):
            return None
        return lent[1]

    # -- clears -------------------------------------------------------------

    def give_back(self, entries_lists: Sequence[Iterable[Any]]) -> None:
        """Take the unreferenced arrays of these entry lists, which the caller is dropping.

        A list (or a dict entry of several names) that something else still
        references keeps its arrays: a user who took the list from the cache
        before clear() keeps its contents. While nobody holds the pool the
        arrays are freed instead.
        """
        taken: _Free = {}
        if self.held:
            for entries in entries_lists:
                # References: `entries_lists`'s, `entries`'s and getrefcount's own.
                if sys.getrefcount(entries) - 3:
                    continue
                for entry in entries:
                    if type(entry) is np.ndarray:
                        # References: the list's, `entry`'s and getrefcount's own
                        # (counted before the call below puts `entry` on the stack).
                        others = sys.getrefcount(entry) - 3
                        self._keep(entry, others, taken)
                    elif type(entry) is dict and sys.getrefcount(entry) - 3 == 0:
                        for value in entry.values():  # the dict's, `value`'s, getrefcount's
                            if type(value) is np.ndarray:
                                others = sys.getrefcount(value) - 3
                                self._keep(value, others, taken)
                            elif self._lent:
                                self._keep_lent(value, taken)
                    elif self._lent:
                        self._keep_lent(entry, taken)
        with self._lock:
            self._free = taken  # the previous clear's leftovers go

    def _keep(self, array: np.ndarray, other_references: int, taken: _Free) -> None:
        if (
            other_references == 0
            and array.nbytes >= self.MIN_BYTES
            and array.flags.c_contiguous
            and array.flags.writeable
        ):
            taken.setdefault((array.shape, array.dtype), []).append(array)

    def _keep_lent(self, tensor: Any, taken: _Free) -> None:
        """The array under a tensor lend() made; whether it is free is checked when taken
        (the tensor, alive until the caller drops its list, references it now)."""
        lent = self._lent.pop(id(tensor), None)
        if lent is not None:
            buffer = lent[1]
            taken.setdefault((buffer.shape, buffer.dtype), []).append(buffer)


# The process's pool: every store copies into it unless given its own (tests do).
BUFFERS = BufferPool()
