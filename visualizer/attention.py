"""Attention maps of a whole model, one key per attention module: `capture_attention`.

    with capture_attention(model) as maps:        # transformers, timm-style, MultiheadAttention
        model(**inputs)                           # or model.generate(...)
    list(maps)                                    # module paths, in forward order
    maps['encoder.layer.0.attention.self']        # one (B, H, Q, K) array per call
    maps.stack()                                  # (L, B, H, Q, K): what analysis and plot take

The model is the unit, whatever computes its attention. While the recorder is
on, every module of the model carries a forward pre-hook and an always-called
forward hook; they keep a per-thread stack of the modules running, and put a
`TorchFunctionMode` on the thread's mode stack while any of them runs. A map
is then recorded under the module path (`model.named_modules()`) of the
innermost module running when it is computed:

- `F.scaled_dot_product_attention` (timm's `fused_attn`, transformers'
  `attn_implementation="sdpa"`, directly or through transformers' attention
  interface): the weights the kernel applied are recomputed beside it with
  `fused.sdpa_weights` (SDPA's exact masking semantics), the kernel's output is
  left as it is. transformers' single-token GQA packing (B, Hkv, n_rep, E) is
  undone, so entries are always (B, H_query, Q, K).
- an explicit softmax over the last axis of a 4-D tensor (B, H, Q, K)
  (transformers' eager attention, timm's explicit path, Bloom, Falcon, MPT and
  any model that writes its attention out): the probabilities themselves, never
  the scores before them. A 3-D softmax (B*H, Q, K) is taken when the module
  says its number of heads (`num_heads` and the like).
- `nn.MultiheadAttention` and `nn.TransformerEncoderLayer`: their fast paths
  (`torch._native_multi_head_attention`, `torch._transformer_encoder_layer_fwd`)
  are taken only when no torch function mode is active, so the mode is taken off
  the stack while they run (their output stays bit for bit the same) and the
  weights are recomputed from the module's own inputs and projections.
- a module whose `forward` carries `get_local(...)`: the first captured name,
  when it is a (B, H, Q, K) tensor, is that call's map (the user said what the
  attention is), in place of what the softmax or SDPA watch saw in the same call.

Entries are post-softmax probabilities: rows sum to 1 over the keys that were
not masked; a query row whose every key is masked is all zeros, which is what
the kernels apply. `rows=` and `heads=` select query rows and query heads
before the product on the recomputed paths (the CLS row of a DINOv2-size input
costs O(N) per head, never N x N) and right after the softmax on eager paths.

Calls: one entry per call of the module, in call order. Two forwards give two
entries per key; `generate()` gives the prefill (B, H, L, L) and then one
(B, H, 1, S) entry per new token, for every attention module.
"""

import inspect
import sys
import threading
from types import TracebackType
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
)

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _graph_sink, _in_graph, _torch_internals
from ._errors import VisualizerError
from ._modes import WatchMode, remove_mode
from ._ranks import Ranks, captures_here, validate_ranks
from ._torch_internals import push_mode
from ._warnings import WarnOnce, raise_pending, warn_user
from .capture import get_local
from .maps import AttentionMaps, Globs, MapEntry, matching, module_globs
from .policy import MISSING, StorageDType, StoragePolicy
from .snapshot import snapshot
from .weights import (
    CheckedSelection,
    Selection,
    WeightsRequest,
    bind_sdpa_arguments,
    functional_multi_head_weights,
    module_weights,
    multi_head_weights,
    sdpa_call_weights,
    select_weights,
    softmax_probabilities,
    unpack_grouped_query,
    validate_selection,
)

# Whether Dynamo is tracing the caller (always False on torch < 2.3, which lacks the check).
_compiling = _torch_internals.compiling_check()

# The positional and keyword arguments of a module call, as hooks see them.
Args = Tuple[Any, ...]
Kwargs = Dict[str, Any]

_WHO = "capture_attention"
# What "no attention was captured" says was searched for.
_SEARCHED = (
    "F.scaled_dot_product_attention calls, softmax over the last axis of a (B, H, Q, K) "
    "tensor, nn.MultiheadAttention / nn.TransformerEncoderLayer, "
    "F.multi_head_attention_forward and forwards decorated with get_local"
)

