"""Fused Triton kernels of pareto_linear (impl="triton") against the float64 reference.

Without CUDA these run under the Triton interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1 before pmkernels' Triton module is imported), at
tiny odd shapes, fp32 and fp16 only (the interpreter does no bf16 maths).
The CUDA section at the end runs the docs/design.md shape grid and is skipped
here by conftest.
"""
from __future__ import annotations

import pytest
import torch

import pmkernels
from pmkernels import reference_pareto_linear
from pmkernels._dispatch import pad_rank
from pmkernels.testing import assert_close_terms, term_scales
from helpers import HAS_CUDA, make_problem, poisoned, random_pref, rel_err

tpl = pytest.importorskip("pmkernels.triton_pareto_linear", reason="triton is not importable here")
triton_pareto_linear = tpl.triton_pareto_linear
tcfg = pytest.importorskip("pmkernels.triton_configs", reason="triton is not importable here")

DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NAMES = ("x", "weight", "bias", "U", "G", "V", "pref")


def _tol(dtype):
    # fp32 big dots run in tf32 on CUDA (docs/design.md §4: < 1e-3); exact fp32 under the interpreter.
    return 1e-3 if (dtype == torch.float32 and HAS_CUDA) else TOL[dtype]


def _leaf(t, dtype, grad=True):
    if t is None:
        return None
    return t.detach().to(DEV, dtype).requires_grad_(grad)


def _check(args64, dtype, *, train_weight=True, x_transform=None, pref_dtype=torch.float32, fn=None,
           grad_mask=None, view=None):
    """Run fn (default triton_pareto_linear) at `dtype` and compare output and all gradients with float64.

    Errors are measured relative to the size of the terms (pmkernels.testing): a gradient that is a
    short sum with heavy cancellation (dγ at K = 1) is judged by its terms' size, not by its value.
    ``view``: applied to every input and to dy before the call (e.g. a non-contiguous view).
    """
    fn = fn or triton_pareto_linear
    grad_mask = grad_mask or {}
    view = view or (lambda t: t)
    x, weight, bias, U, G, V, pref = args64
    need = {n: grad_mask.get(n, True) for n in NAMES}
    need["weight"] = need["weight"] and train_weight
    leaves = {n: _leaf(t, pref_dtype if n == "pref" else dtype, need[n]) for n, t in zip(NAMES, args64)}
    inputs = {n: None if t is None else view(t) for n, t in leaves.items()}
    if x_transform is not None:
        inputs["x"] = x_transform(inputs["x"])
    y = fn(*(inputs[n] for n in NAMES))

    # the reference sees the same (dtype-rounded) inputs, in float64: we test the kernels, not input rounding
    ref_leaves = {n: (None if t is None else _leaf(t, pref_dtype if n == "pref" else dtype, False)
                      .to(torch.float64).requires_grad_(need[n])) for n, t in zip(NAMES, args64)}
    y_ref = reference_pareto_linear(*(ref_leaves[n] for n in NAMES))
    assert y.dtype == dtype and y.shape == y_ref.shape
    dy = torch.randn_like(y_ref)
    y_scale, grad_scales = term_scales(reference_pareto_linear, [ref_leaves[n] for n in NAMES], dy)
    tol = _tol(dtype)
    assert_close_terms(y, y_ref, y_scale, tol, "output")

    y_ref.backward(dy)
    y.backward(view(dy.to(DEV, dtype)))
    for n, scale in zip(NAMES, grad_scales):
        leaf, ref = leaves[n], ref_leaves[n]
        if leaf is None:
            continue
        if not need[n]:
            assert leaf.grad is None, n
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, n
        assert_close_terms(leaf.grad, ref.grad, scale, tol, f"grad of {n}")
    return y


# ----------------------------------------------------------------------------- interpreter grid

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozenW", "trainW"])
def test_matches_reference(dtype, per_sample, bias, train_weight):
    args = make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=per_sample, bias=bias)
    _check(args, dtype, train_weight=train_weight)


