"""Input checks shared by the pmkernels ops.

Every check runs before any compute and raises ``ValueError``/``TypeError``
naming the argument and what was expected, so a bad call never reaches a
kernel. Value checks on ``pref`` (sign, finiteness, row sums) need a host
sync; callers that validated the preference once (the modules do, when it is
set) pass ``check_values=False`` on the hot path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

PREF_SUM_TOL = 1e-3  # rows of pref sum to 1 within max(PREF_SUM_TOL, K * eps(dtype)): see pref_sum_tol

Deltas = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16 or float16), got {t.dtype}")
    return t


def check_low_rank(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, out_features: int, in_features: int
) -> tuple[int, int]:
    """Check U (out, r), G (r, r, K), V (in, r); return (r, K)."""
    for name, t in (("U", U), ("G", G), ("V", V)):
        _check_tensor(name, t)
    if G.dim() != 3 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must have shape (r, r, K), got {tuple(G.shape)}")
    r, K = G.shape[0], G.shape[2]
    if r < 1 or K < 1:
        raise ValueError(f"G must have r >= 1 and K >= 1, got shape {tuple(G.shape)}")
    if U.dim() != 2 or U.shape != (out_features, r):
        raise ValueError(f"U must have shape (out_features, r) = ({out_features}, {r}), got {tuple(U.shape)}")
    if V.dim() != 2 or V.shape != (in_features, r):
        raise ValueError(f"V must have shape (in_features, r) = ({in_features}, {r}), got {tuple(V.shape)}")
    return r, K


def pref_sum_tol(pref: torch.Tensor) -> float:
    """How far a row of pref may sum from 1: max(1e-3, K · eps(pref.dtype)).

    A user's exact γ rounded to pref's dtype moves each entry by up to eps/2 of itself and a sum
    computed in that dtype adds one rounding per term, so K · eps bounds the drift: bf16 (eps 2^-7)
    1/3s sum to 1.00195, inside 3 · eps = 0.023; fp32/fp64 keep the fixed 1e-3.
    """
    K = pref.shape[-1] if pref.dim() else 1
    eps = torch.finfo(pref.dtype).eps if pref.is_floating_point() else 0.0
    return max(PREF_SUM_TOL, K * eps)


def check_pref_values(pref: torch.Tensor, *, name: str = "pref", normalize: bool = False) -> torch.Tensor:
    """Check pref entries are finite and >= 0 and each row sums to 1 (within ``pref_sum_tol``:
    1e-3, or K · eps of pref's dtype if larger, e.g. for bf16).

    With ``normalize=True`` rows are divided by their sum instead of being
    required to sum to 1 (a row summing to 0 is still an error). Returns the
    (possibly normalised) preference.
    """
    p = pref.detach()
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} must contain only finite values (no NaN or inf), got {pref.tolist()}")
    if bool((p < 0).any()):
        raise ValueError(f"{name} must be non-negative (a point of the simplex), got {pref.tolist()}")
    sums = p.double().sum(-1)
    if normalize:
        if bool((sums <= 0).any()):
            raise ValueError(f"{name} rows must have a positive sum to be normalised, got sums {sums.tolist()}")
        return pref / pref.sum(-1, keepdim=True)
    tol = pref_sum_tol(pref)
    if bool(((sums - 1).abs() > tol).any()):
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {tol:.3g} for {pref.dtype}), got sums {sums.tolist()}; "
            "pass normalize=True to rescale them"
        )
    return pref


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Check every entry of ``t`` is finite (no NaN or inf): a host sync, for data checked once."""
    if not bool(torch.isfinite(t.detach()).all()):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise ValueError(f"{name} must contain only finite values, got {bad} NaN/inf entr{'y' if bad == 1 else 'ies'} "
                         f"(shape {tuple(t.shape)})")
    return t


def check_delta_sq_values(delta_sq: torch.Tensor, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> None:
    """Check ``delta_sq`` (K,) can be ‖A_k B_kᵀ‖²: finite and >= 0, and 0 only where A_k B_kᵀ is 0 (a wrong
    constant shifts f_k, and a negative one can make it negative). Zero entries are checked against the
    factors (``low_rank_delta_sq`` of those k only); positive ones are trusted (that is the constant's point)."""
    check_finite("delta_sq", delta_sq)
    d = delta_sq.detach()
    if bool((d < 0).any()):
        raise ValueError(f"delta_sq must be >= 0 (squared norms ‖A_k B_kᵀ‖²), got {d.tolist()}")
    from .reference import low_rank_delta_sq

    for k in (d == 0).nonzero().flatten().tolist():
        a, b = A[k].detach(), B[k].detach()
        exact = float(low_rank_delta_sq([a], [b])[0])
        scale = float(a.double().pow(2).sum() * b.double().pow(2).sum())  # ‖A Bᵀ‖² ≤ ‖A‖² ‖B‖²
        if exact > 1e-6 * scale:
            raise ValueError(f"delta_sq[{k}] is 0 but ‖A[{k}] B[{k}]ᵀ‖² = {exact:.6g}; pass "
                             f"low_rank_delta_sq(A, B) (or delta_sq=None)")


def check_pref_shape(pref: torch.Tensor, K: int, x: Optional[torch.Tensor] = None, *, name: str = "pref") -> bool:
    """Check pref is (K,) or, with x given, (B, K) with B == x.shape[0]; return True if per-sample."""
    _check_tensor(name, pref)
    if pref.dim() == 1:
        if pref.shape[0] != K:
            raise ValueError(f"{name} must have length K = {K} (the last dim of G), got shape {tuple(pref.shape)}")
        return False
    if pref.dim() == 2 and x is not None:
        if pref.shape[1] != K:
            raise ValueError(f"{name} of shape (B, K) must have K = {K} columns, got shape {tuple(pref.shape)}")
        if x.dim() < 2:
            raise ValueError(
                f"a per-sample {name} of shape {tuple(pref.shape)} needs x with a batch dim, i.e. x.dim() >= 2, "
                f"got x of shape {tuple(x.shape)}"
            )
        if pref.shape[0] != x.shape[0]:
            raise ValueError(
                f"per-sample {name} has B = {pref.shape[0]} rows but x.shape[0] = {x.shape[0]}; "
                "expected one row per element of x's leading (batch) dim"
            )
        return True
    expected = f"(K,) = ({K},) or (B, K) = (x.shape[0], {K})" if x is not None else f"(K,) = ({K},)"
    raise ValueError(f"{name} must have shape {expected}, got {tuple(pref.shape)}")


def check_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> bool:
    """Validate the arguments of ``pareto_linear``; return True if pref is per-sample."""
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features) = (..., {in_features}), got {tuple(x.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape (out_features,) = ({out_features},), got {tuple(bias.shape)}")
    _, K = check_low_rank(U, G, V, out_features, in_features)
    per_sample = check_pref_shape(pref, K, x)
    named = [("x", x), ("weight", weight), ("U", U), ("G", G), ("V", V), ("pref", pref)]
    if bias is not None:
        named.append(("bias", bias))
    check_same_device(named)
    check_same_dtype([(n, t) for n, t in named if n != "pref"])
    return per_sample


def check_merged_weight(
    weight: torch.Tensor, U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor
) -> None:
    """Validate the arguments of ``merged_weight`` (one preference): shapes, device, one dtype for the factors."""
    _check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    _, K = check_low_rank(U, G, V, *weight.shape)
    check_pref_shape(pref, K)
    named = [("weight", weight), ("U", U), ("G", G), ("V", V)]
    check_same_device(named + [("pref", pref)])
    check_same_dtype(named)


def check_same_device(named: list[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first.device} but {name} is on {t.device}"
            )


def check_same_dtype(named: list[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"all floating inputs must share one dtype: {first_name} is {first.dtype} but {name} is {t.dtype}"
            )


def _per_objective(t: object, name: str, K: int, dims: tuple[Optional[int], ...], dims_text: str
                   ) -> list[torch.Tensor]:
    """K floating tensors of shape ``dims`` (None: any size) from a (K, *dims) tensor or a sequence of K tensors.

    Every tensor is checked (type, floating dtype, shape) before any compute; errors name ``name`` or
    ``name[k]`` and the expected shape ``dims_text``.
    """
    def fits(shape: tuple[int, ...]) -> bool:
        return len(shape) == len(dims) and all(e is None or e == s for e, s in zip(dims, shape))

    sizes = ", ".join("R" if e is None else str(e) for e in dims)
    each = dims_text.replace(", R", ", R_k")  # one tensor of a sequence: its own rank R_k
    if isinstance(t, torch.Tensor):
        _check_tensor(name, t)
        if t.dim() != len(dims) + 1 or t.shape[0] != K or not fits(tuple(t.shape[1:])):
            raise ValueError(f"{name} must have shape (K, {dims_text}) = ({K}, {sizes}), got {tuple(t.shape)}")
        return list(t.unbind(0))
    if not isinstance(t, (list, tuple)):
        raise TypeError(f"{name} must be a (K, {dims_text}) tensor or a sequence of K ({each}) tensors, "
                        f"got {type(t).__name__}")
    if len(t) != K:
        raise ValueError(f"{name} must hold K = {K} tensors (one per objective), got {len(t)}")
    for k, d in enumerate(t):
        _check_tensor(f"{name}[{k}]", d)
        if not fits(tuple(d.shape)):
            raise ValueError(f"{name}[{k}] must have shape ({each}) = ({sizes.replace('R', 'R_k')}), "
                             f"got {tuple(d.shape)}")
    return list(t)


def _delta_list(deltas: Deltas, K: int, out_features: int, in_features: int) -> list[torch.Tensor]:
    """The deltas as a list of K (out, in) floating tensors, from a (K, out, in) tensor or a sequence."""
    return _per_objective(deltas, "deltas", K, (out_features, in_features), "out, in")


def _check_objective_factors(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor) -> int:
    """The factors and γ of a data-free objective op: U (out, r), G (r, r, K), V (in, r), pref (K,); return K."""
    _check_tensor("U", U)
    _check_tensor("V", V)
    if U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"U must be (out, r) and V (in, r), got {tuple(U.shape)} and {tuple(V.shape)}")
    _, K = check_low_rank(U, G, V, U.shape[0], V.shape[0])
    check_pref_shape(pref, K)
    return K


def check_weight_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, deltas: Deltas
) -> list[torch.Tensor]:
    """Validate the arguments of ``weight_distances``; return the deltas as a list of (out, in) tensors."""
    K = _check_objective_factors(U, G, V, pref)
    ds = _delta_list(deltas, K, U.shape[0], V.shape[0])
    check_same_device([("U", U), ("G", G), ("V", V), ("pref", pref)] + [(f"deltas[{k}]", d) for k, d in enumerate(ds)])
    check_same_dtype([("U", U), ("G", G), ("V", V)])
    check_same_dtype([(f"deltas[{k}]", d) for k, d in enumerate(ds)])
    return ds


def _factor_list(factors: Deltas, name: str, K: int, rows: int, rows_name: str) -> list[torch.Tensor]:
    """K 2-D factors (rows, R_k) from a (K, rows, R) tensor or a sequence of K tensors."""
    return _per_objective(factors, name, K, (rows, None), f"{rows_name}, R")


def check_low_rank_delta_sq(A: Deltas, B: Deltas) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate the arguments of ``low_rank_delta_sq`` (K >= 1 pairs of 2-D factors with the same number of
    columns); return A and B as lists."""
    As = list(A.unbind(0)) if isinstance(A, torch.Tensor) else list(A)
    Bs = list(B.unbind(0)) if isinstance(B, torch.Tensor) else list(B)
    if len(As) != len(Bs) or not As:
        raise ValueError(f"A and B must hold the same number K >= 1 of factors, got {len(As)} and {len(Bs)}")
    for k, (a, b) in enumerate(zip(As, Bs)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 2 or b.dim() != 2 \
                or a.shape[1] != b.shape[1]:
            raise ValueError(f"A[{k}] and B[{k}] must be 2-D tensors with the same number of columns R_k, got "
                             f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}")
    return As, Bs


def check_low_rank_distances(
    U: torch.Tensor, G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor, A: Deltas, B: Deltas,
    delta_sq: Optional[torch.Tensor] = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate the arguments of ``low_rank_distances``; return A and B as lists of 2-D factors."""
    K = _check_objective_factors(U, G, V, pref)
    As = _factor_list(A, "A", K, U.shape[0], "out")
    Bs = _factor_list(B, "B", K, V.shape[0], "in")
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"A[{k}] and B[{k}] must have the same rank R_k (columns), got A[{k}] "
                             f"{tuple(a.shape)} and B[{k}] {tuple(b.shape)}")
    named = [("U", U), ("G", G), ("V", V), ("pref", pref)]
    named += [(f"A[{k}]", a) for k, a in enumerate(As)] + [(f"B[{k}]", b) for k, b in enumerate(Bs)]
    if delta_sq is not None:
        _check_tensor("delta_sq", delta_sq)
        if delta_sq.shape != (K,):
            raise ValueError(f"delta_sq must have shape (K,) = ({K},), got {tuple(delta_sq.shape)}")
        named.append(("delta_sq", delta_sq))
    check_same_device(named)
    check_same_dtype([("U", U), ("G", G), ("V", V)])
    check_same_dtype([(f"A[{k}]", a) for k, a in enumerate(As)] + [(f"B[{k}]", b) for k, b in enumerate(Bs)])
    return As, Bs


def triton_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Input dtypes the Triton kernels support on ``device``: fp32/bf16/fp16 on CUDA; fp32/fp16 under the
    interpreter (it does no bf16 arithmetic and silently returns garbage for it)."""
    if device.type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.float16)


def check_triton_dtype(name: str, t: torch.Tensor) -> None:
    """TypeError before any launch when the Triton kernels cannot compute in ``t``'s dtype."""
    supported = triton_dtypes(t.device)
    if t.dtype not in supported:
        where = "on CUDA" if t.device.type == "cuda" else "under the Triton interpreter (TRITON_INTERPRET=1)"
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        raise TypeError(
            f"impl='triton' supports {names} inputs {where}, got {name} of dtype {t.dtype}; "
            "use impl='torch' (or cast the inputs)"
        )
