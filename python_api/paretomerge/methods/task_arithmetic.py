"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k. Task vectors are streamed one at a time."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..pools import ModelPool
from .merge_utils import apply_delta, check_number, check_pool, sum_task_vectors


@torch.no_grad()
def task_arithmetic(pool: ModelPool, lam: float = 0.3) -> nn.Module:
    """θ = θ0 + λ Σ_k τ_k (a new module)."""
    check_pool(pool)
    lam = check_number(lam, "lam")
    total: dict[str, torch.Tensor] = {}
    for k in range(len(pool)):
        sum_task_vectors(total, pool.task_vector(k))
    return apply_delta(pool, {n: lam * t for n, t in total.items()})
