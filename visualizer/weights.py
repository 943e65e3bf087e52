"""Attention weights from what attention functions are given: all the weight math in one place.

- `sdpa_weights`: what an `F.scaled_dot_product_attention` call applies,
  softmax(q·kᵀ·scale + mask) with SDPA's exact semantics: a boolean mask
  (True = attend) or an additive float mask, broadcast as SDPA broadcasts it;
  `is_causal` with PyTorch's top-left alignment (query i sees keys j <= i,
  also when L != S), and the `torch.nn.attention.bias` causal variants;
  `scale` (default 1/sqrt(E)); `enable_gqa` (query head h uses key head
  h // (Hq // Hk)). A mask given together with `is_causal` is combined with
  it, as the CPU kernel does. Computed in float32 (float64 for float64
  inputs), returned in the query's dtype, as an eager softmax in the model's
  dtype would give. A query row whose every key is masked gets zero weights:
  PyTorch's kernels give such a row a zero output, where a plain softmax
  would give NaN.
- `multi_head_weights`: what `F.multi_head_attention_forward` (and so
  `nn.MultiheadAttention`) applies, from its inputs and projections.
- `unpack_grouped_query`: transformers' packed single-token GQA layout undone.
- `select_weights`: the same row/head selection applied to weights a model formed.

Selection before computation: `rows=` keeps some query rows and `heads=` some
query heads. Only q[..., heads, rows, :]·kᵀ is formed, so the CLS row of a
DINOv2-size input costs O(N) memory per head, not O(N²). An int keeps its
axis: results are always (..., H, Q, S).
"""

import inspect
import math
import operator
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    NamedTuple,
    Optional,
    Sequence,
    SupportsIndex,
    Tuple,
    Union,
)

import torch
import torch.nn.functional as F
from torch import nn

from . import _torch_internals
from ._errors import VisualizerError
from ._pool import BufferPool

# Whether Dynamo is tracing the caller (always False on torch < 2.3, which lacks the check).
_compiling = _torch_internals.compiling_check()

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

# What `rows=` and `heads=` accept: None (all), an int, a slice or a sequence of ints.
Selection = Optional[Union[SupportsIndex, slice, Iterable[SupportsIndex]]]
# A selection checked by `validate_selection`: None, the slice, or a tuple of ints.
CheckedSelection = Optional[Union[slice, Tuple[int, ...]]]
# SDPA's arguments as `bind_sdpa_arguments` returns them:
# (query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa).
SdpaArguments = Tuple[
    torch.Tensor, torch.Tensor, Optional[torch.Tensor], float, bool, Optional[float], bool
]


class WeightsRequest(NamedTuple):
    """What a caller asks of every weights computation it makes: the query rows and heads to
    keep (as `validate_selection` checked them), its name for error messages, and the pool a
    CPU map takes its memory from (None: fresh memory)."""

    rows: CheckedSelection
    heads: CheckedSelection
    who: str
    pool: Optional[BufferPool] = None

def sdpa_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    rows: Selection = None,
    heads: Selection = None,
    where: str = "the scaled_dot_product_attention call",
    who: str = "sdpa_weights",
) -> torch.Tensor:
    """The attention weights an `F.scaled_dot_product_attention` call applies.

    softmax(q·kᵀ·scale + mask) with SDPA's semantics (see the module
    docstring), for the selected query rows and heads only, computed under
    `torch.no_grad()` in float32 (float64 for float64 inputs).

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E), as given to SDPA.
        attn_mask, is_causal, scale, enable_gqa: as given to SDPA; attn_mask
            may also be a `torch.nn.attention.bias.CausalBias`.
        rows, heads: query rows / query heads to keep: None (all), an int, a
            slice or a sequence of ints. An int keeps its axis.
        where, who: name the call and the caller in error messages.

    Returns:
        (..., Hq', L', S) weights in the query's dtype.

    Example:
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
        >>> sdpa_weights(q, k, rows=0).shape
        torch.Size([1, 2, 1, 5])
    """
    request = WeightsRequest(
        validate_selection(rows, "rows", who), validate_selection(heads, "heads", who), who
    )
    return sdpa_call_weights(query, key, attn_mask, is_causal, scale, enable_gqa, request, where)


