"""Plain PyTorch implementations of both ops, ``pareto_linear`` and ``weight_distances``.

pareto_linear:

* ``reference_pareto_linear``: float64, builds W(γ) per sample explicitly.
  Every kernel and every other implementation is tested against it.
* ``naive_pareto_linear``: what a user would write without this library:
  materialise W(γ) (B copies of it when γ is per sample), then ``F.linear`` /
  ``bmm``. The baseline of the benchmarks.
* ``torch_pareto_linear``: the factored form
  ``x Wᵀ + b + (x V M(γ)ᵀ) Uᵀ`` with one output allocation; never builds an
  (out, in) temporary.

weight_distances (f_k = ‖U M(γ) Vᵀ − D_k‖²_F, see ``pmkernels.weight_distances``):

* ``reference_weight_distances``: float64, builds ΔW = U M Vᵀ explicitly.
* ``naive_weight_distances``: the same in the accumulation dtype (fp32, or
  fp64 for fp64 factors): ΔW (out, in) and each difference ΔW − D_k.
* ``torch_weight_distances``: the factored algebra (r×r Gram matrices and
  projections Uᵀ D_k V); no (out, in) temporary besides D_k V.

All take validated inputs (see ``pmkernels.pareto_linear`` /
``pmkernels.weight_distances``) and are differentiable through plain autograd, except
``torch_pareto_linear``, whose last step has its own (first-order) backward.
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

    The one definition of W(γ): the naive path, ``pmkernels.merged_weight``, ``paretomerge.export`` and
    ``paretomerge.fixed_preference`` all compute it here, so their weights agree bit for bit.
    """
    M = core_matrix(G, pref)
    acc = M.dtype
    UM = U.to(acc) @ M  # (..., out, r): M folded into U first, r×r work only
    Vt = V.to(acc).t()
    # one (out, in) buffer in fp32: the base is copied in and the low-rank product accumulated onto it
    if pref.dim() == 1:
        merged = weight.to(acc, copy=True).addmm_(UM, Vt)
    else:
        merged = weight.to(acc).expand(UM.shape[0], -1, -1).clone().baddbmm_(UM, Vt.expand(UM.shape[0], -1, -1))
    return merged.to(weight.dtype)


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


