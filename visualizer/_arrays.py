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
import collections.abc
import math
import os
import sys
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
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
    if maps.ndim == 5 and len(maps):
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


def check_prefix(
    num_prefix_tokens: Integer, num_tokens: int, func: str, name: str = "attn"
) -> int:
    """Return ``num_prefix_tokens`` if it leaves at least one patch token of the map ``name``."""
    if not is_int(num_prefix_tokens) or not 0 <= num_prefix_tokens < num_tokens:
        raise VisualizerError(
            f"{func}: num_prefix_tokens must be an int in [0, {num_tokens}) for {name} with "
            f"{num_tokens} tokens; got {num_prefix_tokens!r}"
        )
    return int(num_prefix_tokens)


def grid_shape(
    num_tokens: int,
    num_prefix_tokens: Integer,
    grid_size: Union[None, Integer, Sequence[SupportsInt]],
    func: str,
    name: str = "attn",
) -> Tuple[int, int]:
    """Return the patch grid ``(h, w)`` for ``num_tokens`` tokens.

    ``grid_size`` may be ``(h, w)``, an int for a square grid, or None to infer
    a square grid from the number of patch tokens. ``name`` is the map's argument.
    """
    num_patches = num_tokens - check_prefix(num_prefix_tokens, num_tokens, func, name)
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise VisualizerError(
                f"{func}: cannot infer a square grid_size from {num_patches} patch tokens of "
                f"{name} ({num_tokens} tokens - num_prefix_tokens={num_prefix_tokens}); pass "
                "grid_size=(h, w)"
            )
        return side, side
    height, width = grid_pair(grid_size, func)
    if height * width != num_patches:
        raise VisualizerError(
            f"{func}: grid_size {(height, width)} has {height * width} patches but {name} has "
            f"{num_tokens} tokens - num_prefix_tokens={num_prefix_tokens} = {num_patches} patch "
            "tokens"
        )
    return height, width


def is_int(value: object) -> "TypeGuard[Integer]":
    """True for an int or numpy integer; False for a bool, which is an int only by accident."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_index(index: Integer, size: int, func: str, name: str) -> int:
    """Return ``index`` as a non-negative int, accepting Python's negative indices."""
    if not is_int(index) or not -size <= index < size:
        raise VisualizerError(f"{func}: {name} must be an int in [{-size}, {size}); got {index!r}")
    return int(index) % size


def sequence_of(
    value: object, single: Union[type, Tuple[type, ...]], func: str, name: str, expected: str
) -> list:
    """``value`` as a list: ``[value]`` if it is one item (of type ``single``), else its items.

    Anything that is neither (a number where indices are expected, an object) is refused
    with ``expected`` in the message, instead of failing later on iteration.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, single):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable):
        raise VisualizerError(f"{func}: {name} must be {expected}; got {value!r}")
    return list(value)


def index_list(value: object, size: int, func: str, name: str, what: str = "index") -> List[int]:
    """One index or a sequence of them (at least one ``what``) as non-negative ints < ``size``."""
    items = sequence_of(value, (int, np.integer), func, name, "an int or a sequence of ints")
    if not items:
        raise VisualizerError(f"{func}: {name} must name at least one {what}; got {value!r}")
    return [check_index(item, size, func, name) for item in items]


def positive_int(value: Integer, func: str, name: str) -> int:
    """Return ``value`` as an int if it is an int >= 1 (a count: columns, layers)."""
    if not is_int(value) or value < 1:
        raise VisualizerError(f"{func}: {name} must be a positive int; got {value!r}")
    return int(value)


def check_bool(value: bool, func: str, name: str) -> bool:
    """Return ``value`` if it is True or False: a string "no" would otherwise count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise VisualizerError(f"{func}: {name} must be True or False; got {value!r}")
    return bool(value)


