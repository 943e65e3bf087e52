"""Capture named local variables (attention maps) from deep inside PyTorch models."""
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
]
