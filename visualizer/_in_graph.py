"""Recording from inside torch.compile'd graphs: maps leave the graph through one custom op.

How capture_attention records a compiled model, and why this way (measured on
torch 2.13, backends eager, aot_eager and inductor on the CPU):

- A `GraphMode` (a TorchFunctionMode) sits on the thread's mode stack while
  recording. Dynamo guards compiled code on that stack, so the first call
  after start recompiles once with the mode traced into the graph; after stop
  the stack matches the uncaptured entry again and that code runs, with no
  recompilation either way from then on (both entries stay in Dynamo's cache).
- Forward pre/post hooks on the selected modules keep a stack of module paths.
  Dynamo traces them like the model's own code, so at trace time the mode
  reads the path of the module running as a constant: which module owns a map
  is decided once, at compile time, and costs nothing per step.
- For a softmax over (B, H, Q, K) the mode passes the probabilities (the
  selected rows and heads only); for `F.scaled_dot_product_attention` it adds
  the weights' computation beside the kernel, which never forms them, so the
  compiler schedules and fuses that work with the rest of the graph.
- A selected module whose forward is decorated with get_local and computes
  no softmax or SDPA: get_local's recorder, traced into the same graph, tells
  the mode its first captured name (a `_graph_sink` listener, `decorated_value`), and
  that (B, H, Q, K) tensor is the call's map, as in eager mode.
- Each map leaves the graph through `_graph_sink`'s custom op, whose eager
  implementation hands the tensor to the recorder's sink, which copies it
  into the store: the graph's own buffers are never kept.

Rejected: Dynamo's `reorderable_logging_functions` (a registered function's
call is deferred until after the graph, its tensors made graph outputs).
Called from the model's own code it works, but calls made from a hook or from
a torch function mode's handler are dropped: nothing was recorded. Forcing
eager execution (Dynamo's `force_eager` stance) stays for what cannot be done
in the graph: see `attention.py`.
"""

import weakref
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _graph_sink, _torch_internals
from .weights import (
    CheckedSelection,
    WeightsRequest,
    bind_sdpa_arguments,
    functional_multi_head_weights,
    sdpa_call_weights,
    select_weights,
    softmax_probabilities,
    unpack_grouped_query,
)

# Whether Dynamo is tracing the caller (always False on torch < 2.3, which lacks the check).
_compiling = _torch_internals.compiling_check()

# Told (module path, map) for each map a compiled graph hands out.
Sink = Callable[[str, torch.Tensor], None]

_SOFTMAX_FUNCTIONS = frozenset(
    {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
)

# One GraphMode per model and selection, so that Dynamo's guard on the mode
# stack (which holds the mode object itself) matches the graphs an earlier
# recorder of the same model and selection compiled: they are reused, never
# compiled again.
_SHARED: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, GraphMode]]" = (
    weakref.WeakKeyDictionary()
)


def available() -> Optional[str]:
    """None when this torch can record inside compiled graphs, else what it lacks."""
    return _graph_sink.available()


def new_sink(sink: Sink) -> int:
    """The number a graph carries to hand maps to `sink` (see `send`)."""
    return _graph_sink.new_sink(lambda name, values: sink(name, values[0]))


def send(weights: torch.Tensor, name: str, sink: int) -> None:
    """In traced code: hand `weights` out of the graph to sink number `sink`, told `name`."""
    _graph_sink.send([weights], name, sink)


def shared_mode(
    model: nn.Module,
    paths: Dict[str, nn.Module],
    selected: Collection[str],
    rows: CheckedSelection,
    heads: CheckedSelection,
    who: str,
    decorated: Dict[str, str],
) -> "GraphMode":
    """The GraphMode of `model` for this selection: made once, then the same object.
    `decorated`: path -> get_local key of the selected modules whose forward is decorated."""
    key = (tuple(selected), repr(rows), repr(heads), tuple(sorted(decorated.items())))
    modes = _SHARED.setdefault(model, {})
    if key not in modes:
        modes[key] = GraphMode(paths, selected, rows, heads, who, decorated)
    return modes[key]


