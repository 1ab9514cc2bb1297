"""Model pools: a pretrained model and K fine-tuned copies, read lazily from their sources."""
from .pool import ArchitectureMismatchError, ModelPool, check_same_architecture, is_float

__all__ = ["ArchitectureMismatchError", "ModelPool", "check_same_architecture", "is_float"]
