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

- exactly SDPA's semantics: a boolean mask (True = attend) or an additive
  float mask, broadcast as SDPA broadcasts it; `is_causal` with PyTorch's
  top-left alignment (query i sees keys j <= i, also when L != S), and the
  `torch.nn.attention.bias` causal variants; `scale` (default 1/sqrt(E));
  `enable_gqa` (query head h uses key head h // (Hq // Hk)). A mask given
  together with `is_causal` is combined with it, as the CPU kernel does.
- weights are computed in float32 (float64 for float64 inputs) and stored in
  the query's dtype, as an eager `softmax` in the model's dtype would give.
- a query row whose every key is masked gets zero weights: PyTorch's kernels
  give such a row a zero output, where a plain softmax would give NaN.
- dropout (`dropout_p > 0`, a module in training): the weights BEFORE dropout
  are recorded, with a warning once per function; the kernel's random
  dropout pattern is not observable. `model.eval()` makes them exact.
- selection before computation: `rows=` keeps some query rows and `heads=`
  some query heads. Only q[..., heads, rows, :]·kᵀ is formed, so the CLS row
  of a DINOv2-size input costs O(N) memory per head, not O(N²). An int keeps
  its axis: entries are always (..., H, Q, S).

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
in eager mode. `get_local('attn')` may stay on that very function: while
sdpa_capture is on, a call that leaves `attn` unbound (it took the fused
path) is left to sdpa_capture instead of being recorded as MISSING, so the
key holds one map per call.

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
Under `torch.compile` the recording runs eagerly between graphs (a graph
break at every SDPA call while capture is on).
"""

import contextlib
import math
import operator
import sys
import threading
import warnings
from types import FrameType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Collection,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    SupportsIndex,
    Tuple,
    Union,
)

import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _torch_version
from ._compat import PY311
from ._errors import VisualizerError
from ._modes import remove_mode
from ._ranks import Ranks, captures_here, validate_ranks
from ._warnings import warn_user
from .cache import BUFFERS, StoragePolicy, snapshot
from .capture import GetLocal, get_local

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

# What `rows=` and `heads=` accept: None (all), an int, a slice or a sequence of ints.
Selection = Optional[Union[SupportsIndex, slice, Iterable[SupportsIndex]]]
# A selection checked by `validate_selection`: None, the slice, or a tuple of ints.
CheckedSelection = Optional[Union[slice, Tuple[int, ...]]]
# What `dtype=` of a storage policy accepts: a name such as "float16", a numpy
# dtype or a torch dtype (see `StoragePolicy`).
StorageDType = Union[npt.DTypeLike, torch.dtype]
# SDPA's arguments as `bind_sdpa_arguments` returns them:
# (query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa).
SdpaArguments = Tuple[
    torch.Tensor, torch.Tensor, Optional[torch.Tensor], float, bool, Optional[float], bool
]

# Frames of these modules (and their submodules) are skipped when naming the
# caller: torch's own (Module.__call__, ...), this module, and transformers'
# attention dispatchers (`sdpa_attention_forward`, ...), through which every
# Hugging Face attention module calls SDPA.
_SKIPPED_MODULES = ("torch", __name__, "transformers.integrations")

if _torch_version.HAS_CAUSAL_BIAS:  # torch>=2.3; older torch has no CausalBias to pass
    from torch.nn.attention.bias import CausalBias, CausalVariant


class SdpaCapture:
    """Records the attention weights of `scaled_dot_product_attention` calls.

    Shares the store (cache, storage policy, key names) of the `GetLocal`
    instance it is made for; the module-level `sdpa_capture` shares
    `get_local`'s, so `get_local.cache` holds both kinds of capture.
    """

    def __init__(self, owner: GetLocal) -> None:
        self._owner = owner
        # torch's mode stack is per thread, so each thread that switches
        # recording on gets its own mode, with its own rows and heads.
        self._threads = threading.local()
        self._modes: Set[_RecordingMode] = set()  # every mode that is on, in any thread
        self._lock = threading.Lock()  # guards _modes
        self._keys: Dict[Tuple[str, str], str] = {}  # (qualified name, module) -> cache key
        self._warned: Set[Tuple[str, str]] = set()

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
        rows = validate_selection(rows, "rows")
        heads = validate_selection(heads, "heads")
        if not captures_here(validate_ranks(ranks, "sdpa_capture"), "sdpa_capture"):
            self._switch_off_here(stacklevel=3)
            return
        mode = getattr(self._threads, "mode", None)
        if mode is not None and mode.on:
            mode.rows, mode.heads = rows, heads
            return
        if mode is not None:  # switched off from another thread: still on our stack
            remove_mode(mode)
        mode = _RecordingMode(self, rows, heads)
        mode.__enter__()
        # While on, get_local leaves fused-path calls of decorated functions to it.
        mode.deferring = self._owner.deferring_to_fused()
        mode.deferring.__enter__()
        self._threads.mode = mode
        with self._lock:
            self._modes.add(mode)

    def deactivate(self) -> None:
        """Stop recording, in every thread; SDPA calls run exactly as without this library.

        Warns if torch functions ran while on but none was
        `F.scaled_dot_product_attention`: nothing was recorded, because the
        code that ran computes its attention another way.
        """
        with self._lock:
            modes, self._modes = self._modes, set()
        for mode in modes:
            self._retire(mode, stacklevel=3)
        self._switch_off_here(stacklevel=3)

    def _switch_off_here(self, stacklevel: int) -> None:
        """Stop recording in this thread only (the end of a capture() block)."""
        mode = getattr(self._threads, "mode", None)
        if mode is None:
            return
        self._threads.mode = None
        remove_mode(mode)
        with self._lock:
            self._modes.discard(mode)
        self._retire(mode, stacklevel + 1)

    def _retire(self, mode: "_RecordingMode", stacklevel: int) -> None:
        """Turn `mode` off (a mode still on another thread's stack passes calls through)."""
        if not mode.on:
            return
        mode.on = False
        if mode.deferring is not None:
            mode.deferring.__exit__(None, None, None)
        if mode.torch_calls and not mode.sdpa_calls:
            warnings.warn(
                f"sdpa_capture: {mode.torch_calls} torch function calls ran while it was on, none "
                "of them F.scaled_dot_product_attention, so nothing was recorded: the code that "
                "ran computes attention another way (an explicit softmax, e.g. a transformers "
                "model loaded with attn_implementation='eager' or timm's fused_attn=False). Use "
                "get_local on its attention function, or visualizer.capture_attention(model), "
                "which captures every implementation",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    @property
    def is_active(self) -> bool:
        """Whether SDPA calls of this thread are being recorded."""
        mode = getattr(self._threads, "mode", None)
        return mode is not None and mode.on

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
        policy = StoragePolicy(keep_on_device, dtype, max_entries)
        rows = validate_selection(rows, "rows")
        heads = validate_selection(heads, "heads")
        here = captures_here(validate_ranks(ranks, "sdpa_capture"), "sdpa_capture")
        was_active = self.is_active
        saved: Optional[Tuple[CheckedSelection, CheckedSelection]] = (
            (self._threads.mode.rows, self._threads.mode.heads) if was_active else None
        )
        try:
            with self._owner.store.scoped(policy) as fresh:
                try:
                    if here:
                        self.activate(rows, heads)
                    else:
                        self._switch_off_here(stacklevel=4)
                    yield fresh
                finally:
                    # Exactly this thread's state on entry, whatever the block switched.
                    if saved is not None:  # it was active
                        self.activate(*saved)
                    else:
                        # Above _switch_off_here: this generator, contextlib's __exit__, the user.
                        self._switch_off_here(stacklevel=4)
        finally:
            self._owner.release_idle_buffers()  # the block was the last capture

    @property
    def cache(self) -> Dict[str, List[Any]]:
        """The shared cache, the same dict as `get_local.cache`."""
        return self._owner.cache

    # -- recording --------------------------------------------------------

    # Under torch.compile the recording runs eagerly, between graphs: Dynamo
    # cannot trace sys._getframe, and the recorded weights are not the graph's.
    @torch.compiler.disable
    def _record(
        self, mode: "_RecordingMode", args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> None:
        mode.sdpa_calls += 1
        query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa = bind_sdpa_arguments(
            *args, **kwargs
        )
        caller = self._caller_key()
        store = self._owner.store
        policy = store.policy
        if dropout_p > 0:
            self._warn_once(
                caller,
                "dropout",
                f"sdpa_capture: {caller} called scaled_dot_product_attention with "
                f"dropout_p={dropout_p}; the recorded weights are the ones BEFORE dropout (the "
                "kernel's random dropout pattern is not observable). Call model.eval() for "
                "weights that are exactly the ones applied",
            )
        if not policy.detach:
            self._warn_once(
                caller,
                "detach",
                f"sdpa_capture: the storage policy has detach=False, but the weights recorded "
                f"for {caller} are recomputed beside the fused kernel and are not part of the "
                "model's autograd graph; they are stored without a graph",
            )
        weights = sdpa_weights(
            query,
            key,
            attn_mask,
            is_causal,
            scale,
            enable_gqa,
            rows=mode.rows,
            heads=mode.heads,
            where=f"the scaled_dot_product_attention call in {caller}",
            who="sdpa_capture",
        )
        store.append(caller, snapshot(weights, policy, owned=True))

    def _caller_key(self) -> str:
        frame: Optional[FrameType] = sys._getframe(1)
        while frame is not None and _is_skipped(frame):
            frame = frame.f_back
        if frame is None:
            return "<unknown>"
        name = (_qualified_name(frame), frame.f_globals.get("__name__", ""))
        key = self._keys.get(name)
        if key is None:
            # get_local's naming: a qualified name taken by a function of
            # another module gets a module-qualified key, with a warning.
            key = self._keys[name] = self._owner.key_for(*name)
        return key

    def _warn_unseen_multi_head_attention(self) -> None:
        caller = self._caller_key()
        self._warn_once(
            caller,
            "multi_head_attention",
            f"sdpa_capture: {caller} ran nn.MultiheadAttention with need_weights=False. Its "
            "scaled_dot_product_attention call happens inside F.multi_head_attention_forward, "
            "itself a torch function, and a TorchFunctionMode sees only the outermost one, so "
            "nothing is recorded for it; call the module with need_weights=True, "
            "average_attn_weights=False to get its weights",
        )

    def _warn_once(self, caller: str, reason: str, message: str) -> None:
        if (caller, reason) in self._warned:
            return
        self._warned.add((caller, reason))
        warn_user(message + " (warned once per function)")


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
    rows = validate_selection(rows, "rows", who)
    heads = validate_selection(heads, "heads", who)
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
    if _torch_version.HAS_CAUSAL_BIAS and isinstance(attn_mask, CausalBias):
        # The bias subclasses stand for a causal mask aligned top-left or
        # bottom-right (the KV-cache convention): query i sees j <= i + offset.
        lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
        causal_offset = key.shape[-2] - query.shape[-2] if lower_right else 0
        attn_mask = None
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        return _attention_weights(
            query, key, attn_mask, causal_offset, scale, enable_gqa, row_positions, head_positions
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


class _RecordingMode(TorchFunctionMode):
    """Runs every torch function as is; hands SDPA calls to the capture after."""

    def __init__(
        self, capture: SdpaCapture, rows: CheckedSelection, heads: CheckedSelection
    ) -> None:
        super().__init__()
        self._capture = capture
        self.rows, self.heads = rows, heads
        # get_local.deferring_to_fused(), entered while on
        self.deferring: Optional[ContextManager[None]] = None
        # False once switched off; a mode left on another thread's stack then
        # passes every call through untouched.
        self.on = True
        # Counted so that switching off can tell "no SDPA ran" from "nothing ran".
        self.torch_calls = 0
        self.sdpa_calls = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        # Dynamo (torch>=2.6) traces this method into compiled graphs: a count
        # it read and changed there would fail its own guard check. Counted
        # eagerly only; SDPA calls are counted in `_record`, which runs eagerly.
        if not _torch_version.is_compiling():
            self.torch_calls += 1
        # The real call first, with the original arguments: the output is the
        # fused kernel's, and an invalid call raises torch's own error. Inside
        # this method torch has taken the mode off the stack, so neither this
        # call nor the recomputation comes back here.
        output = func(*args, **kwargs)
        if not self.on:
            return output
        if func is F.scaled_dot_product_attention:
            self._capture._record(self, args, kwargs)
        elif func is F.multi_head_attention_forward and not kwargs.get("need_weights", True):
            self._capture._warn_unseen_multi_head_attention()
        return output


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
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) for the selected query rows and heads.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E), broadcastable as in SDPA.
        attn_mask: None, bool (True = attend) or additive float, broadcastable
            to (..., Hq, L, S).
        causal_offset: None, or query i sees keys j <= i + causal_offset.
        rows, heads: int64 index tensors, or None for all.

    Returns:
        (..., Hq', L', S) weights in the query's dtype.
    """
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
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
    # On the CPU it takes the memory of a map cleared from a capture cache
    # where one fits (BufferPool): a map is fresh memory otherwise, whose page
    # faults cost more than computing it. The result is then the pool's to
    # take back when the cache holding it is cleared.
    scores = None
    if q.device.type == "cpu" and compute_dtype == query.dtype:
        scores = BUFFERS.empty(torch, scores_shape, compute_dtype)
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
    if scores.device.type == "cpu":
        # In place: on the CPU a second (L, S) map per head is fresh memory
        # whose page faults cost more than the softmax (CUDA's caching
        # allocator has no such cost).
        weights = torch.softmax(scores, dim=-1, out=scores)
    else:
        weights = torch.softmax(scores, dim=-1)
    if dead_rows is not None:
        weights = weights.masked_fill_(dead_rows, 0)
    return weights.to(query.dtype)


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
    """The selected indices for an axis of `size`, as an int64 tensor on `device`."""
    positions: Sequence[int]
    if isinstance(selection, slice):
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


def _is_skipped(frame: FrameType) -> bool:
    if frame.f_code.co_name == "__torch_function__":
        # Another mode or a tensor subclass passing the call on.
        return True
    module = frame.f_globals.get("__name__", "")
    return any(module == name or module.startswith(name + ".") for name in _SKIPPED_MODULES)


def _qualified_name(frame: FrameType) -> str:
    code = frame.f_code
    if PY311:
        # co_qualname is new in 3.11; mypy cannot see the PY311 guard.
        return code.co_qualname  # type: ignore[attr-defined,unused-ignore]
    owner = frame.f_locals.get("self")
    if owner is not None:
        return f"{type(owner).__qualname__}.{code.co_name}"
    return code.co_name


sdpa_capture = SdpaCapture(get_local)
