"""Where captures go: caches of entries per key, their bounds, scopes and fast sinks.

A cache is a dict: key -> list with one entry per call, in call order. An
entry is the captured value when one name is captured, or a dict
name -> value when several are. A `Scope` is one such cache with its
storage policy; every entry of the library enters through `Scope.append`
(the fast sinks below are its specialisations for one list), so a bound,
its drop count and its warning work the same for every capture API.

The store knows no owner: `get_local` (function level) and
`capture_attention` (model level, through its own `Scope`) both use it.
torch is never imported here.
"""
import collections
import contextlib
import itertools
import sys
import threading
import weakref
from types import CodeType, FrameType
from typing import (
    Any,
    Callable,
    Dict,
    Hashable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
)

from . import _torch_internals
from ._pool import BUFFERS, BufferPool
from ._warnings import WarnOnce, warn_during_call
from .policy import StoragePolicy

# get_local.cache and scoped caches: key -> one entry per call.
Cache = Dict[str, Any]
# Told the key and the bound at the first entry a bound drops.
FirstDrop = Callable[[str, int], None]


class BoundedEntries(collections.deque):  # entries of any kind
    """The entries of one key under `max_entries`: the newest ones, in call order.

    A deque with `maxlen`, so an append past the bound drops the oldest entry
    in C, in O(1), without a lock. It reads like the list it stands for:
    equal to a list of the same entries, sliced into a list; copied or
    pickled, it is a plain list.

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

    def add(self, entry: Any) -> bool:
        """Append `entry` and count it; True for the first append that drops an entry."""
        full = len(self) == self.maxlen  # then this append drops the oldest
        self.append(entry)
        next(self.appends)
        if full and not self.warned:
            self.warned = True
            return True
        return False

    @property
    def dropped(self) -> int:
        """How many entries were dropped from this list so far."""
        total = next(self.appends) - self._reads
        self._reads += 1
        return self._dropped_before + max(0, total - (self.maxlen or 0))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        return super().__getitem__(index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return list(self) == other
        return super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # mutable, as list and deque

    def __reduce__(self) -> Tuple[Any, ...]:
        return (list, (list(self),))

    def __repr__(self) -> str:
        return f"BoundedEntries({list(self)!r}, maxlen={self.maxlen})"


Entries = Union[List[Any], BoundedEntries]


class Scope:
    """A cache and its storage policy: where one capture API's entries go.

    `bound` mirrors `policy.max_entries` (read by every recorder call). While
    it is set, every list of the cache is a BoundedEntries of that bound:
    setting the policy converts them. `on_first_drop(key, bound)` is told at
    the first entry the bound drops under a key (the owner words the warning).
    """

    __slots__ = ("cache", "bound", "on_first_drop", "_policy", "_dropped_earlier", "_lock")

    def __init__(self, cache: Dict[str, Any], policy: StoragePolicy,
                 on_first_drop: FirstDrop) -> None:
        self.cache = cache
        self.on_first_drop = on_first_drop
        self._dropped_earlier: Dict[str, int] = {}  # drops of entries converted back to lists
        self._lock = threading.Lock()
        self.bound: Optional[int] = None
        self.policy = policy

    @property
    def policy(self) -> StoragePolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: StoragePolicy) -> None:
        # A store re-points its fast sinks after this (once, not per key).
        self._policy = policy
        self.bound = policy.max_entries
        for key, entries in list(self.cache.items()):
            dict.__setitem__(self.cache, key, self.entries_like(entries, key))

    def append(self, key: str, entry: Any) -> None:
        """Append one call's entry (already a snapshot) under `key`.

        Takes no lock on the common path: dict.setdefault, list.append and
        BoundedEntries.add are atomic under the GIL.
        """
        entries = self.cache.get(key)
        if entries is None:
            entries = self.cache.setdefault(key, self.new_entries())
        bound = self.bound
        if bound is None:
            entries.append(entry)
            return
        if type(entries) is not BoundedEntries or entries.maxlen != bound:
            entries = self.bounded(key)
        if entries.add(entry):
            self.on_first_drop(key, bound)

    def bounded(self, key: str) -> BoundedEntries:
        """The BoundedEntries under `key` (the scope is bounded), converting what a user put there."""
        with self._lock:
            entries = self.entries_like(self.cache.get(key, []), key)
            self.cache[key] = entries
        assert type(entries) is BoundedEntries, "bounded() of an unbounded scope"
        return entries

    def new_entries(self) -> Entries:
        """An empty entries list for this scope's bound."""
        return [] if self.bound is None else BoundedEntries(maxlen=self.bound)

    def entries_like(self, entries: Iterable[Any], key: str) -> Entries:
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

    def count_dropped(self, counts: Mapping[str, int]) -> None:
        """Add drops counted elsewhere (another process's, a copy's) to `dropped`."""
        for key, count in counts.items():
            self._count_earlier(key, count)

    def _count_earlier(self, key: str, count: int) -> None:
        if count:
            self._dropped_earlier[key] = self._dropped_earlier.get(key, 0) + count

    @property
    def dropped(self) -> Dict[str, int]:
        """key -> number of entries dropped by max_entries since the last clear."""
        counts = dict(self._dropped_earlier)
        for key, entries in list(self.cache.items()):
            if type(entries) is BoundedEntries:
                count = entries.dropped
                if count:
                    counts[key] = counts.get(key, 0) + count
        return counts

    def clear(self, keep_keys: bool = True) -> List[Any]:
        """Empty the cache (an empty list under every key, or no key); return the lists taken out.

        New lists are put in place, so lists a user took keep their contents.
        The caller hands what it returns to a BufferPool's `give_back`.
        """
        with self._lock:
            taken = list(self.cache.values())
            if keep_keys:
                # Over a copy of the keys: other threads' calls may add keys meanwhile.
                for key in list(self.cache):  # a store re-points its fast sinks after this
                    dict.__setitem__(self.cache, key, self.new_entries())
            else:
                dict.clear(self.cache)
            self._dropped_earlier.clear()
        return taken


