"""What is kept per call: snapshots, storage policy, bounds, save and load.

The cache is a plain dict: key (the function's qualified name) -> list with one
entry per call, in call order. An entry is the captured value when one name is
captured, or a dict name -> value when several are.

torch is imported lazily (only when a torch tensor is seen), so this module
works on Pythons where torch is not installed.
"""
import collections
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import sys
import threading
import warnings
import weakref

from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np

from ._arrays import is_torch_tensor
from ._errors import VisualizerError


class _Marker:
    """A cache entry that stands for a value that is not there; falsy, one per name."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self):
        return self._name

    def __bool__(self):
        return False

    def __reduce__(self):
        # Pickled (gathered from another rank) or copied, it is still the one
        # marker: `value is MISSING` keeps working.
        return self._name


# A name that was not bound when the function returned.
MISSING = _Marker("MISSING")
# A value that could not be stored (an object that cannot be copied, a tensor
# numpy cannot hold): recorded in its place, with a warning, so the call goes on.
NOT_CAPTURED = _Marker("NOT_CAPTURED")

if TYPE_CHECKING:
    import os

    PathLike = Union[str, "os.PathLike[str]"]

# get_local.cache and scoped caches: key -> one entry per call.
Cache = Dict[str, Any]

_TORCH_ONLY_DTYPES = ("bfloat16",)


class StoragePolicy:
    """How captured values are stored.

    Args:
        keep_on_device: False (default, as the original Visualizer) stores a
            numpy copy on the CPU; True keeps a torch tensor on its device.
        dtype: convert to this dtype when storing (a name such as "float16",
            a torch dtype or a numpy dtype). None keeps the value's dtype,
            except that bfloat16 becomes float32 in numpy, which has no
            bfloat16 (exact: every bfloat16 is a float32).
        max_entries: keep at most this many entries per key, dropping the
            oldest (counted in `dropped`). None keeps all.
        detach: False keeps tensors attached to their autograd graph, not
            copied (for gradient-weighted rollout). Needs keep_on_device=True.
    """

    __slots__ = ("keep_on_device", "dtype", "max_entries", "detach")

    def __init__(
        self,
        keep_on_device: bool = False,
        dtype: Any = None,
        max_entries: Optional[int] = None,
        detach: bool = True,
    ) -> None:
        if not isinstance(keep_on_device, bool):
            raise VisualizerError(
                f"get_local: keep_on_device must be True or False; got {keep_on_device!r}"
            )
        if not isinstance(detach, bool):
            raise VisualizerError(f"get_local: detach must be True or False; got {detach!r}")
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
        ):
            raise VisualizerError(
                f"get_local: max_entries must be a positive int or None; got {max_entries!r}"
            )
        if not detach and not keep_on_device:
            raise VisualizerError(
                "get_local: detach=False keeps the autograd graph, which numpy arrays cannot "
                "hold; expected keep_on_device=True with it, got keep_on_device=False"
            )
        self.keep_on_device = keep_on_device
        self.dtype = _dtype_name(dtype)
        if self.dtype in _TORCH_ONLY_DTYPES and not keep_on_device:
            raise VisualizerError(
                f"get_local: dtype={self.dtype!r} cannot be stored in numpy; expected "
                "keep_on_device=True with it, or a numpy dtype such as 'float32'"
            )
        self.max_entries = max_entries
        self.detach = detach

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"StoragePolicy({fields})"


# The dtypes values can be stored in: both numpy and torch have them (bfloat16
# only torch). Others ('object', 'U10', 'float128', complex) would fail inside
# the model's forward, so they are refused when the policy is made.
_STORABLE_DTYPES = (
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "bool",
)


def _dtype_name(dtype: Any) -> Optional[str]:
    """Normalize a dtype given as str, numpy or torch dtype to its name ('f4' -> 'float32')."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    elif type(dtype).__module__ == "torch":
        name = str(dtype).replace("torch.", "")
    else:
        name = dtype
    if name not in _STORABLE_DTYPES:
        try:
            name = np.dtype(name).name
        except TypeError:
            _refuse_dtype(dtype)
    if name not in _STORABLE_DTYPES:
        _refuse_dtype(dtype)
    return name


