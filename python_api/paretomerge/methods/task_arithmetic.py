"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k. Task vectors are streamed one at a time."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..pools import ModelPool
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool


@torch.no_grad()
def task_arithmetic(pool: ModelPool, lam: float = 0.3) -> nn.Module:
    """θ = θ0 + λ Σ_k τ_k (a new module)."""
    check_pool(pool)
    lam = check_number(lam, "lam")
    total: dict[str, torch.Tensor] = {}
    for k in range(len(pool)):
        for n, t in pool.task_vector(k).items():
            t = t.to(acc_dtype(t))
            total[n] = t.clone() if n not in total else total[n].add_(t)
    return apply_delta(pool, {n: lam * t for n, t in total.items()})
