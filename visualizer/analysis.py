"""Numbers from attention maps: CLS attention, mean attention distance, rollout, ...

Every function takes numpy arrays or torch tensors (CPU or CUDA, float16,
bfloat16, float32, with or without grad) and returns numpy arrays.

Layouts:

- an attention map is ``(B, H, N, N)`` or ``(H, N, N)``: query rows, key
  columns, rows summing to 1 (post-softmax). Results keep the batch axis when
  it was given.
- a layer stack is a list of per-layer maps (``get_local.cache[...]`` is such a
  list, one entry per call) or an array ``(L, B, H, N, N)``. A cache holds one
  map per *call*: after two forwards of a 12-layer model it holds 24 maps. Pass
  ``num_layers=`` (the model's depth) to functions taking a stack and they
  refuse anything but one forward, saying how to pick one.
- tokens are ``num_prefix_tokens`` prefix tokens (CLS, then register tokens)
  followed by the patch grid ``(h, w)`` in row-major order. CLS is token 0.
  :class:`ImageGeometry` holds that layout (with the patch size in pixels and
  the input normalization) once, e.g. ``ImageGeometry.from_model(model)``;
  every function that takes ``grid_size``/``num_prefix_tokens``/``patch_size``
  takes ``geometry=`` instead.

torch is not imported by this module; tensors are converted with
``.detach().cpu()``.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Tuple, Union

import numpy as np

from ._arrays import (
    ArrayOrTensor,
    attention_array,
    check_bool,
    check_choice,
    check_number,
    check_prefix,
    cross_attention_array,
    grid_maps,
    grid_shape,
    is_torch_tensor,
    layer_arrays,
    layer_list,
    pair,
    positive_int,
    to_numpy,
)
from ._errors import VisualizerError
from .geometry import ImageGeometry

if TYPE_CHECKING:
    import torch

# A layer stack: a list (or tuple) of per-layer maps ``(B, H, N, N)``, an
# array ``(L, B, H, N, N)``, or a single map. Arrays are ``ArrayOrTensor``:
# anything numpy makes an array of, or a torch tensor of any device and dtype.
LayerStack = Union[ArrayOrTensor, List[ArrayOrTensor], Tuple[ArrayOrTensor, ...]]

HEAD_FUSIONS = ("mean", "max", "min")


def _check_one_forward(count: int, num_layers: Optional[int], func: str, name: str) -> None:
    """With ``num_layers``, refuse a stack that is not exactly one forward of the model."""
    if num_layers is None:
        return
    positive_int(num_layers, func, "num_layers")
    if count == num_layers:
        return
    # A capture cache holds one map per call of the attention code, not one per
    # layer: a second forward appends num_layers more maps to the same list.
    pick = (
        f"pick one forward: {name}[-{num_layers}:] is the last, {name}[:{num_layers}] the "
        f"first (or clear the cache before the forward you want)"
    )
    if count % num_layers == 0:
        raise VisualizerError(
            f"{func}: {name} holds {count} maps for a model of num_layers={num_layers}: "
            f"{count // num_layers} forwards (calls) of the model, not one (the cache records "
            f"one map per call, not per layer); {pick}"
        )
    raise VisualizerError(
        f"{func}: {name} holds {count} maps, not a whole number of forwards of a model of "
        f"num_layers={num_layers} (the cache records one map per call: a forward was cut "
        f"short or capture was switched on midway, or num_layers is wrong); {pick}"
    )


def _layer_stack(
    maps: LayerStack, func: str, num_layers: Optional[int], name: str = "maps"
) -> tuple[list[Any], bool]:
    """``layer_list`` with the ``num_layers`` check: ``(layers, stacked)``."""
    layers, stacked = layer_list(maps, func, name)
    _check_one_forward(len(layers), num_layers, func, name)
    return layers, stacked


# ------------------------------------------------------------------ analysis


def cls_attention(
    attn: ArrayOrTensor,
    grid_size: Union[int, tuple[int, int], None] = None,
    num_prefix_tokens: Optional[int] = None,
    *,
    geometry: Optional[ImageGeometry] = None,
) -> np.ndarray:
    """CLS token's attention to every patch, per head, on the patch grid.

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)``. A map captured
            for the CLS query row only, ``(B, H, 1, N)`` or ``(H, 1, N)``, is
            accepted too.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches (1 for
            ViT/DINO, 2 for DeiT, 5 for DINOv2 with 4 registers); None: 1.
        geometry: an :class:`ImageGeometry` instead of ``grid_size`` and
            ``num_prefix_tokens``.

    Returns:
        ``(B, H, h, w)`` or ``(H, h, w)``: the CLS row without the prefix
        columns, so register tokens' share is left out.

    Example:
        >>> import numpy as np
        >>> attn = np.full((2, 3, 1 + 6, 1 + 6), 1 / 7)
        >>> cls_attention(attn, grid_size=(2, 3)).shape
        (2, 3, 2, 3)
    """
    func = "cls_attention"
    layout = ImageGeometry.resolve(
        geometry, caller=func, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens
    )
    array, batched = attention_array(attn, func, square=False)
    if array.shape[2] not in (1, array.shape[3]):
        raise VisualizerError(
            f"{func}: attn must have shape (B, H, N, N) or (B, H, 1, N) (CLS row only); got shape "
            f"{array.shape}"
        )
    result = _cls_row_on_grid(array, layout.grid_size, layout.num_prefix_tokens, func, "attn")
    return result if batched else result[0]


def _cls_row_on_grid(
    array: np.ndarray,
    grid_size: Optional[tuple[int, int]],
    num_prefix_tokens: int,
    func: str,
    name: str,
) -> np.ndarray:
    """Row 0 of maps ``(B, H, Q, N)`` without prefix columns, as ``(B, H, h, w)``."""
    batch, heads, _, tokens = array.shape
    if check_prefix(num_prefix_tokens, tokens, func, name) < 1:
        raise VisualizerError(
            f"{func}: num_prefix_tokens must be >= 1 (the map needs a CLS token); got "
            f"{num_prefix_tokens!r}"
        )
    height, width = grid_shape(tokens, num_prefix_tokens, grid_size, func, name)
    # CLS is token 0 because ViT, DeiT, DINO and timm prepend it to the patch
    # sequence (registers come after it), so its query row is row 0.
    return array[:, :, 0, num_prefix_tokens:].reshape(batch, heads, height, width)


@functools.lru_cache(maxsize=4)
def _patch_distances(
    height: int, width: int, patch_height: float, patch_width: float, dtype: str
) -> np.ndarray:
    """Pixel distance between the centres of every pair of patches, ``(n, n)``."""
    rows, cols = np.divmod(np.arange(height * width), width)
    # All patches have the same size, so centre-to-centre distance is the
    # index difference scaled by the patch size in each direction.
    delta_y = (rows[:, None] - rows[None, :]) * patch_height
    delta_x = (cols[:, None] - cols[None, :]) * patch_width
    distances = np.hypot(delta_y, delta_x).astype(dtype)
    distances.flags.writeable = False  # shared by every later call: never let a caller mutate it
    return distances


def _per_layer_statistic(
    maps: LayerStack,
    func: str,
    statistic: Callable[[np.ndarray], np.ndarray],
    average_batch: bool,
    num_layers: Optional[int],
    square: bool = True,
) -> np.ndarray:
    """Apply ``statistic`` (map ``(B, H, Q, N)`` -> ``(B, H)``) to each layer and stack."""
    check_bool(average_batch, func, "average_batch")
    layers, stacked = _layer_stack(maps, func, num_layers)
    per_layer = [
        (statistic(array), batched) for array, batched in layer_arrays(layers, func, square=square)
    ]
    result = np.stack([values for values, _ in per_layer])  # (L, B, H)
    if average_batch or not per_layer[0][1]:
        result = result.mean(axis=1)
    return result if stacked else result[0]


def mean_attention_distance(
    maps: LayerStack,
    grid_size: Union[int, tuple[int, int], None] = None,
    num_prefix_tokens: Optional[int] = None,
    patch_size: Union[float, tuple[float, float], None] = None,
    average_batch: bool = True,
    *,
    geometry: Optional[ImageGeometry] = None,
    num_layers: Optional[int] = None,
) -> np.ndarray:
    """Attention-weighted mean pixel distance between query and key patches, per layer and head.

    For every query patch, the distances from its centre to every key patch's
    centre are averaged with the query's attention weights; the result is then
    averaged over query patches (ViT paper, Figure 7). Prefix tokens (CLS,
    registers) have no position, so they are dropped as queries and as keys,
    and each query's weights are renormalized over the patch keys: the result is
    a distance over the image alone, not shrunk by the share of attention that
    went to CLS. (The widely copied reference code does not renormalize; its
    numbers are smaller by that share.) Queries that give no weight to any patch
    are left out of the average.

    Args:
        maps: a layer stack (list of ``(B, H, N, N)`` maps or an array
            ``(L, B, H, N, N)``) or a single map ``(B, H, N, N)``/``(H, N, N)``.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        patch_size: patch side in pixels, or ``(height, width)`` in pixels;
            None: 16.
        average_batch: average over batch items (default); False keeps a
            batch axis after the layer axis.
        geometry: an :class:`ImageGeometry` instead of ``grid_size``,
            ``num_prefix_tokens`` and ``patch_size``.
        num_layers: the model's depth; when given, ``maps`` must be one
            forward (``num_layers`` maps), see :func:`attention_rollout`.

    Returns:
        ``(L, H)`` in pixels for a stack (``(L, B, H)`` with
        ``average_batch=False`` and batched maps); ``(H,)``/``(B, H)`` for a
        single map.

    Example:
        >>> import numpy as np
        >>> self_only = np.eye(1 + 4)[None]  # (H=1, N, N): every token attends to itself
        >>> mean_attention_distance([self_only, self_only], grid_size=(2, 2))
        array([[0.],
               [0.]])
    """
    func = "mean_attention_distance"
    layout = ImageGeometry.resolve(
        geometry,
        caller=func,
        grid_size=grid_size,
        num_prefix_tokens=num_prefix_tokens,
        patch_size=patch_size,
    )
    num_prefix_tokens = layout.num_prefix_tokens
    patch_height, patch_width = layout.patch_size or (16, 16)

    def statistic(array: np.ndarray) -> np.ndarray:
        height, width = grid_shape(
            array.shape[-1], num_prefix_tokens, layout.grid_size, func, "maps"
        )
        distances = _patch_distances(height, width, patch_height, patch_width, array.dtype.str)
        patches = array[..., num_prefix_tokens:, num_prefix_tokens:]
        # One einsum instead of the reference's Python double loop over
        # (query, key): the distance matrix is built once per grid and cached.
        weighted = np.einsum("bhqk,qk->bhq", patches, distances)
        mass = patches.sum(axis=-1)
        attended = mass > 0
        per_query = np.divide(weighted, mass, out=np.zeros_like(weighted), where=attended)
        count = attended.sum(axis=-1)
        return np.divide(
            per_query.sum(axis=-1), count, out=np.full(count.shape, np.nan), where=count > 0
        )

    return _per_layer_statistic(maps, func, statistic, average_batch, num_layers)


def attention_entropy(
    maps: LayerStack, average_batch: bool = True, *, num_layers: Optional[int] = None
) -> np.ndarray:
    """Shannon entropy (nats) of each query's attention row, averaged over queries, per head.

    0 means every query attends to a single token; ``log(N)`` means uniform
    attention over all ``N`` tokens.

    Args:
        maps: a layer stack (list of ``(B, H, N, N)`` maps or an array
            ``(L, B, H, N, N)``) or a single map ``(B, H, N, N)``/``(H, N, N)``.
            Maps of a few query rows ``(B, H, Q, N)`` (e.g. the CLS row) work too.
        average_batch: average over batch items (default); False keeps a
            batch axis after the layer axis.
        num_layers: the model's depth; when given, ``maps`` must be one
            forward (``num_layers`` maps), see :func:`attention_rollout`.

    Returns:
        ``(L, H)`` for a stack (``(L, B, H)`` with ``average_batch=False`` and
        batched maps); ``(H,)``/``(B, H)`` for a single map.

    Example:
        >>> import numpy as np
        >>> attention_entropy(np.full((2, 4, 4), 0.25))  # log(4) for both heads
        array([1.38629436, 1.38629436])
    """

    def statistic(array: np.ndarray) -> np.ndarray:
        # 0 * log(0) is 0 in the limit; log(1) = 0 stands in for it.
        logs = np.log(np.where(array > 0, array, 1.0))
        return -(array * logs).sum(axis=-1).mean(axis=-1)

    return _per_layer_statistic(
        maps, "attention_entropy", statistic, average_batch, num_layers, square=False
    )


def _rollout(
    fused_layers: Iterable[np.ndarray], discard_ratio: float, add_identity: bool
) -> np.ndarray:
    """Multiply head-fused layers ``(B, N, N)`` in order; return ``(B, N, N)``.

    ``fused_layers`` is never empty (``layer_list`` refuses empty stacks).
    """
    layers = iter(fused_layers)
    result = _rollout_step(next(layers), discard_ratio, add_identity)
    for fused in layers:
        # Later layers act on the output of earlier ones: A_L @ ... @ A_1.
        result = _rollout_step(fused, discard_ratio, add_identity) @ result
    return result


def _rollout_step(fused: np.ndarray, discard_ratio: float, add_identity: bool) -> np.ndarray:
    """One head-fused layer ``(B, N, N)`` as rollout multiplies it."""
    fused = fused.astype(np.float64)
    if discard_ratio > 0:
        fused = _discard_lowest(fused, discard_ratio)
    if add_identity:
        # Each block computes x + attn(x): the residual path carries every
        # token's own state past the attention. Abnar & Zuidema model that
        # as half identity, half attention; without it, information from a
        # token that attends elsewhere would vanish from the product.
        fused = 0.5 * fused + 0.5 * np.eye(fused.shape[-1])
    row_sums = fused.sum(axis=-1, keepdims=True)
    # Renormalize so each row is again a distribution (fusing heads with
    # max/min, discarding and adding I all break that).
    return np.divide(fused, row_sums, out=np.zeros_like(fused), where=row_sums > 0)


def _discard_lowest(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Zero the lowest ``discard_ratio`` share of each item's entries, sparing entry (0, 0).

    Like the common implementation (jacobgil/vit-explain), the CLS->CLS entry
    (flat index 0) is never discarded, so CLS keeps a path to itself.
    """
    batch, tokens, _ = fused.shape
    flat = fused.reshape(batch, tokens * tokens).copy()
    count = min(int(tokens * tokens * discard_ratio), tokens * tokens - 1)
    if count:
        lowest = np.argpartition(flat[:, 1:], count - 1, axis=-1)[:, :count] + 1
        np.put_along_axis(flat, lowest, 0.0, axis=-1)
    return flat.reshape(fused.shape)


