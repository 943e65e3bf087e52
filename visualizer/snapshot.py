"""Copying a captured value into the store: a snapshot later in-place changes cannot alter.

torch is never imported here: a tensor is recognised through `sys.modules`
(it can only exist if its caller imported torch).
"""
import copy
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, FrozenSet, Optional

import numpy as np

from ._arrays import is_torch_tensor
from ._pool import BufferPool
from .policy import NOT_CAPTURED, StoragePolicy

if TYPE_CHECKING:
    import torch

# Values that cannot change after the call: stored as they are.
IMMUTABLE_TYPES: FrozenSet[type] = frozenset(
    {int, float, complex, bool, str, bytes, type(None)})


class Uncapturable(Exception):
    """Raised by snapshot for a value it cannot copy; the recorder stores NOT_CAPTURED."""


def snapshot(
    value: Any,
    policy: StoragePolicy,
    owned: bool = False,
    pool: Optional[BufferPool] = None,
) -> Any:
    """A copy of `value` that later in-place changes to it cannot alter.

    `owned=True` says `value` is a tensor just computed for the record that
    nothing else holds (recomputed attention weights): it is stored without a
    copy wherever the policy allows, since no one can change it. `pool`: where
    copies of large arrays and CPU tensors take warm memory (None: fresh).
    """
    if type(value) in IMMUTABLE_TYPES or isinstance(value, np.generic) or value is NOT_CAPTURED:
        return value
    if is_torch_tensor(value):
        return snapshot_tensor(value, policy, owned, pool)
    if isinstance(value, np.ndarray):
        return np.array(value, dtype=policy.dtype, copy=True)
    if type(value) in (list, tuple):
        return type(value)(snapshot(item, policy, pool=pool) for item in value)
    if type(value) is dict:
        return {key: snapshot(item, policy, pool=pool) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a namedtuple
        return type(value)(*(snapshot(item, policy, pool=pool) for item in value))
    if isinstance(value, dict):
        # OrderedDict, defaultdict, transformers' ModelOutput: a copy of the
        # same type, its items snapshotted (ModelOutput keeps its attributes).
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = snapshot(item, policy, pool=pool)
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copied = copy.copy(value)  # type: ignore[arg-type]  # typeshed: copy(dataclass)
        for field in dataclasses.fields(value):
            # object.__setattr__: frozen dataclasses too.
            item = snapshot(getattr(value, field.name), policy, pool=pool)
            object.__setattr__(copied, field.name, item)
        return copied
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        raise Uncapturable(
            f"a {type(value).__qualname__} module is not copied on every call; capture the "
            "tensors you need from it"
        )
    try:
        return copy.deepcopy(value)
    except Exception as error:
        raise Uncapturable(
            f"a {type(value).__qualname__} cannot be copied ({type(error).__name__}: {error})"
        ) from None


def own_storage(value: Any, policy: StoragePolicy) -> Any:
    """What a ``select`` returned, as it is to be stored: never a view of the whole value.

    Every policy but ``detach=False`` copies a tensor when storing it; that one
    keeps the tensor itself, so a selected row (``a[:, 0]``, a view) would keep
    the whole map's storage alive. It becomes its own contiguous copy, still in
    the autograd graph (``clone`` is differentiable).
    """
    if policy.detach or not is_torch_tensor(value):
        return value
    torch = sys.modules["torch"]
    if value.layout != torch.strided:
        return value
    whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
    if whole and value.is_contiguous():
        return value
    return value.clone(memory_format=torch.contiguous_format)


def snapshot_tensor(
    tensor: "torch.Tensor",
    policy: StoragePolicy,
    owned: bool = False,
    pool: Optional[BufferPool] = None,
) -> Any:
    """A tensor stored as `policy` says: a numpy array, or a tensor kept on its device."""
    torch = sys.modules["torch"]
    dtype = getattr(torch, policy.dtype) if policy.dtype else None
    if pool is not None and owned and (dtype is None or dtype == tensor.dtype) and (
        not tensor.requires_grad
    ):
        # A map computed into the pool's memory (weights.py): stored as the very
        # tensor or array the pool knows, so that clear() recycles it.
        array = pool.array_of(tensor)
        if array is not None:
            return tensor if policy.keep_on_device else array
    if policy.detach:
        tensor = tensor.detach()
    if policy.keep_on_device:
        converting = dtype is not None and dtype != tensor.dtype
        if (
            pool is not None
            and policy.detach
            and (converting or not owned)
            and tensor.device.type == "cpu"
        ):
            lent = pool.lend(tensor, dtype)
            if lent is not None:
                return lent
        if converting:
            return tensor.to(dtype)
        # detach=False is for autograd: the very tensor of the graph is kept.
        return tensor.clone() if policy.detach and not owned else tensor
    if dtype is None and tensor.dtype == torch.bfloat16:
        dtype = torch.float32
    if pool is not None and not owned:
        buffer = pool.take(tensor, dtype)
        if buffer is not None:
            torch.from_numpy(buffer).copy_(tensor.detach())
            return buffer
    # Positional arguments: Tensor.to parses keywords measurably slower.
    if dtype is None:
        return tensor.to("cpu", copy=not owned).numpy()
    return tensor.to("cpu", dtype, copy=not owned).numpy()
