"""The ``low_rank_distances`` op: the K data-free objectives of one layer with low-rank deltas.

    f_k = ‖U M(γ) Vᵀ − A_k B_kᵀ‖²_F,   M(γ) = Σ_k γ_k G[:, :, k]

the factored twin of ``weight_distances`` for deltas held as D_k ≈ A_k B_kᵀ
(A_k out×R_k, B_k in×R_k: compressed task vectors, LoRA adapters). Expanding:

    f_k = tr(Mᵀ (UᵀU) M (VᵀV)) − 2 ⟨M, (Uᵀ A_k)(B_kᵀ V)⟩ + ‖A_k B_kᵀ‖²

with ‖A_k B_kᵀ‖² = ⟨A_kᵀA_k, B_kᵀB_k⟩ a constant the caller can compute
once (``low_rank_delta_sq``) and pass as ``delta_sq``. Time
O(K (out + in) r R), temporaries r×R: no (out, in) tensor anywhere. At full
rank (A_k B_kᵀ = D_k exactly) it equals ``weight_distances``.

Gradients reach U, G, V and pref through plain autograd of the factored
algebra (its saved tensors are the r×R projections); A, B and delta_sq are
data and get none. Layout as ``weight_distances``: checks in ``_validation``,
the implementations ("torch": factored, "naive": densify every D_k) and the
float64 reference in ``reference.py``. No fused kernel: the work is two thin
GEMMs per task, which the BLAS already runs at full speed.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._dispatch import register_op, resolve_impl as _resolve
from ._validation import (Deltas, check_delta_sq_values, check_low_rank_delta_sq, check_low_rank_distances,
                          check_pref_values)

__all__ = ["IMPLS", "low_rank_delta_sq", "low_rank_distances", "resolve_impl"]

IMPLS = ("auto", "torch", "naive")
register_op("low_rank_distances", IMPLS)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete ``low_rank_distances`` implementation ("auto" is "torch"; rules:
    ``pmkernels._dispatch``)."""
    return _resolve("low_rank_distances", impl, device)


def low_rank_delta_sq(A: Deltas, B: Deltas) -> torch.Tensor:
    """(K,) ‖A_k B_kᵀ‖²_F, float32 (float64 for float64 factors): the constant term, computed once.

    A: K (out, R_k) tensors or (K, out, R); B: K (in, R_k) tensors or (K, in, R).
    """
    As, Bs = check_low_rank_delta_sq(A, B)
    return reference.low_rank_delta_sq(As, Bs)


def low_rank_distances(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, A: Deltas,
                       B: Deltas, *, delta_sq: Optional[torch.Tensor] = None, impl: str = "auto",
                       normalize: bool = False, check_values: bool = True) -> torch.Tensor:
    """f_k = ‖U M(γ) Vᵀ − A_k B_kᵀ‖²_F for k = 1..K, as a (K,) float32 tensor.

    U (out, r), G (r, r, K), V (in, r), pref (K,); A: K (out, R_k) tensors or
    (K, out, R); B: K (in, R_k) tensors or (K, in, R) (R_k may differ per task
    and from r). delta_sq: optional (K,) ‖A_k B_kᵀ‖² from ``low_rank_delta_sq``
    (computed here when None). Differentiable w.r.t. U, G, V and pref.
    impl: "auto" (= "torch") | "torch" | "naive". The result is float32
    (float64 when U, G, V are float64). ``check_values=False`` skips pref's
    and delta_sq's value checks (host syncs), as in ``weight_distances``: delta_sq must be finite,
    >= 0, and 0 only for a zero A_k B_kᵀ.
    """
    As, Bs = check_low_rank_distances(U, G, V, pref, A, B, delta_sq)
    impl = resolve_impl(impl, U.device)
    if check_values or normalize:
        pref = check_pref_values(pref, normalize=normalize)
    if check_values and delta_sq is not None:
        check_delta_sq_values(delta_sq, As, Bs)
    if impl == "naive":
        return reference.naive_low_rank_distances(U, G, V, pref, As, Bs)
    return reference.torch_low_rank_distances(U, G, V, pref, As, Bs, delta_sq)
