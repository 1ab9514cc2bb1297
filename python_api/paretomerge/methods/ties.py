"""TIES merging (Yadav et al. 2023): trim each τ_k to its top-k fraction of magnitudes, elect a sign
per entry from the sum of the trimmed vectors, take the mean of the entries agreeing with it
(disjoint mean), θ = θ0 + λ·merged. Two passes over the task vectors: memory stays at a few model sizes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..pools import ModelPool
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool


def _trim_threshold(tv: dict[str, torch.Tensor], keep: float) -> float:
    """The magnitude of the n_keep-th largest entry of the flattened task vector, n_keep = int(keep·d)
    rounded down as PEFT's ``magnitude_prune`` does (0 keeps nothing: the threshold is then +inf)."""
    flat = torch.cat([t.reshape(-1).abs().to(acc_dtype(t)) for t in tv.values()]) if tv else torch.zeros(0)
    d = flat.numel()
    if d == 0:
        return 0.0
    n_keep = int(keep * d)
    if n_keep == 0:
        return float("inf")
    if n_keep >= d:
        return 0.0  # keep everything (including zeros)
    return float(torch.kthvalue(flat, d - n_keep + 1).values)


@torch.no_grad()
def ties_merging(pool: ModelPool, *, k: float = 0.2, lam: float = 1.0) -> nn.Module:
    """TIES merging (a new module). ``k``: the fraction of each task vector's entries kept
    (largest magnitudes, threshold over the whole flattened vector; entries tied with the
    threshold are kept); ``lam``: scale of the merged vector.

    Sign election: sign of Σ_k trimmed τ_k, entries where that sum is exactly 0 take the
    majority sign of the whole summed vector (as the reference implementation does).
    Disjoint mean: mean over the tasks whose trimmed entry is non-zero and has the elected sign.
    Two passes over the task vectors: memory stays at a few model sizes.
    """
    check_pool(pool)
    keep = check_number(k, "k")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"k (the fraction of entries kept) must be in (0, 1], got {k}")
    lam = check_number(lam, "lam")
    K = len(pool)
    # Pass 1: trim thresholds and the summed trimmed vectors (sign election).
    thresholds: list[float] = []
    total: dict[str, torch.Tensor] = {}
    for i in range(K):
        tv = pool.task_vector(i)
        th = _trim_threshold(tv, keep)
        thresholds.append(th)
        for n, t in tv.items():
            t = t.to(acc_dtype(t))
            tr = torch.where(t.abs() >= th, t, torch.zeros_like(t))
            total[n] = tr if n not in total else total[n].add_(tr)
        del tv
    signs = {n: torch.sign(t) for n, t in total.items()}
    majority = torch.sign(sum((s.sum() for s in signs.values()), torch.tensor(0.0, dtype=torch.float64)))
    if majority == 0:
        majority = torch.tensor(1.0, dtype=torch.float64)
    for n, s in signs.items():
        s[s == 0] = majority.to(s.dtype)
    del total
    # Pass 2: disjoint mean of the trimmed entries agreeing with the elected sign.
    acc: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    cnt: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    for i in range(K):
        tv = pool.task_vector(i)
        for n, t in tv.items():
            t = t.to(acc_dtype(t))
            agree = (t.abs() >= thresholds[i]) & (t != 0) & (torch.sign(t) == signs[n])
            acc[n].add_(torch.where(agree, t, torch.zeros_like(t)))
            cnt[n].add_(agree.to(cnt[n].dtype))
        del tv
    merged = {n: lam * acc[n] / cnt[n].clamp_min(1) for n in acc}
    return apply_delta(pool, merged)
