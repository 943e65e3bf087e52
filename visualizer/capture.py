"""get_local: capture named local variables of decorated functions.

    @get_local('attn')
    def forward(self, x):
        ...
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        ...

    get_local.activate()
    model(img)
    get_local.cache['Attention.forward']     # one array per call

Decorating never wraps: the decorator returns the very object it was given and
remembers the function. Activation swaps the function's `__code__` for an
instrumented copy (see `_rewrite`); deactivation swaps the original back. So
capture can be switched at any time, every existing reference to the function
sees the switch, and a deactivated function runs its own code at no cost.
"""
import contextlib
import copyreg
import itertools
import multiprocessing
import os
import sys
import threading
import types
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from . import _torch_internals
from ._arrays import is_torch_tensor
from ._errors import VisualizerError
from ._pool import BufferPool
from ._ranks import Ranks, captures_here, validate_ranks
from ._rewrite import NEXT_NAME, TYPE_NAME, FastPath, Global, instrument, local_names
from ._warnings import WarnOnce, raise_pending
from .policy import MISSING, NOT_CAPTURED, StoragePolicy
from .snapshot import IMMUTABLE_TYPES, own_storage, snapshot
from .store import Cache, CaptureCache, CaptureStore, FastSink, Scope

Decorated = TypeVar("Decorated")
# select=: one callable for every name, or name -> callable.
Select = Union[Callable[[Any], Any], Mapping[str, Callable[[Any], Any]], None]

_MAX_WRAPPED_DEPTH = 100

# What keep() returns for a value that is not a new call's value: captured while
# autograd's backward re-runs a forward (activation checkpointing), or under a
# transform that traces instead of computing (torch.func, export, fx). The
# recorder then stores nothing.
_NOT_RECORDED = object()

# The process whose captures were last checked for being in a child process
# (a DataLoader worker): checked once per process, on its first tensor capture.
_checked_process: list = [None]


class _Registry:
    """Decorated function -> _Registration, holding each function weakly.

    Not a `weakref.WeakKeyDictionary`: its iteration guard defers only the
    removals that begin after an iteration starts, so a function dying in
    another thread a moment before deletes its entry in the middle of a
    snapshot ("dictionary changed size during iteration", CPython 3.9-3.13,
    seen with eight threads decorating and switching). Here the entries change
    only under the registry's own lock: a dying function's entry is removed
    at once if that lock is free, else queued (list.append is atomic) and
    removed as the holder lets go: a walk never sees an entry go, and a dead
    function's code is kept no longer than the walk that held the lock.
    """

    __slots__ = ("_entries", "_dead", "_lock", "_died", "__weakref__")

    def __init__(self) -> None:
        self._entries: "Dict[weakref.ref, _Registration]" = {}
        self._dead: list = []  # weak references whose functions died
        # Not reentrant: a function dying during a walk in the walking thread
        # (a garbage collection there) must queue, not remove.
        self._lock = threading.Lock()
        registry = weakref.ref(self)

        def died(reference: weakref.ref) -> None:
            alive = registry()
            if alive is not None:
                alive._dead.append(reference)
                alive._drop_dead_if_free()

        self._died = died

    def get(self, function: types.FunctionType) -> "Optional[_Registration]":
        """Lock-free: a lookup never changes the entries."""
        return self._entries.get(weakref.ref(function))

    def set(self, function: types.FunctionType, registration: "_Registration") -> None:
        with self._locked():
            self._entries[weakref.ref(function, self._died)] = registration

    def items(self) -> "List[Tuple[types.FunctionType, _Registration]]":
        """A snapshot of the living entries."""
        with self._locked():
            living = [(ref(), registration) for ref, registration in self._entries.items()]
        return [(function, r) for function, r in living if function is not None]

    def values(self) -> "List[_Registration]":
        return [registration for _, registration in self.items()]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._drop_dead()
            yield
        # A function that died while the lock was held queued its entry.
        self._drop_dead_if_free()

    def _drop_dead_if_free(self) -> None:
        # Whoever sees a queued entry and gets the lock removes it; a death
        # that misses the lock here is seen by the holder when it lets go.
        while self._dead and self._lock.acquire(blocking=False):
            try:
                self._drop_dead()
            finally:
                self._lock.release()

    def _drop_dead(self) -> None:
        while self._dead:
            self._entries.pop(self._dead.pop(), None)


class _Registration:
    """One decorated function: where its code lives and what to capture.

    It holds no reference to its function: the registry maps functions to
    registrations weakly, and a registration that held its function would keep
    every decorated function, and all it closes over, alive for ever.
    """

    __slots__ = (
        "key", "names", "select", "module", "original_code", "installed_code", "template",
        "counted", "marked_for_dynamo",
    )

    def __init__(
        self,
        target: types.FunctionType,
        key: str,
        names: Tuple[str, ...],
        select: Dict[str, Callable[[Any], Any]],
    ) -> None:
        self.key = key
        self.names = names
        self.select = select
        # None for a function exec'd in a namespace without __name__ (generated code).
        module = target.__module__
        self.module = module if isinstance(module, str) else ""
        self.original_code = target.__code__
        self.installed_code: Optional[types.CodeType] = None  # while it is installed
        # The _Template of the installed code (None for code with `select`, or none installed).
        self.template: Optional[_Template] = None
        self.counted = False  # whether the installed code counts appends (see _install)
        # Whether activation put Dynamo's skip marker on the function (a marker
        # the user put there is theirs, and stays).
        self.marked_for_dynamo = False

    def current_code(self, target: types.FunctionType) -> types.CodeType:
        """The code `target` runs uninstrumented: its code now, if replaced since.

        Others may replace `__code__` after decorating: IPython's %autoreload
        and editors put the edited function's code in place, `types.coroutine`
        sets a flag on whatever code is there. The current code is the truth,
        so activation instruments it and deactivation restores it.
        """
        current = target.__code__
        if current is self.original_code or current is self.installed_code:
            return self.original_code
        installed = self.installed_code
        if installed is not None and current == installed.replace(co_flags=current.co_flags):
            # Only flags were changed, on the instrumented copy: carry them over.
            return self.original_code.replace(co_flags=current.co_flags)
        return current


