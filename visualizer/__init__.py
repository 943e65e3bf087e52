"""Capture named local variables (attention maps) from deep inside PyTorch models."""
from ._errors import VisualizerError

__all__ = ["VisualizerError"]
