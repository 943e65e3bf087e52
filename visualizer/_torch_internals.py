"""Every private torch API the package uses, in one place, each with the versions it was checked on.

Private APIs change without notice between torch releases. Keeping them here
means a new release is checked by reading one file, and
`tests/test_torch_internals.py` fails naming the API when one moves, instead of
captures silently going empty.

torch is never imported at module import: the capture core (capture, store)
calls some of these on Pythons without torch. A tensor or a model can only
exist if the caller imported torch, so `sys.modules` is enough to find it.
"""

import re
import sys
import types
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

if TYPE_CHECKING:
    import torch
    from torch.overrides import TorchFunctionMode


class Gate(NamedTuple):
    """A torch feature the package uses that older releases lack: its name and the release
    that brought it. A missing feature is said at the call that needs it, never at import."""

    feature: str
    release: Tuple[int, int]


# Each gate was checked on the torch releases `.ci/torch_matrix` runs (2.1.2, 2.6.0,
# 2.8.0, 2.13.0, 2.14.1) and on the release before it (absent there).
# torch.nn.attention.bias (an SDPA attn_mask standing for a causal mask): new in 2.3,
# absent in 2.2.2.
CAUSAL_BIAS = Gate("torch.nn.attention.bias (CausalBias)", (2, 3))
# torch.compiler.is_compiling: new in 2.3. Before 2.6 Dynamo never traces a torch
# function mode, the one place the package asks.
IS_COMPILING = Gate("torch.compiler.is_compiling", (2, 3))
# scaled_dot_product_attention(..., enable_gqa=True): new in 2.5, absent in 2.4.1.
SDPA_ENABLE_GQA = Gate("scaled_dot_product_attention(enable_gqa=...)", (2, 5))
# torch.compiler.set_stance ("force_eager": compiled code runs its Python): new in
# 2.6, absent in 2.5.1.
SET_STANCE = Gate("torch.compiler.set_stance", (2, 6))


def torch_release(version: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of `version`, default the loaded torch's: '2.5.0a0+git12' -> (2, 5)."""
    if version is None:
        version = str(sys.modules["torch"].__version__)
    major, _, rest = version.split("+")[0].partition(".")
    # A plain loop, not itertools.takewhile: gates are asked while Dynamo traces
    # (the weights' code in a graph), and Dynamo before 2.12 cannot trace takewhile.
    minor = ""
    for character in rest:
        if not character.isdigit():
            break
        minor += character
    return int(major), int(minor or 0)


def has(gate: Gate) -> bool:
    """Whether the loaded torch has `gate`'s feature."""
    return torch_release() >= gate.release


def too_old(gate: Gate) -> str:
    """The sentence that says `gate`'s feature needs a newer torch than the loaded one."""
    major, minor = gate.release
    version = sys.modules["torch"].__version__
    return f"{gate.feature} needs torch>={major}.{minor}; this is torch {version}"


# The attribute Dynamo's inliner reads to skip a function that
# torch.compiler.disable marked (checked on torch 2.1-2.14).
DYNAMO_DISABLE_ATTRIBUTE = "_torchdynamo_disable"


def _torch() -> Optional[types.ModuleType]:
    return sys.modules.get("torch")


def autograd_node_getter() -> Optional[Callable[[], object]]:
    """`torch._C._current_autograd_node`, or None when torch is not loaded.

    It returns the autograd node being run, None outside backward: activation
    checkpointing re-runs a forward inside backward, and such a re-run is not
    a new call. Bound once by callers on hot paths. (torch 2.1-2.14)
    """
    torch = _torch()
    return None if torch is None else torch._C._current_autograd_node


def in_backward() -> bool:
    """Whether autograd's backward is running a node in this thread (see above)."""
    getter = autograd_node_getter()
    return getter is not None and getter() is not None


def is_functorch_wrapped(tensor: "torch.Tensor") -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev) wraps `tensor` in a level.

    `torch._C._functorch.is_functorch_wrapped_tensor` (torch 2.1-2.14).
    """
    return bool(sys.modules["torch"]._C._functorch.is_functorch_wrapped_tensor(tensor))


def is_fake(tensor: "torch.Tensor") -> bool:
    """Whether `tensor` is a fake tensor (a shape without values, what Dynamo propagates
    while it compiles): `torch._subclasses.fake_tensor.is_fake` (2.1-2.14)."""
    from torch._subclasses.fake_tensor import is_fake as fake

    return bool(fake(tensor))


# Dynamo continues a function after a graph break in a new code object named
# `torch_dynamo_resume_in_<name>_at_<line>` (checked on 2.6-2.14; 2.1.2: `<resume in
# <name>>`), and its co_qualname (Python 3.11+) the same after the owner's
# (`Owner.torch_dynamo_resume_in_forward_at_142` on 2.6.0; the original's on 2.13.0).
_RESUME_NAME = re.compile(r"torch_dynamo_resume_in_(.+?)(?:_at_\d+)?|<resume in (.+)>")


def resumed_function_name(code_name: str) -> str:
    """The name of the function a Dynamo resume function continues (through resumes of
    resumes, one per graph break); any other name as is."""
    match = _RESUME_NAME.fullmatch(code_name)
    while match is not None:
        code_name = match.group(1) or match.group(2)
        match = _RESUME_NAME.fullmatch(code_name)
    return code_name


def jit_tracing() -> bool:
    """Whether torch.jit.trace is tracing now: `torch._C._get_tracing_state()` (torch 2.1-2.14)."""
    torch = _torch()
    return torch is not None and torch._C._get_tracing_state() is not None


def skip_in_dynamo(code: types.CodeType) -> None:
    """Make Dynamo never compile `code`'s frames: `torch._dynamo.eval_frame.skip_code` (2.1-2.14)."""
    from torch._dynamo.eval_frame import skip_code

    skip_code(code)