@pytest.mark.parametrize("r,K", [(1, 1), (1, 4), (3, 1), (17, 4), (17, 1)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_ranks(r, K, per_sample):
    args = make_problem(N=(3, 5), d_in=19, d_out=23, r=r, K=K, per_sample=per_sample)
    _check(args, torch.float32)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_max_rank_and_tasks(per_sample):
    # r = 128 (BLOCK_R = 128) and K = 64 at a tiny token count.
    args = make_problem(N=(2, 3), d_in=9, d_out=11, r=128, K=64, per_sample=per_sample)
    _check(args, torch.float32)


@pytest.mark.parametrize("N", [(), (7,), (3, 5), (2, 3, 2)], ids=["rank0", "rank1", "rank2", "rank3"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_leading_dims(N, per_sample):
    if per_sample and len(N) == 0:
        pytest.skip("a per-sample pref needs x with a batch dim")
    args = make_problem(N=N, d_in=19, d_out=23, r=3, K=4, per_sample=per_sample)
    _check(args, torch.float32)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("layout", ["strided_features", "transposed"])
def test_non_contiguous_x(per_sample, layout):
    args = list(make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=per_sample))
    if layout == "strided_features":
        # every other feature of a wider buffer: reshape keeps a view with last stride 2
        def xf(x):
            buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
            buf = buf.index_copy(-1, torch.arange(0, 2 * x.shape[-1], 2, device=x.device), x)
            v = buf[..., ::2]
            assert not v.is_contiguous()
            return v
    else:
        def xf(x):
            v = x.transpose(0, 1).contiguous().transpose(0, 1)
            assert not v.is_contiguous()
            return v
    _check(args, torch.float32, x_transform=xf)
    _check(args, torch.float16, x_transform=xf)


def _every_other(t):
    """The same values as a view with last-dim stride 2 (a 1-D one is `buf[::2]`), differentiable."""
    idx = torch.arange(0, 2 * t.shape[-1], 2, device=t.device)
    return t.new_zeros(*t.shape[:-1], 2 * t.shape[-1]).index_copy(-1, idx, t)[..., ::2]


def _transposed(t):
    """The same values with the first and last dims' strides swapped (1-D: every other element)."""
    if t.dim() < 2:
        return _every_other(t)
    return t.transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("layout", [_every_other, _transposed], ids=["every_other", "transposed"])
@pytest.mark.parametrize("which", NAMES + ("dy",))
def test_non_contiguous_inputs(which, layout, per_sample):
    # Every pointer the launchers pass (x, weight, bias, U, G, V, pref and the backward's dy) as a
    # non-contiguous view: the kernels must use its strides (or the launcher copy it), never assume 1.
    args = make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=per_sample)
    pick = {n: (layout if n == which else (lambda t: t)) for n in NAMES + ("dy",)}

    def fn(x, weight, bias, U, G, V, pref):
        ins = dict(zip(NAMES, (x, weight, bias, U, G, V, pref)))
        views = {n: pick[n](t) for n, t in ins.items()}
        assert which == "dy" or not views[which].is_contiguous()
        y = triton_pareto_linear(*(views[n] for n in NAMES))
        return _ViewGrad.apply(y, pick["dy"])  # the gradient reaching the op: dy as that view

    _check(args, torch.float32, fn=fn)


class _ViewGrad(torch.autograd.Function):
    """Identity whose backward hands on the incoming gradient as a non-contiguous view (to test dy)."""

    @staticmethod
    def forward(ctx, y, view):
        ctx.view = view
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        v = ctx.view(dy.contiguous())
        return v, None


def test_rejects_unsupported_dtypes():
    # fp64 would die inside the kernels (InterpreterError / compile error) and bf16 under the interpreter
    # silently returns garbage: both are a TypeError naming the supported dtypes, before any launch.
    args = make_problem(per_sample=True)
    bad = [torch.float64] + ([] if HAS_CUDA else [torch.bfloat16])
    for dt in bad:
        a = [None if t is None else t.to(DEV, dt) for t in args]
        for fn in (triton_pareto_linear, lambda *a: pmkernels.pareto_linear(*a, impl="triton")):
            with pytest.raises(TypeError, match="float32.*float16"):
                fn(*a)


def test_pref_dtypes():
    args = make_problem(per_sample=True)
    _check(args, torch.float32, pref_dtype=torch.float64)
    _check(args, torch.float16, pref_dtype=torch.float16)


@pytest.mark.parametrize(
    "only", ["x", "weight", "U", "G", "V", "pref", "bias"],
)
def test_partial_grads(only):
    args = make_problem(per_sample=True)
    _check(args, torch.float32, grad_mask={n: n == only for n in NAMES})


def test_no_grad_forward():
    args = make_problem(per_sample=True)
    with torch.no_grad():
        y = triton_pareto_linear(*(None if a is None else a.to(DEV, torch.float32) for a in args))
    scale, _ = term_scales(reference_pareto_linear, args)
    assert_close_terms(y, reference_pareto_linear(*args), scale, _tol(torch.float32), "output")


@pytest.mark.parametrize("N,per_sample", [((0, 5), False), ((3, 0), True), ((3, 0), False)])
def test_empty_tokens(N, per_sample):
    args = make_problem(N=N, per_sample=per_sample)
    leaves = [None if a is None else a.to(DEV, torch.float32).requires_grad_() for a in args]
    y = triton_pareto_linear(*leaves)
    assert y.shape == (*N, 23)
    y.sum().backward()
    for n, a in zip(NAMES, leaves):
        if a is not None:
            assert a.grad.shape == a.shape, n
            if n != "x":
                assert torch.count_nonzero(a.grad) == 0, n


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_public_api(per_sample):
    args = make_problem(per_sample=per_sample)

    def fn(*a):
        return pmkernels.pareto_linear(*a, impl="triton")

    _check(args, torch.float32, fn=fn)
    _check(args, torch.float16, fn=fn)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cublas_hybrid_variant(monkeypatch, per_sample):
    # The hybrid (torch.mm base + Triton epilogue pass) is a one-line switch; keep it correct.
    monkeypatch.setattr(tpl, "_BASE_GEMM", "cublas")
    args = make_problem(per_sample=per_sample)
    _check(args, torch.float32)


def test_autotune_config_buckets():
    # The pruners are pure functions (no GPU needed): decode-sized token counts get thin-M tiles, large
    # ones big tiles, rank-sized outputs thin-N tiles; every kept config fits the target's shared memory.
    kw = dict(has_lora=True, add_c=False, block_r=16)
    small = tcfg.gemm_configs("bf16", tcfg.gemm_bucket(16, 4096), capability=90, **kw)
    large = tcfg.gemm_configs("bf16", tcfg.gemm_bucket(8192, 4096), capability=90, **kw)
    thin = tcfg.gemm_configs("bf16", tcfg.gemm_bucket(4096, 16), capability=90, has_lora=False, add_c=False,
                            block_r=16, b_dtype=torch.float32)
    assert small and all(c.kwargs["BLOCK_M"] <= 64 for c in small)
    assert large and all(c.kwargs["BLOCK_M"] >= 64 for c in large) and not set(map(id, small)) & set(map(id, large))
    assert thin and all(c.kwargs["BLOCK_N"] <= 32 for c in thin)
    for cap in (80, 90):
        for dt, es in (("fp32", 4), ("bf16", 2)):
            for c in tcfg.gemm_configs(dt, "large_m", capability=cap, **kw):
                assert c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * es \
                    <= tcfg.smem_limit(cap)
            # r = 128 per-sample fp32 on an A100: the case that had no fitting config
            cfgs = tcfg.shrink_configs(dt, 128, 64, True, cap, small_n=False)
            assert cfgs and all(c.num_stages * (c.kwargs["BLOCK_N"] + 128) * c.kwargs["BLOCK_D"] * es
                                <= tcfg.smem_limit(cap) for c in cfgs)
            assert all(c.kwargs["BLOCK_C"] < 128 for c in cfgs)  # the tiled core contraction
    assert tcfg.shrink_configs("fp16", 16, 8, True, 90, small_n=True)[0].kwargs["BLOCK_C"] == 16
    # the hybrid pass (no main loop) keeps only tiles with <= 64 accumulators per thread
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
               for c in tcfg.gemm_configs("bf16", "large_m", has_lora=True, add_c=True, block_r=16, capability=90))
    assert [pad_rank(r) for r in (1, 3, 16, 17, 128)] == [16, 16, 16, 32, 128]


# ----------------------------------------------------------------------------- kernels, poisoned outputs

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r,K,B", [(1, 1, 1), (3, 4, 3), (17, 4, 5), (5, 3, 1),
                                   (40, 5, 2), (40, 5, 1), (100, 64, 2), (128, 3, 1)])  # r > 32: tiled core; B = 1: shared-γ fold
