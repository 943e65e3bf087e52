"""Capture named local variables (attention maps) from deep inside PyTorch models.

`analysis` (numbers from maps) and `plot` (figures) are submodules:
`from visualizer import analysis, plot`.

The layers, data flowing down (tests/core/test_layers.py holds each module to them):

    capture (get_local)   fused (sdpa_capture)   attention (capture_attention)
         |  function level: _rewrite   |  weights, _modes   |  model level: maps
         v                             v                    v
    store (Scope, BoundedEntries, fast sinks) <- snapshot <- policy, _pool   files
         |
         v
    geometry -> analysis -> plot, explorer          (_torch_internals, _compat: gates)
"""
from typing import TYPE_CHECKING, Any

from ._environment import switch_on_from_environment
from ._errors import VisualizerError
from .capture import get_local
from .files import load_cache, save_cache
from .policy import MISSING, NOT_CAPTURED, StoragePolicy

if TYPE_CHECKING:
    # What __getattr__ imports on first use, for type checkers (torch is not
    # imported at runtime here).
    from .attention import AttentionRecorder, capture_attention
    from .distributed import all_gather, gather
    from .explorer import explore
    from .fused import sdpa_capture
    from .maps import AttentionMaps

__all__ = [
    "AttentionMaps",
    "AttentionRecorder",
    "MISSING",
    "NOT_CAPTURED",
    "StoragePolicy",
    "VisualizerError",
    "all_gather",
    "capture_attention",
    "explore",
    "gather",
    "get_local",
    "load_cache",
    "save_cache",
    "sdpa_capture",
]


def __getattr__(name: str) -> Any:
    # Fused and model-level capture need torch; they are imported on first use
    # so that `import visualizer` works on Pythons without torch.
    if name == "sdpa_capture":
        from .fused import sdpa_capture

        return sdpa_capture
    if name in ("capture_attention", "AttentionRecorder"):
        from . import attention

        return getattr(attention, name)
    if name == "AttentionMaps":
        from .maps import AttentionMaps

        return AttentionMaps
    if name in ("gather", "all_gather"):
        from . import distributed

        return getattr(distributed, name)
    if name == "explore":
        from .explorer import explore

        return explore
    raise AttributeError(f"module 'visualizer' has no attribute {name!r}")


# VISUALIZER_CAPTURE=1 switches capture on in every process that imports the
# library, torchrun workers and spawned children included (see _environment).
switch_on_from_environment(get_local)
