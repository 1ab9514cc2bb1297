"""The ``pareto_linear`` op: y = x W(γ)ᵀ + b, W(γ) = W + U (Σ_k γ_k G_k) Vᵀ.

This module is the public entry point and the dispatcher between the
implementations (``reference.py`` for plain PyTorch, ``triton_pareto_linear``
for the fused kernels). Validation happens here, once, before any compute.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._dispatch import merge_first_is_faster, register_op, resolve_impl as _resolve, triton_importable
from ._validation import check_merged_weight, check_pareto_linear, check_pref_values

IMPLS = ("auto", "triton", "torch", "naive")
register_op("pareto_linear", IMPLS, triton_module="triton_pareto_linear")


def triton_available() -> bool:
    """True when the fused Triton kernels of ``pareto_linear`` can be imported."""
    return triton_importable("triton_pareto_linear")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete ``pareto_linear`` implementation for tensors on ``device``.

    "auto" is "triton" on CUDA when the kernels import, else "torch" (rules: ``pmkernels._dispatch``).
    """
    return _resolve("pareto_linear", impl, device)


def pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
    *,
    impl: str = "auto",
    normalize: bool = False,
    check_values: bool = True,
) -> torch.Tensor:
    """Linear layer with a preference-conditioned low-rank update.

    Shapes:
        x (..., in), weight (out, in), bias (out,) or None,
        U (out, r), G (r, r, K), V (in, r),
        pref (K,) for one preference, or (B, K) for one per element of x's
        leading dim (B == x.shape[0], x.dim() >= 2).
    Returns (..., out) = x W(γ)ᵀ + bias with W(γ) = weight + U M(γ) Vᵀ and
    M(γ) = Σ_k γ_k G[:, :, k]; in x's dtype, accumulated in fp32.

    x, weight, bias, U, G, V share one floating dtype (fp32, bf16, fp16);
    pref may be any floating dtype and is used in fp32. Rows of pref must be
    non-negative, finite and sum to 1 (±max(1e-3, K·eps of pref's dtype), see
    ``check_pref_values``); ``normalize=True`` divides
    them by their sum instead. ``check_values=False`` skips those value
    checks (they sync with the device) for a pref already validated.

    impl: "torch" (factored, rank-sized temporaries), "naive" (materialises
    W(γ), per sample if needed), "triton" (fused kernels; fp32/bf16/fp16 on
    CUDA, fp32/fp16 under the interpreter, else TypeError), "auto" (Triton on
    CUDA when available, else torch; on CPU "naive" for a shared γ over
    N ≥ c·in·out/(in+out) rows (c = 4 in fp32, 6 in bf16/fp16) when no
    gradient flows into W(γ): measured faster there, see
    ``pmkernels._dispatch.MERGE_FIRST_ROWS``).
    """
    check_pareto_linear(x, weight, bias, U, G, V, pref)
    if check_values or normalize:
        pref = check_pref_values(pref, normalize=normalize)
    auto = impl == "auto"
    impl = resolve_impl(impl, x.device)
    if auto and impl == "torch" and _merge_first(x, weight, U, G, V, pref):
        impl = "naive"
    if impl == "naive":
        return reference.naive_pareto_linear(x, weight, bias, U, G, V, pref)
    if impl == "torch":
        return reference.torch_pareto_linear(x, weight, bias, U, G, V, pref)
    from .triton_pareto_linear import triton_pareto_linear

    return triton_pareto_linear(x, weight, bias, U, G, V, pref)


def _merge_first(x, weight, U, G, V, pref) -> bool:
    """auto on CPU: merge W(γ) first (impl "naive") for a shared γ over enough rows, when no gradient
    would flow into W(γ) (naive's backward would then need the (out, in) product dyᵀx; dx alone is fine)."""
    if x.device.type != "cpu" or pref.dim() != 1:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (weight, U, G, V, pref)):
        return False
    return merge_first_is_faster(x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0], x.dtype)


def merged_weight(
    weight: torch.Tensor, U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor,
    *, normalize: bool = False, check_values: bool = True,
) -> torch.Tensor:
    """W(γ) = weight + U M(γ) Vᵀ for one preference.

    weight (out, in), U (out, r), G (r, r, K), V (in, r), pref (K,) -> (out, in)
    in weight's dtype (computed in fp32). weight, U, G, V share one floating dtype
    (as in ``pareto_linear``); pref may be any floating dtype. ``check_values=False`` skips the
    value checks of an already-validated pref (as in ``pareto_linear``).
    """
    check_merged_weight(weight, U, G, V, pref)
    if check_values or normalize:
        pref = check_pref_values(pref, normalize=normalize)
    return reference.merged_weight(weight, U, G, V, pref)