def _refuse_dtype(dtype: Any) -> NoReturn:
    raise VisualizerError(
        f"get_local: dtype must name a dtype numpy and torch can both store, one of "
        f"{list(_STORABLE_DTYPES)} (bfloat16 with keep_on_device=True), as a string, "
        f"numpy or torch dtype; got {dtype!r}"
    )


# Values that cannot change after the call: stored as they are.
IMMUTABLE_TYPES: FrozenSet[type] = frozenset(
    {int, float, complex, bool, str, bytes, type(None)})


def snapshot(value: Any, policy: StoragePolicy, owned: bool = False) -> Any:
    """A copy of `value` that later in-place changes to it cannot alter.

    `owned=True` says `value` is a tensor just computed for the record that
    nothing else holds (recomputed attention weights): it is stored without a
    copy wherever the policy allows, since no one can change it.
    """
    if type(value) in IMMUTABLE_TYPES or isinstance(value, np.generic) or value is NOT_CAPTURED:
        return value
    if is_torch_tensor(value):
        return _snapshot_tensor(sys.modules["torch"], value, policy, owned)
    if isinstance(value, np.ndarray):
        return np.array(value, dtype=policy.dtype, copy=True)
    if type(value) in (list, tuple):
        return type(value)(snapshot(item, policy) for item in value)
    if type(value) is dict:
        return {key: snapshot(item, policy) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a namedtuple
        return type(value)(*(snapshot(item, policy) for item in value))
    if isinstance(value, dict):
        # OrderedDict, defaultdict, transformers' ModelOutput: a copy of the
        # same type, its items snapshotted (ModelOutput keeps its attributes).
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = snapshot(item, policy)
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copied = copy.copy(value)  # type: ignore[arg-type]  # typeshed: copy(dataclass)
        for field in dataclasses.fields(value):
            # object.__setattr__: frozen dataclasses too.
            object.__setattr__(copied, field.name, snapshot(getattr(value, field.name), policy))
        return copied
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        raise Uncapturable(
            f"a {type(value).__qualname__} module is not copied on every call; capture the "
            "tensors you need from it"
        )
    try:
        return copy.deepcopy(value)
    except Exception as error:
        raise Uncapturable(
            f"a {type(value).__qualname__} cannot be copied ({type(error).__name__}: {error})"
        ) from None


class Uncapturable(Exception):
    """Raised by snapshot for a value it cannot copy; the recorder stores NOT_CAPTURED."""


def _snapshot_tensor(torch: Any, tensor: Any, policy: StoragePolicy, owned: bool = False) -> Any:
    dtype = getattr(torch, policy.dtype) if policy.dtype else None
    if owned and (dtype is None or dtype == tensor.dtype) and not tensor.requires_grad:
        # A map computed into the pool's memory (fused.py): stored as the very
        # tensor or array the pool knows, so that clear() recycles it.
        array = BUFFERS.array_of(tensor)
        if array is not None:
            return tensor if policy.keep_on_device else array
    if policy.detach:
        tensor = tensor.detach()
    if policy.keep_on_device:
        converting = dtype is not None and dtype != tensor.dtype
        if policy.detach and (converting or not owned) and tensor.device.type == "cpu":
            lent = BUFFERS.lend(torch, tensor, dtype)
            if lent is not None:
                return lent
        if converting:
            return tensor.to(dtype)
        # detach=False is for autograd: the very tensor of the graph is kept.
        return tensor.clone() if policy.detach and not owned else tensor
    if dtype is None and tensor.dtype == torch.bfloat16:
        dtype = torch.float32
    if not owned:
        buffer = BUFFERS.take(torch, tensor, dtype)
        if buffer is not None:
            torch.from_numpy(buffer).copy_(tensor.detach())
            return buffer
    # Positional arguments: Tensor.to parses keywords measurably slower.
    if dtype is None:
        return tensor.to("cpu", copy=not owned).numpy()
    return tensor.to("cpu", dtype, copy=not owned).numpy()


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
    taken), so an entry a user holds is never written. Each clear() first lets
    go of the buffers the previous one gave and no copy used, and deactivating
    capture lets go of all: the pool never holds more than one clear's worth
    of arrays.
    """

    # Smaller arrays come from warm allocator memory anyway.
    MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self._free: Dict[Tuple[Tuple[int, ...], np.dtype], List[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._numpy_dtypes: Dict[Any, Optional[np.dtype]] = {}
        # id(tensor) -> (a weak reference to it, the array under its memory),
        # for the tensors lend() made that are alive.
        self._lent: Dict[int, Tuple[Any, np.ndarray]] = {}

    def _numpy_dtype(self, torch: Any, torch_dtype: Any) -> Optional[np.dtype]:
        """numpy's dtype for a torch dtype; None where numpy has none (bfloat16)."""
        try:
            return self._numpy_dtypes[torch_dtype]
        except KeyError:
            pass
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

    def take(self, torch: Any, tensor: Any, dtype: Any) -> Optional[np.ndarray]:
        """A free array for a copy of `tensor` as `dtype` (None: its own), or None."""
        if not self._free:
            return None
        numpy_dtype = self._numpy_dtype(torch, dtype if dtype is not None else tensor.dtype)
        if numpy_dtype is None:
            return None
        return self._pop(tuple(tensor.shape), numpy_dtype)

    def lend(self, torch: Any, tensor: Any, dtype: Any) -> Optional[Any]:
        """A copy of CPU `tensor` as `dtype` (None: its own) into `empty()`'s memory; None
        where the pool cannot help (see there) or a clone differs (a strided tensor keeps
        its strides, a subclass or sparse tensor its kind).
        """
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout != torch.strided
            or not tensor.is_contiguous()
        ):
            return None
        lent = self.empty(torch, tuple(tensor.shape), dtype if dtype is not None else tensor.dtype)
        if lent is not None:
            lent.copy_(tensor)
        return lent

    def empty(self, torch: Any, shape: Tuple[int, ...], torch_dtype: Any) -> Optional[Any]:
        """A new CPU tensor, uninitialised, whose memory the pool can take back at a clear():
        a cleared entry's where one fits. None for a small tensor (warm memory anyway) and
        a dtype numpy has not (bfloat16).
        """
        numpy_dtype = self._numpy_dtype(torch, torch_dtype)
        if numpy_dtype is None or math.prod(shape) * numpy_dtype.itemsize < self.MIN_BYTES:
            return None
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

    def array_of(self, tensor: Any) -> Optional[np.ndarray]:
        """The array under the memory of a tensor `empty()` made and no one resized; or None.

        Stored instead of `tensor.numpy()`, it keeps a recycled buffer the same
        array object: each `.numpy()` wraps the last, a chain that would grow by
        one array and one tensor per clear().
        """
        lent = self._lent.get(id(tensor))
        if lent is None or lent[1].shape != tuple(tensor.shape):
            return None
        return lent[1]

    def give_back(self, entries_lists: Sequence[Iterable[Any]]) -> None:
        """Take the unreferenced arrays of these entry lists, which the caller is dropping.

        A list (or a dict entry of several names) that something else still
        references keeps its arrays: a user who took the list from the cache
        before clear() keeps its contents.
        """
        taken: Dict[Tuple[Tuple[int, ...], np.dtype], List[np.ndarray]] = {}
        for entries in entries_lists:
            # References: `entries_lists`'s, `entries`'s and getrefcount's own.
            if sys.getrefcount(entries) - 3:
                continue
            for entry in entries:
                if type(entry) is np.ndarray:
                    # References: the list's, `entry`'s and getrefcount's own.
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

    def _keep(self, array: np.ndarray, other_references: int, taken: Dict[Any, Any]) -> None:
        if (
            other_references == 0
            and array.nbytes >= self.MIN_BYTES
            and array.flags.c_contiguous
            and array.flags.writeable
        ):
            taken.setdefault((array.shape, array.dtype), []).append(array)

    def _keep_lent(self, tensor: Any, taken: Dict[Any, Any]) -> None:
        """The array under a tensor lend() made; whether it is free is checked when taken
        (the tensor, alive until the caller drops its list, references it now)."""
        lent = self._lent.pop(id(tensor), None)
        if lent is not None:
            buffer = lent[1]
            taken.setdefault((buffer.shape, buffer.dtype), []).append(buffer)

    def release(self) -> None:
        """Let go of every free array."""
        with self._lock:
            self._free = {}


