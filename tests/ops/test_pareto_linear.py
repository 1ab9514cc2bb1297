"""pareto_linear: every plain-PyTorch impl against the float64 reference, gradients, bad input."""
from __future__ import annotations

import pytest
import torch

import pmkernels
from pmkernels import pareto_linear, reference_pareto_linear

from pmkernels.testing import assert_close_terms, term_scales
from helpers import make_problem, random_pref, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
IMPLS = ["torch", "naive"]
NAMES = "x weight bias U G V pref".split()


# impl="triton" runs on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not pmkernels.triton_available(),
                                                        reason="triton is not importable"))


def assert_matches_reference(out, args64, tol, dy=None, what="output"):
    """out vs the float64 reference, error relative to the size of the terms (pmkernels.testing)."""
    scale, _ = term_scales(reference_pareto_linear, args64)
    assert_close_terms(out, reference_pareto_linear(*args64), scale, tol, what)


def cast(args, dtype):
    *tensors, pref = args
    return [None if t is None else t.to(dtype) for t in tensors] + [pref]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_reference(impl, per_sample, bias, dtype):
    args = make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=per_sample, bias=bias)
    out = pareto_linear(*cast(args, dtype), impl=impl)
    assert out.dtype == dtype and out.shape == (3, 5, 23)
    assert_matches_reference(out, args, TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", [(7,), (2, 3, 4), (3, 1, 2, 2)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_leading_dims(impl, N, per_sample):
    args = make_problem(N=N, d_in=9, d_out=6, r=2, K=3, per_sample=per_sample)
    out = pareto_linear(*cast(args, torch.float32), impl=impl)
    assert out.shape == (*N, 6)
    assert_matches_reference(out, args, 1e-5)


def test_unbatched_input_with_shared_pref():
    x, w, b, U, G, V, pref = make_problem(N=(3,), per_sample=False)
    out = pareto_linear(x[0], w, b, U, G, V, pref, impl="torch")
    assert out.shape == (23,)
    assert rel_err(out, reference_pareto_linear(x[0], w, b, U, G, V, pref)) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_x(impl):
    x, w, b, U, G, V, pref = make_problem(N=(5, 3), per_sample=True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not xt.is_contiguous()
    out = pareto_linear(xt, w, b, U, G, V, pref, impl=impl)
    assert rel_err(out, reference_pareto_linear(x, w, b, U, G, V, pref)) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_all_inputs(impl, per_sample):
    args = make_problem(N=(2, 3), d_in=5, d_out=4, r=2, K=3, per_sample=per_sample)
    args = [t.clone().requires_grad_(True) for t in args]
    assert torch.autograd.gradcheck(lambda *a: pareto_linear(*a, impl=impl), args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_fp32_gradients_match_reference(impl, per_sample):
    args64 = [t.requires_grad_(True) for t in make_problem(per_sample=per_sample)]
    args32 = [t.detach().float().requires_grad_(True) for t in args64]
    dy = torch.randn(3, 5, 23, dtype=torch.float64)
    reference_pareto_linear(*args64).backward(dy)
    pareto_linear(*args32, impl=impl).backward(dy.float())
    _, scales = term_scales(reference_pareto_linear, args64, dy)
    for name, a64, a32, scale in zip(NAMES, args64, args32, scales):
        assert_close_terms(a32.grad, a64.grad, scale, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_match_reference(dtype, per_sample):
    # the torch path's own backward in bf16/fp16: each gradient in its input's dtype, within the dtype's
    # tolerance of float64 relative to the size of its terms
    args64 = [t.requires_grad_(True) for t in make_problem(per_sample=per_sample)]
    args_lp = [t.detach().to(dtype if i < 6 else torch.float32).requires_grad_(True) for i, t in enumerate(args64)]
    dy = torch.randn(3, 5, 23, dtype=torch.float64)
    reference_pareto_linear(*args64).backward(dy)
    pareto_linear(*args_lp, impl="torch").backward(dy.to(dtype))
    _, scales = term_scales(reference_pareto_linear, args64, dy)
    for name, a64, a_lp, scale in zip(NAMES, args64, args_lp, scales):
        assert a_lp.grad.dtype == a_lp.dtype, name
        assert_close_terms(a_lp.grad.double(), a64.grad, scale, TOL[dtype], f"grad of {name}")


def test_gradients_only_where_required():
    x, w, b, U, G, V, pref = make_problem()
    U.requires_grad_(True)
    pareto_linear(x, w, b, U, G, V, pref, impl="torch").sum().backward()
    assert U.grad is not None and all(t.grad is None for t in (x, w, b, G, V, pref))


def test_per_sample_equals_one_at_a_time():
    x, w, b, U, G, V, pref = make_problem(N=(4, 3), per_sample=True)
    out = pareto_linear(x, w, b, U, G, V, pref, impl="torch")
    for i in range(4):
        one = pareto_linear(x[i], w, b, U, G, V, pref[i], impl="torch")
        assert torch.allclose(out[i], one, rtol=1e-12, atol=1e-12)


def test_merged_weight():
    _, w, _, U, G, V, pref = make_problem()
    M = sum(pref[k] * G[:, :, k] for k in range(G.shape[2]))
    assert torch.allclose(pmkernels.merged_weight(w, U, G, V, pref), w + U @ M @ V.T)


def test_normalize():
    x, w, b, U, G, V, pref = make_problem()
    out = pareto_linear(x, w, b, U, G, V, pref * 3, impl="torch", normalize=True)
    assert torch.allclose(out, pareto_linear(x, w, b, U, G, V, pref, impl="torch"))


def test_auto_uses_torch_on_cpu():
    assert pmkernels.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, NotImplementedError), match="triton"):
        pareto_linear(*make_problem(), impl="triton")


# ---- bad input: a clear error naming the argument, before any compute ----

def _bad(**override):
    args = dict(zip("x weight bias U G V pref".split(), make_problem(per_sample=False)))
    args.update(override)
    return args


BAD_CASES = [
    ("x", dict(x=torch.randn(3, 5, 18, dtype=torch.float64)), ValueError),
    ("weight", dict(weight=torch.randn(23, 19, 1, dtype=torch.float64)), ValueError),
    ("bias", dict(bias=torch.randn(22, dtype=torch.float64)), ValueError),
    ("U", dict(U=torch.randn(22, 3, dtype=torch.float64)), ValueError),
    ("U", dict(U=torch.randn(23, 2, dtype=torch.float64)), ValueError),
    ("V", dict(V=torch.randn(19, 2, dtype=torch.float64)), ValueError),
    ("G", dict(G=torch.randn(3, 2, 4, dtype=torch.float64)), ValueError),
    ("pref", dict(pref=torch.full((5,), 0.2, dtype=torch.float64)), ValueError),  # length != K
    ("pref", dict(pref=torch.tensor([0.5, 0.7, -0.2, 0.0], dtype=torch.float64)), ValueError),
    ("pref", dict(pref=torch.tensor([0.5, float("nan"), 0.25, 0.25], dtype=torch.float64)), ValueError),
    ("pref", dict(pref=torch.tensor([0.5, float("inf"), 0.25, 0.25], dtype=torch.float64)), ValueError),
    ("pref", dict(pref=torch.tensor([0.5, 0.3, 0.3, 0.3], dtype=torch.float64)), ValueError),  # sums to 1.4
    ("pref", dict(pref=random_pref(4, B=4)), ValueError),  # B=4 != x.shape[0]=3
    ("pref", dict(pref=random_pref(4, B=3)[:, :3]), ValueError),  # (B, K-1)
    ("pref", dict(pref=torch.tensor([1, 0, 0, 0])), TypeError),  # integer
    ("x", dict(x=torch.randn(3, 5, 19, dtype=torch.float32)), TypeError),  # mixed dtypes
    ("x", dict(x=[1.0, 2.0]), TypeError),
    ("U", dict(U=torch.randn(23, 3, dtype=torch.float64, device="meta")), ValueError),  # other device
]


@pytest.mark.parametrize("impl", IMPLS + ["auto", TRITON])
@pytest.mark.parametrize("name,override,exc", BAD_CASES)
def test_bad_input(impl, name, override, exc):
    with pytest.raises(exc, match=name):
        pareto_linear(**_bad(**override), impl=impl)


@pytest.mark.parametrize("impl", IMPLS + [TRITON])
@pytest.mark.parametrize("N", [(0,), (0, 5)])
def test_empty_batch_with_per_sample_pref(impl, N):
    # x (0, ..., in) with γ (0, K): an empty result (0, ..., out) and zero gradients, from every impl.
    x, w, b, U, G, V, _ = (None if t is None else t.float().requires_grad_() for t in make_problem(N=N))
    pref = torch.full((0, 4), 0.25, requires_grad=True)
    y = pareto_linear(x, w, b, U, G, V, pref, impl=impl)
    assert y.shape == (*N, 23)
    y.sum().backward()
    for name, t in zip(NAMES, (x, w, b, U, G, V, pref)):
        assert t.grad is not None and t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0, name


def test_merged_weight_rejects_mixed_dtypes():
    _, w, _, U, G, V, pref = make_problem()
    with pytest.raises(TypeError, match="U"):
        pmkernels.merged_weight(w, U.float(), G, V, pref)
    with pytest.raises(TypeError, match="weight"):
        pmkernels.merged_weight(w.float(), U, G, V, pref)
    out = pmkernels.merged_weight(w.float(), U.float(), G.float(), V.float(), pref)  # pref: any float dtype
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_pref_sum_tolerance_follows_dtype(dtype):
    # 1/3 rounded to bf16 sums to 1.00195: a valid γ in bf16; the tolerance is max(1e-3, K eps(dtype)).
    x, w, b, U, G, V, _ = make_problem(K=3)
    third = torch.full((3,), 1 / 3, dtype=dtype)
    pareto_linear(x, w, b, U, G, V, third, impl="torch")
    tol = max(1e-3, 3 * torch.finfo(dtype).eps)
    off = torch.tensor([1 / 3, 1 / 3, 1 / 3 + 2 * tol], dtype=torch.float64).to(dtype)
    with pytest.raises(ValueError, match="sum to 1"):
        pareto_linear(x, w, b, U, G, V, off, impl="torch")


def test_per_sample_pref_needs_batched_x():
    x, w, b, U, G, V, _ = make_problem()
    with pytest.raises(ValueError, match="pref"):
        pareto_linear(x[0, 0], w, b, U, G, V, random_pref(4, B=19), impl="torch")


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        pareto_linear(*make_problem(), impl="cuda")


# ---- property: any shape, any impl, shared or per-sample γ ----

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    d_in=st.integers(1, 17), d_out=st.integers(1, 17), r=st.integers(1, 9), K=st.integers(1, 6),
    per_sample=st.booleans(), bias=st.booleans(), impl=st.sampled_from(IMPLS), seed=st.integers(0, 2**16),
)
def test_property_matches_reference(lead, d_in, d_out, r, K, per_sample, bias, impl, seed):
    torch.manual_seed(seed)
    per_sample = per_sample and len(lead) >= 2
    args = make_problem(N=tuple(lead), d_in=d_in, d_out=d_out, r=r, K=K, per_sample=per_sample, bias=bias)
    out = pareto_linear(*cast(args, torch.float32), impl=impl)
    assert out.shape == (*lead, d_out)
    assert_matches_reference(out, args, 1e-5)


# ---- auto on CPU: merge W(γ) first where measured faster (pmkernels._dispatch.MERGE_FIRST_ROWS) ----

def _auto_picks(monkeypatch, *args, grad=False):
    from pmkernels import reference

    picked = []
    for name in ("naive_pareto_linear", "torch_pareto_linear"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _r=real, _n=name: picked.append(_n) or _r(*a))
    with torch.set_grad_enabled(grad):
        pareto_linear(*args, impl="auto")
    return picked[0].split("_")[0]


def test_auto_merges_first_for_a_shared_pref_over_many_rows(monkeypatch):
    from pmkernels._dispatch import MERGE_FIRST_ROWS, merge_first_is_faster

    d, c = 8, MERGE_FIRST_ROWS[torch.float32]  # in·out/(in+out) = 4: merge first from N = 4c rows
    assert merge_first_is_faster(4 * c, d, d) and not merge_first_is_faster(4 * c - 1, d, d)
    c16 = MERGE_FIRST_ROWS[torch.bfloat16]
    assert merge_first_is_faster(4 * c16, d, d, torch.bfloat16) and not merge_first_is_faster(4 * c16 - 1, d, d, torch.bfloat16)
    many = [t.float() for t in make_problem(N=(4 * c,), d_in=d, d_out=d)]
    few = [t.float() for t in make_problem(N=(4 * c - 1,), d_in=d, d_out=d)]
    assert _auto_picks(monkeypatch, *many) == "naive"
    assert _auto_picks(monkeypatch, *few) == "torch"
    # per-sample γ: naive would build B weights
    per_sample = [t.float() for t in make_problem(N=(2, 4 * c), d_in=d, d_out=d, per_sample=True)]
    assert _auto_picks(monkeypatch, *per_sample) == "torch"
    # a gradient into W(γ) (the factors train): naive's backward would need dyᵀx; only dx is fine
    many[3].requires_grad_(True)
    assert _auto_picks(monkeypatch, *many, grad=True) == "torch"
    assert _auto_picks(monkeypatch, *many, grad=False) == "naive"
    many[3].requires_grad_(False)
    many[0].requires_grad_(True)
    assert _auto_picks(monkeypatch, *many, grad=True) == "naive"


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("which", NAMES + ["all"])
def test_gradient_of_each_input_alone(which, per_sample):
    # the torch path has its own backward for both γ modes: each input alone (every branch of
    # needs_input_grad) and all at once must be right
    args64 = list(make_problem(per_sample=per_sample))
    train = range(len(NAMES)) if which == "all" else [NAMES.index(which)]
    args64 = [t.clone().requires_grad_(True) if i in train else t for i, t in enumerate(args64)]
    args32 = [t.detach().float().requires_grad_(i in train) for i, t in enumerate(args64)]
    dy = torch.randn(3, 5, 23, dtype=torch.float64)
    reference_pareto_linear(*args64).backward(dy)
    pareto_linear(*args32, impl="torch").backward(dy.float())
    _, scales = term_scales(reference_pareto_linear, args64, dy)
    for i in train:
        assert_close_terms(args32[i].grad, args64[i].grad, scales[i], 1e-5, f"grad of {NAMES[i]}")
    assert all(t.grad is None for j, t in enumerate(args32) if j not in train)
