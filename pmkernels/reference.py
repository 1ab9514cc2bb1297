"""Plain PyTorch implementations of ``pareto_linear``.

* ``reference_pareto_linear``: float64, builds W(γ) per sample explicitly.
  Every kernel and every other implementation is tested against it.
* ``naive_pareto_linear``: what a user would write without this library:
  materialise W(γ) (B copies of it when γ is per sample), then ``F.linear`` /
  ``bmm``. The baseline of the benchmarks.
* ``torch_pareto_linear``: the factored form
  ``x Wᵀ + b + ((x V) M(γ)ᵀ) Uᵀ``; never builds an (out, in) temporary.

All take validated inputs (see ``pmkernels.pareto_linear``) and are
differentiable through plain autograd.
"""
from __future__ import annotations

from typing import Optional

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
    """(B, ..., in) -> (B, L, in) with L the product of the middle dims."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


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