# One pool per process: copies of any store go to it, any store's clear() fills it.
BUFFERS = BufferPool()


class CaptureCache(dict):
    """The cache dict: key -> list of entries. Reading an empty list may warn.

    An empty list under a function that is switched on is the sign of a
    function that never ran (a model that took another code path); the store's
    `on_empty_read(key)` is told, so the user hears why nothing is there.
    """

    __slots__ = ("_store",)

    def __init__(self, store: "CaptureStore") -> None:
        super().__init__()
        self._store = store

    def __getitem__(self, key):
        entries = dict.__getitem__(self, key)
        if not entries and self._store.on_empty_read is not None:
            self._store.on_empty_read(key)
        return entries

    # Every change of which list a key holds re-points the store's fast sinks
    # (instrumented code appends immutable values straight to the list).

    def _changed(self):
        store = getattr(self, "_store", None)  # None while unpickling: items come first
        if store is not None:
            store.repoint()

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        self._changed()

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        self._changed()

    def setdefault(self, key, default=None):
        value = dict.setdefault(self, key, default)
        self._changed()
        return value

    def pop(self, key, *default):
        value = dict.pop(self, key, *default)
        self._changed()
        return value

    def popitem(self):
        item = dict.popitem(self)
        self._changed()
        return item

    def clear(self):
        dict.clear(self)
        self._changed()

    def update(self, *contents, **more):
        dict.update(self, *contents, **more)
        self._changed()

    def __ior__(self, other):  # type: ignore[misc]  # returns self, as dict's does
        self.update(other)
        return self


