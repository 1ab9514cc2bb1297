"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k, or θ0 + Σ_k λ_k τ_k with one λ per task.

Task vectors are streamed one at a time. Task vectors the pool holds factored (LoRA adapters,
compressed) stay factored: Σ_k λ_k A_k B_kᵀ is one factored delta of rank Σ_k R_k
(``task_arithmetic_factors``), densified one layer at a time only to be written into the merged model.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..pools import ModelPool
from ..pools.compress import LowRankDelta
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool


def task_arithmetic_factors(pool: ModelPool, lam: Union[float, Sequence[float]] = 0.3,
                            keys: Optional[Sequence[str]] = None) -> dict[str, LowRankDelta]:
    """{key: Σ_k λ_k A_k B_kᵀ} (λ one number or one per task) for the keys factored in every task (default:
    all such keys), still factored."""
    check_pool(pool)
    K = len(pool)
    lams = [lam] * K if isinstance(lam, (int, float)) and not isinstance(lam, bool) else list(lam)
    if len(lams) != K:
        raise TypeError(f"lam must be a number or a sequence of K = {K} numbers (one per task), got {lam!r}")
    lams = [check_number(v, "lam") for v in lams]
    keys = pool.factored_keys() if keys is None else list(keys)
    per_task = [pool.task_factors(k) for k in range(K)]
    return {n: LowRankDelta.combine([f[n] for f in per_task], lams) for n in keys}


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
    factored = set(pool.factored_keys())
    dense_keys = [n for n in pool.float_keys() if n not in factored]
    total: dict[str, torch.Tensor] = {}
    for k in range(K):
        for n, t in pool.task_vector(k, dense_keys).items():
            t = t.to(acc_dtype(t))
            if per_task[k] != 1.0:
                t = per_task[k] * t
            total[n] = t.clone() if n not in total else total[n].add_(t)
    delta = {n: scale * t for n, t in total.items()}
    lams = [scale * p for p in per_task]
    for n, f in task_arithmetic_factors(pool, lams, [n for n in pool.float_keys() if n in factored]).items():
        delta[n] = f.dense()
    return apply_delta(pool, delta)
