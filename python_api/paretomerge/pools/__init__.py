"""Model pools: a pretrained model and K fine-tuned copies, read lazily from their sources."""
from .frozen_trunk import prototype_head, trunk_features, trunk_pool
from .pool import ArchitectureMismatchError, ModelPool, check_same_architecture, is_float

__all__ = ["ArchitectureMismatchError", "ModelPool", "check_same_architecture", "is_float", "prototype_head",
           "trunk_features", "trunk_pool"]
