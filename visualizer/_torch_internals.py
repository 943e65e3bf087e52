"""Every private torch API the package uses, in one place, each with the versions it was checked on.

Private APIs change without notice between torch releases. Keeping them here
means a new release is checked by reading one file, and
`tests/test_torch_internals.py` fails naming the API when one moves, instead of
captures silently going empty.

torch is never imported at module import: the capture core (capture, store)
calls some of these on Pythons without torch. A tensor or a model can only
exist if the caller imported torch, so `sys.modules` is enough to find it.
"""

import sys
import types
from typing import TYPE_CHECKING, Any, Callable, ContextManager, List, Optional

if TYPE_CHECKING:
    import torch
    from torch.overrides import TorchFunctionMode

# The attribute Dynamo's inliner reads to skip a function that
# torch.compiler.disable marked (checked on torch 2.13).
DYNAMO_DISABLE_ATTRIBUTE = "_torchdynamo_disable"


def _torch() -> Optional[types.ModuleType]:
    return sys.modules.get("torch")


def autograd_node_getter() -> Optional[Callable[[], object]]:
    """`torch._C._current_autograd_node`, or None when torch is not loaded.

    It returns the autograd node being run, None outside backward: activation
    checkpointing re-runs a forward inside backward, and such a re-run is not
    a new call. Bound once by callers on hot paths. (torch 2.1-2.13)
    """
    torch = _torch()
    return None if torch is None else torch._C._current_autograd_node


def in_backward() -> bool:
    """Whether autograd's backward is running a node in this thread (see above)."""
    getter = autograd_node_getter()
    return getter is not None and getter() is not None


def is_functorch_wrapped(tensor: "torch.Tensor") -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev) wraps `tensor` in a level.

    `torch._C._functorch.is_functorch_wrapped_tensor` (torch 2.1-2.13).
    """
    return bool(sys.modules["torch"]._C._functorch.is_functorch_wrapped_tensor(tensor))


def jit_tracing() -> bool:
    """Whether torch.jit.trace is tracing now: `torch._C._get_tracing_state()` (torch 2.1-2.13)."""
    torch = _torch()
    return torch is not None and torch._C._get_tracing_state() is not None


def skip_in_dynamo(code: types.CodeType) -> None:
    """Make Dynamo never compile `code`'s frames: `torch._dynamo.eval_frame.skip_code` (2.1-2.13)."""
    from torch._dynamo.eval_frame import skip_code

    skip_code(code)


def dynamo_compiled_anything() -> bool:
    """Whether Dynamo compiled any frame in this process (`convert_frame.input_codes`, 2.1-2.13)."""
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    return convert_frame is not None and bool(convert_frame.input_codes.seen)


def reset_dynamo() -> None:
    """Drop everything Dynamo compiled (`torch._dynamo.reset`, 2.1-2.13)."""
    sys.modules["torch._dynamo"].reset()


def force_eager() -> Optional[ContextManager[Any]]:
    """Make torch.compile'd code run its Python eagerly, process-wide, until exited; None when
    Dynamo was never loaded (nothing compiled). `torch.compiler.set_stance` (2.6-2.13)."""
    if "torch._dynamo" not in sys.modules:
        return None
    return sys.modules["torch"].compiler.set_stance("force_eager")


def compiled_module_type() -> Optional[type]:
    """The class of `torch.compile(module)`'s wrapper, or None before Dynamo is loaded
    (`torch._dynamo.eval_frame.OptimizedModule`, 2.1-2.13)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def compiled_module_original(module: "torch.nn.Module") -> "torch.nn.Module":
    """The module a `torch.compile` wrapper runs: its `_orig_mod` (2.1-2.13)."""
    original = module._orig_mod
    assert isinstance(original, sys.modules["torch"].nn.Module), "torch.compile's wrapper"
    return original


def separate_projections(module: "torch.nn.MultiheadAttention") -> bool:
    """Whether `nn.MultiheadAttention` has separate q/k/v weights: not `_qkv_same_embed_dim` (2.1-2.13)."""
    return not module._qkv_same_embed_dim


def push_mode(mode: "TorchFunctionMode") -> None:
    """Put `mode` on top of this thread's torch function mode stack (`torch.overrides._push_mode`)."""
    sys.modules["torch"].overrides._push_mode(mode)


def pop_mode() -> "TorchFunctionMode":
    """Take the top mode off this thread's stack (`torch.overrides._pop_mode`)."""
    mode: "TorchFunctionMode" = sys.modules["torch"].overrides._pop_mode()
    return mode


def mode_stack() -> "List[TorchFunctionMode]":
    """This thread's torch function modes, innermost last
    (`torch.overrides._get_current_function_mode_stack`, 2.1-2.13)."""
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
    try:  # torch.nn.attention is new in torch 2.3
        import torch.nn.attention.bias as bias
    except ImportError:
        return None
    if not isinstance(attn_mask, bias.CausalBias):
        return None
    lower_right = attn_mask.variant == bias.CausalVariant.LOWER_RIGHT
    return num_keys - num_queries if lower_right else 0


# Recording inside compiled graphs (`_in_graph`) needs `torch.library.custom_op`
# (torch 2.4) and Dynamo tracing a TorchFunctionMode on the stack (torch 2.6);
# checked on torch 2.13.
_IN_GRAPH_SINCE = (2, 6)


def in_graph_capture_missing() -> Optional[str]:
    """None when this torch records inside compiled graphs; else the version and what is needed."""
    torch = sys.modules["torch"]
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if release < _IN_GRAPH_SINCE:
        return (
            f"torch {torch.__version__} cannot record inside compiled graphs (needs torch >= 2.6: "
            "torch.library.custom_op and Dynamo tracing torch function modes)"
        )
    return None


def mark_side_effect(op: object) -> None:
    """Keep graph nodes of `op` that no one uses: AOT autograd and inductor drop them
    otherwise (`torch.fx.node.has_side_effect`, checked on 2.13)."""
    sys.modules["torch"].fx.node.has_side_effect(op)
