"""Attention weights from fused attention: `F.scaled_dot_product_attention` calls.

    with sdpa_capture.capture(rows=[0]) as cache:     # the CLS query row only
        model(img)                                    # timm fused_attn, HF "sdpa", ...
    cache['Attention.forward']                        # one (B, H, 1, N) array per call

Fused kernels never materialize softmax(q·kᵀ·scale + mask), so there is no
local for `get_local` to capture. While `sdpa_capture` is on, a
`torch.overrides.TorchFunctionMode` sees every call of
`torch.nn.functional.scaled_dot_product_attention`, runs it unchanged (the
model's output is the kernel's output, bit for bit) and then recomputes, for
the record only and under `torch.no_grad()`, the weights the kernel applied:

- the weights are those of `visualizer.weights.sdpa_weights`: SDPA's exact
  masking, causal and GQA semantics, computed in float32 and stored in the
  query's dtype; a query row whose every key is masked is zeros.
- dropout (`dropout_p > 0`, a module in training): the weights BEFORE dropout
  are recorded, with a warning once per function; the kernel's random
  dropout pattern is not observable. `model.eval()` makes them exact.
- selection before computation: `rows=` keeps some query rows and `heads=`
  some query heads, so the CLS row of a DINOv2-size input costs O(N) memory
  per head, not O(N²). An int keeps its axis: entries are always (..., H, Q, S).

Where the weights go: the same cache and storage policy as `get_local` (numpy
on the CPU by default; `get_local.activate(keep_on_device=True, ...)` or
`sdpa_capture.capture(keep_on_device=True, ...)` change it), one entry per
call, in call order, keyed by the qualified name of the function that called
SDPA: the first caller up the stack outside torch, this module, transformers'
attention dispatchers such as `sdpa_attention_forward` (they only forward the
call for the attention module) and other modes' `__torch_function__`. So
timm's attention records under 'Attention.forward' and Hugging Face models
under their attention module's forward (e.g. 'ViTAttention.forward',
'LlamaAttention.forward'): the function one would decorate with `get_local`
in eager mode. `get_local('attn')` may stay on that very function: one entry
per call per key, whatever else records. A decorated call whose names are
unbound at its return (it took the fused path) has its SDPA weights as its
entries; one whose names are bound (`get_local('q')`) has its own entry under
its key and its SDPA weights under `'<key>:sdpa'`, with a warning once. A
decorated call that raises records nothing, its SDPA weights included.

What is recorded is what the kernel was given: transformers packs the query
heads of a single-token GQA decoding step into (B, Hkv, n_rep, E) when it
cannot use `enable_gqa`, and then that call's entry has that layout.

Limits: the mode stack is per thread, so capture in the thread that runs the
model. A TorchFunctionMode sees only the outermost torch function of a call:
SDPA called inside `F.multi_head_attention_forward` (`nn.MultiheadAttention`,
as in torchvision's ViT and CLIP, with `need_weights=False`) is not seen, and
a warning says so. Kernels that do not go through
`F.scaled_dot_product_attention` (xformers' `memory_efficient_attention` in
the original DINOv2 repository, the `flash_attn` package) are not seen. The
recomputed weights are not part of the model's autograd graph: a storage
policy with `detach=False` still stores them without a graph, with a warning.
Under `torch.compile` (torch >= 2.11, the `_in_graph` gate): Dynamo traces
this mode, and the weights are computed inside the graph beside the kernel
and leave it through `_in_graph`'s custom op: no graph break, one
recompilation at the first activation per selection (later activations reuse
the graphs), the caller named at trace time from the frames Dynamo traces.
A call with dropout records between graphs (its warning is said eagerly), as
every call does on torch 2.6-2.10: there a graph break at every SDPA call
while capture is on.
"""

import contextlib
import sys
import threading
from types import FrameType
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from . import _in_graph, _torch_internals
from ._compat import PY311
from ._errors import VisualizerError
from ._modes import WatchMode, remove_mode
from ._ranks import Ranks, captures_here, validate_ranks
from ._warnings import WarnOnce, raise_pending, warn_user
from .capture import GetLocal, get_local
from .policy import StorageDType, StoragePolicy
from .snapshot import snapshot
from .weights import (
    CheckedSelection,
    Selection,
    WeightsRequest,
    bind_sdpa_arguments,
    sdpa_call_weights,
    validate_selection,
)