# The global that holds the frozenset of types instrumented code sends to its fast sink.
_IMMUTABLE_NAME = "__visualizer_immutable__"
_GLOBAL_NUMBERS = itertools.count(1)


class _Template:
    """Instrumented code that loads its recorder from the function's globals, and those globals.

    The code of a function without `select` loads its recorder, and the fast
    path its sink, by names unique to this template (`_rewrite.Global`), so
    that torch.compile can trace it. `bind` puts the names in a function's
    globals, with the recorder, or None for "off": a function whose code stays
    installed while capture is off (see GetLocal._settle) skips the call, and
    code Dynamo compiled is guarded on the recorder's global, so each switch
    finds the compiled code made for it.
    """

    __slots__ = ("code", "recorder_name", "bindings", "link")

    def __init__(self, code: types.CodeType, recorder_name: str,
                 bindings: Dict[str, Any], link: "_GraphLink") -> None:
        self.code = code
        self.recorder_name = recorder_name
        self.bindings = bindings
        self.link = link

    def bind(self, namespace: Dict[str, Any], on: bool) -> None:
        """Put the template's globals in `namespace`; the recorder only if `on`, else None.
        Never removed: a call running this code must always find its names."""
        if on:
            namespace.update(self.bindings)
        else:
            namespace[self.recorder_name] = None


class _InstrumentedCode:
    """Instrumented code per original code, kept no longer than the original lives.

    Nested functions are re-created, and re-decorated, on every call of their
    outer function; their original code is one constant of the outer
    function's code. Instrumenting (~0.5 ms) is done once per original code
    and capture (key, names, fast path), and kept by the original code,
    weakly: it goes when the outer function, the factory's class or the
    reloaded module's previous generation goes. Without `select` the code is
    a `_Template`, reused as it is, with one recorder (one code object for
    every generation, so compiled callers stay valid). With `select` the
    recorder holds the callables, which may close over a call's values: what
    is kept is code whose recorder, a constant, is a placeholder, and each
    installation puts its own recorder in (a `replace` of the constants, ~µs),
    so the callables live exactly as long as a function runs the code.
    """

    def __init__(self) -> None:
        # original code -> (key, names, counted, select, in_graph) -> _Template, or code
        # (with a placeholder recorder where there is select)
        self._templates: "weakref.WeakKeyDictionary[types.CodeType, Dict[Any, Any]]" = (
            weakref.WeakKeyDictionary()
        )

    def code(
        self,
        original: types.CodeType,
        registration: _Registration,
        make_recorder: "Callable[[], Tuple[Callable[..., None], _GraphLink]]",
        fast_sink: Optional[Callable[[Callable[..., None]], FastSink]],
        counted: bool,
        in_graph: bool,
    ) -> "Tuple[types.CodeType, Optional[_Template]]":
        """`original` instrumented to call a recorder with the registration's names,
        and its _Template (None where the recorder is a constant of the code).

        `fast_sink(recorder)`: the sink of code with a fast path (one that counts
        its appends if `counted`), or None. `in_graph`: code torch.compile can
        trace (see `_Template`); else the recorder and the fast path's objects
        are constants of the code, which costs ~10-20 ns less per call
        (benchmarks/run_all.py, section a) and is what the core without torch runs.
        """
        token = (registration.key, registration.names, counted, bool(registration.select),
                 in_graph)
        templates = self._templates.setdefault(original, {})
        made = templates.get(token)
        if registration.select:
            # A recorder with select holds the user's callables: a constant of its own code.
            if made is None:
                made = templates[token] = instrument(
                    original, registration.names, _RECORDER_SLOT, MISSING)
            recorder, _ = make_recorder()
            return made.replace(
                co_consts=tuple(
                    recorder if constant is _RECORDER_SLOT else constant
                    for constant in made.co_consts
                )
            ), None
        if made is None:
            recorder, link = make_recorder()
            if in_graph:
                made = _make_template(original, registration, recorder, link, fast_sink)
            else:
                fast = None
                if fast_sink is not None:
                    fast = FastPath(IMMUTABLE_TYPES, fast_sink(recorder), counted)
                made = instrument(original, registration.names, recorder, MISSING, fast)
            templates[token] = made
        if isinstance(made, _Template):
            return made.code, made
        return made, None


