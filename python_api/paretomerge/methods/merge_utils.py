"""Pure tensor helpers shared by the merge methods (PEFT's ``merge_utils`` in spirit): no model logic.

* ``apply_delta``: a deep copy of the pretrained model with θ0 + δ written in.
* ``LayerwiseMerge``: θ_l = θ0_l + Σ_k λ_{l,k} τ_{k,l} from stacked task vectors and a coefficient
  matrix λ (AdaMerging's merged weights; the Pareto trainer's joint AdaMerging uses the same object).
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..pools import ModelPool

__all__ = ["LayerwiseMerge", "acc_dtype", "add_delta", "apply_delta", "check_number", "check_pool", "sum_task_vectors"]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype sums of task vectors accumulate in: float64 for float64 tensors, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_pool(pool) -> None:
    if not isinstance(pool, ModelPool):
        raise TypeError(f"pool must be a ModelPool, got {type(pool).__name__}")


def check_number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


@torch.no_grad()
def apply_delta(pool: ModelPool, delta: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of the pretrained model with θ0 + delta written into its floating tensors."""
    model = copy.deepcopy(pool.pretrained)
    sd = model.state_dict()
    base = pool.pretrained_state()
    for name, d in delta.items():
        sd[name].copy_(add_delta(base[name], d).to(sd[name].dtype))
    return model


def add_delta(base: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """θ0 + δ, added in δ's (accumulation) dtype and returned in θ0's: how every merge writes its result."""
    return (base.to(d.dtype) + d).to(base.dtype)


def sum_task_vectors(total: dict[str, torch.Tensor], tv: Mapping[str, torch.Tensor]) -> None:
    """total += tv per name, in the accumulation dtype (the first task vector of a name is copied)."""
    for n, t in tv.items():
        t = t.to(acc_dtype(t))
        total[n] = t.clone() if n not in total else total[n].add_(t)




class LayerwiseMerge:
    """θ_l = θ0_l + Σ_k clamp(λ_{l,k}, 0, 1) τ_{k,l} for the named tensors l, differentiable w.r.t. λ (L, K).

    names: the L tensor names (in λ's row order); base[n] θ0 (any shape); tau[n] the K task vectors
    of tensor n stacked (K, *shape). ``merged(lam)`` returns {name: merged tensor}.

    The coefficients are clamped to [0, 1] inside the merge, and the raw λ the optimiser updates is kept
    unclamped, as AdaMerging's reference implementation does (``torch.clamp(lambdas_raw, 0, 1)`` in
    its forward); ``bounds=None`` disables the clamp.
    """

    def __init__(self, names: Sequence[str], base: Mapping[str, torch.Tensor],
                 tau: Mapping[str, torch.Tensor], bounds: Optional[tuple[float, float]] = (0.0, 1.0)) -> None:
        self.names = list(names)
        self.bounds = bounds
        self.base = {n: base[n] for n in self.names}
        self.tau = {n: tau[n] for n in self.names}
        self.K = next(iter(self.tau.values())).shape[0] if self.tau else 0

    @classmethod
    def from_pool(cls, pool: ModelPool, names: Sequence[str], device=None) -> "LayerwiseMerge":
        """Stack the K task vectors of ``names`` from ``pool`` (one task at a time)."""
        stacked: dict[str, list] = {n: [] for n in names}
        for k in range(len(pool)):
            tv = pool.task_vector(k, names)
            for n in names:
                stacked[n].append(tv[n])
            del tv
        pre = pool.pretrained_state()
        return cls(names, {n: pre[n].detach().to(device) for n in names},
                   {n: torch.stack(v).to(device) for n, v in stacked.items()})

    def coefficients(self, lam: torch.Tensor) -> torch.Tensor:
        """The effective coefficients (L, K): λ clamped to ``bounds``."""
        return lam if self.bounds is None else lam.clamp(*self.bounds)

    def merged(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        lam = self.coefficients(lam)
        out = {}
        for i, n in enumerate(self.names):
            tau = self.tau[n]
            c = lam[i].to(tau.dtype).view(self.K, *([1] * (tau.dim() - 1)))
            out[n] = self.base[n] + (c * tau).sum(0)
        return out
