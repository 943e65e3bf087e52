"""Capture named local variables (attention maps) from deep inside PyTorch models.

`analysis` (numbers from maps) and `plot` (figures) are submodules:
`from visualizer import analysis, plot`.
"""
from ._errors import VisualizerError
from .cache import MISSING, StoragePolicy, load_cache, save_cache
from .capture import get_local

__all__ = [
    "MISSING",
    "StoragePolicy",
    "VisualizerError",
    "get_local",
    "load_cache",
    "save_cache",
    "sdpa_capture",
]


def __getattr__(name):
    # The fused-attention capture needs torch; it is imported on first use so
    # that `import visualizer` works on Pythons without torch.
    if name == "sdpa_capture":
        from .fused import sdpa_capture

        return sdpa_capture
    raise AttributeError(f"module 'visualizer' has no attribute {name!r}")