def _make_template(
    original: types.CodeType,
    registration: _Registration,
    recorder: Callable[..., None],
    link: "_GraphLink",
    fast_sink: Optional[Callable[[Callable[..., None]], FastSink]],
) -> _Template:
    number = next(_GLOBAL_NUMBERS)
    recorder_name = f"__visualizer_recorder_{number}__"
    bindings: Dict[str, Any] = {recorder_name: recorder}
    fast = None
    if fast_sink is not None:
        sink = fast_sink(recorder)
        fast = FastPath(Global(_IMMUTABLE_NAME), Global(f"__visualizer_sink_{number}__"),
                        sink.counted)
        bindings.update({fast.sink.name: sink, fast.types.name: IMMUTABLE_TYPES,
                         TYPE_NAME: type, NEXT_NAME: next})
    code = instrument(original, registration.names, Global(recorder_name), MISSING, fast)
    return _Template(code, recorder_name, bindings, link)


def _RECORDER_SLOT(*values: Any) -> None:
    """Where code with `select` loads its recorder (see _InstrumentedCode); never run:
    every installation replaces it with its own recorder."""
    raise VisualizerError("get_local: instrumented code ran without its recorder")


class GetLocal:
    """The `get_local` decorator and its switch, cache and settings.

    `get_local(*names, select=None)` returns a decorator. `select` maps a
    captured value to the part worth keeping before any copy is made (e.g.
    `lambda attn: attn[:, :, 0]` keeps the CLS row only): a callable applied
    to every name, or a dict name -> callable.
    """

    def __init__(self, pool: Optional[BufferPool] = None) -> None:
        # `pool`: where copies take warm memory (default: the process's BufferPool).
        self._store = CaptureStore(pool)
        # Capture is on while the switch (activate/deactivate) is on or any
        # capture() block is open, in any thread: blocks are counted, so
        # overlapping blocks in several threads never switch each other off.
        self._switch = False
        self._blocks = 0
        self._active = False  # instrumented code is installed
        self._threads = threading.local()  # .blocks: this thread's open capture() blocks
        self._lock = threading.RLock()
        # target function -> _Registration. Weak, so functions created on
        # every call (nested functions) do not pile up.
        self._registrations = _Registry()
        self._instrumented = _InstrumentedCode()
        self._warn_once = WarnOnce()
        self._store.on_empty_read = self._warn_not_called

    def __reduce__(self):
        # A decorated function pickled by value while capture is on (cloudpickle,
        # the path of joblib, Ray and Dask) takes its recorder along, and with
        # it this object: in the receiving process it is that process's
        # get_local, so the function runs there and captures into its cache.
        return (_process_get_local, ())

    # -- decorating -------------------------------------------------------

    def __call__(
        self, *names: str, select: Select = None
    ) -> Callable[[Decorated], Decorated]:
        names = _validate_names(names)
        select = _validate_select(select, names)

        def decorator(obj: Decorated) -> Decorated:
            target = _find_target(obj, names)
            qualname = getattr(obj, "__qualname__", None) or target.__qualname__
            self._register(target, qualname, names, select)
            return obj

        return decorator

    def _register(self, target, qualname, names, select):
        with self._lock:
            previous = self._registrations.get(target)
            if previous is not None:
                # Decorated again (a second get_local on the same function):
                # capture the union of the names.
                names = previous.names + tuple(n for n in names if n not in previous.names)
                select = {**previous.select, **select}
                key = previous.key
                target.__code__ = previous.current_code(target)
            else:
                key = self._store.key_for(qualname, target.__module__)
            registration = _Registration(target, key, names, select)
            self._registrations.set(target, registration)
            if self._active:
                self._install(target, registration)

    # -- switching --------------------------------------------------------

    def activate(
        self,
        *,
        keep_on_device: bool = False,
        dtype: Any = None,
        max_entries: Optional[int] = None,
        detach: bool = True,
        ranks: Ranks = None,
    ) -> None:
        """Turn capture on for every decorated function, now and later ones.

        The storage arguments set how values are stored; see `StoragePolicy`.
        They are keyword-only, so `activate(True)` cannot be misread.
        `ranks` (an int or ints) switches capture on only in those processes
        of a torch.distributed job; elsewhere every function keeps running
        its original code (see `visualizer._ranks` for how a rank is known).
        """
        policy = StoragePolicy(keep_on_device, dtype, max_entries, detach)
        here = captures_here(validate_ranks(ranks, "get_local"), "get_local")
        with self._lock:
            self._store.policy = policy
            self._set_switch(here)
        self._settle()
        raise_pending()

    def deactivate(self) -> None:
        """Turn capture off: every decorated function gets its original code back.

        Capture stays on while a `capture()` block is open (in any thread)
        until the last one exits.
        """
        with self._lock:
            self._set_switch(False)
        self._settle()
        raise_pending()

    def _set_switch(self, on):
        self._switch = on
        for block in getattr(self._threads, "blocks", ()):
            block.switched = True  # its exit restores the switch it found

    def _settle(self):
        """Install or restore every function's code as the switch and the open blocks say.

        torch.compile: Dynamo does not guard the code it compiled on the
        `__code__` of the functions it inlined, only on the globals that code
        reads. Code instrumented for in-graph capture reads its recorder's
        global, and while Dynamo has compiled anything it stays installed when
        capture goes off, with that global None (one load and a test per
        return): compiled code made with capture on and with capture off are
        then told apart by their guards, both stay in Dynamo's cache, and
        switching back and forth costs no recompilation. Code whose recorder
        is a constant (with `select`, or torch<2.11) cannot be traced: the
        function is marked for Dynamo to run it eagerly, between graphs, and
        while Dynamo has compiled anything the mark stays when capture goes
        off, so that no compiled code inlines its original code either. What
        a swap of `__code__` still hides from compiled code (original code,
        inlined unmarked, instrumented) is made visible by resetting Dynamo
        (`_forget_compiled_code`): once per function at most.
        """
        hidden_swap = False
        with self._lock:
            on = self._switch or self._blocks > 0
            changed, self._active = on != self._active, on
            registrations = self._registrations.items()
            if on:
                if changed:
                    self._store.pool.hold()  # copies into the pool follow until capture is off
                    self._store.cache_switched_on()
                for target, registration in registrations:
                    hidden_swap |= self._install(target, registration)
                self._store.repoint()  # torch may have been loaded since
            else:
                for target, registration in registrations:
                    self._uninstall(target, registration)
                if changed:
                    self._store.pool.let_go()  # no copies follow
        if changed and hidden_swap:
            self._forget_compiled_code()

    def _forget_compiled_code(self):
        """Make torch.compile'd code see the switch: drop what Dynamo compiled.

        Dynamo inlines a decorated function into the compiled graph of its
        caller and keeps running that graph after `__code__` is swapped, so a
        model compiled while capture was off would capture nothing after
        activate(). Resetting Dynamo makes the next call recompile with the
        code now in place: captures then equal eager mode's. Only when Dynamo
        has compiled something, and at most once per function (see `_settle`);
        it costs one recompilation, said once.
        """
        if not _torch_internals.dynamo_compiled_anything():
            return
        _torch_internals.reset_dynamo()
        self._warn_once(
            "compiled",
            "get_local: capture was switched while torch.compile'd code existed; Dynamo's "
            "compiled code was reset so that it sees the switch, and compiled models "
            "recompile on their next call (warned once)",
            now=True,
        )

    @property
    def is_active(self) -> bool:
        """Whether capture is on (as `sdpa_capture.is_active`)."""
        return self._active

    @property
    def is_activate(self) -> bool:
        """Whether capture is on: the original Visualizer's name for `is_active`."""
        return self._active

    @contextlib.contextmanager
    def capture(
        self,
        *,
        keep_on_device: bool = False,
        dtype: Any = None,
        max_entries: Optional[int] = None,
        detach: bool = True,
        ranks: Ranks = None,
    ) -> Iterator[CaptureCache]:
        """Capture inside a `with` block into a fresh cache, then restore.

        Yields a new dict that receives this block's captures (this thread's
        calls); `get_local.cache` and the settings are restored on exit, also
        when the block raises. Blocks are counted: capture is on while any
        block is open in any thread, or while the switch is on, so blocks
        overlapping in several threads each get all their own thread's calls.
        An `activate()`/`deactivate()` inside the block sets the switch the
        block restores on exit. In a process that `ranks` leaves out, the
        block does not switch capture on.

            with get_local.capture() as cache:
                model(img)
            cache['Attention.forward']
        """
        policy = StoragePolicy(keep_on_device, dtype, max_entries, detach)
        here = captures_here(validate_ranks(ranks, "get_local"), "get_local")
        block = _Block(self._switch, counted=here)
        with self._store.scoped(policy) as fresh:
            with self._lock:
                self._blocks += block.counted
                blocks = self._threads.__dict__.setdefault("blocks", [])
                blocks.append(block)
            try:
                self._settle()
                yield fresh
            finally:
                with self._lock:
                    blocks.remove(block)
                    self._blocks -= block.counted
                    if block.switched:
                        self._switch = block.switch_on_entry
                self._settle()
        raise_pending()

    def records_in_graphs(self, function: Any) -> bool:
        """Whether decorated `function` (as `key_of` takes it) is switched on and records
        from inside torch.compile'd graphs (torch>=2.11, no `select`)."""
        registration = self._registration_of(function)
        template = None if registration is None else registration.template
        return self._active and template is not None and bool(template.link.sink)

    def key_of(self, function: Any) -> Optional[str]:
        """The cache key of a decorated function, or None if it is not decorated.

        `function` may be the decorated object itself, a bound method, a
        static/class method or a `functools.wraps` wrapper of it.
        """
        registration = self._registration_of(function)
        return None if registration is None else registration.key

    def _registration_of(self, function: Any) -> Optional[_Registration]:
        candidate = function
        for _ in range(_MAX_WRAPPED_DEPTH):
            if isinstance(candidate, (staticmethod, classmethod, types.MethodType)):
                candidate = candidate.__func__
            registration = (
                self._registrations.get(candidate)
                if isinstance(candidate, types.FunctionType)
                else None
            )
            if registration is not None:
                return registration
            candidate = getattr(candidate, "__wrapped__", None)
            if candidate is None:
                return None
        return None

    # -- the cache --------------------------------------------------------

    @property
    def cache(self) -> CaptureCache:
        """Function key -> list with one entry per call, in call order."""
        raise_pending()
        return self._store.cache

    @cache.setter
    def cache(self, value: Cache) -> None:
        if not isinstance(value, dict):
            raise VisualizerError(
                f"get_local.cache must be a dict; got {type(value).__qualname__}"
            )
        # Its contents go into a CaptureCache, which can say why a list is empty.
        self._store.cache = self._store.new_cache(value)

    @property
    def store(self) -> CaptureStore:
        """The CaptureStore captures go to: the seam fused and model-level capture share
        (keys of functions, the buffer pool, scoped caches)."""
        return self._store

    @property
    def dropped(self) -> Dict[str, int]:
        """Function key -> number of entries dropped by `max_entries`."""
        raise_pending()
        return self._store.dropped

    @property
    def policy(self) -> StoragePolicy:
        """The StoragePolicy in force."""
        return self._store.policy

    def clear(self) -> None:
        """Empty the cache (keys stay, each with a new empty list).

        While capture is on (or another capture copies into the buffer pool)
        the next forward copies into the cleared arrays (see BufferPool); while
        off, nothing would, so they are freed.
        """
        self._store.clear()

    # -- instrumentation --------------------------------------------------

    def _install(self, target, registration):
        """Install `registration`'s instrumented code in `target`, with its recorder bound.

        Returns whether `target` ran its original code before, unmarked for
        Dynamo (a swap that code torch.compile'd earlier cannot see: see `_settle`)."""
        self._store.cache.setdefault(registration.key, [])
        registration.original_code = registration.current_code(target)
        # One name and no select: immutable values take the fast path, which
        # counts appends (a bounded cache's `dropped`) if instrumented under a bound.
        fast = len(registration.names) == 1 and not registration.select
        counted = fast and self._store.process_scope.bound is not None
        swapped = target.__code__ is not registration.installed_code
        # Original code compiled code may have inlined (see _settle).
        hidden = swapped and not registration.marked_for_dynamo
        in_graph = not registration.select and _records_in_graphs()
        if swapped or registration.counted != counted or in_graph != (
                registration.template is not None):
            # Not installed yet (an installed one stays: the same code object, so
            # compiled callers stay valid).
            store = self._store
            fast_sink = None
            if fast:
                def fast_sink(recorder):
                    return store.fast_sink(registration.key, recorder, counted)
            try:
                code, template = self._instrumented.code(
                    registration.original_code, registration,
                    lambda: self._make_recorder(registration), fast_sink, counted, in_graph,
                )
            except Exception as error:
                raise VisualizerError(
                    f"get_local: could not instrument {registration.key} to capture "
                    f"{list(registration.names)}: {type(error).__name__}: {error}"
                ) from error
            if template is not None:
                # The names first: code that runs finds them from its first call.
                template.bind(target.__globals__, True)
            previous = registration.template
            target.__code__ = registration.installed_code = code
            registration.template = template
            registration.counted = counted
            self._store.decorated_codes[code] = registration.key
            if previous is not None and previous is not template:
                previous.bind(target.__globals__, False)  # compiled code made for it recompiles
        elif registration.template is not None:
            registration.template.bind(target.__globals__, True)
        code = target.__code__
        template = registration.template
        if template is not None and template.link.connect():
            # torch.compile traces the code and records from inside its graphs.
            self._unmark_for_dynamo(target, registration)
        elif _run_eagerly_under_compile(target, code):
            registration.marked_for_dynamo = True
        return hidden

    def _uninstall(self, target, registration):
        """Give `target` its original code back (or, see `_settle`, switch its recorder off)."""
        template = registration.template
        compiled_anything = _torch_internals.dynamo_compiled_anything()
        if (
            template is not None
            and template.link.sink
            and target.__code__ is registration.installed_code
            and compiled_anything
        ):
            # Compiled code may have traced this code: it stays, its recorder
            # global None, so the compiled code made for "off" runs (see _settle).
            template.bind(target.__globals__, False)
            return
        registration.original_code = registration.current_code(target)
        target.__code__ = registration.original_code
        registration.installed_code = None
        if template is not None:
            template.bind(target.__globals__, False)  # compiled code made for it recompiles
        registration.template = None
        if not compiled_anything:
            # Else the mark stays: compiled code must not inline the original code,
            # which the next switch would hide from it (see _settle).
            self._unmark_for_dynamo(target, registration)

    @staticmethod
    def _unmark_for_dynamo(target, registration):
        if registration.marked_for_dynamo:
            target.__dict__.pop(_torch_internals.DYNAMO_DISABLE_ATTRIBUTE, None)
            registration.marked_for_dynamo = False

    def _make_recorder(self, registration):
        store = self._store
        key = registration.key
        names = registration.names
        select = registration.select
        warn_missing = self._warn_missing
        warn_tracing = self._warn_tracing
        warn_child_process = self._warn_child_process
        warn_transform = self._warn_transform
        warn_not_captured = self._warn_not_captured
        # Recording from inside torch.compile'd graphs (connected where the code is
        # installed in the globals form: see _GraphLink).
        link = _GraphLink(key, names)

        def keep(name, value):
            """What the cache holds for one captured value."""
            if value is MISSING:
                warn_missing(key, name)
                return value
            if _torch_internals.in_backward():
                # Activation checkpointing re-running the forward during
                # backward: not a new call.
                return _NOT_RECORDED
            chooser = select.get(name)
            if chooser is not None:
                value = own_storage(_apply_select(chooser, value, key, name), store.policy)
            if type(value) not in IMMUTABLE_TYPES:
                if "torch" in sys.modules:
                    if not store.sinks_know_torch:
                        store.repoint()  # torch came after: sinks must check recompute
                    if _checked_process[0] != os.getpid():
                        _checked_process[0] = os.getpid()
                        warn_child_process(key)
                    transform = _tracing_transform(value)
                    if transform is not None:
                        warn_transform(key, name, transform)
                        return _NOT_RECORDED
                    if _torch_internals.jit_tracing():
                        warn_tracing(key)
                try:
                    value = snapshot(value, store.policy, pool=store.pool)
                except Exception as error:  # noqa: BLE001 - the user's call must go on
                    # An object snapshot cannot copy, or a tensor the policy cannot
                    # store (float8 or sparse into numpy, a meta tensor): a marker
                    # in its place, never the live object, never an error here.
                    warn_not_captured(key, name, error)
                    value = NOT_CAPTURED
            return value

        # A checkpointed forward re-run by autograd's backward is not a new
        # call (keep() checks this for values it copies). Bound once: torch is
        # loaded by the time a model's functions are switched on.
        in_backward = _torch_internals.autograd_node_getter()

        # The recorder's own cost is most of the cost of capture (see
        # benchmarks/), so the common case, one name, is written out in full:
        # an immutable value with nothing to select goes straight to its list.
        #
        # While sdpa_capture holds the weights of SDPA calls made by this very
        # call (see CaptureStore.hold_for_call), the return settles them: its
        # frame is the caller's (the instrumented code calls the recorder).
        #
        # Dynamo inlines the recorder into the graph it traces: the first test
        # sends the value out of the graph (see _GraphLink) before anything
        # Dynamo cannot trace (sys._getframe, the copy) is reached.
        if len(names) == 1:
            (only_name,) = names
            needs_keep = bool(select)

            process_scope = store.process_scope  # one object for the store's lifetime

            def record(value):
                if type(value) not in IMMUTABLE_TYPES and link.traced():
                    link.record_in_graph(value)
                    return
                if store.held_calls and store.settle_call(
                    sys._getframe(1), key, value is MISSING
                ):
                    return
                if type(value) in IMMUTABLE_TYPES and not needs_keep:
                    if in_backward is not None and in_backward() is not None:
                        return
                else:
                    value = keep(only_name, value)
                    if value is _NOT_RECORDED:
                        return
                # No thread-local lookup unless a capture() block is open.
                (process_scope if not store.open_scopes else store.current()).append(key, value)

            def from_graph(values):
                """A compiled graph's value, handed out as the graph runs."""
                value = keep(only_name, values[0])
                if value is not _NOT_RECORDED:
                    (process_scope if not store.open_scopes else store.current()).append(
                        key, value)

            link.recorder, link.from_graph = record, from_graph
            return record, link

        def record_several(*values):
            if link.traced():
                link.record_in_graph(*values)
                return
            found = dict(zip(names, values))
            if store.held_calls and store.settle_call(
                sys._getframe(1), key, all(v is MISSING for v in values)
            ):
                return
            entry = {}
            for name, value in found.items():  # a loop, not a comprehension: the
                entry[name] = keep(name, value)  # warnings' stack depth must not vary
            if any(value is _NOT_RECORDED for value in entry.values()):
                return
            store.append(key, entry)

        def several_from_graph(values):
            """A compiled graph's values, handed out as the graph runs."""
            entry = {}
            for name, value in zip(names, values):
                entry[name] = keep(name, value)
            if not any(value is _NOT_RECORDED for value in entry.values()):
                store.append(key, entry)

        link.recorder, link.from_graph = record_several, several_from_graph
        return record_several, link

    def _warn_child_process(self, key):
        """Say so when a capture happens where its cache cannot reach the user's process."""
        where = None
        data = sys.modules.get("torch.utils.data")
        info = data.get_worker_info() if data is not None else None
        parent = multiprocessing.parent_process()
        if info is not None:
            where = f"DataLoader worker {info.id} of {info.num_workers}"
        elif (
            parent is not None
            and not _distributed_initialized()
            and "RANK" not in os.environ
        ):
            where = f"child process {os.getpid()} of process {parent.pid}"
        if where is None:
            return
        self._warn_once(
            ("child process", os.getpid()),
            f"get_local: {key} was captured in {where}: captures stay in that process's "
            "get_local.cache and never reach the parent process. Run the decorated code in the "
            "main process to look at it (e.g. DataLoader(num_workers=0)), or send the values "
            "back yourself (warned once per process)",
        )

    def _warn_not_captured(self, key, name, error):
        self._warn_once(
            ("not captured", key, name),
            f"get_local: {name!r} in {key} could not be stored ({error}); its cache entry is "
            "visualizer.NOT_CAPTURED (warned once per function and name)",
        )

    def _warn_transform(self, key, name, transform):
        self._warn_once(
            ("transform", key),
            f"get_local: {key} ran under {transform}, where {name!r} is not a concrete value; "
            "such calls are not recorded (the call itself runs as without capture; warned "
            "once per function)",
        )

    def _warn_tracing(self, key):
        self._warn_once(
            ("trace", key),
            f"get_local: {key} was captured while torch.jit.trace was tracing it; the traced "
            "module runs no Python code and will not capture when it is called",
        )

    def _warn_not_called(self, key):
        """A user read an empty cache list: say why, if its function is switched on."""
        if not self._active:
            return
        with self._lock:  # another thread may be decorating
            owners = [r for r in self._registrations.values() if r.key == key]
        if not owners:
            return
        hint = ""
        if owners[0].module.startswith("transformers."):
            hint = (
                " transformers 5 loads most models with attn_implementation='sdpa', which never "
                "calls its eager attention function: load the model with "
                "attn_implementation='eager', or use visualizer.capture_attention(model), which "
                "captures every implementation."
            )
        self._warn_once(
            ("not called", key),
            f"get_local: nothing was captured for {key}: it is switched on, but no call of it "
            f"was recorded since capture was switched on or the cache cleared; the code that "
            f"ran most likely did not call it.{hint} (warned once per function)",
            now=True,
        )

    def _warn_missing(self, key, name):
        self._warn_once(
            ("missing", key, name),
            f"get_local: {name!r} was not bound when {key} returned; its cache entry is "
            "visualizer.MISSING (warned once per function and name)",
        )


