"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k. Task vectors are streamed one at a time.

Task vectors the pool holds factored (LoRA adapters, compressed) stay factored: λ Σ_k A_k B_kᵀ is one
factored delta of rank Σ_k R_k (``task_arithmetic_factors``), densified one layer at a time only to be
written into the merged model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..pools import ModelPool
from ..pools.compress import LowRankDelta
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool


def task_arithmetic_factors(pool: ModelPool, lam: float = 0.3,
                            keys: Optional[Sequence[str]] = None) -> dict[str, LowRankDelta]:
    """{key: λ Σ_k A_k B_kᵀ} for the keys factored in every task (default: all such keys), still factored."""
    check_pool(pool)
    lam = check_number(lam, "lam")
    keys = pool.factored_keys() if keys is None else list(keys)
    per_task = [pool.task_factors(k) for k in range(len(pool))]
    return {n: LowRankDelta.combine([f[n] for f in per_task], [lam] * len(pool)) for n in keys}


@torch.no_grad()
def task_arithmetic(pool: ModelPool, lam: float = 0.3) -> nn.Module:
    """θ = θ0 + λ Σ_k τ_k (a new module)."""
    check_pool(pool)
    lam = check_number(lam, "lam")
    factored = set(pool.factored_keys())
    dense_keys = [n for n in pool.float_keys() if n not in factored]
    total: dict[str, torch.Tensor] = {}
    for k in range(len(pool)):
        for n, t in pool.task_vector(k, dense_keys).items():
            t = t.to(acc_dtype(t))
            total[n] = t.clone() if n not in total else total[n].add_(t)
    delta = {n: lam * t for n, t in total.items()}
    for n, f in task_arithmetic_factors(pool, lam, [n for n in pool.float_keys() if n in factored]).items():
        delta[n] = f.dense()
    return apply_delta(pool, delta)