class CaptureCache(dict):  # key -> entries of any kind
    """The cache dict: key -> list of entries. Reading an empty list may warn.

    An empty list under a function that is switched on is the sign of a
    function that never ran (a model that took another code path); the store's
    `on_empty_read(key)` is told, so the user hears why nothing is there.
    Not after a clear() that nothing was recorded since, under any key: then
    nothing known ran since the clear.

    Pickled (or copied), it is a plain dict: a pickle loads where this
    package is not installed.
    """

    __slots__ = ("_store", "cleared")

    def __init__(self, store: "CaptureStore") -> None:
        super().__init__()
        self._store = store
        self.cleared = False  # clear()ed since capture was switched on

    def __getitem__(self, key: str) -> Any:
        entries = dict.__getitem__(self, key)
        if (
            not entries
            and self._store.on_empty_read is not None
            and not (self.cleared and not any(dict.values(self)))
        ):
            self._store.on_empty_read(key)
        return entries

    def __reduce__(self) -> Tuple[Any, ...]:
        return (dict, (dict.copy(self),))

    # Every change of which list a key holds re-points the store's fast sinks
    # (instrumented code appends immutable values straight to the list).

    def _changed(self) -> None:
        store = getattr(self, "_store", None)  # None while unpickling: items come first
        if store is not None:
            store.repoint()

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self._changed()

    def setdefault(self, key: str, default: Any = None) -> Any:
        value = dict.setdefault(self, key, default)
        self._changed()
        return value

    def pop(self, key: str, *default: Any) -> Any:
        value = dict.pop(self, key, *default)
        self._changed()
        return value

    def popitem(self) -> Tuple[str, Any]:
        item = dict.popitem(self)
        self._changed()
        return item

    def clear(self) -> None:
        dict.clear(self)
        self._changed()

    def update(self, *contents: Any, **more: Any) -> None:
        dict.update(self, *contents, **more)
        self._changed()

    def __ior__(self, other: Any) -> "CaptureCache":  # type: ignore[misc]
        self.update(other)
        return self


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


# The ticks of code instrumented under a bound while there is nothing to count.
_NO_TICKS = itertools.repeat(None)
_NEVER = object()  # a sentinel no function returns


