"""Fused implementation of ``weight_distances`` (impl="cpp" and impl="triton").

The objectives split in two (maths: ``pmkernels.weight_distances``):

* one pass over the deltas, the only O(out·in·K) work: the torch.library op
  ``pmkernels::weight_distances_projections`` below, which reads each delta
  element once (with the C++ kernel of ``cpp_weight_distances`` or the Triton
  kernel of ``triton_weight_distances``) and returns P_k = Uᵀ D_k V (K, r, r)
  and ‖D_k‖² (K,), plus the projections Y_k = D_k V (out, K, r) and
  Z_k = D_kᵀ U (in, K, r) that its backward needs — O((out + in)·r·K)
  memory — so that, given ∂L/∂P_k, ∂U = Σ_k Y_k (∂P_k)ᵀ and ∂V = Σ_k Z_k ∂P_k
  with no second read of the deltas;
* r×r-sized algebra (M(γ), the Gram term, ⟨M, P_k⟩) left to plain autograd.

Registration, as for ``pareto_linear``'s Triton op: a
``torch.library.custom_op`` with ``register_autograd`` and ``register_fake``,
so ``torch.compile`` traces it without a graph break. The C++ kernel itself
stays a C++-registered op (``torch.ops.pmkernels.weight_distances_pass``, CPU
key, see csrc/README.md): the custom op calls it (or the Triton launcher)
inside, so both backends share one autograd rule and one fake rule.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import acc_dtype, core_matrix, low_rank_sq

__all__ = ["fused_weight_distances"]


def _cpp_pass(deltas: list[torch.Tensor], U: torch.Tensor, V: torch.Tensor):
    from .cpp_weight_distances import cpp_pass

    return cpp_pass(deltas, U, V)


def _triton_pass(deltas: list[torch.Tensor], U: torch.Tensor, V: torch.Tensor):
    from .triton_weight_distances import triton_pass

    sq, Y, Z = triton_pass(deltas, U, V)
    return sq.to(U.dtype), Y.to(U.dtype), Z.to(U.dtype)


# backend -> pass: (deltas, U, V) in the accumulation dtype -> (‖D_k‖² (K,), Y (out, K, r), Z (in, K, r))
_PASSES: dict[str, Callable] = {"cpp": _cpp_pass, "triton": _triton_pass}


@torch.library.custom_op("pmkernels::weight_distances_projections", mutates_args=())
def _projections_op(
    U: torch.Tensor, V: torch.Tensor, deltas: list[torch.Tensor], backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), V (in, r) in the accumulation dtype; K deltas (out, in) ->
    (P (K, r, r) with P_k = Uᵀ D_k V, ‖D_k‖² (K,), Y (out, K, r), Z (in, K, r)), all in U's dtype."""
    sq, Y, Z = _PASSES[backend](list(deltas), U, V)
    out, K, r = Y.shape
    # P_k = Uᵀ (D_k V), all k in one GEMM: (r, out) @ (out, K r)
    P = (U.t() @ Y.reshape(out, K * r)).reshape(r, K, r).transpose(0, 1).contiguous()
    return P, sq.to(U.dtype), Y, Z


@_projections_op.register_fake
def _(U, V, deltas, backend):
    (out, r), K, in_ = U.shape, len(deltas), V.shape[0]
    return U.new_empty((K, r, r)), U.new_empty((K,)), U.new_empty((out, K, r)), U.new_empty((in_, K, r))


def _setup_context(ctx, inputs, output):
    _, sq, Y, Z = output
    ctx.save_for_backward(Y, Z)
    ctx.n_deltas = len(inputs[2])
    ctx.mark_non_differentiable(sq, Y, Z)


def _backward(ctx, dP, _dsq, _dY, _dZ):
    Y, Z = ctx.saved_tensors
    out, K, r = Y.shape
    # dU[o, a] = Σ_k,b Y[o, k, b] dP[k, a, b];  dV[j, b] = Σ_k,a Z[j, k, a] dP[k, a, b]
    dU = Y.reshape(out, K * r) @ dP.transpose(1, 2).reshape(K * r, r) if ctx.needs_input_grad[0] else None
    dV = Z.reshape(Z.shape[0], K * r) @ dP.reshape(K * r, r) if ctx.needs_input_grad[1] else None
    return dU, dV, [None] * ctx.n_deltas, None  # the deltas are data: no gradient


_projections_op.register_autograd(_backward, setup_context=_setup_context)


def fused_weight_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: list[torch.Tensor], backend: str
) -> torch.Tensor:
    """f_k (K,) from one fused pass over the deltas (``backend`` "cpp" or "triton") plus r×r autograd algebra.

    Inputs validated by ``pmkernels.weight_distances``; result in the accumulation dtype.
    """
    acc = acc_dtype(U)
    M = core_matrix(G, pref).to(acc)
    Ua, Va = U.to(acc), V.to(acc)
    P, sq, _, _ = _projections_op(Ua, Va, [d.detach() for d in deltas], backend)
    return low_rank_sq(Ua, M, Va) - 2 * (P * M).sum((1, 2)) + sq