def dynamo_compiled_anything() -> bool:
    """Whether Dynamo compiled any frame in this process (`convert_frame.input_codes`, 2.1-2.14)."""
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    return convert_frame is not None and bool(convert_frame.input_codes.seen)


def dynamo_graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process (0 before Dynamo is loaded;
    `torch._dynamo.utils.counters["stats"]["unique_graphs"]`, 2.1-2.14; cleared by whoever
    clears Dynamo's counters)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def reset_dynamo() -> None:
    """Drop everything Dynamo compiled (`torch._dynamo.reset`, 2.1-2.14)."""
    sys.modules["torch._dynamo"].reset()


def force_eager() -> Optional[ContextManager[Any]]:
    """Make torch.compile'd code run its Python eagerly, process-wide, until exited; None when
    Dynamo was never loaded (nothing compiled) and on torch<2.6, which has no stances
    (callers refuse compiled models there). `torch.compiler.set_stance` (2.6-2.14)."""
    if "torch._dynamo" not in sys.modules or not has(SET_STANCE):
        return None
    return sys.modules["torch"].compiler.set_stance("force_eager")


def compiled_module_type() -> Optional[type]:
    """The class of `torch.compile(module)`'s wrapper, or None before Dynamo is loaded
    (`torch._dynamo.eval_frame.OptimizedModule`, 2.1-2.14)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def compiled_module_original(module: "torch.nn.Module") -> "torch.nn.Module":
    """The module a `torch.compile` wrapper runs: its `_orig_mod` (2.1-2.14)."""
    original = module._orig_mod
    assert isinstance(original, sys.modules["torch"].nn.Module), "torch.compile's wrapper"
    return original


def separate_projections(module: "torch.nn.MultiheadAttention") -> bool:
    """Whether `nn.MultiheadAttention` has separate q/k/v weights: not its
    `_qkv_same_embed_dim` (2.1-2.14)."""
    return not module._qkv_same_embed_dim


def compiling_check() -> Callable[[], bool]:
    """A function that says whether Dynamo is tracing its caller: `torch.compiler.is_compiling`
    (2.3-2.14); on older torch one that says False, since Dynamo traces no torch function
    mode before 2.6 and modes are what ask. Bound once, outside the traced code."""
    if not has(IS_COMPILING):
        return lambda: False
    check: Callable[[], bool] = sys.modules["torch"].compiler.is_compiling
    return check


def exporting_check() -> Callable[[], bool]:
    """A function that says whether torch.export is tracing its caller: it reads
    `torch.compiler._is_exporting_flag` (2.11-2.14). Not `torch.compiler.is_exporting()`,
    which Dynamo 2.11 folds to True inside every torch.compile trace too (2.13 does not).
    Bound once, outside the traced code."""
    compiler = sys.modules["torch"].compiler

    def exporting() -> bool:
        return bool(compiler._is_exporting_flag)

    return exporting


def push_mode(mode: "TorchFunctionMode") -> None:
    """Put `mode` on top of this thread's torch function mode stack
    (`torch.overrides._push_mode`, 2.1-2.14)."""
    sys.modules["torch"].overrides._push_mode(mode)


def pop_mode() -> "TorchFunctionMode":
    """Take the top mode off this thread's stack (`torch.overrides._pop_mode`, 2.1-2.14)."""
    mode: "TorchFunctionMode" = sys.modules["torch"].overrides._pop_mode()
    return mode


def torch_functions_unwatched() -> ContextManager[None]:
    """A block whose torch calls no torch function mode sees: the library's own
    recomputations, which another recorder's mode must not take for the model's
    attention (`torch._C.DisableTorchFunction`, modes and subclasses, 2.1-2.14)."""
    block: ContextManager[None] = sys.modules["torch"]._C.DisableTorchFunction()
    return block


def mode_stack() -> "List[TorchFunctionMode]":
    """This thread's torch function modes, innermost last
    (`torch.overrides._get_current_function_mode_stack`, 2.1-2.14)."""
    stack: "List[TorchFunctionMode]" = list(
        sys.modules["torch"].overrides._get_current_function_mode_stack()
    )
    return stack


def causal_bias_offset(attn_mask: object, num_queries: int, num_keys: int) -> Optional[int]:
    """For a `torch.nn.attention.bias.CausalBias` mask, the causal offset it stands for:
    query i sees keys j <= i + offset (upper left: 0; lower right, the KV-cache
    convention: num_keys - num_queries). None for any other mask, and on torch
    releases without `torch.nn.attention.bias` (no mask can be one there).
    """
    if not has(CAUSAL_BIAS):
        return None
    import torch.nn.attention.bias as bias

    if not isinstance(attn_mask, bias.CausalBias):
        return None
    lower_right = attn_mask.variant == bias.CausalVariant.LOWER_RIGHT
    return num_keys - num_queries if lower_right else 0


# Recording inside compiled graphs (`_in_graph`): Dynamo tracing the graph mode on
# the stack, its hooks and the `visualizer::record` custom op into the graph. Checked
# with tests/test_compile.py on the gate lowered to each release: it records on torch
# 2.11.0, 2.12.1, 2.13.0 and 2.14.1 (2.11 once `torch_release` stopped using
# `itertools.takewhile`, which Dynamo before 2.12 cannot trace). On 2.10.0 and 2.9.1
# it does not: they recompile at every start and stop (the mode-stack guard, up to the
# recompile limit) and 2.9.1 records nothing from the fullgraph multi-head and
# inductor tests. On 2.6.0 and 2.8.0 Dynamo does not trace the mode's recording
# (2.8: "does not know how to trace frozenset.__contains__"). Releases before 2.12 run
# compiled code eagerly while recording, with a warning naming this gate.
IN_GRAPH_CAPTURE = Gate(
    "recording inside compiled graphs (Dynamo tracing the recording mode and its custom op)",
    (2, 11),
)


def in_graph_capture_missing() -> Optional[str]:
    """None when this torch records inside compiled graphs; else the version and what is needed."""
    return None if has(IN_GRAPH_CAPTURE) else too_old(IN_GRAPH_CAPTURE)


def traced_frames() -> "List[Tuple[types.CodeType, Dict[str, Any], Optional[type]]]":
    """While Dynamo traces: the user frames it is tracing, innermost first, each as
    (code, globals, type of its `self` or None): the stack the traced code would
    have had, which `sys._getframe` cannot see (those frames do not run).

    Dynamo's instruction translators (`InstructionTranslator.current_tx()`, its
    `output.current_tx` innermost inlining translator and their `parent` chain,
    `f_code`, `f_globals`, `symbolic_locals`; checked on torch 2.13 and 2.14.1).
    Call it only from a function Dynamo runs instead of tracing
    (`torch._dynamo.assume_constant_result`)."""
    symbolic_convert = sys.modules["torch._dynamo.symbolic_convert"]
    tx = symbolic_convert.InstructionTranslator.current_tx().output.current_tx
    frames = []
    while tx is not None:
        owner = tx.symbolic_locals.get("self")
        try:
            owner_type = owner.python_type() if owner is not None else None
        except Exception:  # noqa: BLE001 - a variable that cannot say its type
            owner_type = None
        frames.append((tx.f_code, tx.f_globals, owner_type))
        tx = getattr(tx, "parent", None)
    return frames


def is_dynamo_graph_frame(frame: types.FrameType) -> bool:
    """Whether `frame` runs the Python code of a graph Dynamo compiled (the `eager`
    backend runs it as is, its torch calls seen by the modes on the stack): an FX
    GraphModule's generated `forward` (file `<eval_with_key>.N`) whose module carries
    Dynamo's `dynamo_flat_name_to_original_fqn` meta entry (checked on 2.13, 2.14.1).
    A graph the user traced with `torch.fx` has no such entry: its calls are the user's."""
    if not frame.f_code.co_filename.startswith("<eval_with_key>"):
        return False
    owner = frame.f_locals.get("self")
    return "dynamo_flat_name_to_original_fqn" in getattr(owner, "meta", {})


def mark_side_effect(op: object) -> None:
    """Keep graph nodes of `op` that no one uses: AOT autograd and inductor drop them
    otherwise (`torch.fx.node.has_side_effect`, checked on 2.13)."""
    sys.modules["torch"].fx.node.has_side_effect(op)
