"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k, or θ0 + Σ_k λ_k τ_k with one λ per task.

Task vectors are streamed one at a time.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from ..pools import ModelPool
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool


@torch.no_grad()
def task_arithmetic(pool: ModelPool, lam: Union[float, Sequence[float]] = 0.3) -> nn.Module:
    """θ = θ0 + λ Σ_k τ_k for a number ``lam``, or θ0 + Σ_k λ_k τ_k for a sequence of K numbers (a new module)."""
    check_pool(pool)
    K = len(pool)
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        scale, per_task = check_number(lam, "lam"), [1.0] * K
    else:
        if isinstance(lam, (str, bytes)) or not hasattr(lam, "__len__") or len(lam) != K:
            raise TypeError(f"lam must be a number or a sequence of K = {K} numbers (one per task), got {lam!r}")
        scale, per_task = 1.0, [check_number(v, f"lam[{k}]") for k, v in enumerate(lam)]
    total: dict[str, torch.Tensor] = {}
    for k in range(K):
        for n, t in pool.task_vector(k).items():
            t = t.to(acc_dtype(t))
            if per_task[k] != 1.0:
                t = per_task[k] * t
            total[n] = t.clone() if n not in total else total[n].add_(t)
    return apply_delta(pool, {n: scale * t for n, t in total.items()})
