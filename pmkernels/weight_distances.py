"""The ``weight_distances`` op: the K data-free objectives of one layer.

    f_k = ‖U M(γ) Vᵀ − D_k‖²_F,   M(γ) = Σ_k γ_k G[:, :, k],   D_k = W_k − W

(W(γ) − W_k = ΔW − D_k when W is the base merge.) Expanding the square:

    f_k = ‖U M Vᵀ‖² − 2 ⟨M, Uᵀ D_k V⟩ + ‖D_k‖²
    ‖U M Vᵀ‖² = tr(Mᵀ (UᵀU) M (VᵀV))

so only r×r Gram matrices and the r×r projections P_k = Uᵀ D_k V are needed:
no (out, in) temporary. Summing over layers is the caller's job.

Gradients (upstream g_k = ∂L/∂f_k, w = Σ_k g_k, A = UᵀU, B = VᵀV):

    ∂L/∂M  = 2 w A M B − 2 Σ_k g_k P_k
    ∂L/∂U  = 2 w U M B Mᵀ − 2 Σ_k g_k (D_k V) Mᵀ
    ∂L/∂V  = 2 w V Mᵀ A M − 2 Σ_k g_k (D_kᵀ U) M
    ∂L/∂G[:, :, k] = γ_k ∂L/∂M,   ∂L/∂γ_k = ⟨∂L/∂M, G_k⟩

The fused impls ("cpp", "triton") split this in two: one pass over the deltas
(``_ProjectionPass``, an autograd Function) reads each delta element once and
returns ‖D_k‖² and P_k, saving the projections Y_k = D_k V (out, r) and
Z_k = D_kᵀ U (in, r) — O((out + in)·r·K) memory — so that its backward,
given ∂L/∂P_k, is  ∂U = Σ_k Y_k (∂P_k)ᵀ,  ∂V = Σ_k Z_k ∂P_k  with no second
read of the deltas. Everything else (M, the Gram term, the ⟨M, P_k⟩
contraction) is r×r-sized and left to autograd.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from ._validation import (
    _check_tensor,
    check_low_rank,
    check_pref_shape,
    check_pref_values,
    check_same_device,
    check_same_dtype,
)
from .reference import core_matrix

Deltas = Union[torch.Tensor, Sequence[torch.Tensor]]
WD_IMPLS = ("auto", "triton", "cpp", "torch", "naive")


def _delta_list(deltas: Deltas, K: int, out_features: int, in_features: int) -> list[torch.Tensor]:
    if isinstance(deltas, torch.Tensor):
        if deltas.dim() != 3 or deltas.shape != (K, out_features, in_features):
            raise ValueError(
                f"deltas must have shape (K, out, in) = ({K}, {out_features}, {in_features}), "
                f"got {tuple(deltas.shape)}"
            )
        return list(deltas.unbind(0))
    if not isinstance(deltas, (list, tuple)):
        raise TypeError(f"deltas must be a (K, out, in) tensor or a sequence of K (out, in) tensors, "
                        f"got {type(deltas).__name__}")
    if len(deltas) != K:
        raise ValueError(f"deltas must hold K = {K} tensors (one per objective), got {len(deltas)}")
    for k, d in enumerate(deltas):
        _check_tensor(f"deltas[{k}]", d)
        if d.shape != (out_features, in_features):
            raise ValueError(f"deltas[{k}] must have shape (out, in) = ({out_features}, {in_features}), "
                             f"got {tuple(d.shape)}")
    return list(deltas)


def check_weight_distances(U, G, V, pref, deltas) -> list[torch.Tensor]:
    """Validate the arguments of ``weight_distances``; return the deltas as a list."""
    _check_tensor("U", U)
    _check_tensor("V", V)
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U must be (out, r) and V (in, r), got {tuple(U.shape)} and {tuple(V.shape)}")
    _, K = check_low_rank(U, G, V, U.shape[0], V.shape[0])
    check_pref_shape(pref, K)
    ds = _delta_list(deltas, K, U.shape[0], V.shape[0])
    check_same_device([("U", U), ("G", G), ("V", V), ("pref", pref)] + [(f"deltas[{k}]", d) for k, d in enumerate(ds)])
    check_same_dtype([("U", U), ("G", G), ("V", V)])
    check_same_dtype([(f"deltas[{k}]", d) for k, d in enumerate(ds)])
    return ds


def _acc_dtype(U: torch.Tensor) -> torch.dtype:
    """float32 (float64 when the factors are float64, e.g. for gradcheck)."""
    return torch.promote_types(U.dtype, torch.float32)


def naive_weight_distances(U, G, V, pref, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Baseline: build ΔW = U M Vᵀ (out, in) and each difference ΔW − D_k."""
    acc = _acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    dW = U.to(acc) @ M @ V.to(acc).t()
    return torch.stack([(dW - d.to(acc)).pow(2).sum() for d in deltas])


