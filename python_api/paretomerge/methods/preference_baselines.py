"""The paper's "straightforward" preference-aware baselines: one merge (or one training) per γ.

* ``ta_preference`` (task arithmetic with preference): θ(γ) = θ0 + Σ_k c_k τ_k with
  c_k = λ·K·γ_k, so γ = (1/K, …, 1/K) gives task arithmetic with λ, and γ = e_k gives θ0 + λK τ_k
  (the same total coefficient mass λK, all on task k). Cost per new γ: one merge.
* ``adamerging_preference`` (AdaMerging with preference): layer-wise AdaMerging whose objective is
  the γ-weighted entropy Σ_k K·γ_k H_k (γ uniform gives plain AdaMerging). Cost per new γ: one
  AdaMerging training run.

``weighted_merge`` (θ0 + Σ_k c_k τ_k for a coefficient vector c) is also MAP's merge; ``TaskVectors``
stacks the K task vectors once so that many merges (MAP's samples, a grid of γ) do not re-read the
pool.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..pools import ModelPool
from .adamerging import adamerging
from .merge_utils import LayerwiseMerge, acc_dtype, apply_delta, check_number, check_pool

__all__ = ["TaskVectors", "adamerging_preference", "preference_coefficients", "ta_preference", "weighted_merge"]


def _check_pref(pref, K: int, name: str = "pref") -> list[float]:
    if isinstance(pref, torch.Tensor):
        pref = pref.detach().cpu().reshape(-1).tolist()
    if isinstance(pref, str) or not hasattr(pref, "__len__") or len(pref) != K:
        raise ValueError(f"{name} must be K = {K} numbers on the simplex, got {pref!r}")
    vals = [check_number(v, f"{name}[{k}]") for k, v in enumerate(pref)]
    if any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-4:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {vals}")
    return vals


def preference_coefficients(pref: Sequence[float], lam: float = 0.3) -> list[float]:
    """TA+pref's coefficients c_k = λ·K·γ_k."""
    K = len(pref)
    return [float(lam) * K * float(g) for g in pref]


class TaskVectors:
    """θ0 and the K task vectors of every floating tensor, stacked once: ``merge(c)`` is θ0 + Σ_k c_k τ_k.

    ``merge`` writes into one model copy that it owns and returns it (the next call overwrites it);
    ``new_model(c)`` returns a fresh deep copy.
    """

    def __init__(self, pool: ModelPool) -> None:
        check_pool(pool)
        self.pool = pool
        self.K = len(pool)
        self.names = pool.float_keys()
        self.stack = LayerwiseMerge.from_pool(pool, self.names)
        self._model: Optional[nn.Module] = None

    def state(self, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        if len(coefficients) != self.K:
            raise ValueError(f"coefficients must be K = {self.K} numbers, got {len(coefficients)}")
        c = torch.tensor([float(v) for v in coefficients], dtype=torch.float64)
        return self.stack.merged(c.expand(len(self.names), self.K))

    @torch.no_grad()
    def merge(self, coefficients: Sequence[float]) -> nn.Module:
        if self._model is None:
            self._model = copy.deepcopy(self.pool.pretrained)
        self._write(self._model, coefficients)
        return self._model

    @torch.no_grad()
    def new_model(self, coefficients: Sequence[float]) -> nn.Module:
        model = copy.deepcopy(self.pool.pretrained)
        self._write(model, coefficients)
        return model

    def _write(self, model: nn.Module, coefficients: Sequence[float]) -> None:
        sd = model.state_dict()
        for n, v in self.state(coefficients).items():
            sd[n].copy_(v.to(sd[n].dtype))


@torch.no_grad()
def weighted_merge(pool: ModelPool, coefficients: Sequence[float]) -> nn.Module:
    """θ0 + Σ_k c_k τ_k (a new module); task vectors streamed one at a time, summed in float32/64."""
    check_pool(pool)
    if isinstance(coefficients, str) or len(coefficients) != len(pool):
        raise ValueError(f"coefficients must be K = {len(pool)} numbers, got {coefficients!r}")
    c = [check_number(v, f"coefficients[{k}]") for k, v in enumerate(coefficients)]
    total: dict[str, torch.Tensor] = {}
    for k in range(len(pool)):
        for n, t in pool.task_vector(k).items():
            t = c[k] * t.to(acc_dtype(t))
            total[n] = t if n not in total else total[n].add_(t)
    return apply_delta(pool, total)


def ta_preference(pool: ModelPool, pref: Sequence[float], lam: float = 0.3) -> nn.Module:
    """Task arithmetic with preference γ: θ0 + Σ_k λ·K·γ_k τ_k (a new module)."""
    check_pool(pool)
    lam = check_number(lam, "lam")
    return weighted_merge(pool, preference_coefficients(_check_pref(pref, len(pool)), lam))


def adamerging_preference(pool: ModelPool, pref: Sequence[float],
                          logits_fn: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
                          unlabeled: Sequence[Sequence[torch.Tensor]], **options) -> nn.Module:
    """AdaMerging trained on the γ-weighted entropy Σ_k K·γ_k H_k (a new module; one training per γ).
    ``options`` are ``adamerging``'s (steps, lr, init_lam, seed)."""
    check_pool(pool)
    K = len(pool)
    weights = [K * g for g in _check_pref(pref, K)]
    return adamerging(pool, logits_fn, unlabeled, task_weights=weights, **options)