# Frames of these modules (and their submodules) are skipped when naming the
# caller: torch's own (Module.__call__, ...), this module, and transformers'
# attention dispatchers (`sdpa_attention_forward`, ...), through which every
# Hugging Face attention module calls SDPA.
_SKIPPED_MODULES = ("torch", __name__, "transformers.integrations")

_WATCHED = frozenset({F.scaled_dot_product_attention, F.multi_head_attention_forward})

# Whether Dynamo is tracing the caller (always False on torch < 2.3, which lacks the check).
_compiling = _torch_internals.compiling_check()

# In a name handed out of a graph: the caller's qualified name, this, its module.
_NAME_SEPARATOR = "\x1f"


class _Recording:
    """One thread's recording: its mode on that thread's stack, its selection, its count."""

    __slots__ = ("mode", "rows", "heads", "sdpa_calls", "fused")

    def __init__(self, rows: CheckedSelection, heads: CheckedSelection) -> None:
        self.rows, self.heads = rows, heads
        self.sdpa_calls = 0
        self.mode: Optional[WatchMode] = None
        # The store's fused_recording(), entered while on.
        self.fused: Optional[ContextManager[None]] = None


class SdpaCapture:
    """Records the attention weights of `scaled_dot_product_attention` calls.

    Shares the store (cache, storage policy, key names, buffer pool) of the
    `GetLocal` instance it is made for; the module-level `sdpa_capture` shares
    `get_local`'s, so `get_local.cache` holds both kinds of capture.
    """

    def __init__(self, owner: GetLocal) -> None:
        self._owner = owner
        # torch's mode stack is per thread, so each thread that switches
        # recording on gets its own mode, with its own rows and heads.
        self._threads = threading.local()
        self._recordings: Set[_Recording] = set()  # every recording that is on, in any thread
        self._lock = threading.Lock()  # guards _recordings
        self._keys: Dict[Tuple[str, str], str] = {}  # (qualified name, module) -> cache key
        self._warn_once = WarnOnce()
        # The sink compiled graphs hand their maps to (see _record_in_graph): made at
        # the first activation, where this torch records inside graphs; else None.
        self._graph_sink: Optional[int] = None
        self._caller_in_trace: Optional[Callable[[], str]] = None

    # -- switching --------------------------------------------------------

    def activate(
        self, rows: Selection = None, heads: Selection = None, ranks: Ranks = None
    ) -> None:
        """Record every SDPA call of this thread from now on, until `deactivate`.

        Args:
            rows: query rows to keep: None (all), an int (e.g. 0 for CLS), a
                slice or a sequence of ints; negative indices count from the end.
            heads: query heads to keep, in the same forms.
            ranks: record only in these processes of a torch.distributed job
                (None: every process); elsewhere this stays off.

        Values are stored with the storage policy in force (`get_local.policy`).
        Calling it again while on changes `rows` and `heads`. Recording is per
        thread (torch's mode stack is): other threads switch on for themselves.
        """
        checked_rows = validate_selection(rows, "rows", "sdpa_capture")
        checked_heads = validate_selection(heads, "heads", "sdpa_capture")
        if not captures_here(validate_ranks(ranks, "sdpa_capture"), "sdpa_capture"):
            self._switch_off_here()
            return
        recording: Optional[_Recording] = getattr(self._threads, "recording", None)
        if recording is not None and recording.mode is not None and recording.mode.on:
            recording.rows, recording.heads = checked_rows, checked_heads
            return
        if recording is not None and recording.mode is not None:
            remove_mode(recording.mode)  # switched off from another thread: still on our stack
        if self._graph_sink is None and _in_graph.available() is None:
            self._graph_sink = _in_graph.new_sink(self._from_graph)
            # Run by Dynamo at trace time, its result a constant of the graph.
            self._caller_in_trace = torch._dynamo.assume_constant_result(_caller_in_trace)
        recording = _Recording(checked_rows, checked_heads)
        store = self._owner.store
        recording.mode = WatchMode(_WATCHED, self._listener(recording))
        recording.mode.__enter__()
        store.pool.hold()  # maps are computed into the pool's memory until switched off
        # While on, decorated calls settle what it holds for them at their return.
        recording.fused = store.fused_recording()
        recording.fused.__enter__()
        self._threads.recording = recording
        with self._lock:
            self._recordings.add(recording)
        raise_pending()

    def deactivate(self) -> None:
        """Stop recording, in every thread; SDPA calls run exactly as without this library.

        Warns if torch functions ran while on but none was
        `F.scaled_dot_product_attention`: nothing was recorded, because the
        code that ran computes its attention another way.
        """
        with self._lock:
            recordings, self._recordings = self._recordings, set()
        for recording in recordings:
            self._retire(recording)
        self._switch_off_here()
        raise_pending()

    def _switch_off_here(self, warn_if_empty: bool = True) -> None:
        """Stop recording in this thread only (the end of a capture() block)."""
        recording: Optional[_Recording] = getattr(self._threads, "recording", None)
        if recording is None:
            return
        self._threads.recording = None
        if recording.mode is not None:
            remove_mode(recording.mode)
        with self._lock:
            self._recordings.discard(recording)
        self._retire(recording, warn_if_empty)

    def _retire(self, recording: _Recording, warn_if_empty: bool = True) -> None:
        """Turn a recording off (a mode still on another thread's stack passes calls through).

        `warn_if_empty=False` when a block ends by an exception: it says enough,
        and a warning made an error must not replace it."""
        mode = recording.mode
        if mode is None or not mode.on:
            return
        mode.on = False
        self._owner.store.pool.let_go()
        if recording.fused is not None:
            recording.fused.__exit__(None, None, None)
        if warn_if_empty and mode.calls and not recording.sdpa_calls:
            warn_user(
                f"sdpa_capture: {mode.calls} torch function calls ran while it was on, none "
                "of them F.scaled_dot_product_attention, so nothing was recorded: the code that "
                "ran computes attention another way (an explicit softmax, e.g. a transformers "
                "model loaded with attn_implementation='eager' or timm's fused_attn=False). Use "
                "get_local on its attention function, or visualizer.capture_attention(model), "
                "which captures every implementation"
            )

    @property
    def is_active(self) -> bool:
        """Whether SDPA calls of this thread are being recorded."""
        recording: Optional[_Recording] = getattr(self._threads, "recording", None)
        return recording is not None and recording.mode is not None and recording.mode.on

    @contextlib.contextmanager
    def capture(
        self,
        rows: Selection = None,
        heads: Selection = None,
        *,
        keep_on_device: bool = False,
        dtype: Optional[StorageDType] = None,
        max_entries: Optional[int] = None,
        ranks: Ranks = None,
    ) -> Iterator[Dict[str, List[Any]]]:
        """Record this thread's SDPA calls inside a `with` block into a fresh cache, then restore.

        Yields a new dict that receives this block's captures (SDPA weights and
        anything `get_local` captures meanwhile in this thread), stored with
        the storage policy these arguments describe (see `StoragePolicy`;
        there is no `detach`, since recomputed weights have no graph to keep).
        On exit, also when the block raises, this thread's previous state (off,
        or on with its own rows and heads) comes back. Blocks in other threads
        are independent. In a process that `ranks` leaves out, it is off inside
        the block. `get_local`'s on/off state is never changed.

            with sdpa_capture.capture(rows=0) as cache:
                model(img)
            cache['Attention.forward'][layer]    # (B, H, 1, N)
        """
        policy = StoragePolicy(keep_on_device, dtype, max_entries, who="sdpa_capture")
        validate_selection(rows, "rows", "sdpa_capture")
        validate_selection(heads, "heads", "sdpa_capture")
        here = captures_here(validate_ranks(ranks, "sdpa_capture"), "sdpa_capture")
        was_active = self.is_active
        saved: Optional[Tuple[CheckedSelection, CheckedSelection]] = (
            (self._threads.recording.rows, self._threads.recording.heads) if was_active else None
        )
        with self._owner.store.scoped(policy) as fresh:
            raised = True
            try:
                if here:
                    self.activate(rows, heads)
                else:
                    self._switch_off_here()
                yield fresh
                raised = False
            finally:
                # Exactly this thread's state on entry, whatever the block switched.
                if saved is not None:  # it was active
                    self.activate(*saved)
                else:
                    self._switch_off_here(warn_if_empty=not raised)
        raise_pending()

    @property
    def cache(self) -> Dict[str, List[Any]]:
        """The shared cache, the same dict as `get_local.cache`."""
        return self._owner.cache

    # -- recording --------------------------------------------------------

    def _listener(
        self, recording: _Recording
    ) -> Callable[[Callable[..., Any], Tuple[Any, ...], Dict[str, Any], Any], None]:
        """What `recording`'s mode tells about the watched calls it ran."""

        def watched(
            func: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any
        ) -> None:
            if func is F.scaled_dot_product_attention:
                if _compiling() and self._graph_sink is not None:
                    self._record_in_graph(recording, args, kwargs)
                else:
                    self._record(recording, args, kwargs)
            elif not kwargs.get("need_weights", True):  # F.multi_head_attention_forward
                self._warn_unseen_multi_head_attention()

        return watched

    # Under torch.compile the recording runs eagerly, between graphs: Dynamo
    # cannot trace sys._getframe, and the recorded weights are not the graph's.
    @torch.compiler.disable
    def _record(
        self, recording: _Recording, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> None:
        # Counted here, eagerly: Dynamo (torch 2.6-2.8) traces the listener, and a
        # count read and changed in a graph failed its own guard check.
        recording.sdpa_calls += 1
        query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa = bind_sdpa_arguments(
            *args, **kwargs
        )
        if _torch_internals.is_fake(query):
            # Older Dynamo (checked: torch 2.1.2; 2.6.0 traces the mode instead) runs
            # the recording mode itself on the fake tensors it compiles with.
            raise VisualizerError(
                "sdpa_capture: cannot record inside torch.compile on torch "
                f"{torch.__version__}: Dynamo runs the recording on fake tensors, which hold no "
                "weights (torch>=2.6 records between compiled graphs). Record the model "
                "uncompiled"
            )
        decorated_frame, caller = self._caller()
        if caller is None:
            return  # a compiled graph's call: the graph records it (_record_in_graph)
        store = self._owner.store
        policy = store.policy
        if _torch_internals.is_functorch_wrapped(query):
            # vmap/grad/jacrev levels: the weights are no concrete values (get_local's rule).
            self._warn_once(
                (caller, "transform"),
                f"sdpa_capture: {caller} called scaled_dot_product_attention under a torch.func "
                "transform (vmap, grad, jacrev, ...), where its weights are not concrete values; "
                "such calls are not recorded (the call itself runs as without capture; warned "
                "once per function)",
            )
            return
        if dropout_p > 0:
            self._warn_once(
                (caller, "dropout"),
                f"sdpa_capture: {caller} called scaled_dot_product_attention with "
                f"dropout_p={dropout_p}; the recorded weights are the ones BEFORE dropout (the "
                "kernel's random dropout pattern is not observable). Call model.eval() for "
                "weights that are exactly the ones applied (warned once per function)",
            )
        if not policy.detach:
            self._warn_once(
                (caller, "detach"),
                f"sdpa_capture: the storage policy has detach=False, but the weights recorded "
                f"for {caller} are recomputed beside the fused kernel and are not part of the "
                "model's autograd graph; they are stored without a graph (warned once per "
                "function)",
            )
        request = WeightsRequest(recording.rows, recording.heads, "sdpa_capture", store.pool)
        where = f"the scaled_dot_product_attention call in {caller}"
        # Other recorders' modes (capture_attention's) must not see this recomputation.
        with _torch_internals.torch_functions_unwatched():
            weights = sdpa_call_weights(
                query, key, attn_mask, is_causal, scale, enable_gqa, request, where
            )
            entry = snapshot(weights, policy, owned=True, pool=store.pool)
        if decorated_frame is not None:
            # get_local records this call too: its return decides where this goes.
            store.hold_for_call(decorated_frame, caller, entry)
        else:
            store.append(caller, entry)

    def _record_in_graph(
        self, recording: _Recording, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> None:
        """Traced by Dynamo: the weights computed in the graph beside the kernel.

        They leave the graph through `_in_graph`'s custom op, to `_from_graph`:
        no graph break, and the compiler schedules and fuses the computation
        with the rest of the graph. The caller's name is found at trace time,
        from the frames Dynamo traces, and is a constant of the graph.
        """
        query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa = bind_sdpa_arguments(
            *args, **kwargs
        )
        if not isinstance(dropout_p, (int, float)) or dropout_p > 0:
            # Its warning, once per function, is said eagerly, between graphs.
            self._record(recording, args, kwargs)
            return
        assert self._caller_in_trace is not None and self._graph_sink is not None
        name = self._caller_in_trace()
        request = WeightsRequest(recording.rows, recording.heads, "sdpa_capture")
        where = f"the scaled_dot_product_attention call in {name.partition(_NAME_SEPARATOR)[0]}"
        weights = sdpa_call_weights(
            query, key, attn_mask, is_causal, scale, enable_gqa, request, where
        )
        _in_graph.send(weights, name, self._graph_sink)

    def _from_graph(self, name: str, weights: torch.Tensor) -> None:
        """A compiled graph's map, handed out at run time: stored as an eager call's is."""
        recording: Optional[_Recording] = getattr(self._threads, "recording", None)
        if recording is None or recording.mode is None or not recording.mode.on:
            return  # switched off in this thread since the graph was entered
        recording.sdpa_calls += 1
        if _torch_internals.in_backward():
            return  # a checkpointed forward recomputed: not a new call
        qualname, _, module = name.partition(_NAME_SEPARATOR)
        store = self._owner.store
        # A copy: the graph's buffer is the compiler's to reuse.
        store.append(self._key((qualname, module)), snapshot(weights, store.policy, pool=store.pool))

    def _caller_key(self) -> str:
        return self._caller()[1] or "<a compiled graph>"

    def _caller(self) -> Tuple[Optional[FrameType], Optional[str]]:
        """The frame of the function that called SDPA, and the key its maps go under.

        The key is None for a call made by the code of a graph Dynamo compiled
        while recording (its backend `eager` runs it in Python, seen by this
        mode): that graph records its maps itself."""
        frame: Optional[FrameType] = sys._getframe(1)
        while frame is not None and _is_skipped(frame):
            frame = frame.f_back
        if frame is None:
            return None, "<unknown>"
        if self._graph_sink is not None and _torch_internals.is_dynamo_graph_frame(frame):
            return None, None
        decorated = self._owner.store.decorated_codes.get(frame.f_code)
        if decorated is not None:
            return frame, decorated  # a get_local-decorated function: its own key
        return None, self._key((_qualified_name(frame), frame.f_globals.get("__name__", "")))

    def _key(self, name: Tuple[str, str]) -> str:
        """The cache key of the function with this (qualified name, module)."""
        key = self._keys.get(name)
        if key is None:
            # get_local's naming: a qualified name taken by a function of
            # another module gets a module-qualified key, with a warning.
            key = self._keys[name] = self._owner.store.key_for(*name)
        return key

    def _warn_unseen_multi_head_attention(self) -> None:
        caller = self._caller_key()
        self._warn_once(
            (caller, "multi_head_attention"),
            f"sdpa_capture: {caller} ran nn.MultiheadAttention with need_weights=False. Its "
            "scaled_dot_product_attention call happens inside F.multi_head_attention_forward, "
            "itself a torch function, and a TorchFunctionMode sees only the outermost one, so "
            "nothing is recorded for it; call the module with need_weights=True, "
            "average_attn_weights=False to get its weights (warned once per function)",
        )


def _is_skipped(frame: FrameType) -> bool:
    if frame.f_code.co_name == "__torch_function__":
        # Another mode or a tensor subclass passing the call on.
        return True
    return _is_skipped_module(frame.f_globals.get("__name__", ""))


def _is_skipped_module(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in _SKIPPED_MODULES)


def _caller_in_trace() -> str:
    """At trace time: the name of the function whose SDPA call Dynamo is tracing, as
    `qualified name<_NAME_SEPARATOR>module` (the frames `_caller` skips, skipped)."""
    for code, globals_, owner_type in _torch_internals.traced_frames():
        module = globals_.get("__name__", "")
        if code.co_name == "__torch_function__" or _is_skipped_module(module):
            continue
        if PY311:
            qualname: str = code.co_qualname  # type: ignore[attr-defined,unused-ignore]
            owner_name, dot, name = qualname.rpartition(".")
        else:
            owner_name = owner_type.__qualname__ if owner_type is not None else ""
            dot, name = ("." if owner_name else ""), code.co_name
        return owner_name + dot + _torch_internals.resumed_function_name(name) + (
            _NAME_SEPARATOR + module
        )
    return "<unknown>" + _NAME_SEPARATOR


def _qualified_name(frame: FrameType) -> str:
    code = frame.f_code
    if PY311:
        # co_qualname is new in 3.11; mypy cannot see the PY311 guard.
        qualname: str = code.co_qualname  # type: ignore[attr-defined,unused-ignore]
        owner_name, dot, name = qualname.rpartition(".")
        return owner_name + dot + _torch_internals.resumed_function_name(name)
    name = _torch_internals.resumed_function_name(code.co_name)
    owner = frame.f_locals.get("self")
    if owner is not None:
        return f"{type(owner).__qualname__}.{name}"
    return name


sdpa_capture = SdpaCapture(get_local)
