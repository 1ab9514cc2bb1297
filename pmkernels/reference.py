"""Plain PyTorch implementations of both ops, ``pareto_linear`` and ``weight_distances``.

pareto_linear:

* ``reference_pareto_linear``: float64, builds W(γ) per sample explicitly.
  Every kernel and every other implementation is tested against it.
* ``naive_pareto_linear``: what a user would write without this library:
  materialise W(γ) (B copies of it when γ is per sample), then ``F.linear`` /
  ``bmm``. The baseline of the benchmarks.
* ``torch_pareto_linear``: the factored form
  ``x Wᵀ + b + ((x V) M(γ)ᵀ) Uᵀ``; never builds an (out, in) temporary.

weight_distances (f_k = ‖U M(γ) Vᵀ − D_k‖²_F, see ``pmkernels.weight_distances``):

* ``reference_weight_distances``: float64, builds ΔW = U M Vᵀ explicitly.
* ``naive_weight_distances``: the same in the accumulation dtype (fp32, or
  fp64 for fp64 factors): ΔW (out, in) and each difference ΔW − D_k.
* ``torch_weight_distances``: the factored algebra (r×r Gram matrices and
  projections Uᵀ D_k V); no (out, in) temporary besides D_k V.

All take validated inputs (see ``pmkernels.pareto_linear`` /
``pmkernels.weight_distances``) and are differentiable through plain autograd.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def core_matrix(G: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """M(γ) = Σ_k γ_k G[:, :, k], in float32 or wider.

    G (r, r, K); pref (K,) -> (r, r), or pref (B, K) -> (B, r, r).
    """
    dtype = torch.promote_types(G.dtype, torch.float32)
    return torch.einsum("...k,ijk->...ij", pref.to(dtype), G.to(dtype))


def merged_weight(
    weight: torch.Tensor, U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor
) -> torch.Tensor:
    """W(γ) = weight + U M(γ) Vᵀ, computed in fp32, returned in weight's dtype.

    weight (out, in), U (out, r), G (r, r, K), V (in, r), pref (K,) -> (out, in);
    pref (B, K) -> (B, out, in).
    """
    M = core_matrix(G, pref)
    acc = M.dtype
    delta = U.to(acc) @ M @ V.to(acc).transpose(-1, -2)
    return (weight.to(acc) + delta).to(weight.dtype)


def _as_batches(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., in) -> (B, L, in) with L the product of the middle dims (explicit: B may be 0)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def reference_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> torch.Tensor:
    """float64 ground truth: y = x W(γ)ᵀ + b with W(γ) built explicitly (per sample if pref is (B, K))."""
    d = torch.float64
    x, weight, U, G, V, pref = (t.to(d) for t in (x, weight, U, G, V, pref))
    bias = None if bias is None else bias.to(d)
    W = merged_weight(weight, U, G, V, pref)
    if pref.dim() == 1:
        return F.linear(x, W, bias)
    y = torch.einsum("bli,boi->blo", _as_batches(x), W)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def naive_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> torch.Tensor:
    """Materialise W(γ) (B of them for a per-sample pref), then F.linear / bmm."""
    W = merged_weight(weight, U, G, V, pref)
    if pref.dim() == 1:
        return F.linear(x, W, bias)
    y = torch.bmm(_as_batches(x), W.transpose(1, 2))
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def torch_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> torch.Tensor:
    """Factored form: F.linear(x, W, b) + ((x V) M(γ)ᵀ) Uᵀ; rank-sized temporaries only.

    The (N, r) intermediates are kept in fp32; the expand runs in x's dtype.
    """
    M = core_matrix(G, pref)
    xv = (x @ V).to(M.dtype)  # (..., r)
    if pref.dim() == 1:
        t = xv @ M.t()
    else:
        t = torch.bmm(_as_batches(xv), M.transpose(1, 2)).reshape(xv.shape)
    return F.linear(x, weight, bias) + t.to(x.dtype) @ U.t()


# ---------------------------------------------------------------------------------------- weight_distances


def acc_dtype(U: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of weight_distances: float32 (float64 when the factors are float64, e.g. gradcheck)."""
    return torch.promote_types(U.dtype, torch.float32)


def reference_weight_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: Sequence[torch.Tensor]
) -> torch.Tensor:
    """float64 ground truth: ΔW = U M(γ) Vᵀ built explicitly, f_k = ‖ΔW − D_k‖²_F -> (K,) float64."""
    d = torch.float64
    M = core_matrix(G.to(d), pref.to(d))
    dW = U.to(d) @ M @ V.to(d).t()
    return torch.stack([(dW - Dk.to(d)).pow(2).sum() for Dk in deltas])


def naive_weight_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Baseline: build ΔW = U M Vᵀ (out, in) and each difference ΔW − D_k, in the accumulation dtype."""
    acc = acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    dW = U.to(acc) @ M @ V.to(acc).t()
    return torch.stack([(dW - d.to(acc)).pow(2).sum() for d in deltas])


def low_rank_sq(Ua: torch.Tensor, M: torch.Tensor, Va: torch.Tensor) -> torch.Tensor:
    """‖U M Vᵀ‖²_F = ⟨(UᵀU) M (VᵀV), M⟩: r×r work only."""
    return ((Ua.t() @ Ua) @ M @ (Va.t() @ Va) * M).sum()


def torch_weight_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Factored algebra: Gram matrices and r×r projections, one matmul pair per delta."""
    acc = acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    Uf, Vf = U.to(acc), V.to(acc)
    # ‖D_k‖² and Uᵀ D_k V carry no gradient w.r.t. the deltas (they are data).
    proj = torch.stack([Uf.t() @ (d.detach().to(acc) @ Vf) for d in deltas])  # (K, r, r)
    delta_sq = torch.stack([d.detach().to(acc).pow(2).sum() for d in deltas])
    return low_rank_sq(Uf, M, Vf) - 2 * (proj * M).sum((1, 2)) + delta_sq