class GraphMode(TorchFunctionMode):
    """Adds the recording of attention to the graphs Dynamo traces while it is on the stack.

    Outside tracing it runs every call unchanged and does nothing else: eager
    models are recorded by `capture_attention`'s own hooks. Its `__torch_function__`
    is its own code object, not one shared with `WatchMode`'s: Dynamo keeps its
    compiled variants per code object, and one shared by both modes hit Dynamo's
    recompile limit (torch 2.8), after which graphs stopped recording.
    """

    def __init__(
        self,
        paths: Dict[str, nn.Module],
        selected: Collection[str],
        rows: CheckedSelection,
        heads: CheckedSelection,
        who: str,
        decorated: Dict[str, str],
    ) -> None:
        super().__init__()
        # Weak: the registry of shared modes must not keep the model alive.
        self.modules = {path: weakref.ref(paths[path]) for path in selected}
        self.request = WeightsRequest(rows, heads, who)  # no pool: the graph plans its buffers
        self.sink = _graph_sink.new_number()
        # Paths of the selected modules running, innermost last, and whether each
        # call recorded a map yet: read and written at trace time.
        self.stack: List[str] = []
        self.recorded: List[bool] = []
        self.decorated = dict(decorated)
        # One bound method for the mode's lifetime: Dynamo guards traced code on the
        # store's listeners, and a new bound method at every start would recompile.
        self.listener = self.decorated_value

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if _compiling() and self.stack:
            if func is F.scaled_dot_product_attention:
                self._sdpa(args, kwargs)
            elif func is F.multi_head_attention_forward:
                self._multi_head(args, kwargs)
            elif func in _SOFTMAX_FUNCTIONS:
                self._softmax(args, kwargs, output)
        return output

    def _softmax(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        path = self.stack[-1]
        probabilities = softmax_probabilities(args, kwargs, output, self._module(path))
        if probabilities is None:
            return
        weights = select_weights(
            probabilities, self.request.rows, self.request.heads, where=_where(path),
            who=self.request.who,
        )
        self._record(path, weights)

    def _sdpa(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        query, key, attn_mask, _, is_causal, scale, enable_gqa = bind_sdpa_arguments(
            *args, **kwargs
        )
        if query.dim() < 3:
            return
        path = self.stack[-1]
        query, attn_mask, enable_gqa = unpack_grouped_query(
            self._module(path), query, key, attn_mask, enable_gqa
        )
        weights = sdpa_call_weights(
            query, key, attn_mask, is_causal, scale, enable_gqa, self.request, _where(path)
        )
        self._record(path, weights)

    def _multi_head(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        path = self.stack[-1]
        weights = functional_multi_head_weights(args, kwargs, self.request, _where(path))
        self._record(path, weights)

    def _module(self, path: str) -> nn.Module:
        module = self.modules[path]()
        assert module is not None, "a model that runs is alive"
        return module

    def _record(self, path: str, weights: torch.Tensor) -> None:
        _graph_sink.send([weights], path, self.sink)
        if self.recorded:
            self.recorded[-1] = True

    def decorated_value(self, key: str, values: List[torch.Tensor]) -> None:
        """Traced: a get_local recorder of `key` recording from the graph (a listener).

        A decorated forward that computed no softmax or SDPA: its first captured
        name, when it is a (B, H, Q, K) tensor, is that call's map, as in eager
        mode (`AttentionRecorder._take_decorated`). It runs at the forward's
        return, so the innermost running module is the decorated one.
        """
        if not self.stack or self.recorded[-1]:
            return
        path = self.stack[-1]
        if self.decorated.get(path) != key:
            return
        if not values or values[0].dim() != 4:
            # Nothing to record: the graph says so as it runs (no warning can be
            # said while tracing without breaking the graph).
            _graph_sink.send([], path, self.sink)
            self.recorded[-1] = True
            return
        weights = select_weights(
            values[0], self.request.rows, self.request.heads, where=_where(path),
            who=self.request.who,
        )
        self._record(path, weights)

    # -- the hooks Dynamo traces ------------------------------------------

    def put_hooks(self, handles: List[Any]) -> None:
        """Put the path-stack hooks on the selected modules, each handle into `handles` at once
        (a start interrupted half way takes off the ones already on)."""
        for path in self.modules:
            module = self._module(path)
            if isinstance(module, (nn.Softmax, torch.jit.ScriptModule)):
                continue
            handles.append(module.register_forward_pre_hook(self._enter_hook(path)))
            handles.append(module.register_forward_hook(self._exit_hook))

    def _enter_hook(self, path: str) -> Callable[[nn.Module, Any], None]:
        stack, recorded = self.stack, self.recorded

        def enter(module: nn.Module, args: Any) -> None:
            if _compiling():
                stack.append(path)
                recorded.append(False)

        return enter

    def _exit_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if _compiling() and self.stack:
            self.stack.pop()
            self.recorded.pop()

    # -- the sink ---------------------------------------------------------

    def connect(self, sink: Sink, not_a_map: Callable[[str, str], None]) -> None:
        """Hand the graphs' maps to `sink`; `not_a_map(path, key)` is told of a call of a
        decorated forward whose first captured name was no (B, H, Q, K) tensor."""

        def receive(path: str, values: List[torch.Tensor]) -> None:
            if values:
                sink(path, values[0])
            else:
                not_a_map(path, self.decorated[path])

        _graph_sink.connect(self.sink, receive)

    def disconnect(self) -> None:
        _graph_sink.disconnect(self.sink)
        del self.stack[:]
        del self.recorded[:]


def _where(path: str) -> str:
    return f"the attention computed in module {path!r}"