class _SharedPrefLinear(torch.autograd.Function):
    """y = x Wᵀ + b + (x A) Uᵀ for one shared γ (A = V M(γ)ᵀ, (in, r), built by the caller under autograd).

    Its own backward so that dx = dy W + (dy U) Aᵀ is one buffer (``addmm_`` into dy W) instead of two
    branches that autograd allocates and adds; t = x A (N, r) is saved, not recomputed. First-order only.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, U, A):
        t = x2 @ A  # (N, r)
        y = F.linear(x2, weight, bias)
        y.addmm_(t, U.t())
        ctx.save_for_backward(x2, weight, U, A, t)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, U, A, t = ctx.saved_tensors
        need_x, need_w, need_b, need_u, need_a = ctx.needs_input_grad
        dx = dw = db = dU = dA = None
        dt = dy @ U if (need_x or need_a) else None  # (N, r)
        if need_x:
            dx = (dy @ weight).addmm_(dt, A.t())
        if need_w:
            dw = dy.t() @ x2
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        if need_u:
            dU = (t.t() @ dy).t()  # (rᵀ·big)ᵀ: the layout MKL runs 1.4–1.8× faster at rank 16
        if need_a:
            dA = (dt.t() @ x2).t()
        return dx, dw, db, dU, dA


class _PerSamplePrefLinear(torch.autograd.Function):
    """y = x Wᵀ + b + t Uᵀ with t = x V M_bᵀ for the rows of sample b (M (B, r, r) in fp32, built by the
    caller under autograd from a per-sample γ); x2 (N, in) holds B samples of L rows each (N = B·L).

    Its own backward for the same reasons as ``_SharedPrefLinear``: dx = dy W + (dt M_b) Vᵀ in one buffer
    (autograd would allocate both branches and add them), xv = x V and t saved rather than recomputed, and
    the (d, r) products taken as (rᵀ·big)ᵀ. First-order only.
    """

    @staticmethod
    def forward(ctx, x2, rows_per_sample, weight, bias, U, M, V):
        xv = x2 @ V  # (N, r)
        blocks = (M.shape[0], rows_per_sample, V.shape[1])  # (B, L, r): explicit, B or L may be 0
        t = torch.bmm(xv.to(M.dtype).reshape(blocks), M.transpose(1, 2)).to(x2.dtype).reshape(xv.shape)
        y = F.linear(x2, weight, bias)
        y.addmm_(t, U.t())
        ctx.save_for_backward(x2, weight, U, M, V, xv, t)
        ctx.has_bias, ctx.blocks = bias is not None, blocks
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, U, M, V, xv, t = ctx.saved_tensors
        need_x, _, need_w, need_b, need_u, need_m, need_v = ctx.needs_input_grad
        dx = dw = db = dU = dM = dV = None
        if need_x or need_m or need_v:
            dt = (dy @ U).to(M.dtype).reshape(ctx.blocks)
            if need_m:
                dM = torch.bmm(dt.transpose(1, 2), xv.to(M.dtype).reshape(ctx.blocks))
            if need_x or need_v:
                dxv = torch.bmm(dt, M).to(x2.dtype).reshape(xv.shape)  # (N, r)
                if need_x:
                    dx = (dy @ weight).addmm_(dxv, V.t())
                if need_v:
                    dV = (dxv.t() @ x2).t()
        if need_w:
            dw = dy.t() @ x2
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        if need_u:
            dU = (t.t() @ dy).t()
        return dx, None, dw, db, dU, dM, dV


def torch_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> torch.Tensor:
    """Factored form x Wᵀ + b + t Uᵀ with t = x V M(γ)ᵀ; rank-sized temporaries only.

    One (N, out) allocation: ``F.linear`` writes the base product and ``addmm_`` adds the rank-r
    update into it. A shared γ is folded into V once per call (A = V M(γ)ᵀ: an (in, r) product, in
    fp32, then in x's dtype), so t = x A is one GEMM, and backward writes dx in one buffer
    (``_SharedPrefLinear``). A per-sample γ needs x V (N, r) and one batched (B, L, r)·(B, r, r) product,
    kept in fp32 (``_PerSamplePrefLinear``, whose backward also writes dx in one buffer).
    """
    M = core_matrix(G, pref)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    if pref.dim() == 1:
        A = (V.to(M.dtype) @ M.t()).to(x.dtype)  # (in, r)
        y = _SharedPrefLinear.apply(x2, weight, bias, U, A)
    else:
        y = _PerSamplePrefLinear.apply(x2, math.prod(x.shape[1:-1]), weight, bias, U, M, V)
    return y.reshape(*x.shape[:-1], weight.shape[0])


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


# ---------------------------------------------------------------------------------------- low_rank_distances
# f_k = ‖U M(γ) Vᵀ − A_k B_kᵀ‖²_F (see ``pmkernels.low_rank_distances``).


def reference_low_rank_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor,
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
) -> torch.Tensor:
    """float64 ground truth: D_k = A_k B_kᵀ built explicitly, then ``reference_weight_distances`` -> (K,)."""
    d = torch.float64
    return reference_weight_distances(U, G, V, pref, [a.to(d) @ b.to(d).t() for a, b in zip(A, B)])


def naive_low_rank_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor,
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Baseline: densify every D_k = A_k B_kᵀ (out, in) and build ΔW, in the accumulation dtype."""
    acc = acc_dtype(U)
    return naive_weight_distances(U, G, V, pref, [a.to(acc) @ b.to(acc).t() for a, b in zip(A, B)])


def low_rank_delta_sq(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K,) ‖A_k B_kᵀ‖²_F = ⟨A_kᵀA_k, B_kᵀB_k⟩ (both R_k×R_k and symmetric), in fp32 or wider, no grad."""
    acc = torch.promote_types(A[0].dtype, torch.float32)
    out = []
    for a, b in zip(A, B):
        a, b = a.detach().to(acc), b.detach().to(acc)
        out.append(((a.t() @ a) * (b.t() @ b)).sum())
    return torch.stack(out)


def torch_low_rank_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor,
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], delta_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Factored algebra: ‖U M Vᵀ‖² − 2 ⟨M, (UᵀA_k)(B_kᵀV)⟩ + ‖A_k B_kᵀ‖²; temporaries r×R_k only.

    Plain autograd: the saved tensors are the r×R_k projections and the factors already held.
    """
    acc = acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    Uf, Vf = U.to(acc), V.to(acc)
    # The factors are data (no gradient), like the dense deltas.
    proj = torch.stack([(Uf.t() @ a.detach().to(acc)) @ (b.detach().to(acc).t() @ Vf) for a, b in zip(A, B)])
    if delta_sq is None:
        delta_sq = low_rank_delta_sq(A, B)
    return low_rank_sq(Uf, M, Vf) - 2 * (proj * M).sum((1, 2)) + delta_sq.detach().to(acc)