_SOFTMAX_FUNCTIONS = frozenset(
    {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
)
# What the recording mode shows the recorder (see AttentionRecorder._watched).
_WATCHED = _SOFTMAX_FUNCTIONS | {F.scaled_dot_product_attention, F.multi_head_attention_forward}

# Modules that choose a native fast path only when no torch function mode is
# active (they check `has_torch_function`): the recording mode is off while
# they run, so capture never changes which path they take.
_FAST_PATH_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

# Names in a forward's code that mean a kernel this library cannot see.
_UNSEEN_KERNELS = frozenset(
    {
        "memory_efficient_attention",
        "flash_attn_func",
        "flash_attn_varlen_func",
        "flash_attn_qkvpacked_func",
        "flash_attn_kvpacked_func",
        "flash_attn_with_kvcache",
    }
)
_SEEN_IMPLEMENTATIONS = ("eager", "sdpa")


_MULTI_HEAD_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_ENCODER_LAYER_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)


def capture_attention(
    model: nn.Module,
    modules: Optional[Globs] = None,
    rows: Selection = None,
    heads: Selection = None,
    *,
    keep_on_device: bool = False,
    dtype: Optional[StorageDType] = None,
    max_entries: Optional[int] = None,
    ranks: Ranks = None,
) -> "AttentionRecorder":
    """Record the attention maps of every attention module of `model`.

    Use it as a context manager, which yields the `AttentionMaps`:

        with capture_attention(model, rows=0) as maps:   # CLS row only
            model(pixel_values)
        maps.stack()                                     # (L, B, H, 1, N)

    or, around a training loop, `recorder = capture_attention(model)`,
    `recorder.start()`, ..., `recorder.stop()`, with the maps in
    `recorder.maps`.

    Args:
        model: a `torch.nn.Module`.
        modules: a glob or list of globs over module paths
            (`model.named_modules()` names, e.g. "encoder.*"): only these
            modules record, and a map computed inside a submodule that is not
            selected goes to its innermost selected ancestor. None finds the
            attention modules itself (see the module docstring).
        rows: query rows to keep: None (all), an int (0 is CLS), a slice or a
            sequence of ints. An int keeps its axis: entries are (B, H, 1, K).
        heads: query heads to keep, in the same forms.
        keep_on_device, dtype, max_entries: how entries are stored (see
            `visualizer.StoragePolicy`); `max_entries` bounds each module's list.
        ranks: record only in these processes of a torch.distributed job
            (None: every process); elsewhere no hook is put on and the maps
            stay empty. A model wrapped in DistributedDataParallel or
            DataParallel is recorded through its `.module`: keys carry no
            "module." prefix.

    Returns:
        An `AttentionRecorder`.

    At the end (`stop()` or leaving the block) it warns if the model ran and
    nothing was captured, saying what was searched; at the start it warns
    about modules whose attention it cannot see (TorchScript, flash-attention
    or xformers kernels, transformers implementations other than eager/sdpa).
    """
    return AttentionRecorder(
        model,
        modules=modules,
        rows=rows,
        heads=heads,
        keep_on_device=keep_on_device,
        dtype=dtype,
        max_entries=max_entries,
        ranks=ranks,
    )


