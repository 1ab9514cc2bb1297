"""The ``weight_distances`` op: the K data-free objectives of one layer.

    f_k = ‖U M(γ) Vᵀ − D_k‖²_F,   M(γ) = Σ_k γ_k G[:, :, k],   D_k = W_k − W

(W(γ) − W_k = ΔW − D_k when W is the base merge.) Expanding the square:

    f_k = ‖U M Vᵀ‖² − 2 ⟨M, Uᵀ D_k V⟩ + ‖D_k‖²
    ‖U M Vᵀ‖² = tr(Mᵀ (UᵀU) M (VᵀV))

so only r×r Gram matrices and the r×r projections Uᵀ D_k V are needed: no
(out, in) temporary. Summing over layers is the caller's job.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

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


def naive_weight_distances(U, G, V, pref, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Baseline: build ΔW = U M Vᵀ (out, in) and each difference ΔW − D_k."""
    M = core_matrix(G, pref)
    dW = U.float() @ M @ V.float().t()
    return torch.stack([(dW - d.float()).pow(2).sum() for d in deltas])


def torch_weight_distances(U, G, V, pref, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Factored algebra: Gram matrices and r×r projections, one matmul pair per delta."""
    M = core_matrix(G, pref)
    Uf, Vf = U.float(), V.float()
    low_rank_sq = ((Uf.t() @ Uf) @ M @ (Vf.t() @ Vf) * M).sum()
    # ‖D_k‖² and Uᵀ D_k V carry no gradient w.r.t. the deltas (they are data).
    proj = torch.stack([Uf.t() @ (d.float() @ Vf) for d in deltas])  # (K, r, r)
    delta_sq = torch.stack([d.detach().float().pow(2).sum() for d in deltas])
    return low_rank_sq - 2 * (proj * M).sum((1, 2)) + delta_sq


def weight_distances(U, G, V, pref, deltas: Deltas, *, impl: str = "auto", normalize: bool = False) -> torch.Tensor:
    """f_k = ‖U M(γ) Vᵀ − D_k‖²_F for k = 1..K, as a (K,) float32 tensor.

    U (out, r), G (r, r, K), V (in, r), pref (K,); deltas a (K, out, in)
    tensor or a sequence of K (out, in) tensors (fp32, bf16 or fp16; never
    stacked or copied). Differentiable w.r.t. U, G, V and pref.
    impl: "auto" | "triton" | "cpp" | "torch" | "naive".
    """
    if impl not in WD_IMPLS:
        raise ValueError(f"impl must be one of {WD_IMPLS}, got {impl!r}")
    ds = check_weight_distances(U, G, V, pref, deltas)
    pref = check_pref_values(pref, normalize=normalize)
    if impl in ("auto", "torch"):
        return torch_weight_distances(U, G, V, pref, ds)
    if impl == "naive":
        return naive_weight_distances(U, G, V, pref, ds)
    raise NotImplementedError(f"impl={impl!r} for weight_distances is not built yet; use impl='torch'")
