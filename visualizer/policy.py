"""What the cache holds and how: the markers for absent values, and the storage policy.

torch is never imported here: a torch dtype is recognised by its module name.
"""
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Union

import numpy as np

from ._errors import VisualizerError

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

# What `dtype=` of a storage policy accepts: a name such as "float16", a numpy
# dtype or a torch dtype (see `StoragePolicy`).
StorageDType = Union["npt.DTypeLike", "torch.dtype"]


class _Marker:
    """A cache entry that stands for a value that is not there; falsy, one per name."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        # Pickled (gathered from another rank) or copied, it is still the one
        # marker: `value is MISSING` keeps working.
        return self._name


# A name that was not bound when the function returned.
MISSING = _Marker("MISSING")
# A value that could not be stored (an object that cannot be copied, a tensor
# numpy cannot hold): recorded in its place, with a warning, so the call goes on.
NOT_CAPTURED = _Marker("NOT_CAPTURED")

# The dtypes values can be stored in: both numpy and torch have them (bfloat16
# only torch). Others ('object', 'U10', 'float128', complex) would fail inside
# the model's forward, so they are refused when the policy is made.
STORABLE_DTYPES = (
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "bool",
)
_TORCH_ONLY_DTYPES = ("bfloat16",)


class StoragePolicy:
    """How captured values are stored.

    Args:
        keep_on_device: False (default, as the original Visualizer) stores a
            numpy copy on the CPU; True keeps a torch tensor on its device.
        dtype: convert to this dtype when storing (a name such as "float16",
            a torch dtype or a numpy dtype). None keeps the value's dtype,
            except that bfloat16 becomes float32 in numpy, which has no
            bfloat16 (exact: every bfloat16 is a float32).
        max_entries: keep at most this many entries per key, dropping the
            oldest (counted in `dropped`). None keeps all.
        detach: False keeps tensors attached to their autograd graph, not
            copied (for gradient-weighted rollout). Needs keep_on_device=True.
        who: the API the arguments were given to, named in error messages.
    """

    __slots__ = ("keep_on_device", "dtype", "max_entries", "detach")

    def __init__(
        self,
        keep_on_device: bool = False,
        dtype: Any = None,
        max_entries: Optional[int] = None,
        detach: bool = True,
        *,
        who: str = "get_local",
    ) -> None:
        if not isinstance(keep_on_device, bool):
            raise VisualizerError(
                f"{who}: keep_on_device must be True or False; got {keep_on_device!r}"
            )
        if not isinstance(detach, bool):
            raise VisualizerError(f"{who}: detach must be True or False; got {detach!r}")
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
        ):
            raise VisualizerError(
                f"{who}: max_entries must be a positive int or None; got {max_entries!r}"
            )
        if not detach and not keep_on_device:
            raise VisualizerError(
                f"{who}: detach=False keeps the autograd graph, which numpy arrays cannot "
                "hold; expected keep_on_device=True with it, got keep_on_device=False"
            )
        self.keep_on_device = keep_on_device
        self.dtype = dtype_name(dtype, who)
        if self.dtype in _TORCH_ONLY_DTYPES and not keep_on_device:
            raise VisualizerError(
                f"{who}: dtype={self.dtype!r} cannot be stored in numpy; expected "
                "keep_on_device=True with it, or a numpy dtype such as 'float32'"
            )
        self.max_entries = max_entries
        self.detach = detach

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"StoragePolicy({fields})"


def dtype_name(dtype: Any, who: str = "get_local") -> Optional[str]:
    """Normalize a dtype given by name or as a numpy/torch dtype to its name ('float32').

    A string must be one of the names: numpy's type codes ('f4', '<f2', 'd') and
    aliases ('float', 'int', whose size depends on the platform) are refused.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    elif type(dtype).__module__ == "torch":
        name = str(dtype).replace("torch.", "")
    elif isinstance(dtype, (np.dtype, type)):  # np.dtype('<f2'), np.float32
        try:
            name = np.dtype(dtype).name
        except TypeError:
            _refuse_dtype(dtype, who)
    else:
        _refuse_dtype(dtype, who)
    if name not in STORABLE_DTYPES:
        _refuse_dtype(dtype, who)
    return name


def _refuse_dtype(dtype: Any, who: str) -> NoReturn:
    raise VisualizerError(
        f"{who}: dtype must name a dtype numpy and torch can both store, one of "
        f"{list(STORABLE_DTYPES)} (bfloat16 with keep_on_device=True), as a string, "
        f"numpy or torch dtype; got {dtype!r}"
    )