def test_shrink_kernel_poisoned(dtype, r, K, B):
    N, D, L = B * 7, 37, 7
    a = torch.randn(N, D, dtype=torch.float64, device=DEV)
    p = torch.randn(D, r, dtype=torch.float64, device=DEV) / D**0.5
    G = torch.randn(r, r, K, dtype=torch.float64, device=DEV)
    g = random_pref(K, B).to(DEV)

    def z_of(a, p):
        return a @ p

    def t_of(a, p, G, g):  # z M_bᵀ with M_b = Σ_k g_bk G_k
        M = torch.einsum("bk,ijk->bij", g, G)  # (B, r, r)
        return torch.einsum("bla,bca->blc", z_of(a, p).view(B, L, r), M).reshape(N, r)

    z, t = poisoned((N, r), device=DEV), poisoned((N, r), device=DEV)
    tpl._shrink(a.to(dtype), p.to(dtype), G.to(dtype).transpose(0, 1), g.float(), L, z=z, t=t)
    tol = _tol(dtype)  # tf32 on CUDA for fp32
    assert_close_terms(z, z_of(a, p), term_scales(z_of, [a, p])[0], tol, "z")
    assert_close_terms(t, t_of(a, p, G, g), term_scales(t_of, [a, p, G, g])[0], tol, "t")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lora,bias", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("M,N,K,R", [(1, 23, 19, 1), (21, 33, 45, 3), (70, 17, 5, 17)])
