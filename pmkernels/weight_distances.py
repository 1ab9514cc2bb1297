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

Layout (the same as ``pareto_linear``): this module is the public entry
(validate once, resolve the impl, call it); the plain-PyTorch impls ("torch",
"naive") and the float64 reference live in ``reference.py``; the fused impls
("cpp", "triton") in ``fused_weight_distances.py`` (the torch.library op and
its autograd), whose one pass over the deltas is the C++ kernel
(``cpp_weight_distances.py``, csrc/weight_distances.cpp) or the Triton kernel
(``triton_weight_distances.py``).
"""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import cpp_available, register_op, resolve_impl as _resolve
from ._validation import Deltas, check_pref_values, check_weight_distances

__all__ = ["IMPLS", "cpp_available", "resolve_impl", "weight_distances"]

IMPLS = ("auto", "triton", "cpp", "torch", "naive")
register_op("weight_distances", IMPLS, triton_module="triton_weight_distances", cpp=True)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete ``weight_distances`` implementation for tensors on ``device``.

    "auto" is "triton" on CUDA when triton imports, "cpp" on CPU when the C++ kernel builds, else
    "torch" (rules: ``pmkernels._dispatch``).
    """
    return _resolve("weight_distances", impl, device)


def weight_distances(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: Deltas, *,
                     impl: str = "auto", normalize: bool = False, check_values: bool = True) -> torch.Tensor:
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
    if impl not in IMPLS:  # resolve_impl's check, made before the tensors are checked
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    ds = check_weight_distances(U, G, V, pref, deltas)
    if check_values or normalize:
        pref = check_pref_values(pref, normalize=normalize)
    impl = resolve_impl(impl, U.device)
    if impl == "torch" or U.shape[0] == 0 or V.shape[0] == 0:  # empty layers: nothing to fuse
        return reference.torch_weight_distances(U, G, V, pref, ds)
    if impl == "naive":
        return reference.naive_weight_distances(U, G, V, pref, ds)
    from .fused_weight_distances import fused_weight_distances

    return fused_weight_distances(U, G, V, pref, ds, impl)