def _check_rollout_options(func: str, discard_ratio: float, add_identity: bool) -> None:
    check_number(discard_ratio, func, "discard_ratio", 0, 1, high_open=True)
    check_bool(add_identity, func, "add_identity")


def attention_rollout(
    maps: LayerStack,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    add_identity: bool = True,
    *,
    num_layers: Optional[int] = None,
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input.

    Per layer: fuse the heads, optionally zero the lowest weights, add the
    identity for the residual path, renormalize rows; then multiply the layers,
    last on the left.

    Args:
        maps: a layer stack in forward order (list of ``(B, H, N, N)`` maps or
            an array ``(L, B, H, N, N)``), or a single map.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        discard_ratio: share of each layer's fused entries to zero, lowest first
            (the CLS->CLS entry is never discarded), in ``[0, 1)``.
        add_identity: model the residual connection as ``0.5 * A + 0.5 * I``.
        num_layers: the model's depth. A capture cache holds one map per call,
            so after two forwards of a 12-layer model it holds 24 maps, and a
            rollout over them would multiply two forwards as if they were 24
            layers. With ``num_layers`` given, ``maps`` must hold exactly one
            forward (``num_layers`` maps); anything else is refused with a
            message saying how to pick one (``maps[-num_layers:]``: the last).
            None (default) takes the stack as given.

    Returns:
        ``(B, N, N)`` or ``(N, N)``: row ``i`` is output token ``i``'s
        attribution over input tokens; each row sums to 1.

    Example:
        >>> import numpy as np
        >>> identity = np.broadcast_to(np.eye(5), (2, 3, 5, 5))  # (B, H, N, N)
        >>> np.allclose(attention_rollout([identity] * 4), np.eye(5))
        True
    """
    func = "attention_rollout"
    check_choice(head_fusion, HEAD_FUSIONS, func, "head_fusion")
    _check_rollout_options(func, discard_ratio, add_identity)
    fuse = getattr(np, head_fusion)
    layers, _ = _layer_stack(maps, func, num_layers)
    arrays = list(layer_arrays(layers, func))
    result = _rollout((fuse(array, axis=1) for array, _ in arrays), discard_ratio, add_identity)
    return result if arrays[0][1] else result[0]


def _gradients(score: Any, maps: LayerStack, func: str) -> Any:
    """d score / d maps, with the autograd graph kept for further targets."""
    tensors = maps if isinstance(maps, (list, tuple)) else [maps]
    if not all(is_torch_tensor(tensor) and tensor.requires_grad for tensor in tensors):
        raise VisualizerError(
            f"{func}: to differentiate score, maps must be torch tensors that require grad "
            f"(capture them on device without detaching); got {type(tensors[0]).__name__}"
            + (
                f" with requires_grad={tensors[0].requires_grad}"
                if is_torch_tensor(tensors[0])
                else ""
            )
        )
    if not is_torch_tensor(score) or score.numel() != 1:
        raise VisualizerError(
            f"{func}: score must be a scalar torch tensor (e.g. logits[:, target].sum() for "
            f"a batch); got {type(score).__name__} of shape {tuple(np.shape(score))}"
        )
    torch = sys.modules["torch"]
    try:
        # retain_graph: one forward pass can then explain several targets.
        grads = torch.autograd.grad(score.reshape(()), tensors, retain_graph=True)
    except RuntimeError as error:
        raise VisualizerError(
            f"{func}: cannot differentiate score with respect to maps: {error}"
        ) from None
    return list(grads) if isinstance(maps, (list, tuple)) else grads[0]


def gradient_rollout(
    maps: LayerStack,
    grads: Optional[LayerStack] = None,
    *,
    score: Optional[torch.Tensor] = None,
    discard_ratio: float = 0.0,
    add_identity: bool = True,
    num_layers: Optional[int] = None,
) -> np.ndarray:
    """Gradient-weighted attention rollout (Chefer et al., 2021; jacobgil's "grad rollout").

    Per layer the heads are fused as ``mean_h(max(grad * attn, 0))``: only
    attention that increases the score counts. Then, as in
    :func:`attention_rollout`, the lowest weights may be discarded, the identity
    is added, rows are renormalized and the layers are multiplied.

    Give either ``grads`` (d score / d maps, same layout as ``maps``) or
    ``score``, a scalar tensor computed from maps that were captured with their
    autograd graph; the gradients are then taken here. For a batch, sum the
    items' scores: items do not interact, so each gets its own gradient.

    Args:
        maps: layer stack in forward order (list of ``(B, H, N, N)`` or an array
            ``(L, B, H, N, N)``), or a single map.
        grads: gradients of the score with respect to ``maps``, same layout.
        score: scalar torch tensor to differentiate instead of passing grads.
        discard_ratio: share of each layer's fused entries to zero, lowest first.
        add_identity: model the residual connection as ``0.5 * A + 0.5 * I``.
        num_layers: the model's depth; when given, ``maps`` must be one
            forward (``num_layers`` maps), see :func:`attention_rollout`.

    Returns:
        ``(B, N, N)`` or ``(N, N)`` with rows summing to 1.

    Example:
        >>> import numpy as np
        >>> attn = np.full((1, 2, 3, 3), 1 / 3)
        >>> gradient_rollout([attn], grads=[-np.ones_like(attn)])[0]  # nothing helps the score
        array([[1., 0., 0.],
               [0., 1., 0.],
               [0., 0., 1.]])
    """
    func = "gradient_rollout"
    if (grads is None) == (score is None):
        raise VisualizerError(
            f"{func}: pass exactly one of grads and score; got "
            f"{'both' if grads is not None else 'neither'}"
        )
    _check_rollout_options(func, discard_ratio, add_identity)
    # Checked before differentiating: the gradients of a wrong stack are wasted work.
    map_layers, _ = _layer_stack(maps, func, num_layers)
    if grads is None:
        grads = _gradients(score, maps, func)
    grad_layers, _ = layer_list(grads, func, "grads")
    if len(map_layers) != len(grad_layers):
        raise VisualizerError(
            f"{func}: grads must have one entry per layer of maps ({len(map_layers)}); got "
            f"{len(grad_layers)}"
        )
    arrays = list(layer_arrays(map_layers, func, "maps"))
    grad_arrays = list(layer_arrays(grad_layers, func, "grads", probabilities=False))
    if arrays[0][0].shape != grad_arrays[0][0].shape:
        raise VisualizerError(
            f"{func}: grads must have the shape of maps; got {grad_arrays[0][0].shape} for maps of "
            f"shape {arrays[0][0].shape}"
        )
    fused = (
        np.clip(grad * array, 0, None).mean(axis=1)
        for (array, _), (grad, _) in zip(arrays, grad_arrays)
    )
    result = _rollout(fused, discard_ratio, add_identity)
    return result if arrays[0][1] else result[0]


def rollout_cls_attention(
    rollout: ArrayOrTensor,
    grid_size: Union[int, tuple[int, int], None] = None,
    num_prefix_tokens: Optional[int] = None,
    *,
    geometry: Optional[ImageGeometry] = None,
) -> np.ndarray:
    """The CLS row of a rollout on the patch grid: what the class token draws from each patch.

    Args:
        rollout: ``(B, N, N)`` or ``(N, N)`` from :func:`attention_rollout` or
            :func:`gradient_rollout`.
        grid_size: patch grid ``(h, w)``; None infers a square grid.
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        geometry: an :class:`ImageGeometry` instead of ``grid_size`` and
            ``num_prefix_tokens``.

    Returns:
        ``(B, h, w)`` or ``(h, w)``.

    Example:
        >>> import numpy as np
        >>> rollout_cls_attention(np.full((5, 5), 0.2), grid_size=(2, 2)).shape
        (2, 2)
    """
    func = "rollout_cls_attention"
    layout = ImageGeometry.resolve(
        geometry, caller=func, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens
    )
    array = to_numpy(rollout, func, "rollout")
    if array.ndim not in (2, 3) or array.shape[-1] != array.shape[-2] or array.size == 0:
        raise VisualizerError(
            f"{func}: rollout must have shape (B, N, N) or (N, N) with N >= 1; got shape "
            f"{array.shape}"
        )
    batched = array.ndim == 3
    # A rollout is a one-head map: (B, N, N) -> (B, H=1, N, N).
    result = _cls_row_on_grid(
        array.reshape(-1, 1, *array.shape[-2:]),
        layout.grid_size,
        layout.num_prefix_tokens,
        func,
        "rollout",
    )[:, 0]
    return result if batched else result[0]


def threshold_mask(attention: ArrayOrTensor, fraction: float = 0.6) -> np.ndarray:
    """DINO's masks: per map, the fewest patches holding ``fraction`` of the attention mass.

    Args:
        attention: non-negative maps ``(..., h, w)``, e.g. :func:`cls_attention`
            output ``(B, H, h, w)`` or ``(H, h, w)``.
        fraction: share of each map's total mass to keep, in ``(0, 1]``.

    Returns:
        boolean ``(..., h, w)``: True for kept patches.

    Example:
        >>> import numpy as np
        >>> threshold_mask(np.array([[0.5, 0.1], [0.3, 0.1]]), fraction=0.7)
        array([[ True, False],
               [ True, False]])
    """
    func = "threshold_mask"
    array = grid_maps(attention, func, "attention").astype(np.float64)
    check_number(fraction, func, "fraction", 0, 1, low_open=True)
    if array.min() < 0:
        raise VisualizerError(f"{func}: attention must be non-negative; got minimum {array.min()}")
    flat = array.reshape(*array.shape[:-2], -1)
    # Taking patches strongest first reaches the mass with the fewest patches:
    # any other set of k patches holds at most the k largest weights. The
    # stable sort breaks ties by patch index, so the result is deterministic.
    order = np.argsort(-flat, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(flat, order, axis=-1), axis=-1)
    total = cumulative[..., -1:]
    kept_count = np.where(
        total > 0, (cumulative < fraction * total).sum(axis=-1, keepdims=True) + 1, 0
    )
    kept_in_order = np.arange(flat.shape[-1]) < np.minimum(kept_count, flat.shape[-1])
    mask = np.empty_like(kept_in_order)
    np.put_along_axis(mask, order, kept_in_order, axis=-1)
    return mask.reshape(array.shape)


def find_artifact_tokens(
    attn: ArrayOrTensor,
    num_prefix_tokens: Optional[int] = None,
    z_threshold: float = 10.0,
    *,
    geometry: Optional[ImageGeometry] = None,
) -> Union[np.ndarray, list[np.ndarray]]:
    """Patch tokens that receive outlying attention ("artifact" tokens, Darcet et al. 2023).

    Some ViTs (DINOv2 without registers, large supervised ViTs) route much of
    their attention to a few low-information background patches; users hide
    them by hand-zeroing a token index. Here, per head, each patch token's
    score is the attention it receives averaged over queries, and its robust
    z-score is ``(score - median) / (1.4826 * MAD)`` over the patch tokens; a
    token is an artifact if the median of its z-scores over heads exceeds
    ``z_threshold``, i.e. it is an outlier in at least half of the heads.
    Prefix tokens are never candidates. The default threshold is deliberately
    high: artifacts reach z-scores of tens to thousands. Pass the full map
    when you have it: averaging over all queries separates artifacts (which
    every patch attends to) from objects (which mostly CLS attends to); from the
    CLS row alone, a very peaky head-consistent object can also be flagged.

    Args:
        attn: attention map ``(B, H, N, N)`` or ``(H, N, N)``, or a few query
            rows ``(B, H, Q, N)``/``(H, Q, N)`` (e.g. the CLS row only).
        num_prefix_tokens: CLS plus register tokens before the patches; None: 1.
        z_threshold: robust z-score above which a token is an outlier.
        geometry: an :class:`ImageGeometry` instead of ``num_prefix_tokens``.

    Returns:
        for a batch, a list with one int array per item; otherwise one int
        array. Indices are full-token indices (prefix tokens counted), as used
        to index the map's key axis.

    Example:
        >>> import numpy as np
        >>> attn = np.full((2, 5, 5), 0.1)
        >>> attn[:, :, 3] = 0.6  # every query puts most of its weight on token 3
        >>> find_artifact_tokens(attn)
        array([3])
    """
    func = "find_artifact_tokens"
    num_prefix_tokens = ImageGeometry.resolve(
        geometry, caller=func, num_prefix_tokens=num_prefix_tokens
    ).num_prefix_tokens
    array, batched = attention_array(attn, func, square=False)
    check_prefix(num_prefix_tokens, array.shape[-1], func)
    check_number(z_threshold, func, "z_threshold")
    received = array.mean(axis=2)[..., num_prefix_tokens:].astype(np.float64)  # (B, H, patches)
    median = np.median(received, axis=-1, keepdims=True)
    deviation = np.median(np.abs(received - median), axis=-1, keepdims=True)
    # 1.4826 * MAD estimates the standard deviation for normal data. The floor
    # stops float rounding in an exactly uniform map from looking like a spike.
    scale = np.maximum(1.4826 * deviation, 1e-6 * np.abs(median) + np.finfo(np.float64).tiny)
    # Artifacts draw attention in (nearly) every head, whereas a salient object
    # dominates only some: require the outlier in at least half of the heads.
    z_scores = np.median((received - median) / scale, axis=1)  # (B, patches)
    tokens = [np.flatnonzero(row > z_threshold) + num_prefix_tokens for row in z_scores]
    return tokens if batched else tokens[0]


def _source_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation with half-pixel centres."""
    # align_corners=False convention (torch, PIL): output pixel i's centre sits
    # at input coordinate (i + 0.5) * in / out - 0.5, clamped to the edge cells.
    source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, source - lower


def upsample_to_image(
    attention: ArrayOrTensor, image_size: Union[float, tuple[float, float]], mode: str = "bilinear"
) -> np.ndarray:
    """Resize grid maps ``(..., h, w)`` to the image size, e.g. to overlay attention on the input.

    Args:
        attention: maps ``(..., h, w)``.
        image_size: ``(height, width)`` in pixels.
        mode: ``"nearest"`` (each patch a flat block, as DINO's
            ``interpolate(scale_factor=patch_size)``) or ``"bilinear"``
            (half-pixel centres, like ``torch.nn.functional.interpolate`` with
            ``align_corners=False``). Non-integer scale factors are fine.

    Returns:
        ``(..., height, width)``.

    Example:
        >>> import numpy as np
        >>> upsample_to_image(np.array([[0.0, 1.0]]), (2, 4), mode="nearest")
        array([[0., 0., 1., 1.],
               [0., 0., 1., 1.]])
    """
    func = "upsample_to_image"
    array = grid_maps(attention, func, "attention")
    check_choice(mode, ("nearest", "bilinear"), func, "mode")
    out_height, out_width = (int(side) for side in pair(image_size, func, "image_size"))
    if out_height < 1 or out_width < 1:
        raise VisualizerError(
            f"{func}: image_size must be at least one pixel each way; got {image_size!r}"
        )
    in_height, in_width = array.shape[-2:]
    try:
        return _resize(array, out_height, out_width, mode)
    except (MemoryError, ValueError):  # numpy: an array too large to allocate
        raise VisualizerError(
            f"{func}: image_size={image_size!r} makes maps of {array.shape[:-2]} x "
            f"{out_height} x {out_width} values, more than memory holds; expected the image's size"
        ) from None


def _resize(array: np.ndarray, out_height: int, out_width: int, mode: str) -> np.ndarray:
    in_height, in_width = array.shape[-2:]
    if mode == "nearest":
        # Integer arithmetic: output pixel i lies in input cell floor(i * in / out).
        rows = np.arange(out_height) * in_height // out_height
        cols = np.arange(out_width) * in_width // out_width
        return array[..., rows[:, None], cols[None, :]]
    top, bottom, row_weight = _source_weights(in_height, out_height)
    left, right, col_weight = _source_weights(in_width, out_width)
    rows = (
        array[..., top, :] * (1 - row_weight)[:, None] + array[..., bottom, :] * row_weight[:, None]
    )
    return rows[..., left] * (1 - col_weight) + rows[..., right] * col_weight


def box_cxcywh_to_xyxy(
    boxes: ArrayOrTensor, image_size: Union[float, tuple[float, float]]
) -> np.ndarray:
    """Convert DETR's normalized ``(cx, cy, w, h)`` boxes to pixel ``(x0, y0, x1, y1)``.

    Args:
        boxes: ``(..., 4)`` in ``[0, 1]`` relative to the image (DETR's
            ``outputs["pred_boxes"]``).
        image_size: ``(height, width)`` in pixels of the image the model saw.

    Returns:
        ``(..., 4)`` pixel corners.

    Example:
        >>> box_cxcywh_to_xyxy([0.5, 0.5, 0.5, 1.0], image_size=(100, 200))
        array([ 50.,   0., 150., 100.])
    """
    func = "box_cxcywh_to_xyxy"
    array = to_numpy(boxes, func, "boxes").astype(np.float64)
    if array.ndim < 1 or array.shape[-1] != 4:
        raise VisualizerError(f"{func}: boxes must have shape (..., 4); got shape {array.shape}")
    height, width = pair(image_size, func, "image_size")
    centre_x, centre_y, box_width, box_height = np.moveaxis(array, -1, 0)
    return np.stack(
        [
            (centre_x - box_width / 2) * width,
            (centre_y - box_height / 2) * height,
            (centre_x + box_width / 2) * width,
            (centre_y + box_height / 2) * height,
        ],
        axis=-1,
    )


def attention_mass_in_boxes(
    cross_attn: ArrayOrTensor,
    boxes: ArrayOrTensor,
    image_size: Union[float, tuple[float, float], None] = None,
    grid_size: Union[int, tuple[int, int], None] = None,
    *,
    geometry: Optional[ImageGeometry] = None,
) -> np.ndarray:
    """Share of each object query's cross-attention mass that falls inside its box.

    A feature-map cell partly inside the box counts with the fraction of its
    area inside, so the result does not jump when a box edge crosses a cell.

    Args:
        cross_attn: decoder cross-attention ``(B, H, Q, h*w)``, or head-averaged
            ``(B, Q, h*w)`` (``nn.MultiheadAttention``'s default output).
        boxes: pixel ``(x0, y0, x1, y1)`` per query, ``(B, Q, 4)``, or
            ``(Q, 4)`` shared by all items.
        image_size: ``(height, width)`` of the image the model saw; None
            takes ``geometry.image_size``.
        grid_size: encoder feature grid ``(h, w)``; None infers a square grid.
        geometry: an :class:`ImageGeometry` of the feature grid instead of
            ``grid_size`` (and ``image_size``, if it has a patch size). Its
            ``num_prefix_tokens`` must be 0: the keys are feature cells only.

    Returns:
        ``(B, Q)`` shares in ``[0, 1]`` (heads averaged first).

    Example:
        >>> import numpy as np
        >>> attn = np.zeros((1, 1, 4)); attn[0, 0, 0] = 1.0  # all on the top-left cell
        >>> attention_mass_in_boxes(attn, [[0, 0, 10, 10]], image_size=(20, 20), grid_size=(2, 2))
        array([[1.]])
    """
    func = "attention_mass_in_boxes"
    layout = _cross_attention_layout(geometry, grid_size, func)
    if image_size is None:
        image_size = layout.image_size
        if image_size is None:
            raise VisualizerError(
                f"{func}: image_size is required unless geometry has grid_size and patch_size; "
                f"got image_size=None and geometry={geometry!r}"
            )
    array = cross_attention_array(cross_attn, func).mean(axis=1)  # (B, Q, S)
    batch, queries, cells = array.shape
    height, width = grid_shape(cells, 0, layout.grid_size, func, "cross_attn")
    box_array = to_numpy(boxes, func, "boxes").astype(np.float64)
    if box_array.shape not in ((queries, 4), (batch, queries, 4)):
        raise VisualizerError(
            f"{func}: boxes must have shape ({batch}, {queries}, 4) or ({queries}, 4) to "
            f"match cross_attn; got shape {box_array.shape}"
        )
    box_array = np.broadcast_to(box_array, (batch, queries, 4))
    image_height, image_width = pair(image_size, func, "image_size")

    def overlap(
        low: np.ndarray, high: np.ndarray, cells_along: int, pixels: float
    ) -> np.ndarray:
        edges = np.arange(cells_along + 1) * pixels / cells_along
        inside = np.minimum(high[..., None], edges[1:]) - np.maximum(low[..., None], edges[:-1])
        return np.clip(inside, 0, None) / (pixels / cells_along)  # (B, Q, cells_along)

    across = overlap(box_array[..., 0], box_array[..., 2], width, image_width)
    down = overlap(box_array[..., 1], box_array[..., 3], height, image_height)
    grid = array.reshape(batch, queries, height, width)
    inside = np.einsum("bqyx,bqy,bqx->bq", grid, down, across)
    total = grid.sum(axis=(-2, -1))
    return np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)


def _cross_attention_layout(
    geometry: Optional[ImageGeometry], grid_size: Union[int, tuple[int, int], None], func: str
) -> ImageGeometry:
    """The feature-grid geometry of cross-attention, whose keys have no prefix tokens."""
    if isinstance(geometry, ImageGeometry) and geometry.num_prefix_tokens != 0:
        raise VisualizerError(
            f"{func}: cross-attention keys are feature-map cells only, with no prefix tokens; "
            f"got geometry.num_prefix_tokens={geometry.num_prefix_tokens}: pass "
            "ImageGeometry(..., num_prefix_tokens=0)"
        )
    return ImageGeometry.resolve(geometry, caller=func, grid_size=grid_size, num_prefix_tokens=0)