class AttentionRecorder:
    """Hooks on a model's modules that record attention maps by module path.

    Made by `capture_attention`; see there. `maps` is the `AttentionMaps`
    being filled; `start()` and `stop()` switch recording on and off (a
    `with` block does both). Recording can be started again after a stop; the
    maps keep what they hold.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Optional[Globs] = None,
        rows: Selection = None,
        heads: Selection = None,
        *,
        keep_on_device: bool = False,
        dtype: Optional[StorageDType] = None,
        max_entries: Optional[int] = None,
        ranks: Ranks = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise VisualizerError(
                f"{_WHO}: model must be a torch.nn.Module; got {type(model).__qualname__}"
            )
        self._policy = StoragePolicy(keep_on_device, dtype, max_entries, who=_WHO)
        # Checked now, so a bad selection fails here and not inside the model.
        self._rows: CheckedSelection = validate_selection(rows, "rows", _WHO)
        self._heads: CheckedSelection = validate_selection(heads, "heads", _WHO)
        self._ranks = validate_ranks(ranks, _WHO)
        self.model = model
        self.maps = AttentionMaps(self._policy)
        self._pool = get_local.store.pool  # where copies and recomputed maps take memory
        self._request = WeightsRequest(self._rows, self._heads, _WHO, self._pool)
        # A data-parallel or torch.compile wrapper's only child is the model:
        # keys without its "module." / "_orig_mod." prefix, the same as for
        # the plain model.
        model = _unwrapped(model)
        self._paths = dict(model.named_modules())
        self._paths_by_id = {id(module): path for path, module in self._paths.items()}
        self._selected = self._select(modules)
        self._modules_argument = modules
        self._started = False
        self._here = False  # whether this process records (ranks=)
        self._handles: List[RemovableHandle] = []
        self._wrapped: List[Callable[[], None]] = []  # callables that undo _wrap_forward
        self._state = threading.local()
        # Every thread's watch mode since start(): stop() switches them all off,
        # also those it cannot take off another thread's stack (an interrupted call).
        self._thread_modes: List[WatchMode] = []
        self._thread_modes_lock = threading.Lock()
        self._module_calls = 0
        self._recorded = 0  # maps recorded since start(): clear() in between hides them
        self._transformed = False  # whether calls under torch.func went unrecorded (said)
        self._decorated: Dict[int, str] = {}  # id(module) -> get_local key of its forward
        # whether this recorder holds torch.compile's force_eager stance while recording
        # (only where the graph cannot record)
        self._eager = False
        # What records inside compiled graphs while recording (see _in_graph)
        self._graph: Optional[_in_graph.GraphMode] = None
        # The sink number compiled graphs record to since start() (None: they do not record)
        self._graph_sink_number: Optional[int] = None
        self._graphs_at_start = 0  # Dynamo's count of the graphs it compiled, at start()
        self._warn_once = WarnOnce()

    # -- switching --------------------------------------------------------

    @property
    def is_active(self) -> bool:
        """Whether the hooks are on (never in a process that `ranks` leaves out)."""
        return bool(self._handles or self._wrapped)

    def start(self) -> "AttentionRecorder":
        """Put the hooks on the model's modules and start recording."""
        if self._started:
            raise VisualizerError(f"{_WHO}: this recorder is already started; stop() it first")
        self._started = True
        try:
            self._here = captures_here(self._ranks, _WHO)
            if self._here:
                self._put_on()
            raise_pending()  # a handover point: what the warning filters made errors
        except BaseException:
            # A start that fails part way (a warning turned into an error, a
            # hook that cannot be put on) leaves nothing on the model and the
            # recorder stopped, so that it can be started again.
            self._stop(warn_if_empty=False)
            raise
        return self

    def _put_on(self) -> None:
        # Fresh per-thread state: calls a KeyboardInterrupt left open in another
        # thread during an earlier start are not this start's.
        self._state = threading.local()
        self._thread_modes = []
        self._module_calls = 0
        self._recorded = 0
        self._transformed = False
        self._graph_sink_number = None
        self._graphs_at_start = _torch_internals.dynamo_graphs_compiled()
        self._warn_unseen_modules()
        inside_encoder_layers: Set[int] = set()
        for module in self._paths.values():
            if isinstance(module, nn.TransformerEncoderLayer):
                # Its fast path is off as soon as it or any submodule has a
                # hook: it is watched through its own forward instead.
                inside_encoder_layers.update(id(m) for m in module.modules())
                self._wrapped.append(_wrap_forward(module, self._enter, self._exit))
        hooked = [
            module
            for module in self._paths.values()
            if not isinstance(module, torch.jit.ScriptModule)
            and id(module) not in inside_encoder_layers
        ]
        for module in hooked:
            key = get_local.key_of(type(module).forward)
            if key is not None:
                self._decorated[id(module)] = key
        self._record_compiled_code(inside_encoder_layers)
        # Dynamo guards compiled code on the ids of always-called hooks, which
        # are new at every start: for a compiled model the exit hook is an
        # ordinary one, so that starting again reuses the graphs compiled
        # before. A forward that raises then leaves its call on the module
        # stack until stop(), which clears it. Eager models keep always-called
        # exits: an exception caught inside the model (activation checkpointing
        # stops its recomputation by one) must not leave calls open.
        optimized = _torch_internals.compiled_module_type()
        always_call = self._graph is None or not (
            optimized is not None and isinstance(self.model, optimized)
        )
        for module in hooked:
            self._handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(
                    self._exit_hook, with_kwargs=True, always_call=always_call
                )
            )
        self._pool.hold()
        self.maps.pool = self._pool  # clear() while recording recycles

    def stop(self) -> None:
        """Take the hooks off; warn if the model ran and no attention was captured."""
        self._stop(warn_if_empty=True)
        raise_pending()

    def _stop(self, warn_if_empty: bool) -> None:
        started, self._started = self._started, False
        if not started or not self._here:
            return
        for handle in self._handles:
            handle.remove()
        for unwrap in self._wrapped:
            unwrap()
        self._handles, self._wrapped = [], []
        self._close_interrupted_calls()
        with self._thread_modes_lock:
            for mode in self._thread_modes:
                mode.on = False  # one left on another thread's stack passes calls through
        if self.maps.pool is not None:
            self.maps.pool = None
            self._pool.let_go()  # no copies of this recorder follow
        if self._eager:
            self._eager = False
            _EAGER_STANCE.release()
        if self._graph is not None:
            remove_mode(self._graph)
            _graph_sink.stop_listening(self._graph.listener)
            self._graph.disconnect()
            self._graph = None
        self._decorated = {}
        if warn_if_empty:
            self._warn_if_empty()

    def _close_interrupted_calls(self) -> None:
        """Forget the module calls a KeyboardInterrupt left open in this thread.

        torch runs always-called exit hooks for an `Exception` only: a
        KeyboardInterrupt (or SystemExit) leaves the calls it interrupted in
        this thread's frames and the watch mode on this thread's mode stack.
        """
        state = self._state
        frames = getattr(state, "frames", None)
        if frames:
            frames.clear()
            remove_mode(state.mode)

    def __enter__(self) -> AttentionMaps:
        self.start()
        return self.maps

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        # An error in the block says enough: no "nothing captured" on top of it.
        self._stop(warn_if_empty=exc_type is None)
        if exc_type is None:
            raise_pending()

    def _record_compiled_code(self, inside_encoder_layers: Set[int]) -> None:
        """Record compiled code from its graphs where it can; else make it run eagerly.

        Only where compiled code can run (Dynamo loaded): the mode that makes
        graphs record stays on this thread's stack while recording.
        """
        optimized = _torch_internals.compiled_module_type()
        if optimized is None:
            return  # Dynamo was never loaded: nothing is compiled
        reason = _in_graph.available()
        decorated = {
            path: self._decorated[id(module)]
            for path, module in self._paths.items()
            if id(module) in self._decorated
        }
        if reason is None and decorated and get_local.is_active:
            # A decorated forward that computes no softmax or SDPA gives its map
            # through get_local's recorder, which records in graphs unless it has
            # `select` (or torch is too old: then `reason` is set already).
            eager = [
                path for path in decorated
                if not get_local.records_in_graphs(type(self._paths[path]).forward)
            ]
            if eager:
                reason = (
                    f"module {eager[0]!r} has a get_local-decorated forward whose recorder "
                    "runs eagerly (it was decorated with select=), and capture_attention takes "
                    "such a forward's map from what get_local records"
                )
        if reason is not None:
            self._eager = _EAGER_STANCE.hold()
            if isinstance(self.model, optimized):
                warn_user(
                    f"{_WHO}: the compiled {type(_unwrapped(self.model)).__qualname__} runs "
                    f"eagerly while recording: {reason}"
                )
            return
        selected = [
            path
            for path, module in self._paths.items()
            if path in self._selected and id(module) not in inside_encoder_layers
        ]
        self._graph = _in_graph.shared_mode(
            _unwrapped(self.model), self._paths, selected, self._rows, self._heads, _WHO,
            {path: key for path, key in decorated.items() if path in selected},
        )
        self._graph_sink_number = self._graph.sink
        self._graph.connect(self._from_graph, self._not_a_map_in_graph)
        if self._graph.decorated:
            _graph_sink.listen(self._graph.listener)
        self._graph.put_hooks(self._handles)
        push_mode(self._graph)

    def _not_a_map_in_graph(self, path: str, key: str) -> None:
        """A compiled call of a decorated forward whose first captured name was no map."""
        self._warn_once(
            ("decorated", key),
            f"{_WHO}: {key} is decorated with get_local, but its first captured name held no "
            f"(B, H, Q, K) attention map in the compiled graph; nothing was recorded for "
            f"{path!r}",
        )

    def _from_graph(self, path: str, weights: torch.Tensor) -> None:
        """A map a compiled graph handed out (see _in_graph): copied, the graph's buffer is not kept."""
        if _torch_internals.in_backward():
            return
        self._recorded += 1
        self.maps.add(path, snapshot(weights, self._policy, pool=self._pool))

    # -- which modules ----------------------------------------------------

    def _select(self, modules: Optional[Globs]) -> Set[str]:
        if modules is None:
            return set(self._paths)
        globs = module_globs(modules, _WHO)
        unmatched = [glob for glob in globs if not matching(self._paths, [glob])]
        if unmatched:
            raise VisualizerError(
                f"{_WHO}: modules={unmatched[0]!r} matches none of the model's "
                f"{len(self._paths)} module paths; expected a glob over names such as "
                f"{[p for p in self._paths if p][:5]}"
            )
        return set(matching(self._paths, globs))

    def _warn_unseen_modules(self) -> None:
        named: Set[int] = set()  # ids of a TorchScript module's submodules, of configs: named once
        for path, module in self._paths.items():
            if id(module) in named:
                continue
            if isinstance(module, torch.jit.ScriptModule):
                named.update(id(m) for m in module.modules())
            config = getattr(module, "config", None)
            if config is not None:
                if id(config) in named:
                    continue
                named.add(id(config))
            reason = _unseen_reason(module)
            if reason and path in self._selected:
                self._warn_once(
                    ("unseen", path),
                    f"{_WHO}: module {path!r} ({type(module).__qualname__}) {reason}; its "
                    "attention cannot be captured",
                )

    # -- hooks ------------------------------------------------------------

    def _frames(self) -> List["_Frame"]:
        state = self._state
        frames = getattr(state, "frames", None)
        if frames is None:
            frames = state.frames = []
            state.mode = WatchMode(_WATCHED, self._watched)
            with self._thread_modes_lock:
                self._thread_modes.append(state.mode)
        return frames

    def _enter(self, module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        if _compiling():
            return  # a graph records through _in_graph's hooks
        frames = self._frames()
        state = self._state
        if not _torch_internals.in_backward():
            self._module_calls += 1
        if not frames:
            push_mode(state.mode)
        frame = _Frame(module, self._paths_by_id.get(id(module)))
        if isinstance(module, _FAST_PATH_MODULES):
            frame.suspended = remove_mode(state.mode)
            if self._graph is not None:
                frame.graph_suspended = remove_mode(self._graph)
        key = self._decorated.get(id(module))
        if key is not None:
            frame.decorated_start = len(get_local.store.cache.get(key, ()))
        frames.append(frame)

    def _exit_hook(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> None:
        # torch calls always_call hooks from its `except` clause when the
        # forward raised: then there is an exception being handled.
        self._exit(module, args, kwargs, failed=sys.exc_info()[0] is not None)

    def _exit(self, module: nn.Module, args: Args, kwargs: Kwargs, failed: bool) -> None:
        if _compiling():
            return
        frames = self._frames()
        state = self._state
        if not frames or frames[-1].module is not module:
            return  # hooks put on while this module was already running
        frame = frames.pop()
        try:
            if not failed:
                if isinstance(module, nn.MultiheadAttention):
                    self._record_multi_head(frames + [frame], module, args, kwargs)
                elif isinstance(module, nn.TransformerEncoderLayer):
                    self._record_encoder_layer(frames + [frame], module, args, kwargs)
                key = self._decorated.get(id(module))
                if key is not None and not frame.saw_attention and frame.path in self._selected:
                    self._take_decorated(frame, key)
                self._flush(frame)
        finally:
            if frame.graph_suspended and self._graph is not None:
                push_mode(self._graph)
            if frame.suspended:
                push_mode(state.mode)
            if not frames:
                remove_mode(state.mode)

    # -- recording --------------------------------------------------------

    def _owner(self, frames: Sequence["_Frame"]) -> Optional["_Frame"]:
        """The innermost running module that records: its frame, or None."""
        for frame in reversed(frames):
            if frame.path in self._selected and not isinstance(frame.module, nn.Softmax):
                return frame
        return None

    def _record(
        self,
        frames: Sequence["_Frame"],
        compute: Callable[[str], torch.Tensor],
        owned: bool,
    ) -> None:
        """Keep `compute(where)`, a (B, H, Q, K) map, for the module that owns it.

        `frames` are the running module calls, innermost last. Nothing is
        computed when no running module records (not selected by modules=).
        The map is snapshotted now: the model may change its softmax output in
        place later (an in-place dropout). `owned`: the map is a fresh tensor
        no one else holds (recomputed, or a selection copied out), stored
        without a second copy.
        """
        for frame in frames:
            frame.saw_attention = True
        owner = self._owner(frames)
        # During backward, activation checkpointing re-runs forwards: those are
        # not new calls, and their maps were recorded when the forward ran.
        if owner is not None and not _torch_internals.in_backward():
            # Another recorder's mode (a nested capture_attention, sdpa_capture)
            # must not take this recomputation for the model's attention.
            with _torch_internals.torch_functions_unwatched():
                weights = compute(f"the attention computed in module {owner.path!r}")
                entry = snapshot(weights, self._policy, owned=owned, pool=self._pool)
            owner.records.append(entry)

    def _flush(self, frame: "_Frame") -> None:
        if frame.path is None:  # not one of the model's modules: never an owner
            return
        self._recorded += len(frame.records)
        for entry in frame.records:
            self.maps.add(frame.path, entry)

    def _watched(
        self, func: Callable[..., Any], args: Args, kwargs: Kwargs, output: Any
    ) -> None:
        """What the recording mode shows after an attention call ran (the model's output
        is what it computed: the mode ran the call first)."""
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, torch.Tensor) and self._under_transform(first):
            return
        if func is F.scaled_dot_product_attention:
            self._sdpa(args, kwargs)
        elif func is F.multi_head_attention_forward:
            self._functional_multi_head(args, kwargs)
        else:
            self._softmax(args, kwargs, output)

    def _softmax(self, args: Args, kwargs: Kwargs, output: Any) -> None:
        frames = self._state.frames
        if not frames:
            return
        probabilities = softmax_probabilities(args, kwargs, output, frames[-1].module)
        if probabilities is None:
            return
        self._record(
            frames,
            lambda where: select_weights(
                probabilities, self._rows, self._heads, where=where, who=_WHO
            ),
            # A selection is copied out of the model's tensor; the whole map is the model's.
            owned=self._rows is not None or self._heads is not None,
        )

    def _sdpa(self, args: Args, kwargs: Kwargs) -> None:
        frames = self._state.frames
        if not frames:
            return
        query, key, attn_mask, _, is_causal, scale, enable_gqa = bind_sdpa_arguments(
            *args, **kwargs
        )
        if query.dim() < 3:
            return
        query, attn_mask, enable_gqa = unpack_grouped_query(
            frames[-1].module, query, key, attn_mask, enable_gqa
        )
        self._record(
            frames,
            lambda where: sdpa_call_weights(
                query, key, attn_mask, is_causal, scale, enable_gqa, self._request, where
            ),
            owned=True,
        )

    def _functional_multi_head(self, args: Args, kwargs: Kwargs) -> None:
        """F.multi_head_attention_forward called by a model's own code."""
        frames = self._state.frames
        if not frames:
            return
        self._record(
            frames,
            lambda where: functional_multi_head_weights(args, kwargs, self._request, where),
            owned=True,
        )

    def _record_multi_head(
        self, frames: List["_Frame"], module: nn.MultiheadAttention, args: Args, kwargs: Kwargs
    ) -> None:
        bound = _MULTI_HEAD_SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key = a["query"], a["key"]
        if self._under_transform(query):
            return
        if query.is_nested or key.is_nested:
            self._warn_nested(frames[-1].path)
            return
        self._record(
            frames,
            lambda where: module_weights(
                module, query, key, a["key_padding_mask"], a["attn_mask"], self._request, where
            ),
            owned=True,
        )

    def _record_encoder_layer(
        self,
        frames: List["_Frame"],
        layer: nn.TransformerEncoderLayer,
        args: Args,
        kwargs: Kwargs,
    ) -> None:
        """Its self-attention, from its input: the fast path never calls `self_attn`."""
        bound = _ENCODER_LAYER_SIGNATURE.bind(layer, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        source = a["src"]
        if self._under_transform(source):
            return
        if source.is_nested:
            self._warn_nested(frames[-1].path)
            return
        if layer.norm_first:
            norm = layer.norm1
            with torch.no_grad():
                source = F.layer_norm(
                    source, norm.normalized_shape, norm.weight, norm.bias, norm.eps
                )
        # Recorded as if the self_attn module had run, under its own path.
        attention = _Frame(layer.self_attn, self._paths_by_id.get(id(layer.self_attn)))
        self._record(
            frames + [attention],
            lambda where: module_weights(
                layer.self_attn,
                source,
                source,
                a["src_key_padding_mask"],
                a["src_mask"],
                self._request,
                where,
            ),
            owned=True,
        )
        self._flush(attention)

    def _take_decorated(self, frame: "_Frame", key: str) -> None:
        """A get_local-decorated forward that ran no softmax or SDPA: what get_local captured.

        Read, not taken, from `get_local.cache` (its entries stay the user's),
        and only while get_local is on: the first captured name of each call,
        when it is a (B, H, Q, K) tensor or array, is that call's map.
        """
        if not get_local.is_active:
            self._warn_once(
                ("decorated off", key),
                f"{_WHO}: module {frame.path!r} computed no softmax or SDPA attention; its "
                f"forward {key} is decorated with get_local, which is off. Switch it on "
                "(get_local.activate()) and capture_attention records what it captures",
            )
            return
        for entry in get_local.store.cache.get(key, [])[frame.decorated_start :]:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if getattr(value, "ndim", None) == 4:
                where = f"the attention computed in module {frame.path!r}"
                with _torch_internals.torch_functions_unwatched():
                    selected = select_weights(
                        torch.as_tensor(value), self._rows, self._heads, where=where, who=_WHO
                    )
                    entry = snapshot(selected, self._policy, pool=self._pool)
                frame.records.append(entry)
            elif value is not MISSING:
                self._warn_once(
                    ("decorated", key),
                    f"{_WHO}: {key} is decorated with get_local, but its first captured name "
                    f"held {_describe_value(value)}, not a (B, H, Q, K) attention map; nothing "
                    f"was recorded for {frame.path!r}",
                )

    def _under_transform(self, tensor: torch.Tensor) -> bool:
        """Whether a torch.func transform (vmap, grad, jacrev) runs this call: say so once.

        Its tensors are levels of wrappers, not the numbers the call computes,
        and recomputing from them can fail inside the user's call."""
        if not _torch_internals.is_functorch_wrapped(tensor):
            return False
        self._transformed = True
        frames = getattr(self._state, "frames", None)
        path = frames[-1].path if frames else None
        self._warn_once(
            ("transform", path),
            f"{_WHO}: module {path!r} ran under a torch.func transform (vmap, grad, jacrev, "
            "...), where its attention holds no concrete values; such calls are not recorded "
            "(the call itself runs as without capture; warned once per module)",
        )
        return True

    # -- warnings ---------------------------------------------------------

    def _warn_nested(self, path: Optional[str]) -> None:
        self._warn_once(
            ("nested", path),
            f"{_WHO}: module {path!r} ran on nested tensors (nn.TransformerEncoder's fast path "
            "with src_key_padding_mask, in eval without grad); its attention was not "
            "recorded. Build the encoder with enable_nested_tensor=False to capture it",
        )

    def _warn_if_empty(self) -> None:
        if self.maps or self._recorded or self._transformed:
            return
        model = type(self.model).__qualname__
        graphs_record = self._graph_sink_number is not None
        if self._module_calls == 0 and graphs_record and self._graphs_traced_none():
            # Compiled code calls no hooks at run time: whether the model ran cannot
            # be told, but Dynamo compiled graphs while recording, none with attention.
            message = (
                f"{_WHO}: nothing was captured: no module of the {model} ran eagerly while "
                "recording, and no graph torch.compile traced from it with capture on holds "
                f"attention. Searched for {_SEARCHED}. If the model was not called inside the "
                "block, call it there"
            )
        elif self._module_calls == 0:
            message = (
                f"{_WHO}: nothing was captured: no module of the {model} ran while recording "
                "(call the model inside the block)"
                + ("; its compiled code records only on the thread that started the recorder"
                   if graphs_record else "")
            )
        else:
            scope = (
                f"all {len(self._paths)} modules"
                if self._modules_argument is None
                else f"the {len(self._selected)} modules matching modules="
                f"{self._modules_argument!r}"
            )
            unseen = [
                p for p in self._paths if p in self._selected and _unseen_reason(self._paths[p])
            ]
            message = (
                f"{_WHO}: the {model} ran ({self._module_calls} module "
                f"calls) but no attention was captured. Searched {scope} for "
                f"{_SEARCHED}; none ran"
                + (f". Modules whose attention cannot be seen: {unseen[:5]}" if unseen else "")
            )
        warn_user(message)

    def _graphs_traced_none(self) -> bool:
        """Whether Dynamo compiled graphs since start() and no graph traced with this
        recorder's graph mode sends it anything."""
        assert self._graph_sink_number is not None
        return not _graph_sink.traced(self._graph_sink_number) and (
            _torch_internals.dynamo_graphs_compiled() != self._graphs_at_start
        )


class _Frame:
    """One running module call: where its maps go and what it recorded so far."""

    __slots__ = (
        "module",
        "path",
        "records",
        "suspended",
        "graph_suspended",
        "decorated_start",
        "saw_attention",
    )

    def __init__(self, module: nn.Module, path: Optional[str]) -> None:
        self.module = module
        # None for a module that is not one of the model's (a copy made while recording)
        self.path = path
        self.records: List[MapEntry] = []  # entries recorded for this module during this call
        self.suspended = False  # whether this call took the mode off the stack
        self.graph_suspended = False  # whether it took the graph recording mode off
        self.decorated_start = 0  # get_local entries of its forward before the call
        self.saw_attention = False  # any map computed during this call, for any module


def _wrap_forward(
    module: nn.Module,
    enter: Callable[[nn.Module, Args, Kwargs], None],
    exit: Callable[..., None],
) -> Callable[[], None]:
    """Call enter/exit around `module`'s forward without a hook; return the undo.

    For `nn.TransformerEncoderLayer`, which leaves its fast path when it or a
    submodule has any hook. The wrapper is an instance attribute, which
    `Module.__call__` uses in place of the class's forward.
    """
    previous = module.__dict__.get("forward")
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        enter(module, args, kwargs)
        try:
            output = original(*args, **kwargs)
        except BaseException:
            exit(module, args, kwargs, failed=True)
            raise
        exit(module, args, kwargs, failed=False)
        return output

    module.forward = forward

    def undo() -> None:
        if previous is None:
            del module.forward
        else:
            module.forward = previous

    return undo


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel, DataParallel and torch.compile wrappers."""
    optimized = _torch_internals.compiled_module_type()
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif optimized is not None and isinstance(model, optimized):
            # Its graphs run the recorded Python only under Dynamo's force_eager stance.
            if not _torch_internals.has(_torch_internals.SET_STANCE):
                raise VisualizerError(
                    f"{_WHO}: cannot capture a torch.compile'd model (it runs its Python "
                    f"only under a Dynamo stance): "
                    f"{_torch_internals.too_old(_torch_internals.SET_STANCE)}. Capture the "
                    "model itself, before torch.compile"
                )
            model = _torch_internals.compiled_module_original(model)
        else:
            return model


class _EagerStance:
    """While any recorder records, torch.compile'd code runs eagerly; one owner per process.

    Only where a graph cannot record (see `AttentionRecorder._record_compiled_code`).
    A compiled graph then runs neither the module hooks nor the torch functions
    the recorder watches one by one: maps would be missing or misattributed.
    With Dynamo's "force_eager" stance (process-wide) compiled models run
    their Python code, so the maps equal eager mode's. The stance is set by
    the first recorder that starts and restored by the last that stops,
    whatever order recorders stop in: each set_stance undo restores what it
    found, so two recorders stopped crosswise would leave the stance set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._undo: Optional[ContextManager[Any]] = None

    def hold(self) -> bool:
        """Count one more recorder; False (nothing held) while Dynamo was never loaded."""
        with self._lock:
            if self._holders == 0:
                self._undo = _torch_internals.force_eager()
                if self._undo is None:
                    return False
            self._holders += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._undo is not None:
                undo, self._undo = self._undo, None
                undo.__exit__(None, None, None)


_EAGER_STANCE = _EagerStance()


def _unseen_reason(module: nn.Module) -> Optional[str]:
    """Why the attention of `module` cannot be seen, or None."""
    if isinstance(module, torch.jit.ScriptModule):
        return "is TorchScript, which runs no Python code"
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if isinstance(implementation, str) and implementation not in _SEEN_IMPLEMENTATIONS:
        return (
            f"runs attn_implementation={implementation!r}, a kernel that is not "
            "F.scaled_dot_product_attention and never forms the weights; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is not None:
        names = set(code.co_names)
        for constant in code.co_consts:
            names.update(getattr(constant, "co_names", ()))
        kernels = sorted(names & _UNSEEN_KERNELS)
        if kernels:
            return (
                f"calls {kernels[0]} (flash-attn or xformers), a kernel that is not "
                "F.scaled_dot_product_attention and never forms the weights"
            )
    return None


def _describe_value(value: object) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    return f"a {type(value).__name__}"