class BoundedEntries(collections.deque):
    """The entries of one key under `max_entries`: the newest ones, in call order.

    A deque with `maxlen`, so an append past the bound drops the oldest entry
    in C, in O(1), without a lock (trimming a list cost O(bound) per call).
    It reads like the list it stands for: equal to a list of the same
    entries, sliced into a list; copied or pickled, it is a plain list.

    `appends` counts every append (`next()` is atomic under the GIL), so the
    number of dropped entries is exact when several threads append at once.
    """

    def __init__(self, entries: Iterable[Any] = (), maxlen: int = 1) -> None:
        entries = list(entries)
        super().__init__(entries[len(entries) - maxlen:] if len(entries) > maxlen else entries,
                         maxlen)
        self._dropped_before = len(entries) - len(self)
        # Advanced once per append (and per read of `dropped`, which counts
        # its reads): held + appended - maxlen is the number dropped.
        self.appends = itertools.count(len(self))
        self._reads = 0  # next() calls made by `dropped`, not by appends
        self.warned = False

    @property
    def dropped(self) -> int:
        """How many entries were dropped from this list so far."""
        total = next(self.appends) - self._reads
        self._reads += 1
        return self._dropped_before + max(0, total - (self.maxlen or 0))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self)[index]
        return super().__getitem__(index)

    def __eq__(self, other):
        if isinstance(other, list):
            return list(self) == other
        return super().__eq__(other)

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __reduce__(self):
        return (list, (list(self),))

    def __repr__(self):
        return f"BoundedEntries({list(self)!r}, maxlen={self.maxlen})"


class Scope:
    """Where captures go: a cache dict and its storage policy.

    `bound` mirrors `policy.max_entries` (read by every recorder call). While
    it is set, every list of the cache is a BoundedEntries of that bound:
    setting the policy converts them.
    """

    __slots__ = ("cache", "bound", "_policy", "_dropped_earlier")

    def __init__(self, cache: "CaptureCache", policy: StoragePolicy) -> None:
        self.cache = cache
        self._dropped_earlier: Dict[str, int] = {}  # drops of entries converted back to lists
        self.bound = None
        self.policy = policy

    @property
    def policy(self):
        return self._policy

    @policy.setter
    def policy(self, policy):
        # The store re-points its fast sinks after this (once, not per key).
        self._policy = policy
        self.bound = policy.max_entries
        for key, entries in list(self.cache.items()):
            dict.__setitem__(self.cache, key, self.entries_like(entries, key))

    def new_entries(self) -> Union[List[Any], BoundedEntries]:
        """An empty entries list for this scope's bound."""
        return [] if self.bound is None else BoundedEntries(maxlen=self.bound)

    def entries_like(self, entries: Iterable[Any], key: str) -> Union[List[Any], BoundedEntries]:
        """`entries` in the container this scope's bound calls for (the same object if it is)."""
        if self.bound is None:
            if type(entries) is BoundedEntries:
                self._count_earlier(key, entries.dropped)
                return list(entries)
            return entries if isinstance(entries, (list, BoundedEntries)) else list(entries)
        if type(entries) is BoundedEntries and entries.maxlen == self.bound:
            return entries
        if type(entries) is BoundedEntries:
            self._count_earlier(key, entries.dropped)
        return BoundedEntries(entries, self.bound)

    def _count_earlier(self, key, count):
        if count:
            self._dropped_earlier[key] = self._dropped_earlier.get(key, 0) + count

    @property
    def dropped(self):
        """key -> number of entries dropped by max_entries since the last clear."""
        counts = dict(self._dropped_earlier)
        for key, entries in list(self.cache.items()):
            if type(entries) is BoundedEntries:
                count = entries.dropped
                if count:
                    counts[key] = counts.get(key, 0) + count
        return counts

    def clear(self) -> List[Any]:
        """Put an empty list under every key; return the lists taken out."""
        dropped = list(self.cache.values())
        for key in self.cache:  # the store re-points its fast sinks after this
            dict.__setitem__(self.cache, key, self.new_entries())
        self._dropped_earlier.clear()
        return dropped

    def __reduce__(self):
        # Pickled along with a recorder: in the receiving process, captures go
        # to that process's get_local scope (see CaptureStore.__reduce__).
        return (_process_scope, ())


