"""TIES merging (Yadav et al. 2023): trim each τ_k to its top-k fraction of magnitudes, elect a sign
per entry from the sum of the trimmed vectors, take the mean of the entries agreeing with it
(disjoint mean), θ = θ0 + λ·merged. Two passes over the task vectors: memory stays at a few model sizes.

Scope of the trim (and of the majority sign used where the elected sign is 0):

* ``scope="model"`` (default, the original TIES and FusionBench's ``ties_merging``): one threshold over
  the whole flattened task vector, so a layer with small updates may be trimmed away entirely;
* ``scope="tensor"`` (MergeKit's ``ties``, PEFT's ``ties`` on adapter weights): each parameter tensor is
  trimmed to its own top-k fraction. Equal to MergeKit's ``ties`` (``density`` = k, ``weight`` 1,
  ``lambda`` = λ) except on exact magnitude ties, which MergeKit breaks by sort order, and on tensors
  so small that int(k·d) = 0, where MergeKit keeps one entry and PEFT (and this) none.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn

from ..pools import ModelPool
from .merge_utils import acc_dtype, apply_delta, check_number, check_pool

SCOPES = ("model", "tensor")


def _trim_threshold(tensors: Sequence[torch.Tensor], keep: float) -> float:
    """The magnitude of the n_keep-th largest entry of the flattened tensors, n_keep = int(keep·d)
    rounded down as PEFT's ``magnitude_prune`` does (0 keeps nothing: the threshold is then +inf)."""
    flat = torch.cat([t.reshape(-1).abs().to(acc_dtype(t)) for t in tensors]) if tensors else torch.zeros(0)
    d = flat.numel()
    if d == 0:
        return 0.0
    n_keep = int(keep * d)
    if n_keep == 0:
        return float("inf")
    if n_keep >= d:
        return 0.0  # keep everything (including zeros)
    return float(torch.kthvalue(flat, d - n_keep + 1).values)


def _thresholds(tv: dict[str, torch.Tensor], keep: float, scope: str) -> dict[str, float]:
    if scope == "model":
        th = _trim_threshold(list(tv.values()), keep)
        return {n: th for n in tv}
    return {n: _trim_threshold([t], keep) for n, t in tv.items()}


def _sign(total: torch.Tensor) -> torch.Tensor:
    s = torch.sign(total.sum(dtype=torch.float64))
    return s if s != 0 else torch.tensor(1.0, dtype=torch.float64)


@torch.no_grad()
def ties_deltas(task_vector: Callable[[int], dict[str, torch.Tensor]], K: int, keep: float, lam: float,
                scope: str = "model") -> dict[str, torch.Tensor]:
    """The merged TIES delta λ·merged per tensor name; ``task_vector(i)`` gives τ_i (called twice per i,
    so only one task vector is held at a time). Sums accumulate in float32 (float64 for float64 tensors)."""
    # Pass 1: trim thresholds and the summed trimmed vectors (sign election).
    thresholds: list[dict[str, float]] = []
    total: dict[str, torch.Tensor] = {}
    for i in range(K):
        tv = task_vector(i)
        th = _thresholds(tv, keep, scope)
        thresholds.append(th)
        for n, t in tv.items():
            t = t.to(acc_dtype(t))
            tr = torch.where(t.abs() >= th[n], t, torch.zeros_like(t))
            total[n] = tr if n not in total else total[n].add_(tr)
        del tv
    signs = {n: torch.sign(t) for n, t in total.items()}
    # Where the elected sign is 0: the majority sign of the summed vector (the whole model, or this tensor).
    if scope == "model":
        majority = _sign(sum((s.sum(dtype=torch.float64) for s in signs.values()),
                             torch.tensor(0.0, dtype=torch.float64)))
        for s in signs.values():
            s[s == 0] = majority.to(s.dtype)
    else:
        for s in signs.values():
            s[s == 0] = _sign(s).to(s.dtype)
    del total
    # Pass 2: disjoint mean of the trimmed entries agreeing with the elected sign.
    acc: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    cnt: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    for i in range(K):
        tv = task_vector(i)
        for n, t in tv.items():
            t = t.to(acc_dtype(t))
            agree = (t.abs() >= thresholds[i][n]) & (t != 0) & (torch.sign(t) == signs[n])
            acc[n].add_(torch.where(agree, t, torch.zeros_like(t)))
            cnt[n].add_(agree.to(cnt[n].dtype))
        del tv
    return {n: acc[n] / cnt[n].clamp_min(1) * lam for n in acc}  # mean, then λ (MergeKit's order)


def _check_options(k, lam, scope) -> tuple[float, float]:
    keep = check_number(k, "k")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"k (the fraction of entries kept) must be in (0, 1], got {k}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return keep, check_number(lam, "lam")


@torch.no_grad()
def ties_tensor(task_vectors: Sequence[torch.Tensor], *, k: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES with ``scope="tensor"`` on the K task vectors of ONE tensor (same shapes): the merged delta."""
    keep, lam = _check_options(k, lam, "tensor")
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty: TIES needs at least one task vector")
    return ties_deltas(lambda i: {"t": task_vectors[i]}, len(task_vectors), keep, lam, "tensor")["t"]


@torch.no_grad()
def ties_merging(pool: ModelPool, *, k: float = 0.2, lam: float = 1.0,
                 scope: Literal["model", "tensor"] = "model") -> nn.Module:
    """TIES merging (a new module). ``k``: the fraction of each task vector's entries kept
    (largest magnitudes; entries tied with the threshold are kept); ``lam``: scale of the merged vector;
    ``scope``: trim over the whole flattened task vector ("model", default: the paper's TIES) or over
    each tensor separately ("tensor": MergeKit's and PEFT's per-tensor TIES).

    Sign election: sign of Σ_k trimmed τ_k, entries where that sum is exactly 0 take the
    majority sign of the summed vector (of the scope) as the reference implementation does.
    Disjoint mean: mean over the tasks whose trimmed entry is non-zero and has the elected sign.
    """
    check_pool(pool)
    keep, lam = _check_options(k, lam, scope)
    return apply_delta(pool, ties_deltas(pool.task_vector, len(pool), keep, lam, scope))