def _outside_backward(
    append: Callable[[Any], Any], current_node: Callable[[], object]
) -> Callable[[Any], None]:
    """`append`, except for values captured while autograd re-runs a forward."""

    def call(value: Any) -> None:
        if current_node() is None:
            append(value)

    return call


def _bounded_outside_backward(
    scope: Scope, key: str, entries: BoundedEntries, current_node: Callable[[], object]
) -> Callable[[Any], None]:
    """`Scope.append` for one bounded list, except while autograd re-runs a forward.

    Specialised: `scope.append(key, value)` looks up the list each time,
    measured 2.3x slower per call; and `entries.add` (a method call) is taken
    only for the one append that can be the first drop, the others append and
    count in C (with torch loaded and a bound, ~100 ns of a ~300 ns call).
    """
    add, bound, on_first_drop = entries.add, scope.bound, scope.on_first_drop
    append, appends = entries.append, entries.appends

    def call(value: Any) -> None:
        if current_node() is None:
            if entries.warned or len(entries) < bound:  # type: ignore[operator]
                append(value)
                next(appends)
            elif add(value):
                on_first_drop(key, bound)  # type: ignore[arg-type]  # the scope is bounded

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

    __slots__ = ("scope", "sink", "entries", "bound")

    def __init__(self, scope: Scope, sink: FastSink, entries: BoundedEntries, bound: int) -> None:
        self.scope, self.sink, self.entries, self.bound = scope, sink, entries, bound

    def arm(self) -> Iterator[Any]:
        room = max(0, self.bound - len(self.entries) - 1)
        return itertools.chain(
            itertools.islice(self.entries.appends, room), iter(self.at_the_brim, _NEVER)
        )

    def at_the_brim(self) -> None:
        entries, sink = self.entries, self.sink
        next(entries.appends)
        full = len(entries) >= self.bound
        if sink.call == entries.append:  # else the sink was re-pointed elsewhere
            sink.ticks = entries.appends if full else self.arm()
        if full and not entries.warned:
            entries.warned = True
            self.scope.on_first_drop(sink.key, self.bound)


class _HeldCall:
    """What a fused recorder held for one running decorated call: (scope, entry) pairs."""

    __slots__ = ("frame", "entries")

    def __init__(self, frame: FrameType) -> None:
        self.frame: Optional[FrameType] = frame  # kept, so that its id names only it
        self.entries: List[Tuple[Scope, Any]] = []