class _GraphLink:
    """How one recorder records from inside torch.compile'd graphs (torch >= 2.11).

    Dynamo inlines the recorder into the graph of the compiled code that calls
    the decorated function. There `traced()` is True and `record_in_graph`
    hands the captured tensors, detached, out of the graph through
    `_graph_sink`'s custom op; as the graph runs, the op hands them to
    `from_graph`, which stores copies as an eager call's values are stored.
    No graph break, and `fullgraph=True` compiles. A value that is not a tensor
    (MISSING, a tuple, ...) is recorded by the recorder run eagerly, between
    graphs: a graph break, as there was before for every value.

    Connected (`connect`) when its code is installed in the globals form
    (torch loaded, torch>=2.11, no `select`: see `_InstrumentedCode`); until
    then `traced()` is False and the recorder only ever runs eagerly.
    """

    __slots__ = ("key", "names", "sink", "compiling", "exporting", "tensor", "send",
                 "listeners", "between_graphs", "recorder", "from_graph", "__weakref__")

    def __init__(self, key: str, names: Tuple[str, ...]) -> None:
        self.key = key
        self.names = names
        self.sink = 0  # the sink's number once connected (numbers start at 1)
        self.compiling: Optional[Callable[[], bool]] = None
        self.recorder: Callable[..., None] = _RECORDER_SLOT
        self.from_graph: Callable[[Any], None] = _RECORDER_SLOT

    def __reduce__(self) -> Any:
        # A recorder pickled by value (see GetLocal.__reduce__) takes an unconnected
        # link along: the receiving process's compiled graphs are its own.
        return (_GraphLink, (self.key, self.names))

    def connect(self) -> bool:
        """Connect to a sink if torch is loaded and records in graphs; whether connected."""
        if self.sink:
            return True
        torch = sys.modules.get("torch")
        if torch is None or _torch_internals.in_graph_capture_missing() is not None:
            return False
        from . import _graph_sink

        _graph_sink.available()  # registers the op
        self.tensor = torch.Tensor
        self.send = _graph_sink.send
        self.listeners = _graph_sink.listeners
        # The recorder run between graphs: Dynamo breaks the graph at its call, and
        # under fullgraph=True its error says this reason.
        names = ", ".join(map(repr, self.names))
        self.between_graphs = torch.compiler.disable(self.recorder, reason=(
            f"get_local records {names} of {self.key} from inside compiled graphs only when "
            "every captured value is a tensor; a call that captures anything else (a Python "
            "number, a tuple, ...) is recorded eagerly, between graphs. Capture tensors only, "
            "or compile without fullgraph=True"
        ))
        # torch.export traces with is_compiling() True too: its graph is an
        # artifact to save and load, not to record from; keep() says so.
        self.exporting = _torch_internals.exporting_check()
        self.compiling = _torch_internals.compiling_check()
        # Weak: a sink number lives as long as the process; the recorder need not.
        link = weakref.ref(self)

        def sink(name: str, values: Any) -> None:
            alive = link()
            if alive is not None:
                alive.from_graph(values)

        self.sink = _graph_sink.new_sink(sink)
        return True

    def traced(self) -> bool:
        """Whether torch.compile is tracing the recorder, and it can record in the graph."""
        compiling = self.compiling
        return compiling is not None and compiling() and not self.exporting()

    def record_in_graph(self, *values: Any) -> None:
        """Traced by Dynamo: the values leave the graph through the custom op."""
        for value in values:
            if not isinstance(value, self.tensor):
                self.between_graphs(*values)
                return
        tensors = [value.detach() for value in values]
        self.send(tensors, self.key, self.sink)
        for listener in self.listeners():
            listener(self.key, tensors)