def sdpa_call_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    request: WeightsRequest,
    where: str,
) -> torch.Tensor:
    """`sdpa_weights` for a checked `request`; on the CPU the map is computed into the
    request's pool when it has one (a recorder's: see `_attention_weights`). `where` names
    the call in error messages. The map takes no part in autograd: computed without
    grad from detached inputs, also where it is traced into a compiled graph."""
    query, key = query.detach(), key.detach()
    rows, heads, who, pool = request
    if heads is not None and query.dim() < 4:
        raise VisualizerError(
            f"{who}: heads={_describe(heads)} selects on the heads axis of a "
            f"(B, H, L, E) query, but {where} has a {query.dim()}-D query of shape "
            f"{tuple(query.shape)}"
        )
    row_positions = (
        None
        if rows is None
        else _positions(rows, query.shape[-2], "rows", "query rows", where, who, query.device)
    )
    head_positions = (
        None
        if heads is None
        else _positions(
            heads, query.shape[-3], "heads", "query heads", where, who, query.device
        )
    )
    causal_offset: Optional[int] = 0 if is_causal else None
    bias_offset = _torch_internals.causal_bias_offset(attn_mask, query.shape[-2], key.shape[-2])
    if bias_offset is not None:
        causal_offset, attn_mask = bias_offset, None
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        return _attention_weights(
            query,
            key,
            attn_mask,
            causal_offset,
            scale,
            enable_gqa,
            row_positions,
            head_positions,
            pool,
        )


def select_weights(
    weights: torch.Tensor,
    rows: Selection = None,
    heads: Selection = None,
    *,
    where: str = "the attention",
    who: str = "select_weights",
) -> torch.Tensor:
    """The selected query rows and heads of computed weights (..., H, Q, K).

    The same selection `sdpa_weights` makes before computing, applied to
    weights a model already formed (an eager softmax): a view-free copy of
    only the kept rows. An int keeps its axis.

    Example:
        >>> select_weights(torch.rand(2, 3, 5, 5), rows=0, heads=[0, 2]).shape
        torch.Size([2, 2, 1, 5])
    """
    rows = validate_selection(rows, "rows", who)
    heads = validate_selection(heads, "heads", who)
    if heads is not None:
        positions = _positions(
            heads, weights.shape[-3], "heads", "query heads", where, who, weights.device
        )
        weights = weights.index_select(-3, positions)
    if rows is not None:
        positions = _positions(
            rows, weights.shape[-2], "rows", "query rows", where, who, weights.device
        )
        weights = weights.index_select(-2, positions)
    return weights



