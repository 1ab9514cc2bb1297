"""One format for unlabeled data, shared by AdaMerging and Pareto Merging's trainer: ``unlabeled[k]`` is task k's
inputs, either one tensor (N, ...) or a list of input batches (each (B_k, ...)). Each method converts to what it
iterates over: the trainer draws random batches from one tensor, AdaMerging walks over batches."""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["Unlabeled", "as_batches", "as_tensor"]

Unlabeled = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_batches(data, k: int) -> list[torch.Tensor]:
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise ValueError(f"unlabeled[{k}] must hold at least one input batch, got an empty sequence")
    if isinstance(data, (list, tuple)) and all(isinstance(b, torch.Tensor) for b in data):
        return list(data)
    raise TypeError(f"unlabeled[{k}] must be a tensor of inputs or a non-empty list of input batches, got "
                    f"{type(data).__name__}")


def as_tensor(data: Unlabeled, k: int) -> torch.Tensor:
    """Task k's inputs as one tensor (N, ...): a tensor as is, a list of batches concatenated."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"unlabeled[{k}] must hold at least one input (N, ...), got shape {tuple(data.shape)}")
        return data
    return torch.cat(_check_batches(data, k), 0)


def as_batches(data: Unlabeled, k: int, batch_size: int) -> list[torch.Tensor]:
    """Task k's inputs as a list of batches: a list as is, a tensor cut into ``batch_size`` rows per batch."""
    if isinstance(data, torch.Tensor):
        x = as_tensor(data, k)
        return [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]
    return _check_batches(data, k)
