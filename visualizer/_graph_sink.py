"""The way out of a torch.compile'd graph: one custom op that hands tensors to a sink.

Every recorder that records from inside compiled graphs (capture_attention's
GraphMode, sdpa_capture, get_local's recorders) adds a call of
`visualizer::record` to the graph it is traced into. The op returns nothing
and is registered as having a side effect (otherwise AOT autograd and inductor
drop a node nobody uses). Its eager implementation, run when the compiled
graph runs, hands the tensors to the sink whose number the graph carries as a
constant. Sinks copy what they keep: the graph's buffers are the compiler's.

A graph outliving its recorder finds no sink under its number and records
nothing. Listeners (`listen`) are told, while Dynamo traces, what get_local's
recorders send: capture_attention's graph mode takes a decorated forward's map
from there.
"""
import itertools
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from . import _torch_internals

# Told (name, tensors) for each call of the op a compiled graph makes.
Sink = Callable[[str, List[torch.Tensor]], None]

_SINKS: Dict[int, Sink] = {}
_SINKS_LOCK = threading.Lock()
# Told (key, tensors) while torch.compile traces a get_local recorder that records in
# the graph: capture_attention's graph mode takes a decorated forward's map from there
# (_in_graph.GraphMode.decorated_value). A module global, replaced on change: Dynamo
# guards the traced code on it, and on nothing that changes more often.
_LISTENERS: Tuple[Callable[[str, List[torch.Tensor]], None], ...] = ()
_NUMBERS = itertools.count(1)
_OP: Optional[Any] = None
# Numbers of the sinks some traced graph sends to: added by the op's fake kernel,
# which runs (real Python, not traced) as Dynamo traces each call of the op.
_TRACED: Set[int] = set()


def available() -> Optional[str]:
    """None when this torch can record inside compiled graphs, else what it lacks."""
    missing = _torch_internals.in_graph_capture_missing()
    if missing is None:
        _register_op()
    return missing


def _register_op() -> None:
    global _OP
    if _OP is not None:
        return

    @torch.library.custom_op("visualizer::record", mutates_args=())
    def record(values: List[torch.Tensor], name: str, sink: int) -> None:
        receiver = _SINKS.get(sink)
        if receiver is not None:
            receiver(name, values)

    @record.register_fake
    def _(values: List[torch.Tensor], name: str, sink: int) -> None:
        _TRACED.add(sink)

    _torch_internals.mark_side_effect(torch.ops.visualizer.record.default)
    _OP = torch.ops.visualizer.record


def new_number() -> int:
    """A sink number no other sink has (connect a sink to it with `connect`)."""
    return next(_NUMBERS)


def connect(number: int, sink: Sink) -> None:
    """Hand what graphs send to `number` to `sink` from now on."""
    with _SINKS_LOCK:
        _SINKS[number] = sink


def disconnect(number: int) -> None:
    """Graphs that send to `number` record nothing from now on."""
    with _SINKS_LOCK:
        _SINKS.pop(number, None)


def new_sink(sink: Sink) -> int:
    """The number a graph carries to hand tensors to `sink` (see `send`)."""
    number = new_number()
    connect(number, sink)
    return number


def send(values: List[torch.Tensor], name: str, sink: int) -> None:
    """In traced code: hand `values` out of the graph to sink number `sink`, told `name`."""
    assert _OP is not None, "available() registers the op before a sink is made"
    _OP(values, name, sink)


def traced(number: int) -> bool:
    """Whether a graph that sends to sink `number` has been traced (whether or not it ran)."""
    return number in _TRACED


def listen(listener: Callable[[str, List[torch.Tensor]], None]) -> None:
    """Tell `listener` what every get_local recorder traced into a graph sends (see above)."""
    global _LISTENERS
    with _SINKS_LOCK:
        _LISTENERS = _LISTENERS + (listener,)


def stop_listening(listener: Callable[[str, List[torch.Tensor]], None]) -> None:
    global _LISTENERS
    with _SINKS_LOCK:
        _LISTENERS = tuple(other for other in _LISTENERS if other is not listener)


def listeners() -> Tuple[Callable[[str, List[torch.Tensor]], None], ...]:
    """In traced code: the listeners now."""
    return _LISTENERS
