"""Input coercion and shape checks shared by `analysis` and `plot`.

Every public function there accepts numpy arrays or torch tensors (any device,
float16/bfloat16/float32/float64, with or without grad). This module turns them
into float numpy arrays and checks the layouts the library uses:

- attention maps ``(B, H, N, N)`` or ``(H, N, N)``: query rows, key columns;
- layer stacks: a list of per-layer maps (what the capture cache holds) or one
  array ``(L, B, H, N, N)``;
- patch grids ``(h, w)`` after ``num_prefix_tokens`` CLS/register tokens.

torch is never imported here: a tensor can only exist if its caller already
imported torch, so ``sys.modules`` is enough to recognise one. That keeps
``import visualizer.analysis`` free of torch for Pythons without it.
"""

import collections
import math
import sys
from typing import (
    TYPE_CHECKING,
    Any,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    SupportsFloat,
    SupportsInt,
    Tuple,
    Union,
)

import numpy as np
import numpy.typing as npt

from ._errors import VisualizerError

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeGuard

# What public functions of `analysis` and `plot` take: anything numpy can make
# an array of, or a torch tensor (any device and float dtype, with or without grad).
ArrayOrTensor = Union[npt.ArrayLike, "torch.Tensor"]
# What `to_numpy` gives: a float32 or float64 array on the CPU.
FloatArray = npt.NDArray[np.floating]
# An int, numpy's integers included.
Integer = Union[int, np.integer]

ATTENTION_LAYOUT = "(B, H, N, N) or (H, N, N)"