def test_gemm_kernel_poisoned(dtype, lora, bias, M, N, K, R):
    a = torch.randn(M, K, dtype=torch.float64, device=DEV)
    bT = torch.randn(K, N, dtype=torch.float64, device=DEV)  # pass b = bT.t(): a transposed view
    t = torch.randn(M, R, dtype=torch.float64, device=DEV)
    u = torch.randn(N, R, dtype=torch.float64, device=DEV)
    bb = torch.randn(N, dtype=torch.float64, device=DEV)

    def ref_of(a, bT, t, u, bb):
        return a @ bT + (t @ u.t() if lora else 0) + (bb if bias else 0)

    out = poisoned((M, N), dtype=dtype, device=DEV)
    res = tpl._gemm(a.to(dtype), bT.to(dtype).t(), dtype, t=t.float() if lora else None,
                    u=u.to(dtype) if lora else None, bias=bb.to(dtype) if bias else None, out=out)
    assert res.data_ptr() == out.data_ptr()
    ins = [a, bT, t, u, bb]
    assert_close_terms(out, ref_of(*ins), term_scales(ref_of, ins)[0], _tol(dtype), "gemm")


@pytest.mark.parametrize("r,P,L", [(1, 1, 7), (3, 4, 5), (17, 2, 600), (5, 1, 1000)])
def test_core_grad_kernel_poisoned(r, P, L):
    w = torch.randn(P * L, r, dtype=torch.float64, device=DEV)
    z = torch.randn(P * L, r, dtype=torch.float64, device=DEV)

    def ref_of(w, z):
        return torch.bmm(w.view(P, L, r).transpose(1, 2), z.view(P, L, r))

    splits, _ = tpl._core_splits(P, L)
    parts = poisoned((P, splits, r, r), device=DEV)
    dM = tpl._core_grad(w.float(), z.float(), P, L, out=parts)
    assert_close_terms(dM, ref_of(w, z), term_scales(ref_of, [w, z])[0], 1e-5, "dM")


def test_import_error_without_triton(monkeypatch):
    # No triton: importing the module raises ImportError (not a crash), so triton_available() is False.
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "pmkernels.triton_pareto_linear")
    monkeypatch.delattr(pmkernels, "triton_pareto_linear")
    with pytest.raises(ImportError, match="triton"):
        importlib.import_module("pmkernels.triton_pareto_linear")
    assert not pmkernels.triton_available()


@pytest.mark.parametrize("lora,bias", [(False, False), (True, True)])
def test_gemm_split_k(lora, bias):
    # K = 600 in 3 slices of 256 (the last one ragged), fp32 partials summed on the host.
    M, N, K, R = 19, 13, 600, 3
    a = torch.randn(M, K, dtype=torch.float64, device=DEV)
    b = torch.randn(N, K, dtype=torch.float64, device=DEV)
    t = torch.randn(M, R, dtype=torch.float64, device=DEV)
    u = torch.randn(N, R, dtype=torch.float64, device=DEV)
    bb = torch.randn(N, dtype=torch.float64, device=DEV)

    def ref_of(a, b, t, u, bb):
        return a @ b.t() + (t @ u.t() if lora else 0) + (bb if bias else 0)

    out = poisoned((M, N), device=DEV)
    tpl._gemm(a.float(), b.float(), torch.float32, t=t.float() if lora else None, u=u.float() if lora else None,
              bias=bb.float() if bias else None, out=out, split_k=3)
    ins = [a, b, t, u, bb]
    assert_close_terms(out, ref_of(*ins), term_scales(ref_of, ins)[0], _tol(torch.float32), "split-K fp32")
    res = tpl._gemm(a.half(), b.half(), torch.float16, split_k=2)
    plain = lambda a, b: a @ b.t()  # noqa: E731
    assert res.dtype == torch.float16
    assert_close_terms(res, plain(a, b), term_scales(plain, [a, b])[0], 1e-2, "split-K fp16")