def _low_rank_sq(Ua: torch.Tensor, M: torch.Tensor, Va: torch.Tensor) -> torch.Tensor:
    """‖U M Vᵀ‖²_F = ⟨(UᵀU) M (VᵀV), M⟩: r×r work only."""
    return ((Ua.t() @ Ua) @ M @ (Va.t() @ Va) * M).sum()


def torch_weight_distances(U, G, V, pref, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Factored algebra: Gram matrices and r×r projections, one matmul pair per delta."""
    acc = _acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    Uf, Vf = U.to(acc), V.to(acc)
    low_rank_sq = _low_rank_sq(Uf, M, Vf)
    # ‖D_k‖² and Uᵀ D_k V carry no gradient w.r.t. the deltas (they are data).
    proj = torch.stack([Uf.t() @ (d.detach().to(acc) @ Vf) for d in deltas])  # (K, r, r)
    delta_sq = torch.stack([d.detach().to(acc).pow(2).sum() for d in deltas])
    return low_rank_sq - 2 * (proj * M).sum((1, 2)) + delta_sq


# A pass: (deltas, U, V) in the accumulation dtype -> (‖D_k‖² (K,), Y (out, K, r), Z (in, K, r))
# with Y[:, k] = D_k V and Z[:, k] = D_kᵀ U.
PassFn = Callable[[list, torch.Tensor, torch.Tensor], tuple]


class _ProjectionPass(torch.autograd.Function):
    """(U, V, deltas) -> (P (K, r, r) with P_k = Uᵀ D_k V, ‖D_k‖² (K,)) in one pass over the deltas.

    Saves Y_k = D_k V and Z_k = D_kᵀ U; backward: ∂U = Σ_k Y_k ∂P_kᵀ, ∂V = Σ_k Z_k ∂P_k.
    The deltas are data: no gradient flows to them.
    """

    @staticmethod
    def forward(ctx, pass_fn: PassFn, U: torch.Tensor, V: torch.Tensor, *deltas: torch.Tensor):
        sq, Y, Z = pass_fn(list(deltas), U.detach(), V.detach())
        out, K, r = Y.shape
        # P_k = Uᵀ (D_k V), all k in one GEMM: (r, out) @ (out, K r)
        P = (U.detach().t() @ Y.reshape(out, K * r)).reshape(r, K, r).transpose(0, 1)
        ctx.save_for_backward(Y, Z)
        ctx.n_deltas = len(deltas)
        ctx.mark_non_differentiable(sq)
        return P, sq.to(P.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dP: torch.Tensor, dsq: torch.Tensor):
        Y, Z = ctx.saved_tensors
        out, K, r = Y.shape
        # dU[o, a] = Σ_k,b Y[o, k, b] dP[k, a, b];  dV[j, b] = Σ_k,a Z[j, k, a] dP[k, a, b]
        dU = Y.reshape(out, K * r) @ dP.transpose(1, 2).reshape(K * r, r) if ctx.needs_input_grad[1] else None
        dV = Z.reshape(Z.shape[0], K * r) @ dP.reshape(K * r, r) if ctx.needs_input_grad[2] else None
        return (None, dU, dV) + (None,) * ctx.n_deltas


def fused_weight_distances(U, G, V, pref, deltas: list[torch.Tensor], pass_fn: PassFn) -> torch.Tensor:
    """f_k from one fused pass over the deltas (``pass_fn``) plus r×r-sized autograd algebra."""
    acc = _acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    Ua, Va = U.to(acc), V.to(acc)
    P, sq = _ProjectionPass.apply(pass_fn, Ua, Va, *[d.detach() for d in deltas])
    return _low_rank_sq(Ua, M, Va) - 2 * (P * M).sum((1, 2)) + sq


def _cpp_pass(deltas, U, V):
    from .cpp_weight_distances import cpp_pass

    return cpp_pass(deltas, U, V)


def _triton_pass(deltas, U, V):
    from .triton_weight_distances import triton_pass

    sq, Y, Z = triton_pass(deltas, U, V)
    return sq.to(U.dtype), Y.to(U.dtype), Z.to(U.dtype)


def _triton_importable() -> bool:
    try:
        from . import triton_weight_distances  # noqa: F401
    except ImportError:
        return False
    return True


def cpp_available() -> bool:
    """True when the C++ kernel builds and loads (builds it on first call)."""
    from .cpp_weight_distances import available

    return available()


def resolve_wd_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete implementation for tensors on ``device``."""
    if impl not in WD_IMPLS:
        raise ValueError(f"impl must be one of {WD_IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if _triton_importable() else "torch"
        if device.type == "cpu" and cpp_available():
            return "cpp"
        return "torch"
    if impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors on {device}"
            )
        if not _triton_importable():
            raise NotImplementedError("impl='triton' needs triton, which could not be imported; use impl='torch'")
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' needs CPU tensors, got tensors on {device}")
        if not cpp_available():
            from .cpp_weight_distances import build_error

            raise RuntimeError(f"impl='cpp': the C++ kernel could not be built ({build_error()}); use impl='torch'")
    return impl


def weight_distances(U, G, V, pref, deltas: Deltas, *, impl: str = "auto", normalize: bool = False,
                     check_values: bool = True) -> torch.Tensor:
    """f_k = ‖U M(γ) Vᵀ − D_k‖²_F for k = 1..K, as a (K,) float32 tensor.

    U (out, r), G (r, r, K), V (in, r), pref (K,); deltas a (K, out, in)
    tensor or a sequence of K (out, in) tensors (fp32, bf16 or fp16; never
    stacked or copied). Differentiable w.r.t. U, G, V and pref.
    impl: "auto" | "triton" | "cpp" | "torch" | "naive". "auto" is triton on
    CUDA, cpp on CPU when the C++ kernel builds (else torch, with a one-time
    warning). The result is float32 (float64 when U, G, V are float64).
    ``check_values=False`` skips the value checks of pref (they sync with the
    device), as in ``pareto_linear``, for a pref already checked.
    """
    if impl not in WD_IMPLS:
        raise ValueError(f"impl must be one of {WD_IMPLS}, got {impl!r}")
    ds = check_weight_distances(U, G, V, pref, deltas)
    if check_values or normalize:
        pref = check_pref_values(pref, normalize=normalize)
    impl = resolve_wd_impl(impl, U.device)
    if impl == "torch" or U.shape[0] == 0 or V.shape[0] == 0:  # empty layers: nothing to fuse
        return torch_weight_distances(U, G, V, pref, ds)
    if impl == "naive":
        return naive_weight_distances(U, G, V, pref, ds)
    return fused_weight_distances(U, G, V, pref, ds, _cpp_pass if impl == "cpp" else _triton_pass)
