"""Structure variants of the preference-conditioned update, all as constrained cores G of the one op.

Every Pareto layer computes W(γ) = W + U M(γ) Vᵀ with M(γ) = Σ_k γ_k G[:, :, k] (``pmkernels``'
kernels, unchanged). The related methods the paper compares are the same op with some entries of
G fixed (or tied), so they are served, trained and exported by the same code:

* ``tensor`` (Pareto Merging): G free, r²K core entries.
* ``lora_sum`` (PaLoRA / Pareto low-rank manifolds: Σ_k γ_k U_k V_kᵀ): the rank r is split in K
  blocks of b = r / K columns (U_k = U[:, block k], V_k = V[:, block k]); G[:, :, k] is zero
  outside its k-th diagonal block B_k (b×b, trainable), so W(γ) = W + Σ_k γ_k U_k B_k V_kᵀ.
  (With B_k = I this is exactly U blockdiag(γ_1 I, …, γ_K I) Vᵀ; a free B_k adds no expressivity —
  it folds into U_k — and keeps the init of the tensor variant.) Needs r divisible by K.
* ``diag`` (Panacea: SVD-LoRA whose last K singular values are the preference): M(γ) =
  diag(σ_1, …, σ_{r−K}, s γ_1, …, s γ_K), i.e. G[:, :, k] = diag(σ, s e_k): off-diagonal entries
  fixed at 0; the first r − K diagonal entries σ are one vector shared by every k (Σ_k γ_k = 1 makes
  Σ_k γ_k σ = σ) — tied by giving every k the summed gradient; the preference part is fixed at
  s = 1 (Panacea learns a per-layer scale s; U's last K columns absorb it). Needs r ≥ K.

Parameter budget: every variant has the same U (out×r) and V (in×r), which dominate the count
((out + in)·r against at most r²K core entries); the trainable core entries are r²K (tensor),
r²/K (lora_sum) and r − K (diag). ``trainable_count`` reports the exact number.

How the constraint is kept (no kernel changes): ``apply_structure`` projects every G onto the
constraint set (fixed entries set, tied entries averaged), registers a gradient hook on G that
zeroes the fixed entries' gradient and sums the tied ones', and an optimizer step post-hook that
projects again (a no-op under plain Adam; it undoes weight decay on fixed entries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ...config import STRUCTURES
from ...layers import factored_weights

__all__ = ["STRUCTURES", "StructureConstraint", "apply_structure", "closed_form_delta", "trainable_count"]


@dataclass
class StructureConstraint:
    """The constraint of one core G (r, r, K): entries where ``free`` are trained; the others equal
    ``value``; for ``diag`` the first r − K diagonal entries are tied across k (``tied``)."""

    structure: str
    free: torch.Tensor    # (r, r, K) bool
    value: torch.Tensor   # (r, r, K) the fixed entries' values (ignored where free)
    tied: Optional[torch.Tensor] = None  # (r, r) bool: entries shared by every k

    def project_(self, G: torch.Tensor) -> None:
        with torch.no_grad():
            if self.tied is not None:
                shared = G[self.tied].mean(-1, keepdim=True)  # (n_tied, 1)
                G[self.tied] = shared.expand(-1, G.shape[-1]).to(G.dtype)
            G.copy_(torch.where(self.free.to(G.device), G, self.value.to(G.device, G.dtype)))

    def grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad * self.free.to(grad.device, grad.dtype)
        if self.tied is not None:
            grad = grad.clone()
            grad[self.tied] = grad[self.tied].sum(-1, keepdim=True).expand(-1, grad.shape[-1])
        return grad


def constraint_for(structure: str, r: int, K: int, layer: str = "") -> StructureConstraint:
    """The constraint of ``structure`` for a core of rank r with K objectives."""
    where = f" (layer {layer})" if layer else ""
    if structure == "tensor":
        return StructureConstraint(structure, torch.ones(r, r, K, dtype=torch.bool), torch.zeros(r, r, K))
    if structure == "lora_sum":
        if r % K:
            raise ValueError(f"trainer.structure: 'lora_sum' splits the rank into K = {K} equal blocks; rank "
                             f"{r}{where} is not divisible by {K} (set trainer.rank to a multiple of K)")
        b = r // K
        free = torch.zeros(r, r, K, dtype=torch.bool)
        for k in range(K):
            free[k * b:(k + 1) * b, k * b:(k + 1) * b, k] = True
        return StructureConstraint(structure, free, torch.zeros(r, r, K))
    if structure == "diag":
        if r < K:
            raise ValueError(f"trainer.structure: 'diag' needs rank >= K = {K} (K preference singular values); "
                             f"got rank {r}{where}")
        n = r - K
        free = torch.zeros(r, r, K, dtype=torch.bool)
        value = torch.zeros(r, r, K)
        idx = torch.arange(n)
        free[idx, idx, :] = True
        for k in range(K):
            value[n + k, n + k, k] = 1.0  # the preference part s·e_k, s fixed at 1
        tied = torch.zeros(r, r, dtype=torch.bool)
        tied[idx, idx] = True
        return StructureConstraint(structure, free, value, tied)
    raise ValueError(f"trainer.structure must be one of {STRUCTURES}, got {structure!r}")


def apply_structure(model: nn.Module, structure: str, optimizer: Optional[torch.optim.Optimizer] = None
                    ) -> list[StructureConstraint]:
    """Constrain every Pareto layer's core G of ``model`` to ``structure`` (in place; see the module doc).

    Projects each G, registers the masked-gradient hook and, with ``optimizer``, a step post-hook that
    projects again. ``"tensor"`` changes nothing (no hooks). Returns one constraint per factored weight.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"trainer.structure must be one of {STRUCTURES}, got {structure!r}")
    if structure == "tensor":
        return []
    out: list[StructureConstraint] = []
    seen: set[int] = set()
    pairs = []
    for key, _U, G, _V, _W in factored_weights(model):
        if id(G) in seen:
            continue
        seen.add(id(G))
        c = constraint_for(structure, G.shape[0], G.shape[-1], key)
        out.append(c)
        pairs.append((G, c))
    for G, c in pairs:
        c.project_(G.data)
        G.register_hook(c.grad_hook)
    if optimizer is not None:
        def project_all(*_args) -> None:
            for G, c in pairs:
                c.project_(G.data)
        optimizer.register_step_post_hook(project_all)
    return out


