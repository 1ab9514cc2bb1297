"""Helpers to test pmkernels ops (as ``torch.testing`` is for torch): error measures and poisoning.

Used by the project's tests and benchmark guards, and usable by anyone
checking a kernel against a float64 reference.

* ``rel_err(out, ref)``: ‖out − ref‖ / ‖ref‖, the plain relative error.
* ``term_scales(fn, inputs, cotangent)`` and ``term_scaled_err(out, ref, scale)``:
  error relative to the size of the *terms* that make up each result, not to
  the result. A floating-point sum of terms t_i has an error of order
  eps · Σ|t_i| whatever the cancellation; when the terms nearly cancel
  (a K = 1 preference gradient is one dot product ⟨dM, G⟩) ‖ref‖ is much
  smaller than Σ|t_i| and a relative-to-result tolerance fails on some CPUs
  and passes on others. ``term_scales`` evaluates the float64 reference on
  the absolute values of the inputs (and of the output gradient): for a
  polynomial whose terms all carry a + sign (a matmul chain, a sum of
  products) that gives Σ|t_i| for every output element and, through
  autograd, for every gradient element.
* ``assert_close_terms``: the assertion the tests use, recording err/tol
  when ``PMKERNELS_TEST_ERRLOG`` names a file (to find tolerance edges).
* ``poisoned(shape)``: a NaN-filled buffer, so unwritten outputs fail.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

__all__ = ["assert_close_terms", "poisoned", "rel_err", "term_scaled_err", "term_scales"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (any shapes that broadcast; ref may be all zero)."""
    out, ref = out.detach().double(), ref.detach().to(out.device).double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def term_scaled_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """‖out − ref‖ / ‖scale‖ in float64, with ``scale`` the magnitude of the terms of each element of ref
    (from ``term_scales``; ‖scale‖ >= ‖ref‖, so this is at most ``rel_err``)."""
    out = out.detach().double()
    ref, scale = ref.detach().to(out.device).double(), scale.detach().to(out.device).double()
    return float((out - ref).norm() / scale.norm().clamp_min(1e-300))


def term_scales(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[Optional[torch.Tensor]],
    cotangent: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """Σ|terms| of fn's output and of its gradients: fn in float64 on |inputs|, backward with |cotangent|.

    ``fn`` must add every term with a + sign once its inputs are non-negative (true of
    ``reference_pareto_linear``; for a difference a − b pass −|b|, e.g. negated deltas to
    ``reference_weight_distances``). Non-tensor inputs (None) pass through. Returns
    (output scale, [gradient scale per input, None for non-tensors or without a cotangent]).
    """
    leaves = [
        t.detach().double().abs().requires_grad_(cotangent is not None) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    with torch.enable_grad():
        out = fn(*leaves)
        if cotangent is None:
            return out.detach(), [None] * len(leaves)
        out.backward(cotangent.detach().to(out.device).double().abs())
    return out.detach(), [t.grad if isinstance(t, torch.Tensor) else None for t in leaves]


def assert_close_terms(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, tol: float, what: str = "") -> float:
    """Assert term_scaled_err(out, ref, scale) < tol; return the error.

    With ``PMKERNELS_TEST_ERRLOG=<file>`` set, appends "err/tol what" to that file (tolerance audits).
    """
    err = term_scaled_err(out, ref, scale)
    log = os.environ.get("PMKERNELS_TEST_ERRLOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{err / tol:.4g} {what} {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\n")
    assert err < tol, f"{what}: error {err:.3g} (relative to the size of its terms) >= {tol}"
    return err


def poisoned(shape: Sequence[int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """A NaN-filled tensor: outputs a kernel leaves unwritten show up as NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