def is_torch_tensor(x: object) -> "TypeGuard[torch.Tensor]":
    """True if ``x`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_integer_data(x: ArrayOrTensor) -> bool:
    """True if ``x`` (array or tensor) holds integers, e.g. a uint8 image."""
    if is_torch_tensor(x):
        return not (x.is_floating_point() or x.is_complex())
    return np.asarray(x).dtype.kind in "biu"


def to_numpy(x: ArrayOrTensor, func: str, name: str) -> FloatArray:
    """Return ``x`` as a float numpy array on the CPU, detached from autograd.

    float16 and bfloat16 become float32 (numpy has no bfloat16 and its float16
    arithmetic is slow and imprecise); float32 and float64 are kept.
    """
    if is_torch_tensor(x):
        # .cpu() before the dtype change moves half the bytes off a GPU.
        tensor = x.detach().cpu()
        if tensor.is_complex():
            raise VisualizerError(
                f"{func}: {name} must be real; got a tensor of dtype {tensor.dtype}"
            )
        if tensor.dtype not in (sys.modules["torch"].float32, sys.modules["torch"].float64):
            tensor = tensor.float()
        return tensor.numpy()
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise VisualizerError(
            f"{func}: {name} must be a numpy array or torch tensor of numbers; got "
            f"{type(x).__name__} ({error})"
        ) from None
    if array.dtype.kind not in "biuf":
        raise VisualizerError(
            f"{func}: {name} must be a numpy array or torch tensor of real numbers; "
            f"got {type(x).__name__} of dtype {array.dtype}"
        )
    if array.dtype.kind != "f" or array.dtype == np.float16:
        array = array.astype(np.float32)
    return array


def attention_array(
    x: ArrayOrTensor,
    func: str,
    name: str = "attn",
    square: bool = True,
    probabilities: bool = True,
) -> Tuple[FloatArray, bool]:
    """Coerce one attention map; return ``(array (B, H, Q, N), batched)``.

    ``batched`` tells whether the caller gave a batch axis, so results can be
    returned with the same layout. ``square=False`` allows ``Q != N`` (a map
    captured for a few query rows only, or cross-attention). ``probabilities=False``
    skips the check that it is attention (for gradients of maps).
    """
    array = to_numpy(x, func, name)
    if array.ndim not in (3, 4):
        raise VisualizerError(
            f"{func}: {name} must have shape {ATTENTION_LAYOUT}; got shape {tuple(array.shape)}"
        )
    if square and array.shape[-1] != array.shape[-2]:
        raise VisualizerError(
            f"{func}: {name} must have shape {ATTENTION_LAYOUT} with as many query rows as "
            f"key columns; got shape {tuple(array.shape)}"
        )
    if probabilities:
        check_probabilities(array, func, name)
    batched = array.ndim == 4
    return (array if batched else array[None]), batched


# float16 maps summed over thousands of keys drift above 1 by rounding alone.
_ROW_SUM_TOLERANCE = 1e-2


def check_probabilities(array: np.ndarray, func: str, name: str) -> None:
    """Refuse what is not attention: NaN, negative values, rows summing to more than 1.

    Rows may sum to less than 1 (a map restricted to some keys); never more.
    Negative values or larger sums are what pre-softmax scores look like, a
    common mistake (some models' `attn_weights` local holds the scores).
    """
    if array.size == 0:
        raise VisualizerError(f"{func}: {name} is empty; got shape {tuple(array.shape)}")
    finite = np.isfinite(array)
    if not finite.all():
        raise VisualizerError(
            f"{func}: {name} holds {int(array.size - finite.sum())} NaN or infinite values of "
            f"{array.size}; expected attention probabilities, finite and in [0, 1]"
        )
    lowest, largest_sum = float(array.min()), float(array.sum(axis=-1).max())
    if lowest < 0 or largest_sum > 1 + _ROW_SUM_TOLERANCE:
        found = f"a value of {lowest:.3g}" if lowest < 0 else f"a row summing to {largest_sum:.3g}"
        raise VisualizerError(
            f"{func}: {name} has {found}; expected post-softmax attention probabilities (every "
            "value >= 0, every query row summing to at most 1). This looks like pre-softmax "
            "scores: capture the softmax output, or use capture_attention(model), which records "
            "probabilities"
        )


def layer_list(
    maps: Union[ArrayOrTensor, List[ArrayOrTensor], Tuple[ArrayOrTensor, ...]],
    func: str,
    name: str = "maps",
) -> Tuple[List[ArrayOrTensor], bool]:
    """Split a layer stack into per-layer maps; return ``(layers, stacked)``.

    Accepts a list/tuple of per-layer maps, an array ``(L, B, H, N, N)``, or a
    single map ``(B, H, N, N)``/``(H, N, N)`` (then ``stacked`` is False and the
    caller drops the layer axis from its result). A 4-D array is one layer with
    a batch axis, never ``(L, H, N, N)``: that is the map layout everywhere else.
    """
    if isinstance(maps, (list, tuple, collections.deque)):  # a deque: a bounded cache list
        if not maps:
            raise VisualizerError(
                f"{func}: {name} must hold at least one layer's map; got an empty "
                f"{type(maps).__name__}"
            )
        return list(maps), True
    if not (is_torch_tensor(maps) or isinstance(maps, np.ndarray)):
        maps = to_numpy(maps, func, name)
    if maps.ndim == 5:
        return list(maps), True
    if maps.ndim in (3, 4):
        return [maps], False
    raise VisualizerError(
        f"{func}: {name} must be a list of per-layer maps {ATTENTION_LAYOUT}, "
        f"an array (L, B, H, N, N), or one map; got shape {tuple(maps.shape)}"
    )


def layer_arrays(
    layers: Iterable[ArrayOrTensor],
    func: str,
    name: str = "maps",
    square: bool = True,
    probabilities: bool = True,
) -> Iterator[Tuple[FloatArray, bool]]:
    """Yield ``(array (B, H, N, N), batched)`` per layer, converting lazily.

    One layer at a time keeps memory at one map's size: at DINOv2 resolutions a
    float64 copy of all layers would take gigabytes.
    """
    # (the layer's shape as given, its array's shape) for layer 0
    first_shape: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    for index, layer in enumerate(layers):
        array, batched = attention_array(layer, func, f"{name}[{index}]", square, probabilities)
        if first_shape is None:
            first_shape = (tuple(np.shape(layer)), array.shape)
        elif array.shape != first_shape[1]:
            raise VisualizerError(
                f"{func}: every layer of {name} must have the same shape; "
                f"got {first_shape[0]} for layer 0 and {tuple(np.shape(layer))} for layer {index}"
            )
        yield array, batched


def check_prefix(num_prefix_tokens: Integer, num_tokens: int, func: str) -> int:
    """Return ``num_prefix_tokens`` if it leaves at least one patch token."""
    if (
        not isinstance(num_prefix_tokens, (int, np.integer))
        or not 0 <= num_prefix_tokens < num_tokens
    ):
        raise VisualizerError(
            f"{func}: num_prefix_tokens must be an int in [0, {num_tokens}) for maps with "
            f"{num_tokens} tokens; got {num_prefix_tokens!r}"
        )
    return int(num_prefix_tokens)


def grid_shape(
    num_tokens: int,
    num_prefix_tokens: Integer,
    grid_size: Union[None, Integer, Sequence[SupportsInt]],
    func: str,
) -> Tuple[int, int]:
    """Return the patch grid ``(h, w)`` for ``num_tokens`` tokens.

    ``grid_size`` may be ``(h, w)``, an int for a square grid, or None to infer
    a square grid from the number of patch tokens.
    """
    num_patches = num_tokens - check_prefix(num_prefix_tokens, num_tokens, func)
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise VisualizerError(
                f"{func}: cannot infer a square grid_size from {num_patches} patch tokens "
                f"({num_tokens} tokens - {num_prefix_tokens} prefix tokens); pass grid_size=(h, w)"
            )
        return side, side
    height, width = grid_pair(grid_size, func)
    if height * width != num_patches:
        raise VisualizerError(
            f"{func}: grid_size {(height, width)} has {height * width} patches but the map has "
            f"{num_tokens} tokens - {num_prefix_tokens} prefix tokens = {num_patches} patch tokens"
        )
    return height, width


def check_index(index: Integer, size: int, func: str, name: str) -> int:
    """Return ``index`` as a non-negative int, accepting Python's negative indices."""
    if not isinstance(index, (int, np.integer)) or not -size <= index < size:
        raise VisualizerError(f"{func}: {name} must be an int in [{-size}, {size}); got {index!r}")
    return int(index) % size


_INTS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def _positive_pair(
    value: Any, func: str, name: str, kinds: Tuple[type, ...], form: str
) -> Tuple[Any, Any]:
    """``value`` as two positive numbers of ``kinds`` (one number means both), checked."""
    if isinstance(value, kinds):
        value = (value, value)
    try:
        first, second = value
        if not all(isinstance(side, kinds) and not isinstance(side, bool) for side in value):
            raise TypeError
    except (TypeError, ValueError):
        raise VisualizerError(f"{func}: {name} must be {form}; got {value!r}") from None
    if not (first > 0 and second > 0):
        raise VisualizerError(f"{func}: {name} must be positive; got {value!r}")
    return first, second


def pair(
    value: Union[float, np.integer, np.floating, Sequence[SupportsFloat]], func: str, name: str
) -> Tuple[float, float]:
    """Return ``(a, b)`` from a positive number or a pair of positive numbers."""
    first, second = _positive_pair(
        value, func, name, _NUMBERS, "a positive number or a pair of them"
    )
    return float(first), float(second)


def grid_pair(value: Union[Integer, Sequence[SupportsInt]], func: str) -> Tuple[int, int]:
    """``grid_size`` as ``(h, w)`` ints; an int means a square grid."""
    height, width = _positive_pair(value, func, "grid_size", _INTS, "(h, w), an int or None")
    return int(height), int(width)


def cross_attention_array(cross_attn: ArrayOrTensor, func: str) -> FloatArray:
    """Coerce DETR cross-attention to ``(B, H, Q, S)`` (``H = 1`` if head-averaged)."""
    array = to_numpy(cross_attn, func, "cross_attn")
    if array.ndim in (3, 4):
        check_probabilities(array, func, "cross_attn")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        return array
    raise VisualizerError(
        f"{func}: cross_attn must have shape (B, H, Q, h*w) or (B, Q, h*w) (head-averaged); got "
        f"shape {array.shape}"
    )