class CaptureStore:
    """The caches captures go to, plus what guards them: policies, locks, keys, the pool.

    One process-wide scope, and per thread a stack of scopes opened by
    `scoped()` blocks: a thread records into its innermost open block, else
    into the process-wide scope. `cache`, `dropped` and `policy` read and
    write this thread's current scope.

    Args:
        pool: the BufferPool copies take warm memory from (default: the
            process's); tests give a store its own.
    """

    def __init__(self, pool: Optional[BufferPool] = None) -> None:
        self.pool = BUFFERS if pool is None else pool
        # (key, counted) -> FastSink of the instrumented code capturing under
        # it (see FastSink); re-pointed whenever what they depend on changes.
        self._sinks: Dict[Tuple[str, bool], FastSink] = {}
        self._sinks_lock = threading.RLock()
        self.sinks_know_torch = False  # whether torch was loaded when they were pointed
        # Called with a key whose empty list a user reads (see CaptureCache).
        self.on_empty_read: Optional[Callable[[str], None]] = None
        self.warn_once = WarnOnce()
        self.process_scope = Scope(self.new_cache(), StoragePolicy(), self._warn_bound)
        # scoped() blocks open in any thread: while none is, recorders go
        # straight to process_scope without a thread-local lookup.
        self.open_scopes = 0
        self._threads = threading.local()
        # How many fused-attention recorders write here (see fused_recording).
        self.fused_recorders = 0
        # instrumented code object -> the key its recorder captures under
        # (weak: dropping a decorated function frees its code, see issue 22)
        self.decorated_codes: "weakref.WeakKeyDictionary[CodeType, str]" = (
            weakref.WeakKeyDictionary()
        )
        # id(frame) -> _HeldCall: fused entries waiting for a decorated call's return
        self._held: Dict[int, _HeldCall] = {}
        self.held_calls = 0  # len(self._held), read without the lock by recorders
        self._lock = threading.Lock()
        # qualified name -> module of the function that took it as its key
        self._key_modules: Dict[str, str] = {}

    def current(self) -> Scope:
        """The scope this thread records into."""
        if self.open_scopes:
            stack = getattr(self._threads, "stack", None)
            if stack:
                top: Scope = stack[-1]
                return top
        return self.process_scope

    @property
    def cache(self) -> Any:  # a CaptureCache, unless a user put a dict of their own
        return self.current().cache

    @cache.setter
    def cache(self, value: Dict[str, Any]) -> None:
        self.current().cache = value
        self.repoint()

    @property
    def dropped(self) -> Dict[str, int]:
        with self._lock:  # BoundedEntries.dropped counts its own reads
            return self.current().dropped

    @property
    def policy(self) -> StoragePolicy:
        return self.current().policy

    @policy.setter
    def policy(self, value: StoragePolicy) -> None:
        self.current().policy = value
        self.repoint()

    # -- keys -------------------------------------------------------------

    def key_for(self, qualname: str, module: str, who: str = "get_local") -> str:
        """The cache key of a function with this qualified name in this module.

        The qualified name, unless a function of another module took it first:
        then `module.qualname`, with a warning. Fused capture names the callers
        of scaled_dot_product_attention with it, so their maps share keys with
        decorated functions.
        """
        with self._lock:
            owner = self._key_modules.setdefault(qualname, module)
        if owner == module:
            return qualname
        key = f"{module}.{qualname}"
        warn_during_call(
            f"{who}: {qualname!r} in module {module!r} has the same qualified name as a "
            f"captured function in module {owner!r}; its captures go under {key!r}"
        )
        return key

    @contextlib.contextmanager
    def fused_recording(self) -> Iterator[None]:
        """A block in which a fused-attention recorder (`sdpa_capture`) may hold entries.

        While any such block is open, every decorated call's return goes
        through its recorder (no fast path), which settles what was held for
        the call (see `hold_for_call`).
        """
        with self._lock:
            self.fused_recorders += 1
        self.repoint()  # every decorated call's return must look for held entries
        try:
            yield
        finally:
            with self._lock:
                self.fused_recorders -= 1
                self._drop_finished_calls()
            self.repoint()

    # -- one entry per call per key: fused entries of decorated calls -------
    #
    # sdpa_capture names an SDPA call's weights after the function that made
    # it. When that function is itself decorated with get_local, both would
    # record under one key: two entries for one call. So the fused entry is
    # held until the decorated call returns, and the return decides: names
    # unbound (timm's fused path: `attn` never formed) -> the held weights are
    # the call's entries under its key; names bound -> the call's own entry
    # goes under its key and the weights under `key:sdpa`. A call that raises
    # records nothing (get_local's rule), its held weights included.

    def hold_for_call(self, frame: FrameType, key: str, entry: Any) -> None:
        """Keep `entry` (a fused recorder's) until the decorated call running in `frame` returns."""
        scope = self.current()
        with self._lock:
            self._drop_finished_calls()
            held = self._held.get(id(frame))
            if held is None:
                held = self._held[id(frame)] = _HeldCall(frame)
                self.held_calls = len(self._held)
            held.entries.append((scope, entry))

    def settle_call(self, frame: FrameType, key: str, unbound: bool) -> bool:
        """The decorated call in `frame` returns: place what was held for it.

        Returns whether the held entries are the call's entries (its names
        were `unbound`), so that the call records nothing of its own.
        """
        with self._lock:
            held = self._held.get(id(frame))
            if held is None or held.frame is not frame:
                return False
            del self._held[id(frame)]
            self.held_calls = len(self._held)
        held.frame = None  # its locals are the user's: not kept a moment longer
        target = key if unbound else f"{key}:sdpa"
        if not unbound:
            self.warn_once(
                ("held", key),
                f"sdpa_capture: {key} is also captured by get_local, and its names were bound: "
                f"one entry per call per key, so the weights of its "
                f"scaled_dot_product_attention calls go under {target!r} (warned once per key)",
            )
        for scope, entry in held.entries:
            scope.append(target, entry)
        return unbound

    def drop_finished_calls(self) -> None:
        """Forget what was held for decorated calls that ended by raising."""
        with self._lock:
            self._drop_finished_calls()

    def _drop_finished_calls(self) -> None:
        if not self._held:
            return
        running = set()
        for top in sys._current_frames().values():
            frame: Optional[FrameType] = top
            while frame is not None:
                running.add(id(frame))
                frame = frame.f_back
        for ident in [ident for ident in self._held if ident not in running]:
            self._held.pop(ident).frame = None
        self.held_calls = len(self._held)

    # -- the fast path of instrumented code --------------------------------

    def fast_sink(self, key: str, fallback: Callable[[Any], Any], counted: bool) -> FastSink:
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

    def _point(self, sink: FastSink) -> None:
        current_node = _torch_internals.autograd_node_getter()
        self.sinks_know_torch = current_node is not None
        sink.call, sink.ticks = self._route(sink, current_node)

    def _route(
        self, sink: FastSink, current_node: Optional[Callable[[], object]]
    ) -> Tuple[Callable[[Any], Any], Iterator[Any]]:
        """(call, ticks) for `sink` in the current state; `current_node` None without torch."""
        fallback = sink.fallback, _NO_TICKS
        if self.fused_recorders:
            return fallback  # a return must settle what a fused recorder held for the call
        if self.open_scopes:
            return fallback  # a thread may record into its own scope: each call must look
        scope = self.process_scope
        entries = dict.get(scope.cache, sink.key)
        bound = scope.bound
        if bound is None:
            if type(entries) is not list:
                return fallback  # none yet, or a user's object: the recorder deals with it
            if current_node is None:
                return entries.append, _NO_TICKS
            return _outside_backward(entries.append, current_node), _NO_TICKS
        if type(entries) is not BoundedEntries or entries.maxlen != bound:
            return fallback
        if current_node is not None:
            return _bounded_outside_backward(scope, sink.key, entries, current_node), _NO_TICKS
        if not sink.counted:
            return fallback  # its code was instrumented unbounded: it does not tick
        if entries.warned:
            return entries.append, entries.appends
        return entries.append, _TicksUntilFull(scope, sink, entries, bound).arm()

    # -- caches and scopes --------------------------------------------------

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
        cache = self.new_cache()
        scope = Scope(cache, policy, self._warn_bound)
        stack = getattr(self._threads, "stack", None)
        if stack is None:
            stack = self._threads.stack = []
        stack.append(scope)
        with self._lock:
            self.open_scopes += 1
        self.repoint()
        try:
            yield cache
        finally:
            with self._lock:
                self.open_scopes -= 1
            stack.remove(scope)
            self.repoint()

    def append(self, key: str, entry: Any) -> None:
        """Append one call's entry (already a snapshot) under `key`, in this thread's scope."""
        self.current().append(key, entry)

    def clear(self) -> None:
        """Empty every list of this thread's scope, keeping the keys (as the original did).

        New lists are put in place, so lists a user took from the cache keep
        their contents. Arrays nothing else references go back to the pool.
        """
        scope = self.current()
        taken = scope.clear()
        if isinstance(scope.cache, CaptureCache):
            scope.cache.cleared = True
        self.repoint()  # first: a sink pointing at an old list references it
        self.pool.give_back(taken)

    def cache_switched_on(self) -> None:
        """Capture was switched on: an empty list of this thread's cache is news again."""
        cache = self.current().cache
        if isinstance(cache, CaptureCache):
            cache.cleared = False

    def _warn_bound(self, key: Hashable, limit: int) -> None:
        self.warn_once(
            ("bound", key),
            f"get_local: the cache for {key!r} holds at most {limit} entries "
            f"(max_entries); older entries are dropped, counted in get_local.dropped",
        )