class FastSink:
    """Where instrumented code sends an immutable value without a Python call.

    The code of a function capturing one name with no `select` tests the
    value's type inline; for int, float, str, ... (IMMUTABLE_TYPES: nothing to
    copy) it calls `next(sink.ticks)` (only if it was instrumented under a
    bound) and `sink.call(value)` instead of its recorder. The store keeps `call`
    pointed at the C-level `append` of the key's list when nothing else needs
    doing, and at `fallback` (the recorder, which does every check) otherwise:
    a scoped() block open in some thread, no list yet or a user's object in
    its place, a bound its code does not count. With torch loaded, `call` is
    a small function that first checks for activation-checkpoint recompute
    (and counts, under a bound). Under a bound `ticks` is the list's append
    counter (for `dropped`).
    """

    __slots__ = ("call", "ticks", "key", "fallback", "counted")

    def __init__(self, key: str, fallback: Callable[[Any], Any], counted: bool) -> None:
        self.key = key
        self.fallback = fallback
        self.counted = counted  # whether its code calls next(ticks)
        self.call: Callable[[Any], Any] = fallback
        self.ticks: Iterator[Any] = _NO_TICKS

    def __reduce__(self):
        # Pickled by value with the instrumented code (cloudpickle): in the
        # receiving process, the sink of that process's get_local store.
        return (_process_sink, (self.key, self.fallback, self.counted))


# The ticks of code instrumented under a bound while there is nothing to count.
_NO_TICKS = itertools.repeat(None)
_NEVER = object()  # a sentinel no function returns


def _outside_backward(append, torch):
    """`append`, except for values captured while autograd re-runs a forward."""
    current_node = torch._C._current_autograd_node

    def call(value):
        if current_node() is None:
            append(value)

    return call


class _TicksUntilFull:
    """The ticks of a bounded fast sink until its list is full.

    `arm()` gives an iterator that ticks `entries.appends` in C while the list
    surely has room (one short of the room it has now: a recorder may be
    about to append), then calls `at_the_brim` before the next append: if the
    list is full, that append drops the oldest entry, so it warns and hands
    the sink the plain counter; else it arms a new run of C ticks. (A class,
    not closures: closures calling each other form a cycle that would keep
    the list alive after clear() until the garbage collector runs.)
    """

    __slots__ = ("store", "sink", "entries", "bound")

    def __init__(self, store, sink, entries, bound):
        self.store, self.sink, self.entries, self.bound = store, sink, entries, bound

    def arm(self):
        room = max(0, self.bound - len(self.entries) - 1)
        return itertools.chain(
            itertools.islice(self.entries.appends, room), iter(self.at_the_brim, _NEVER)
        )

    def at_the_brim(self):
        entries, sink = self.entries, self.sink
        next(entries.appends)
        full = len(entries) >= self.bound
        if sink.call == entries.append:  # else the sink was re-pointed elsewhere
            sink.ticks = entries.appends if full else self.arm()
        if full and not entries.warned:
            # warn_bound <- at_the_brim <- the captured function
            self.store.warn_bound(entries, sink.key, self.bound, stacklevel=3)