class _Block:
    """One open `capture()` block: the switch it found, whether it counts, whether it switched."""

    __slots__ = ("switch_on_entry", "counted", "switched")

    def __init__(self, switch_on_entry: bool, counted: bool) -> None:
        self.switch_on_entry = switch_on_entry
        self.counted = int(counted)
        self.switched = False  # activate()/deactivate() ran in its thread while it was open


def _process_get_local():
    """This process's `get_local` (what a pickled GetLocal or store becomes)."""
    return get_local


def _records_in_graphs():
    """Whether torch is loaded and records inside compiled graphs (torch>=2.11)."""
    return "torch" in sys.modules and _torch_internals.in_graph_capture_missing() is None


def _run_eagerly_under_compile(function, code):
    """Make torch.compile run an instrumented function eagerly, between graphs.

    Dynamo cannot trace a call to the recorder (a constant function object)
    and would fail. Marked like this, it graph-breaks around the function
    (when inlining it) or skips its frame (when called directly), so capture
    sees real tensors and records exactly what eager mode records, while the
    rest of the model still compiles. Done only when torch is already loaded:
    the core must not import torch. Returns whether it put the skip marker on
    ``function`` (False if the function already had one of its own).
    """
    if "torch" not in sys.modules:
        return False
    _torch_internals.skip_in_dynamo(code)
    # The recorders' own frames (record, keep, ...: the nested functions of
    # _make_recorder, one code object each for all recorders) are not worth
    # compiling either: Dynamo would only graph-break inside them.
    for constant in GetLocal._make_recorder.__code__.co_consts:
        if isinstance(constant, types.CodeType):
            _torch_internals.skip_in_dynamo(constant)
    # The attribute Dynamo's inliner checks for torch.compiler.disable'd
    # functions; removed again by deactivate() unless it was there before.
    if _torch_internals.DYNAMO_DISABLE_ATTRIBUTE in function.__dict__:
        return False
    setattr(function, _torch_internals.DYNAMO_DISABLE_ATTRIBUTE, True)
    return True