def check_number(
    value: SupportsFloat,
    func: str,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number within the bounds."""
    number = float(value) if is_real(value) else math.nan
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below and math.isfinite(number)):
        if math.isinf(low) and math.isinf(high):
            expected = "a finite number"
        elif low == 0 and low_open and math.isinf(high):
            expected = "positive"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}" + (
                ")" if high_open else "]"
            )
        raise VisualizerError(f"{func}: {name} must be {expected}; got {value!r}")
    return number


def is_real(value: object) -> bool:
    """True for an int or float (numpy's too), not a bool or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_choice(value: str, options: Sequence[str], func: str, name: str) -> str:
    """Return ``value`` if it is one of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        expected = (
            " or ".join(repr(option) for option in options)
            if len(options) == 2
            else f"one of {tuple(options)}"
        )
        raise VisualizerError(f"{func}: {name} must be {expected}; got {value!r}")
    return value


def check_path(path: object, func: str, name: str = "path") -> None:
    """Refuse what ``open`` would not take as a file name (None, a number) before opening."""
    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fspath(path):
        raise VisualizerError(
            f"{func}: {name} must be a file path (a non-empty str or os.PathLike); got "
            f"{type(path).__name__} {path!r}"
        )


def grid_maps(x: ArrayOrTensor, func: str, name: str) -> FloatArray:
    """Coerce maps on a grid ``(..., h, w)``: at least 2-D, not empty, finite."""
    array = to_numpy(x, func, name)
    if array.ndim < 2 or array.size == 0:
        raise VisualizerError(
            f"{func}: {name} must have shape (..., h, w) with h, w >= 1; got "
            f"{'an empty array of ' if array.size == 0 else ''}shape {array.shape}"
        )
    check_finite(array, func, name)
    return array


def check_finite(array: np.ndarray, func: str, name: str) -> None:
    """Refuse NaN and infinite values, which every comparison and sort would misread."""
    finite = np.isfinite(array)
    if not finite.all():
        raise VisualizerError(
            f"{func}: {name} holds {int(array.size - finite.sum())} NaN or infinite values of "
            f"{array.size}; expected finite numbers"
        )


def _positive_pair(
    value: Any, func: str, name: str, is_kind: Callable[[Any], bool], form: str
) -> Tuple[Any, Any]:
    """``value`` as two positive, finite numbers that pass ``is_kind`` (one number means both)."""
    items: Any = (value, value) if is_kind(value) else value
    try:
        first, second = items
        if not (is_kind(first) and is_kind(second)):
            raise TypeError
    except (TypeError, ValueError):
        raise VisualizerError(f"{func}: {name} must be {form}; got {value!r}") from None
    if not all(0 < float(side) < math.inf for side in (first, second)):
        finite = "" if is_kind is is_int else " and finite"
        raise VisualizerError(f"{func}: {name} must be positive{finite}; got {value!r}")
    return first, second


def pair(
    value: Union[float, np.integer, np.floating, Sequence[SupportsFloat]], func: str, name: str
) -> Tuple[float, float]:
    """Return ``(a, b)`` from a positive number or a pair of positive numbers."""
    first, second = _positive_pair(
        value, func, name, is_real, "a positive number or a pair of them"
    )
    return float(first), float(second)


def grid_pair(value: Union[Integer, Sequence[SupportsInt]], func: str) -> Tuple[int, int]:
    """``grid_size`` as ``(h, w)`` ints; an int means a square grid."""
    height, width = _positive_pair(value, func, "grid_size", is_int, "(h, w), an int or None")
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


def image_pixels(
    image: ArrayOrTensor,
    batch_index: Integer,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    func: str,
    batch_name: str = "batch_index",
) -> FloatArray:
    """The image a model saw as float ``(height, width, 3)`` in ``[0, 1]``.

    Accepts ``(H, W)``, ``(H, W, C)``, ``(C, H, W)`` and batches of them
    (``batch_index`` picks the item). Tensors follow torch's ``(C, H, W)``;
    arrays follow ``(H, W, C)`` unless only the first axis looks like channels.
    Integer images are read as 0-255. ``mean``/``std`` (one value per channel,
    or one for all) undo a ``Normalize`` transform. Float values still outside
    ``[0, 1]`` are stretched to it, so a normalized tensor passed without
    ``mean``/``std`` is at least recognisable.
    """
    integer = is_integer_data(image)
    array = to_numpy(image, func, "image")
    if array.ndim == 4:
        array = array[check_index(batch_index, array.shape[0], func, f"{batch_name} (of image)")]
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[0] in (1, 3) and (
        is_torch_tensor(image) or array.shape[-1] not in (1, 3, 4)
    ):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise VisualizerError(
            f"{func}: image must have shape (H, W, 3), (3, H, W), (B, 3, H, W) or (H, W), with 1, "
            f"3 or 4 channels and at least one pixel; got shape {tuple(np.shape(image))}"
        )
    check_finite(array, func, "image")
    array = array[..., :3].astype(np.float64)
    # A grey image may be undone with an RGB model's three values: it becomes RGB.
    counts = (1, 3) if array.shape[-1] == 1 else (1, array.shape[-1])
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) not in counts:
            raise VisualizerError(
                f"{func}: {name} has {len(values)} values, one per channel, but the image has "
                f"{array.shape[-1]} channels (shape {array.shape}); expected "
                f"{' or '.join(map(str, counts))} values"
            )
    if integer:
        array = array / 255.0
    if mean is not None or std is not None:
        array = array * np.asarray(1.0 if std is None else std) + np.asarray(
            0.0 if mean is None else mean
        )
    low, high = array.min(), array.max()
    if low < 0 or high > 1:
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