def bind_sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> SdpaArguments:
    """Bind a call's arguments by SDPA's own signature."""
    return query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    causal_offset: Optional[int],
    scale: Optional[float],
    enable_gqa: bool,
    rows: Optional[torch.Tensor],
    heads: Optional[torch.Tensor],
    pool: Optional[BufferPool],
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) for the selected query rows and heads.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E), broadcastable as in SDPA.
        attn_mask: None, bool (True = attend) or additive float, broadcastable
            to (..., Hq, L, S).
        causal_offset: None, or query i sees keys j <= i + causal_offset.
        rows, heads: int64 index tensors, or None for all.
        pool: where a CPU map takes its memory (None: fresh).

    Returns:
        (..., Hq', L', S) weights in the query's dtype.
    """
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    if scale is None:
        # A head dim of 0 makes every score q·kᵀ 0, whatever the scale: SDPA's
        # 1/sqrt(0) is never applied to a number, so use 1, not a division by zero.
        scale = 1 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    num_rows, num_keys = query.shape[-2], key.shape[-2]
    ndim = max(query.dim(), key.dim(), 0 if attn_mask is None else attn_mask.dim())
    q, k = _with_ndim(query, ndim), _with_ndim(key, ndim)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        # SDPA repeats each key head for Hq // Hk consecutive query heads.
        query_heads = torch.arange(q.shape[-3], device=q.device) if heads is None else heads
        k = k.index_select(-3, query_heads // (q.shape[-3] // k.shape[-3]))
    elif heads is not None:
        k = _select_broadcast(k, -3, heads)
    if heads is not None:
        q = q.index_select(-3, heads)
    if rows is not None:
        q = q.index_select(-2, rows)
    q, k = q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)
    scores_shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], num_keys)
    # `scores` is this function's own tensor: changed in place from here on.
    # For a recorder, on the CPU, it takes the memory of a map cleared from a
    # capture cache where one fits (BufferPool): a map is fresh memory
    # otherwise, whose page faults cost more than computing it. The result is
    # then the pool's to take back when the cache holding it is cleared.
    scores = None
    if pool is not None and q.device.type == "cpu" and compute_dtype == query.dtype:
        scores = pool.empty(scores_shape, compute_dtype)
    if scores is None:
        scores = torch.matmul(q, k)
    else:
        torch.matmul(q, k, out=scores)
    scores.mul_(scale)
    if causal_offset is not None:
        query_positions = torch.arange(num_rows, device=q.device) if rows is None else rows
        key_positions = torch.arange(num_keys, device=q.device)
        allowed = key_positions <= (query_positions + causal_offset)[:, None]
        scores.masked_fill_(~allowed, -math.inf)
    if attn_mask is not None:
        mask = _with_ndim(attn_mask, ndim)
        if heads is not None:
            mask = _select_broadcast(mask, -3, heads)
        if rows is not None:
            mask = _select_broadcast(mask, -2, rows)
        in_place = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        if mask.dtype == torch.bool:
            if in_place:
                scores.masked_fill_(~mask, -math.inf)
            else:  # a mask with more batch entries than q and k
                scores = torch.where(mask, scores, -math.inf)
        elif in_place:
            scores.add_(mask.to(compute_dtype))
        else:
            scores = scores + mask.to(compute_dtype)
    # PyTorch's kernels give a query with every key masked a zero output.
    dead_rows = None
    if attn_mask is not None or causal_offset is not None:
        dead_rows = scores.amax(-1, keepdim=True) == -math.inf
    if scores.device.type == "cpu" and not _compiling():
        # In place: on the CPU a second (L, S) map per head is fresh memory
        # whose page faults cost more than the softmax (CUDA's caching
        # allocator has no such cost). A compiled graph plans its own buffers.
        weights = torch.softmax(scores, dim=-1, out=scores)
    else:
        weights = torch.softmax(scores, dim=-1)
    if dead_rows is not None:
        weights = weights.masked_fill_(dead_rows, 0)
    return weights.to(query.dtype)


# Module attributes that give the number of heads, for a 3-D (B*H, Q, K) softmax.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")


def softmax_probabilities(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any, module: nn.Module
) -> Optional[torch.Tensor]:
    """The (B, H, Q, K) attention a softmax call formed, detached, or None if it is not one.

    A softmax over the last axis of a 4-D tensor is taken as it is; of a 3-D
    (B*H, Q, K) tensor when `module` (the module running) says its number of heads.
    """
    if not isinstance(output, torch.Tensor):
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None or output.dim() not in (3, 4) or dim not in (-1, output.dim() - 1):
        return None
    if output.dim() == 3:
        heads = _head_count(module)
        if heads is None or output.shape[0] % heads:
            return None
        output = output.reshape(output.shape[0] // heads, heads, *output.shape[1:])
    return output.detach()


def _head_count(module: nn.Module) -> Optional[int]:
    """The number of heads a module says it has, or None."""
    for name in _HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _with_ndim(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """`tensor` viewed with leading singleton axes up to `ndim` axes (broadcasting)."""
    return tensor.reshape((1,) * (ndim - tensor.dim()) + tuple(tensor.shape))


def _select_broadcast(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """index_select on `dim`, unless that axis has size 1 and broadcasts."""
    return tensor if tensor.shape[dim] == 1 else tensor.index_select(dim, index)


def validate_selection(
    selection: Selection, argument: str, who: str = "sdpa_capture"
) -> CheckedSelection:
    """`rows=`/`heads=` as given (None, an int, a slice or a sequence of ints), checked.

    Returns None, the slice, or a tuple of ints; raises VisualizerError naming
    `who` and the argument otherwise.
    """
    if selection is None or isinstance(selection, slice):
        return selection
    items = selection if _is_sequence(selection) else (selection,)
    try:
        indices = tuple(_index(item) for item in items)
    except TypeError:
        raise VisualizerError(
            f"{who}: {argument} must be None, an int, a slice or a sequence of ints; "
            f"got {selection!r} ({type(selection).__name__})"
        ) from None
    if not indices:
        raise VisualizerError(
            f"{who}: {argument} must select at least one index; got {selection!r}"
        )
    return indices


def _is_sequence(value: object) -> "TypeGuard[Iterable[Any]]":
    if isinstance(value, (str, bytes)) or getattr(value, "ndim", None) == 0:
        return False
    return hasattr(value, "__iter__")


def _index(item: Any) -> int:
    """`item` as an index; TypeError for anything that is not one, bools included."""
    if isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
        raise TypeError("a bool is not an index")
    return operator.index(item)


def _positions(
    selection: Union[slice, Tuple[int, ...]],
    size: int,
    argument: str,
    axis: str,
    where: str,
    who: str,
    device: torch.device,
) -> torch.Tensor:
    """The selected indices for an axis of `size`, as an int64 tensor on `device`.

    An empty axis (a call with no queries, an input of no tokens) selects
    nothing whatever the selection: the call's entry is empty along it, as the
    call's own output is, instead of the user's call failing."""
    positions: Sequence[int]
    if size == 0:
        positions = []
    elif isinstance(selection, slice):
        positions = range(size)[selection]
        if not positions:
            raise VisualizerError(
                f"{who}: {argument}={_describe(selection)} selects none of the {size} "
                f"{axis} of {where}"
            )
    else:
        outside = [index for index in selection if not -size <= index < size]
        if outside:
            raise VisualizerError(
                f"{who}: {argument}={_describe(selection)} is out of range for the {size} "
                f"{axis} of {where}; expected indices "
                f"in [{-size}, {size}), got {outside}"
            )
        positions = [index % size for index in selection]
    return torch.tensor(positions, dtype=torch.long, device=device)


def _describe(selection: Union[slice, Tuple[int, ...]]) -> str:
    if isinstance(selection, tuple) and len(selection) == 1:
        return repr(selection[0])
    return repr(list(selection) if isinstance(selection, tuple) else selection)


def multi_head_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    in_proj_weight: Optional[torch.Tensor],
    in_proj_bias: Optional[torch.Tensor],
    bias_k: Optional[torch.Tensor],
    add_zero_attn: bool,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    q_proj_weight: Optional[torch.Tensor],
    k_proj_weight: Optional[torch.Tensor],
    static_k: Optional[torch.Tensor],
    request: WeightsRequest,
    where: str,
) -> torch.Tensor:
    """The weights `F.multi_head_attention_forward` applies, as (B, H, L', S).

    Follows that function: sequence-first (L, B, E) inputs (or unbatched
    (L, E)), packed or separate projections, `bias_k` and `add_zero_attn`
    appended keys, boolean masks meaning "masked" (True) or additive float
    masks, `attn_mask` (L, S) or (B*H, L, S), `key_padding_mask` (B, S).
    Unbatched inputs give B = 1.
    """
    with torch.no_grad():
        if query.dim() == 2:
            query, key = query.unsqueeze(1), key.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        length, batch, embed = query.shape
        head_dim = embed // num_heads
        # The call itself ran first, and torch checked there that the weights
        # it uses (packed, or separate) are given.
        if q_proj_weight is None:
            assert in_proj_weight is not None, "packed projections without in_proj_weight"
            q_proj_weight, k_proj_weight, _ = in_proj_weight.chunk(3)
        q_bias, k_bias = (None, None) if in_proj_bias is None else in_proj_bias.chunk(3)[:2]
        q = F.linear(query, q_proj_weight, q_bias)
        q = q.reshape(length, batch, num_heads, head_dim).permute(1, 2, 0, 3)
        if static_k is not None:
            k = static_k.reshape(batch, num_heads, -1, head_dim)
        else:
            assert k_proj_weight is not None, "separate projections without k_proj_weight"
            k = F.linear(key, k_proj_weight, k_bias)
            if bias_k is not None:
                k = torch.cat([k, bias_k.expand(1, batch, embed)])
            k = k.reshape(k.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)
        if add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, num_heads, 1, head_dim)], dim=2)
        keys = k.shape[2]
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.reshape(batch, num_heads, length, -1) if mask.dim() == 3 else mask
            mask = F.pad(mask, (0, keys - mask.shape[-1]))
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).reshape(batch, 1, 1, -1)
            padding = F.pad(padding, (0, keys - padding.shape[-1]))
            mask = padding if mask is None else mask + padding
        return sdpa_call_weights(q, k, mask, False, None, False, request, where)


def functional_multi_head_weights(
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    request: WeightsRequest,
    where: str,
) -> torch.Tensor:
    """`multi_head_weights` of an `F.multi_head_attention_forward(*args, **kwargs)` call."""
    a = _bind_multi_head_arguments(*args, **kwargs)
    separate = a["use_separate_proj_weight"]
    return multi_head_weights(
        a["query"],
        a["key"],
        a["num_heads"],
        a["in_proj_weight"],
        a["in_proj_bias"],
        a["bias_k"],
        a["add_zero_attn"],
        a["key_padding_mask"],
        a["attn_mask"],
        a["q_proj_weight"] if separate else None,
        a["k_proj_weight"] if separate else None,
        a["static_k"],
        request,
        where,
    )


# F.multi_head_attention_forward's parameters in order, and its defaults: read from
# the installed torch, so a call binds by that torch's own signature.
_MULTI_HEAD_PARAMETERS = inspect.signature(F.multi_head_attention_forward).parameters
_MULTI_HEAD_NAMES = tuple(_MULTI_HEAD_PARAMETERS)
_MULTI_HEAD_DEFAULTS = {
    name: parameter.default
    for name, parameter in _MULTI_HEAD_PARAMETERS.items()
    if parameter.default is not inspect.Parameter.empty
}


def _bind_multi_head_arguments(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """A call's arguments by `F.multi_head_attention_forward`'s own signature, by name.

    Plain dict work rather than `inspect.Signature.bind`, so that Dynamo
    traces it inside a compiled graph.
    """
    bound = dict(_MULTI_HEAD_DEFAULTS)
    bound.update(zip(_MULTI_HEAD_NAMES, args))
    bound.update(kwargs)
    return bound


def module_weights(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    request: WeightsRequest,
    where: str,
) -> torch.Tensor:
    """The weights of an `nn.MultiheadAttention` call, from its inputs and projections."""
    if module.batch_first and query.dim() == 3:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    separate = _torch_internals.separate_projections(module)
    return multi_head_weights(
        query,
        key,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        module.bias_k,
        module.add_zero_attn,
        key_padding_mask,
        attn_mask,
        module.q_proj_weight if separate else None,
        module.k_proj_weight if separate else None,
        None,
        request,
        where,
    )


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as F.multi_head_attention_forward reads it: bool True = -inf, float added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def unpack_grouped_query(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    enable_gqa: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """Undo transformers' `pack_gqa`: a decoding step's (B, Hkv, n_rep, E) query.

    transformers runs a single-token step of a grouped-query model as
    (B, Hkv, n_rep, E) queries against (B, Hkv, S, E) keys; query head
    kv * n_rep + r is row r of key head kv. Unpacked, it is (B, H, 1, E) with
    SDPA's `enable_gqa`, so entries are (B, H, 1, S) like every other call.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    kv_heads = getattr(getattr(module, "config", None), "num_key_value_heads", None)
    if (
        not isinstance(groups, int)
        or groups <= 1
        or query.dim() != 4
        or enable_gqa
        or query.shape[1] != kv_heads
        or key.shape[1] != kv_heads
        or query.shape[2] != groups
    ):
        return query, attn_mask, enable_gqa
    batch, _, _, dim = query.shape
    query = query.reshape(batch, kv_heads * groups, 1, dim)
    if (
        isinstance(attn_mask, torch.Tensor)
        and attn_mask.dim() == 4
        and attn_mask.shape[1] == kv_heads
        and attn_mask.shape[2] == groups
    ):
        attn_mask = attn_mask.reshape(attn_mask.shape[0], kv_heads * groups, 1, -1)
    return query, attn_mask, True