def _distributed_initialized():
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def _tracing_transform(value):
    """The transform tracing `value` instead of computing it, or None.

    torch.func (vmap, grad, jacrev, ...) wraps tensors in levels, torch.export
    runs on fake and functional tensors, torch.fx.symbolic_trace passes Proxy
    objects: none of them holds the numbers a call computes.
    """
    if is_torch_tensor(value):
        if _torch_internals.is_functorch_wrapped(value):
            return "a torch.func transform (vmap, grad, jacrev, ...)"
        if type(value).__name__ in ("FakeTensor", "FunctionalTensor"):
            return "torch.export or fake-tensor tracing"
        return None
    fx = sys.modules.get("torch.fx")
    if fx is not None and isinstance(value, fx.Proxy):
        return "torch.fx symbolic tracing"
    return None


def _apply_select(chooser, value, key, name):
    try:
        return chooser(value)
    except Exception as error:
        shape = getattr(value, "shape", None)
        got = f"a value of shape {tuple(shape)}" if shape is not None else type(value).__name__
        raise VisualizerError(
            f"get_local: select for {name!r} in {key} raised {type(error).__name__}: {error} "
            f"(on {got})"
        ) from error


def _validate_names(names):
    if not names:
        raise VisualizerError(
            "get_local: expected at least one variable name, e.g. get_local('attn'); got no names"
        )
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise VisualizerError(
                f"get_local: variable names must be identifiers given as strings; "
                f"got {name!r} ({type(name).__name__})"
            )
    return tuple(dict.fromkeys(names))