class CaptureStore:
    """The caches captures go to, plus what guards them: policies, a lock, drop counts.

    One process-wide scope, and per thread a stack of scopes opened by
    `scoped()` blocks: a thread records into its innermost open block, else
    into the process-wide scope. `cache`, `dropped` and `policy` read and
    write this thread's current scope.
    """

    def __init__(self):
        # (key, counted) -> FastSink of the instrumented code capturing under
        # it (see FastSink); re-pointed whenever what they depend on changes.
        self._sinks: Dict[Tuple[str, bool], FastSink] = {}
        self._sinks_lock = threading.RLock()
        self.sinks_know_torch = False  # whether torch was loaded when they were pointed
        # Called with a key whose empty list a user reads (see CaptureCache).
        self.on_empty_read = None
        self.process_scope = Scope(self.new_cache(), StoragePolicy())
        # scoped() blocks open in any thread: while none is, recorders go
        # straight to process_scope without a thread-local lookup.
        self.open_scopes = 0
        self._threads = threading.local()
        # How many fused-attention recorders (visualizer.fused) write here.
        # While any does, get_local leaves a call whose names are all unbound
        # to them instead of recording MISSING (see GetLocal).
        self.fused_recorders = 0
        self._lock = threading.Lock()
        self._warned_bound = set()

    def __reduce__(self):
        # Pickled along with a recorder (see GetLocal.__reduce__): in the
        # receiving process it is that process's get_local store. Imported
        # there lazily: capture imports this module.
        return (_process_store, ())

    def current(self) -> Scope:
        """The scope this thread records into."""
        if self.open_scopes:
            stack = getattr(self._threads, "stack", None)
            if stack:
                return stack[-1]
        return self.process_scope

    def _set_in_scope(self, attribute, value):
        setattr(self.current(), attribute, value)
        self.repoint()

    cache = property(
        lambda self: self.current().cache,
        lambda self, value: self._set_in_scope("cache", value),
    )
    @property
    def dropped(self):
        with self._lock:  # BoundedEntries.dropped counts its own reads
            return self.current().dropped
    policy = property(
        lambda self: self.current().policy,
        lambda self, value: self._set_in_scope("policy", value),
    )

    # -- the fast path of instrumented code --------------------------------

    def fast_sink(
        self, key: str, fallback: Callable[[Any], Any], counted: bool
    ) -> "FastSink":
        """The FastSink for `key` and code that ticks or not (made on first use).

        `fallback` is a recorder of `key`.
        """
        with self._sinks_lock:
            sink = self._sinks.get((key, counted))
            if sink is None:
                sink = self._sinks[key, counted] = FastSink(key, fallback, counted)
                self._point(sink)
            return sink

    def repoint(self) -> None:
        """Point every fast sink at what the current state calls for.

        Called after every change a sink depends on: which list a key of the
        process-wide cache holds, its bound, scoped() blocks opening and
        closing, torch being loaded.
        """
        if self._sinks:
            with self._sinks_lock:
                for sink in self._sinks.values():
                    self._point(sink)

    def _point(self, sink: "FastSink") -> None:
        torch = sys.modules.get("torch")
        self.sinks_know_torch = torch is not None
        call, ticks = self._route(sink, torch)
        sink.call, sink.ticks = call, ticks

    def _route(self, sink, torch):
        """(call, ticks) for `sink` in the current state."""
        fallback = sink.fallback, _NO_TICKS
        if self.open_scopes:
            return fallback  # a thread may record into its own scope: each call must look
        scope = self.process_scope
        entries = dict.get(scope.cache, sink.key)
        bound = scope.bound
        if bound is None:
            if type(entries) is not list:
                return fallback  # none yet, or a user's object: the recorder deals with it
            if torch is None:
                return entries.append, _NO_TICKS
            return _outside_backward(entries.append, torch), _NO_TICKS
        if type(entries) is not BoundedEntries or entries.maxlen != bound:
            return fallback
        if torch is not None:
            return self._bounded_outside_backward(sink.key, entries, bound, torch), _NO_TICKS
        if not sink.counted:
            return fallback  # its code was instrumented unbounded: it does not tick
        if entries.warned:
            return entries.append, entries.appends
        return entries.append, self._ticks_until_full(sink, entries, bound)

    def _ticks_until_full(self, sink, entries, bound):
        """`entries.appends`, in C, but warning at the first drop (see _TicksUntilFull)."""
        return _TicksUntilFull(self, sink, entries, bound).arm()

    def _bounded_outside_backward(self, key, entries, bound, torch):
        """Append to and count `entries`, except while autograd re-runs a forward.

        The store's `append`, specialised to one list: calling
        `self.append(key, value)` instead measured 2.3x slower per call (it
        looks up the scope and the list each time). Keep the two in step.
        """
        current_node = torch._C._current_autograd_node
        append, appends, warn_bound = entries.append, entries.appends, self.warn_bound

        def call(value):
            if current_node() is None:
                full = len(entries) == bound  # then this append drops the oldest
                append(value)
                next(appends)
                if full and not entries.warned:
                    warn_bound(entries, key, bound)  # <- call <- the captured function

        return call

    def new_cache(
        self, contents: Union[Mapping[str, Any], Iterable[Tuple[str, Any]]] = ()
    ) -> CaptureCache:
        """A CaptureCache of this store, holding `contents` (a dict or pairs)."""
        cache = CaptureCache(self)
        cache.update(contents)
        return cache

    @contextlib.contextmanager
    def scoped(self, policy: StoragePolicy) -> Iterator[CaptureCache]:
        """Capture this thread's calls into a fresh cache with `policy` for a block.

        Yields the fresh dict. Other threads keep recording where they did;
        on exit, also when the block raises, this thread records where it did
        before.
        """
        scope = Scope(self.new_cache(), policy)
        stack = getattr(self._threads, "stack", None)
        if stack is None:
            stack = self._threads.stack = []
        stack.append(scope)
        with self._lock:
            self.open_scopes += 1
        self.repoint()
        try:
            yield scope.cache
        finally:
            with self._lock:
                self.open_scopes -= 1
            stack.remove(scope)
            self.repoint()

    def append(self, key: str, entry: Any) -> None:
        """Append one call's entry (already a snapshot) under `key`, in this thread's scope.

        Takes no lock: dict.setdefault, list.append and deque.append are
        atomic under the GIL. (Recorders inline this; keep them in step.)
        """
        scope = self.current()
        entries = scope.cache.get(key)
        if entries is None:
            entries = scope.cache.setdefault(key, scope.new_entries())
        bound = scope.bound
        if bound is None:
            entries.append(entry)
            return
        if type(entries) is not BoundedEntries or entries.maxlen != bound:
            entries = self.bounded_entries(scope, key)
        full = len(entries) == bound  # then this append drops the oldest
        entries.append(entry)
        next(entries.appends)
        if full and not entries.warned:
            self.warn_bound(entries, key, bound, stacklevel=4)

    def bounded_entries(self, scope: Scope, key: str) -> BoundedEntries:
        """The BoundedEntries under `key`, converting what a user put there."""
        with self._lock:
            entries = scope.entries_like(scope.cache.get(key, []), key)
            scope.cache[key] = entries
            return cast(BoundedEntries, entries)  # the scope is bounded: recorders checked

    def warn_bound(
        self, entries: BoundedEntries, key: str, limit: int, stacklevel: int = 3
    ) -> None:
        """The first drop under `key`: say so once. `stacklevel` points at the captured function."""
        entries.warned = True
        if key in self._warned_bound:
            return
        self._warned_bound.add(key)
        warnings.warn(
            f"get_local: the cache for {key!r} holds at most {limit} entries "
            f"(max_entries); older entries are dropped, counted in get_local.dropped",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    def clear(self, recycle: bool = True) -> None:
        """Empty every list of this thread's scope, keeping the keys (as the original did).

        New lists are put in place, so lists a user took from the cache keep
        their contents. `recycle`: hand the arrays nothing else references to
        the buffer pool, for the next copies (else they are freed).
        """
        scope = self.current()
        with self._lock:
            dropped = scope.clear()
        self.repoint()  # first: a sink pointing at an old list references it
        if recycle:
            BUFFERS.give_back(dropped)


def _process_store():
    """This process's get_local store."""
    from .capture import get_local

    return get_local.store


def _process_sink(key, fallback, counted):
    """This process's get_local fast sink for `key`."""
    return _process_store().fast_sink(key, fallback, counted)


def _process_scope():
    """This process's process-wide get_local scope."""
    return _process_store().process_scope


_FORMAT = "visualizer-cache"
_MANIFEST = "__manifest__"


def save_cache(cache: Mapping[str, Any], path: "PathLike") -> None:
    """Write a cache dict to an .npz file, without pickle.

    Arrays and tensors become arrays (bfloat16 as float32, which holds it
    exactly); MISSING, NOT_CAPTURED, None, numbers, strings and lists or tuples of them are
    kept in a JSON manifest stored in the same file.

    Args:
        cache: `get_local.cache` or a dict of the same form.
        path: file to write (written as given; no suffix is added).
    """
    arrays: Dict[str, np.ndarray] = {}

    def encode(value, where):
        if value is MISSING:
            return {"missing": True}
        if value is NOT_CAPTURED:
            return {"not_captured": True}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"scalar": value}
        if is_torch_tensor(value):
            value = _snapshot_tensor(sys.modules["torch"], value, StoragePolicy())
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise VisualizerError(
                    f"save_cache: {where} is an object array, which needs pickle; "
                    "expected a numeric array"
                )
            array_key = f"a{len(arrays)}"
            arrays[array_key] = value
            return {"array": array_key}
        if type(value) in (list, tuple):
            items = [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return {type(value).__name__: items}
        raise VisualizerError(
            f"save_cache: {where} is a {type(value).__qualname__}; expected an array, a "
            "tensor, a number, a string, None or a list/tuple of them"
        )

    keys: List[Dict[str, Any]] = []
    manifest = {"format": _FORMAT, "version": 1, "keys": keys}
    for key, entries in cache.items():
        if not isinstance(key, str):
            raise VisualizerError(
                f"save_cache: keys must be strings (function or module names); got {key!r} "
                f"({type(key).__qualname__})"
            )
        if not isinstance(entries, (list, tuple, BoundedEntries)):
            raise VisualizerError(
                f"save_cache: cache[{key!r}] must be a list of entries, one per call; got "
                f"{type(entries).__qualname__}"
            )
        encoded = []
        for index, entry in enumerate(entries):
            where = f"cache[{key!r}][{index}]"
            if isinstance(entry, dict):
                encoded.append(
                    {"names": {n: encode(v, f"{where}[{n!r}]") for n, v in entry.items()}}
                )
            else:
                encoded.append({"value": encode(entry, where)})
        keys.append({"key": key, "entries": encoded})
    arrays[_MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub: a bool kwarg


def load_cache(path: "PathLike") -> Dict[str, List[Any]]:
    """Read a file written by `save_cache` back into a cache dict of numpy arrays.

    Anything else (another .npz or .npy, a truncated or corrupt file) raises
    VisualizerError naming the file and what was expected.
    """
    expected = "expected a file written by save_cache (an .npz with a JSON manifest)"
    try:
        archive = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:
        raise VisualizerError(
            f"load_cache: {path!r} cannot be read as an .npz ({type(error).__name__}: "
            f"{error}); {expected}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise VisualizerError(
            f"load_cache: {path!r} holds a single {type(archive).__name__}, not an .npz; "
            f"{expected}"
        )
    with archive:
        try:
            return _read_archive(archive, path, expected)
        except VisualizerError:
            raise
        except Exception as error:
            raise VisualizerError(
                f"load_cache: {path!r} is damaged or not a visualizer cache "
                f"({type(error).__name__}: {error}); {expected}"
            ) from None


def _read_archive(archive, path, expected):
    if _MANIFEST not in archive.files:
        raise VisualizerError(
            f"load_cache: {path!r} has no {_MANIFEST!r}; {expected}, got an .npz with "
            f"{sorted(archive.files)[:5]}"
        )
    manifest = json.loads(archive[_MANIFEST].tobytes().decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise VisualizerError(
            f"load_cache: {path!r} is not a visualizer cache; got format "
            f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}"
        )

    def decode(encoded):
        if "missing" in encoded:
            return MISSING
        if "not_captured" in encoded:
            return NOT_CAPTURED
        if "scalar" in encoded:
            return encoded["scalar"]
        if "array" in encoded:
            return archive[encoded["array"]]
        if "list" in encoded:
            return [decode(item) for item in encoded["list"]]
        return tuple(decode(item) for item in encoded["tuple"])

    cache = {}
    for record in manifest["keys"]:
        cache[record["key"]] = [
            {n: decode(v) for n, v in entry["names"].items()}
            if "names" in entry
            else decode(entry["value"])
            for entry in record["entries"]
        ]
    return cache