def test_backward_with_split_k(monkeypatch):
    # Force the split-K path of the token-reduction GEMMs (dW, dU, dV) that only CUDA would pick.
    # Under the interpreter BLOCK_K is fixed at 32, so slices of 32 tokens are aligned; on CUDA the
    # autotuned BLOCK_K goes up to 256, so keep the real alignment and use more tokens.
    monkeypatch.setattr(tpl, "_split_k", lambda M, N, K, device: 3)
    if HAS_CUDA:
        args = make_problem(N=(4, 200), per_sample=True, device=DEV)  # 800 tokens: 3 slices of 256 + 32
    else:
        monkeypatch.setattr(tpl, "_SPLIT_ALIGN", 32)
        args = make_problem(N=(4, 20), per_sample=True)  # 80 tokens: 3 slices of 32 (the last ragged)
    _check(args, torch.float32)


# ----------------------------------------------------------------------------- the one-launch forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r,K", [(3, 2), (16, 5), (20, 5), (20, 2)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("bias,split", [(True, 1), (False, 1), (True, 3)], ids=["bias", "nobias", "bias_splitK"])
def test_one_launch_gemm_poisoned(monkeypatch, dtype, r, K, per_sample, bias, split):
    # _gemm_kernel with FUSE_SHRINK: z = x V in the K loop, t = z M_bᵀ and + t Uᵀ in the epilogue, no t input.
    # Per-sample: 7 samples of L = 5 rows, so a 16-row interpreter tile holds rows of 4 samples (L does not
    # divide BLOCK_M). Split-K: every slice adds the expand of its own partial z (t is linear in z), the
    # host sums the slices; under the interpreter BLOCK_K is 32, so 32-input slices are aligned (75 inputs:
    # 3 slices, the last ragged); on CUDA the autotuned BLOCK_K goes up to 256, so the real alignment.
    if split > 1 and not HAS_CUDA:
        monkeypatch.setattr(tpl, "_SPLIT_ALIGN", 32)
    B, L = (7, 5) if per_sample else (1, 37)
    N, D, O = B * L, 29 if split == 1 else (75 if not HAS_CUDA else 600), 43
    x = torch.randn(N, D, dtype=torch.float64, device=DEV)
    W = torch.randn(O, D, dtype=torch.float64, device=DEV) / D**0.5
    b = torch.randn(O, dtype=torch.float64, device=DEV)
    U = torch.randn(O, r, dtype=torch.float64, device=DEV) / r**0.5
    G = torch.randn(r, r, K, dtype=torch.float64, device=DEV)
    V = torch.randn(D, r, dtype=torch.float64, device=DEV) / D**0.5
    g = random_pref(K, B).to(DEV)

    def ref_of(x, W, b, U, G, V, g):  # x Wᵀ + (x V) M_bᵀ Uᵀ [+ b], M_b = Σ_k g_bk G_k
        M = torch.einsum("bk,ijk->bij", g, G)
        t = torch.einsum("bla,bca->blc", (x @ V).view(B, L, r), M).reshape(N, r)
        return x @ W.t() + t @ U.t() + (b if bias else 0)

    out = poisoned((N, O), dtype=dtype, device=DEV)
    res = tpl._gemm(x.to(dtype), W.to(dtype), dtype, u=U.to(dtype), bias=b.to(dtype) if bias else None, out=out,
                    split_k=split, shrink=(V.to(dtype), G.to(dtype).transpose(0, 1), g.float(), L))
    assert res.data_ptr() == out.data_ptr()
    ins = [x, W, b, U, G, V, g]
    assert_close_terms(out, ref_of(*ins), term_scales(ref_of, ins)[0], _tol(dtype), "one-launch forward")