def _validate_select(select, names):
    if select is None:
        return {}
    if callable(select):
        return {name: select for name in names}
    if isinstance(select, dict):
        unknown = [name for name in select if name not in names]
        if unknown:
            raise VisualizerError(
                f"get_local: select names {unknown} that are not captured; "
                f"expected some of {list(names)}"
            )
        for name, chooser in select.items():
            if not callable(chooser):
                raise VisualizerError(
                    f"get_local: select[{name!r}] must be callable; got {chooser!r}"
                )
        return dict(select)
    raise VisualizerError(
        f"get_local: select must be a callable or a dict of name -> callable; got {select!r}"
    )


def _find_target(obj, names):
    """The Python function whose locals hold `names`, following `__wrapped__`."""
    candidate = obj
    examined = []
    for _ in range(_MAX_WRAPPED_DEPTH):
        if isinstance(candidate, (staticmethod, classmethod, types.MethodType)):
            candidate = candidate.__func__
        if isinstance(candidate, types.FunctionType):
            available = local_names(candidate.__code__)
            if all(name in available for name in names):
                return candidate
            examined.append(candidate)
        candidate = getattr(candidate, "__wrapped__", None)
        if candidate is None:
            break
    if not examined:
        raise VisualizerError(
            f"get_local{names!r} can only instrument a Python function (def or lambda), "
            f"a method, staticmethod or classmethod; got {_describe(obj)}"
        )
    innermost = examined[-1]
    available = local_names(innermost.__code__)
    missing = [name for name in names if name not in available]
    raise VisualizerError(
        f"get_local: {', '.join(map(repr, missing))} is not a local variable of "
        f"{innermost.__qualname__}; expected one of its locals: {sorted(available)} "
        f"(names given: {list(names)})"
    )


