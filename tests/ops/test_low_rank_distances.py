"""Tests of pmkernels.low_rank_distances: f_k = ‖U M Vᵀ − A_k B_kᵀ‖² against a float64 dense reference."""
from __future__ import annotations

import pytest
import torch

import pmkernels
from pmkernels import low_rank_delta_sq, low_rank_distances, reference_low_rank_distances, weight_distances

from helpers import random_pref

SHAPES = [  # (out, in, r, K, ranks R_k)
    (23, 19, 3, (5, 2, 7, 1)),
    (37, 70, 5, (11, 11, 11)),
    (41, 13, 8, (1, 4, 13, 2, 9, 6, 3, 8)),  # K = 8, R_k > r and < r, one R_k = in (full rank)
    (9, 30, 1, (9,)),
]


def make_lr(out, in_, r, ranks, dtype=torch.float64):
    """Fresh random inputs (no zeros) at odd shapes, R_k per task."""
    K = len(ranks)
    U = torch.randn(out, r, dtype=dtype) / r**0.5
    G = torch.randn(r, r, K, dtype=dtype)
    V = torch.randn(in_, r, dtype=dtype) / r**0.5
    pref = random_pref(K).to(dtype)
    A = [torch.randn(out, R, dtype=dtype) for R in ranks]
    B = [torch.randn(in_, R, dtype=dtype) / R**0.5 for R in ranks]
    return U, G, V, pref, A, B


def term_scale(U, G, V, pref, A, B) -> torch.Tensor:
    """(K,) size of the terms of f_k: ‖UMVᵀ‖² + ‖A_kB_kᵀ‖² + 2‖UMVᵀ‖‖A_kB_kᵀ‖ (float64) — the tolerance base."""
    d = torch.float64
    dw = pmkernels.core_matrix(G.to(d), pref.to(d))
    n = (U.to(d) @ dw @ V.to(d).t()).norm()
    return torch.stack([n**2 + (a.to(d) @ b.to(d).t()).norm() ** 2 + 2 * n * (a.to(d) @ b.to(d).t()).norm()
                        for a, b in zip(A, B)])


@pytest.mark.parametrize("impl", ["torch", "naive", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense_reference(shape, impl, dtype):
    out, in_, r, ranks = shape
    U, G, V, pref, A, B = make_lr(out, in_, r, ranks, dtype)
    f = torch.full((len(ranks),), float("nan"), dtype=dtype)  # poisoned: every entry must be written
    f.copy_(low_rank_distances(U, G, V, pref, A, B, impl=impl))
    ref = reference_low_rank_distances(U, G, V, pref, A, B)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(f).all()
    assert ((f.double() - ref).abs() <= tol * term_scale(U, G, V, pref, A, B)).all(), (f, ref)


def test_stacked_factors_and_precomputed_constant():
    U, G, V, pref, A, B = make_lr(23, 19, 3, (6, 6, 6))
    delta_sq = low_rank_delta_sq(A, B)
    f1 = low_rank_distances(U, G, V, pref, torch.stack(A), torch.stack(B), delta_sq=delta_sq)
    f2 = low_rank_distances(U, G, V, pref, A, B)
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_gradcheck(impl):
    U, G, V, pref, A, B = make_lr(11, 7, 3, (4, 2, 5))
    for t in (U, G, V, pref):
        t.requires_grad_(True)
    # pref is the simplex coordinate: gradcheck perturbs it off the simplex, so skip the value checks
    fn = lambda U, G, V, pref: low_rank_distances(U, G, V, pref, A, B, impl=impl, check_values=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (U, G, V, pref))


@pytest.mark.parametrize("shape", [(23, 19, 3, 4), (16, 40, 6, 8)])
def test_equals_dense_op_at_full_rank(shape):
    """An exact factorisation D_k = A_k B_kᵀ (SVD at full rank): the factored and dense ops agree."""
    out, in_, r, K = shape
    U, G, V, pref, _, _ = make_lr(out, in_, r, (1,) * K)
    D = torch.randn(K, out, in_, dtype=torch.float64)
    A, B = [], []
    for d in D:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        A.append(u * s)
        B.append(vh.t())
    dense = weight_distances(U, G, V, pref, D, impl="torch")
    lr = low_rank_distances(U, G, V, pref, A, B)
    scale = term_scale(U, G, V, pref, A, B)
    assert ((lr - dense).abs() <= 1e-12 * scale).all()
    # and the gradients agree too
    g_dense = torch.autograd.grad(weight_distances(U.requires_grad_(), G.requires_grad_(), V.requires_grad_(), pref,
                                                   D, impl="torch").sum(), (U, G, V))
    g_lr = torch.autograd.grad(low_rank_distances(U, G, V, pref, A, B).sum(), (U, G, V))
    for a, b in zip(g_dense, g_lr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))


def test_temporaries_stay_rank_sized():
    """Autograd saves nothing of size (out, in): the largest saved tensor is a factor itself."""
    out, in_, r, ranks = 300, 200, 4, (8, 8)
    U, G, V, pref, A, B = make_lr(out, in_, r, ranks, torch.float32)
    U.requires_grad_(True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        low_rank_distances(U, G, V, pref, A, B).sum()
    assert max(sizes) <= max(out, in_) * max(max(ranks), r)


@pytest.mark.parametrize("bad, match", [
    (lambda a: {"A": a["A"][:2]}, r"A must hold K = 3"),
    (lambda a: {"A": [a["A"][0], a["A"][1][:-1], a["A"][2]]}, r"A\[1\] must have shape \(out, R_k\) = \(23, R_k\)"),
    (lambda a: {"B": [a["B"][0], a["B"][1][:, :-1], a["B"][2]]}, r"A\[1\] and B\[1\] must have the same rank"),
    (lambda a: {"A": [a["A"][0].long(), *a["A"][1:]]}, r"A\[0\] must be a floating tensor"),
    (lambda a: {"A": "no"}, r"A must be a \(K, out, R\) tensor or a sequence"),
    (lambda a: {"delta_sq": torch.ones(2, dtype=torch.float64)}, r"delta_sq must have shape \(K,\) = \(3,\)"),
    (lambda a: {"pref": torch.tensor([0.5, 0.6, -0.1], dtype=torch.float64)}, r"pref must be non-negative"),
    (lambda a: {"impl": "cpp"}, r"impl must be one of"),
])
def test_bad_input(bad, match):
    U, G, V, pref, A, B = make_lr(23, 19, 3, (2, 3, 4))
    args = {"A": A, "B": B, "pref": pref, "delta_sq": None, "impl": "auto"}
    args.update(bad(args))
    with pytest.raises((ValueError, TypeError), match=match):
        low_rank_distances(U, G, V, args["pref"], args["A"], args["B"], delta_sq=args["delta_sq"],
                           impl=args["impl"])


def test_stacked_integer_factors_are_rejected_before_compute():
    U, G, V, pref, A, B = make_lr(23, 19, 3, (2, 2, 2))
    with pytest.raises(TypeError, match="A must be a floating tensor"):
        low_rank_distances(U, G, V, pref, torch.ones(3, 23, 2, dtype=torch.int64), torch.stack(B))