def trainable_count(model: nn.Module, structure: str) -> int:
    """Trainable entries of the factors (U, V, and G's free entries, tied ones counted once)."""
    total, seen = 0, set()
    for key, U, G, V, _W in factored_weights(model):
        for p in (U, V):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        if id(G) not in seen:
            seen.add(id(G))
            c = constraint_for(structure, G.shape[0], G.shape[-1], key)
            free = int(c.free.sum())
            if c.tied is not None:
                free -= int(c.tied.sum()) * (G.shape[-1] - 1)
            total += free
    return total


def closed_form_delta(structure: str, U: torch.Tensor, G: torch.Tensor, V: torch.Tensor,
                      pref: torch.Tensor) -> torch.Tensor:
    """ΔW(γ) (out, in) of a constrained core written the way the cited work writes it (for tests).

    lora_sum: Σ_k γ_k U_k B_k V_kᵀ; diag: U diag(σ, γ) Vᵀ; tensor: U (Σ_k γ_k G_k) Vᵀ.
    """
    r, K = G.shape[0], G.shape[-1]
    if structure == "tensor":
        return U @ torch.einsum("ijk,k->ij", G, pref.to(G.dtype)) @ V.T
    if structure == "lora_sum":
        b = r // K
        return sum(pref[k] * U[:, k * b:(k + 1) * b] @ G[k * b:(k + 1) * b, k * b:(k + 1) * b, k]
                   @ V[:, k * b:(k + 1) * b].T for k in range(K))
    if structure == "diag":
        sigma = torch.diagonal(G[:, :, 0])[: r - K]
        return U @ torch.diag(torch.cat([sigma, pref.to(G.dtype)])) @ V.T
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