def _describe(obj):
    if isinstance(obj, type):
        return (
            f"the class {obj.__qualname__}; decorate the method that computes the "
            f"variable, e.g. {obj.__qualname__}.forward"
        )
    if hasattr(obj, "forward") and hasattr(obj, "parameters"):
        return (
            f"a {type(obj).__qualname__} module instance; decorate its method, e.g. "
            f"get_local(...)(type(module).forward)"
        )
    return f"{type(obj).__qualname__} {obj!r}"


get_local = GetLocal()


# A decorated function pickled by value while capture is on (cloudpickle, the
# path of joblib, Ray and Dask) takes its recorder along, and with it the
# store, its scope and fast sink: in the receiving process they are that
# process's get_local's, so the function captures into its cache there.
copyreg.pickle(CaptureStore, lambda store: (_process_store, ()))
copyreg.pickle(Scope, lambda scope: (_process_scope, ()))
copyreg.pickle(FastSink, lambda sink: (_process_sink, (sink.key, sink.fallback, sink.counted)))


def _process_store():
    """This process's get_local store."""
    return get_local.store


def _process_scope():
    """This process's process-wide get_local scope."""
    return get_local.store.process_scope


def _process_sink(key, fallback, counted):
    """This process's get_local fast sink for `key`."""
    return get_local.store.fast_sink(key, fallback, counted)