class _ShrinkSpy:
    """Stands in for tpl._shrink and counts its calls (the two-launch forward's first launch)."""

    def __init__(self):
        self.calls = 0
        self.real = tpl._shrink

    def __call__(self, *a, **k):
        self.calls += 1
        return self.real(*a, **k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("r", [3, 16, 20])
def test_forward_launch_plan(monkeypatch, dtype, per_sample, r):
    # No gradient needed and pad_rank(r) <= FUSED_FWD_MAX_BLOCK_R: the forward is the fused GEMM alone (the
    # shrink launcher is never called); r = 20 (BLOCK_R 32) keeps the two launches. With gradients enabled
    # the forward keeps both launches (the backward needs z and t) and every gradient still matches.
    spy = _ShrinkSpy()
    monkeypatch.setattr(tpl, "_shrink", spy)
    args = make_problem(N=(5, 3), d_in=29, d_out=43, r=r, K=5, per_sample=per_sample)
    one = tcfg.one_launch_forward(pad_rank(r), False, 15, 43, per_sample, capability=0)
    assert one == (r <= 16)
    with torch.no_grad():
        y = triton_pareto_linear(*(None if a is None else a.to(DEV, torch.float32 if n == "pref" else dtype)
                                   for n, a in zip(NAMES, args)))
    assert spy.calls == (0 if one else 1)
    ref64 = [None if a is None else a.to(DEV, torch.float32 if n == "pref" else dtype).double()
             for n, a in zip(NAMES, args)]
    assert_close_terms(y, reference_pareto_linear(*ref64), term_scales(reference_pareto_linear, ref64)[0],
                       _tol(dtype), "no-grad output")
    spy.calls = 0
    _check(args, dtype)  # with grad: output and every gradient against float64
    assert spy.calls == 2  # the forward's shrink and the backward's


def test_fused_gemm_configs():
    # the fused GEMM's pruner counts the V tile it streams beside A and B (num_stages buffers) in the shared
    # memory estimate, and keeps a config for every bucket, dtype, capability and rank it is enabled for
    for cap in (80, 90):
        for dt, es in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
            for bucket in ("small_m", "large_m"):
                for aligned in (True, False):
                    for block_r in (16, tcfg.FUSED_FWD_MAX_BLOCK_R):
                        cfgs = tcfg.gemm_configs(dt, bucket, has_lora=True, add_c=False, block_r=block_r,
                                                 capability=cap, aligned=aligned, fuse_shrink=True)
                        assert cfgs
                        for c in cfgs:
                            kw = c.kwargs
                            assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"] + block_r) * kw["BLOCK_K"] * es \
                                <= tcfg.smem_limit(cap)
    # the launch plan: no gradient, the Triton base, r <= 16, and decode-sized or out within the GPU's limit
    # (before sm_90: shared γ only)
    plan = tcfg.one_launch_forward
    for ps in (False, True):
        assert plan(16, False, 6400, 768, ps, 90) and not plan(32, False, 6400, 768, ps, 90)
        assert not plan(16, True, 16, 768, ps, 90) and not plan(16, False, 16, 768, ps, 90, base="cublas")
        assert plan(16, False, 8192, 4096, ps, 90) and not plan(16, False, 8192, 14336, ps, 90)
        assert plan(16, False, 64, 14336, ps, 80) and not plan(16, False, 65, 14336, ps, 80)
    assert plan(16, False, 6400, 768, False, 80) and not plan(16, False, 6400, 3072, False, 80)
    assert not plan(16, False, 6400, 768, True, 80)


# ----------------------------------------------------------------------------- torch.library integration

def test_opcheck():
    x, weight, bias, U, G, V, pref = make_problem(N=(2, 3), per_sample=True, dtype=torch.float32)
    x2 = x.reshape(-1, x.shape[-1]).to(DEV).requires_grad_()
    args = [x2] + [t.to(DEV).requires_grad_() for t in (weight, bias, U, G, V)] + [pref.float().to(DEV).requires_grad_()]
    torch.library.opcheck(torch.ops.pmkernels.pareto_linear_fwd.default, tuple(args))
    torch.library.opcheck(torch.ops.pmkernels.pareto_linear_infer.default, tuple(a.detach() for a in args))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_torch_compile_fullgraph(per_sample):
    args = make_problem(per_sample=per_sample)

    def f(x, weight, bias, U, G, V, pref):
        return torch.relu(triton_pareto_linear(x, weight, bias, U, G, V, pref)) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")

    # forward + backward through the compiled graph (no graph breaks: fullgraph=True) against the same
    # kernels run eagerly (their accuracy against float64 is _check's job): the same numbers
    leaves = [None if a is None else a.to(DEV, torch.float32).requires_grad_() for a in args]
    eager_leaves = [None if a is None else a.detach().clone().requires_grad_() for a in leaves]
    y, y_eager = cf(*leaves), f(*eager_leaves)
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_eager.backward(dy)
    for n, a, b in zip(NAMES, leaves, eager_leaves):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_torch_compile_no_grad_one_launch(monkeypatch, per_sample):
    # the no-grad forward's op (pareto_linear_infer) traces with no graph break and still runs one launch
    spy = _ShrinkSpy()
    monkeypatch.setattr(tpl, "_shrink", spy)
    args = [None if a is None else a.to(DEV, torch.float32) for a in make_problem(per_sample=per_sample)]

    def f(*a):
        return pmkernels.pareto_linear(*a, impl="triton", check_values=False)

    with torch.no_grad():
        y = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert spy.calls == 0
    args64 = [None if a is None else a.double() for a in args]
    assert_close_terms(y, reference_pareto_linear(*args64), term_scales(reference_pareto_linear, args64)[0],
                       _tol(torch.float32), "compiled no-grad output")


def test_torch_compile_inductor_public_api():
    # The public dispatcher under the default (inductor) backend: with check_values=False there is no
    # host sync, so the whole call (validation, dispatch, custom op, its backward) is one graph.
    args = make_problem(per_sample=True)

    def f(x, weight, bias, U, G, V, pref):
        return pmkernels.pareto_linear(x, weight, bias, U, G, V, pref, impl="triton", check_values=False)

    _check(args, torch.float32, fn=torch.compile(f, fullgraph=True))


def test_autocast():
    args = make_problem(per_sample=True)
    dt = torch.float16
    leaves = [None if a is None else a.to(DEV, torch.float32).requires_grad_() for a in args]
    with torch.autocast(DEV, dtype=dt):
        y = triton_pareto_linear(*leaves)
    assert y.dtype == dt
    # same as casting the inputs by hand (pref stays fp32), bit for bit
    y_cast = triton_pareto_linear(*(None if a is None else a.to(dt) for a in leaves[:-1]), leaves[-1])
    assert torch.equal(y, y_cast)
    ref = reference_pareto_linear(*args)
    assert rel_err(y.detach().cpu(), ref) < 1e-2
    y.float().sum().backward()
    for n, a in zip(NAMES, leaves):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all(), n


# ----------------------------------------------------------------------------- GPU codegen without a GPU
# The interpreter never runs Triton's GPU compiler. bench/scripts/aot_sweep.py --subset compiles a
# representative slice of the launch variants × every config the pruners keep for them, ahead of time for
# Hopper (sm_90) and Ampere (sm_80) with Triton's bundled ptxas, in a subprocess without TRITON_INTERPRET
# (in-process, the interpreter's patched tl builtins break codegen) and a fresh Triton cache (every compile
# is real). It fails on codegen errors the interpreter cannot see, on a variant with no config that fits
# shared memory, on spills in kept configs at r <= 64, and on a GEMM main loop that is not software-
# pipelined. The full sweep (all variants, its table in bench/RESULTS.md) is `python bench/scripts/aot_sweep.py`.

def test_aot_compile_sweep_subset():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    script = os.path.join(root, "bench", "scripts", "aot_sweep.py")
    proc = subprocess.run([sys.executable, script, "--subset"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "SWEEP OK" in proc.stdout


# ----------------------------------------------------------------------------- CUDA: the docs/design.md shape grid

CUDA_SHAPES = {
    "vit_768x768": (6400, 768, 768),
    "vit_768x3072": (6400, 768, 3072),
    "llm_4096x4096": (8192, 4096, 4096),
    "llm_4096x14336": (8192, 4096, 14336),
    "decode_16": (16, 4096, 4096),
}


@pytest.mark.cuda
@pytest.mark.parametrize("shape", list(CUDA_SHAPES), ids=list(CUDA_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_shape_grid(shape, dtype, per_sample):
    tokens, d_in, d_out = CUDA_SHAPES[shape]
    B = 16 if tokens <= 64 else 4  # decode: one user per token; else 4 samples (float64 W(γ) per sample)
    N = (B, tokens // B)
    args = make_problem(N=N, d_in=d_in, d_out=d_out, r=16, K=8, per_sample=per_sample, dtype=torch.float32,
                        device="cuda")
    # against the float64 reference: output and every gradient
    _check(args, dtype)
    # against impl="torch" at the same dtype
    a = [None if t is None else t.to(dtype) for t in args[:-1]] + [args[-1]]
    y_t = pmkernels.pareto_linear(*a, impl="triton")
    y_p = pmkernels.pareto_linear(*a, impl="torch")
    assert rel_err(y_t, y_p) < _tol(dtype)


def test_autotune_config_cap(monkeypatch):
    # PMKERNELS_AUTOTUNE_CONFIGS=N (bench/gpu_check.sh's short GPU window): the runtime pruners keep only
    # the first N configs of what gemm_configs / shrink_configs keep; unset: all of them; bad values fail.
    monkeypatch.setattr(tpl, "cuda_capability", lambda dev: 90)
    a = torch.empty(100, 64, dtype=torch.bfloat16)
    gemm_kw = dict(HAS_LORA=True, ADD_C=False, BLOCK_R=16, FUSE_SHRINK=False)
    gemm_args = dict(a_ptr=a, b_ptr=a, M=8192, N=4096, M_BUCKET=1)
    shrink_kw = dict(BLOCK_R=16, SHARED_PREF=True)
    shrink_args = dict(a_ptr=a, K=8, N=8192, N_BUCKET=1)
    every_gemm = tcfg.gemm_configs(torch.bfloat16, "large_m", has_lora=True, add_c=False, block_r=16, capability=90,
                                  b_dtype=torch.bfloat16)
    assert len(every_gemm) > 2
    monkeypatch.setattr(tpl, "_AUTOTUNE_MAX", None)
    assert len(tpl._prune_gemm([], gemm_args, **gemm_kw)) == len(every_gemm)
    monkeypatch.setattr(tpl, "_AUTOTUNE_MAX", 2)
    assert tpl._prune_gemm([], gemm_args, **gemm_kw) == every_gemm[:2]
    # the one-launch forward's GEMM (FUSE_SHRINK) is capped the same way, from its own kept list
    every_fused = tcfg.gemm_configs(torch.bfloat16, "large_m", has_lora=True, add_c=False, block_r=16, capability=90,
                                   b_dtype=torch.bfloat16, fuse_shrink=True)
    assert tpl._prune_gemm([], gemm_args, **dict(gemm_kw, FUSE_SHRINK=True)) == every_fused[:2]
    assert len(tpl._prune_shrink([], shrink_args, **shrink_kw)) == 2
    for raw, want in (("", None), ("0", None), ("3", 3)):
        monkeypatch.setenv("PMKERNELS_AUTOTUNE_CONFIGS", raw)
        assert tpl._autotune_max_configs() == want
    monkeypatch.setenv("PMKERNELS_AUTOTUNE_CONFIGS", "two")
    with pytest.raises(ValueError, match="PMKERNELS_AUTOTUNE_CONFIGS"):
        tpl._autotune_max_configs()


def test_unaligned_gemm_configs(monkeypatch):
    # Odd K or row strides (no divisibility hints: element-wise, unpipelined loads) spilled in nearly every
    # aligned config (AOT sweep at odd sizes); such launches get their own small-K tiles, chosen by the
    # launch's M_BUCKET bit 1, which is also part of the autotune key.
    assert tcfg.loads_aligned(4096, 4096, 1, 4096, 1) and tcfg.loads_aligned(0, 1, 4096, 1, 768)
    assert not tcfg.loads_aligned(4093, 4093, 1, 4093, 1) and not tcfg.loads_aligned(4096, 4093, 1, 4096, 1)
    for bucket in ("small_m", "large_m"):
        for cap in (80, 90):
            for dt in ("bf16", "fp32"):
                odd = tcfg.gemm_configs(dt, bucket, has_lora=True, add_c=False, block_r=16, capability=cap,
                                       aligned=False)
                assert odd and all(c in tcfg.GEMM_UNALIGNED_CONFIGS[bucket] for c in odd)
                assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 32 for c in odd)
    thin = dict(has_lora=False, add_c=False, block_r=16, capability=90, b_dtype=torch.float32)
    assert tcfg.gemm_configs("bf16", "thin_n", aligned=False, **thin) == tcfg.gemm_configs("bf16", "thin_n", **thin)
    monkeypatch.setattr(tpl, "cuda_capability", lambda dev: 90)
    a = torch.empty(8, 8, dtype=torch.bfloat16)
    kw = dict(HAS_LORA=True, ADD_C=False, BLOCK_R=16, FUSE_SHRINK=False)
    for m_bucket, odd in ((1, False), (3, True)):
        got = tpl._prune_gemm([], dict(a_ptr=a, b_ptr=a, M=8185, N=4091, M_BUCKET=m_bucket), **kw)
        assert all((c in tcfg.GEMM_UNALIGNED_CONFIGS["large_m"]) == odd for c in got)


def test_unaligned_shrink_configs():
    # odd sizes (element-wise loads): the prefill configs with BLOCK_D >= 64 spilled (AOT sweep), so unaligned
    # prefill launches keep BLOCK_D <= 32; decode launches and aligned ones are unchanged
    for cap in (80, 90):
        for dt in ("bf16", "fp32"):
            for r in (16, 64):
                odd = tcfg.shrink_configs(dt, r, 8, True, cap, small_n=False, aligned=False)
                assert odd and all(c.kwargs["BLOCK_D"] <= 32 for c in odd)
                assert tcfg.shrink_configs(dt, r, 8, True, cap, small_n=True, aligned=False) == \
                    tcfg.shrink_configs(dt, r, 8, True, cap, small_n=True)
