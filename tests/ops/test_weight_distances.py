"""Tests of pmkernels.weight_distances: every impl against a float64 reference."""
from __future__ import annotations

import warnings

import pytest
import torch

import pmkernels
from pmkernels.weight_distances import cpp_available, resolve_impl, weight_distances

from pmkernels.testing import assert_close_terms, term_scales
from helpers import HAS_CUDA, random_pref, rel_err

SHAPES = [  # (out, in, r, K)
    (23, 19, 3, 4),
    (23, 19, 1, 1),
    (37, 70, 5, 3),
    (41, 131, 20, 2),  # several row blocks and column tiles; r = 16 + 8 slices in the cpp kernel
]


def _cpp_ok() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cpp_available()


def _cpp_reason() -> str:
    from pmkernels.cpp_weight_distances import build_error

    return f"the C++ weight_distances extension could not be built here: {build_error()}"


def _triton_ok() -> bool:
    try:
        import pmkernels.triton_weight_distances  # noqa: F401
    except ImportError:
        return False
    return True


needs_cpp = pytest.mark.skipif(not _cpp_ok(), reason="C++ extension unavailable (see build warning)")
needs_triton = pytest.mark.skipif(not _triton_ok(), reason="triton is not importable")

IMPLS = [
    "naive",
    "torch",
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=needs_triton),
]


def make_wd(out=23, in_=19, r=3, K=4, dtype=torch.float64, delta_dtype=None, device="cpu"):
    """Fresh random inputs (no zeros) at odd shapes."""
    U = torch.randn(out, r, dtype=dtype, device=device) / r**0.5
    G = torch.randn(r, r, K, dtype=dtype, device=device)
    V = torch.randn(in_, r, dtype=dtype, device=device) / r**0.5
    pref = random_pref(K).to(device=device, dtype=dtype)
    D = torch.randn(K, out, in_, dtype=delta_dtype or dtype, device=device)
    return U, G, V, pref, D


reference = pmkernels.reference_weight_distances


def _abs_terms(U, G, V, pref, deltas):
    """The reference with ΔW − D_k turned into ΔW + |D_k| (term_scales passes |inputs|): Σ|terms|."""
    return reference(U, G, V, pref, [-d for d in deltas])


def assert_matches(f, g, U, G, V, pref, deltas, w, *, tol_f=1e-5, tol_g=1e-5):
    """Objectives f and gradients g (of U, G, V, pref under the weights w) vs the float64 reference,
    each error relative to the size of its terms (pmkernels.testing)."""
    f_ref, g_ref = _grads(reference, U.double(), G.double(), V.double(), pref.double(), deltas, w.double())
    f_scale, g_scales = term_scales(lambda u, gg, v, p: _abs_terms(u, gg, v, p, [d.double().abs() for d in deltas]),
                                    [U, G, V, pref], w)
    assert_close_terms(f, f_ref, f_scale, tol_f, "objectives")
    for name, a, b, scale in zip("UGVp", g, g_ref, g_scales):
        assert a is not None and torch.isfinite(a).all(), name
        assert_close_terms(a, b, scale, tol_g, f"grad of {name}")


def _grads(fn, U, G, V, pref, deltas, w):
    leaves = [t.detach().clone().requires_grad_() for t in (U, G, V, pref)]
    f = fn(*leaves, deltas)
    (f * w).sum().backward()
    return f.detach(), [t.grad for t in leaves]


def _run(impl, U, G, V, pref, deltas):
    return weight_distances(U, G, V, pref, deltas, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads_fp32(impl, shape):
    out, in_, r, K = shape
    U, G, V, pref, D = make_wd(out, in_, r, K)
    w = torch.randn(K, dtype=torch.float64)
    U, G, V, pref, D = (t.float() for t in (U, G, V, pref, D))
    f, g = _grads(lambda *a: _run(impl, *a), U, G, V, pref, D, w.float())
    assert f.dtype == torch.float32 and f.shape == (K,)
    assert_matches(f, g, U, G, V, pref, D, w.float())


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("shape", [(5, 4, 2, 3), (3, 6, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_fp64(impl, shape):
    U, G, V, pref, D = make_wd(*shape)
    ins = [t.clone().requires_grad_() for t in (U, G, V, pref)]
    # pref is perturbed off the simplex by gradcheck: normalize=True keeps validation happy
    # and differentiates through the normalisation, which is part of the op then.
    assert torch.autograd.gradcheck(
        lambda u, g, v, p: weight_distances(u, g, v, p, D, impl=impl, normalize=True), ins
    )
    assert torch.autograd.gradcheck(lambda u, g, v: weight_distances(u, g, v, pref, list(D), impl=impl), ins[:3])


@pytest.mark.parametrize("impl", IMPLS)
def test_list_equals_stacked(impl):
    U, G, V, pref, D = [t.float() for t in make_wd(23, 19, 3, 4)]
    a = _run(impl, U, G, V, pref, D)
    # separate, non-contiguous-in-memory tensors; one a strided (transposed-copy) view
    ds = [d.clone() for d in D]
    ds[1] = D[1].t().contiguous().t()
    b = _run(impl, U, G, V, pref, ds)
    c = _run(impl, U, G, V, pref, tuple(D.unbind(0)))
    assert torch.equal(a, c)
    assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["U", "V", "deltas_rows", "deltas_cols"])
def test_non_contiguous_inputs(impl, which):
    # U, V and the deltas as non-contiguous views: every impl uses their strides or copies them.
    U, G, V, pref, D = [t.float() for t in make_wd(41, 70, 5, 3)]
    w = torch.randn(3)

    def run(u, g, v, p, deltas):
        if which == "U":
            u = u.t().contiguous().t()
        elif which == "V":
            v = v.new_zeros(v.shape[0], 2 * v.shape[1]).index_copy(1, torch.arange(0, 2 * v.shape[1], 2), v)[:, ::2]
        elif which == "deltas_rows":  # row stride > in: slices of a wider buffer
            deltas = torch.cat([deltas, deltas], dim=2)[:, :, : deltas.shape[2]]
        else:  # column stride != 1: transposed copies
            deltas = deltas.transpose(1, 2).contiguous().transpose(1, 2)
        assert not (u if which == "U" else v if which == "V" else deltas).is_contiguous()
        return _run(impl, u, g, v, p, deltas)

    f, g = _grads(run, U, G, V, pref, D, w)
    assert_matches(f, g, U, G, V, pref, D, w)


@pytest.mark.parametrize(
    "impl,dtype",
    [
        ("torch", torch.bfloat16),
        ("naive", torch.bfloat16),
        pytest.param("cpp", torch.bfloat16, marks=needs_cpp),
        pytest.param("cpp", torch.float16, marks=needs_cpp),
        # the kernel converts each loaded delta tile to fp32 at once: bf16 works under the interpreter too
        pytest.param("triton", torch.float16, marks=needs_triton),
        pytest.param("triton", torch.bfloat16, marks=needs_triton),
    ],
)
def test_low_precision_deltas(impl, dtype):
    device = "cuda" if (impl == "triton" and HAS_CUDA) else "cpu"
    U, G, V, pref, D = make_wd(23, 19, 3, 4, dtype=torch.float32, delta_dtype=dtype, device=device)
    w = torch.randn(4, device=device)
    f, g = _grads(lambda *a: _run(impl, *a), U, G, V, pref, list(D), w)
    assert f.dtype == torch.float32
    # reference on the same (already rounded) deltas: accumulation is fp32, only the deltas are rounded
    assert_matches(f, g, U, G, V, pref, D, w)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
def test_cuda(impl):
    U, G, V, pref, D = make_wd(130, 70, 16, 8, dtype=torch.float32, device="cuda")
    w = torch.randn(8, device="cuda")
    f, g = _grads(lambda *a: _run(impl, *a), U, G, V, pref, D, w)
    assert_matches(f, g, U, G, V, pref, D, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_layer(impl):
    U, G, V, pref, D = [t.float() for t in make_wd(0, 5, 2, 3)]
    f = _run(impl, U, G, V, pref, D)
    assert f.shape == (3,) and torch.equal(f, torch.zeros(3))


def test_auto_picks_cpp_on_cpu():
    expected = "cpp" if _cpp_ok() else "torch"
    assert resolve_impl("auto", torch.device("cpu")) == expected
    U, G, V, pref, D = [t.float() for t in make_wd(23, 19, 3, 4)]
    assert rel_err(pmkernels.weight_distances(U, G, V, pref, D), reference(U, G, V, pref, D)) < 1e-5


@needs_cpp
def test_cpp_op_registered():
    assert hasattr(torch.ops.pmkernels, "weight_distances_pass")
    D = torch.randn(2, 7, 5)
    U, V = torch.randn(7, 3), torch.randn(5, 3)
    for dt in (torch.float32, torch.float64):
        Dd, Ud, Vd = D.to(dt), U.to(dt), V.to(dt)
        sq, Y, Z = torch.ops.pmkernels.weight_distances_pass(list(Dd), Ud, Vd)
        torch.testing.assert_close(sq, Dd.pow(2).sum((1, 2)))
        torch.testing.assert_close(Y, (Dd @ Vd).transpose(0, 1))
        torch.testing.assert_close(Z, (Dd.transpose(1, 2) @ Ud).transpose(0, 1))


def test_cpp_build_failure_falls_back(monkeypatch):
    from pmkernels import cpp_weight_distances as cw

    monkeypatch.setattr(cw, "_state", {"tried": False, "ok": False, "error": None})

    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cw, "_build", broken)
    U, G, V, pref, D = [t.float() for t in make_wd(23, 19, 3, 4)]
    with pytest.warns(RuntimeWarning, match="could not build"):
        f = weight_distances(U, G, V, pref, D, impl="auto")
    assert rel_err(f, reference(U, G, V, pref, D)) < 1e-5
    with pytest.raises(RuntimeError, match="impl='cpp'"):
        weight_distances(U, G, V, pref, D, impl="cpp")


# ---------------------------------------------------------------- bad input
@pytest.fixture
def good():
    return [t.float() for t in make_wd(6, 5, 2, 3)]


@pytest.mark.parametrize("impl", ["torch", "naive", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(deltas=torch.randn(3, 6, 4)), ValueError, "deltas"),
        (lambda a: a.update(deltas=torch.randn(2, 6, 5)), ValueError, "deltas"),
        (lambda a: a.update(deltas=torch.randn(6, 5)), ValueError, "deltas"),
        (lambda a: a.update(deltas=[torch.randn(6, 5)] * 2), ValueError, "deltas"),
        (lambda a: a.update(deltas=[torch.randn(6, 5), torch.randn(6, 4), torch.randn(6, 5)]), ValueError,
         r"deltas\[1\]"),
        (lambda a: a.update(deltas=[torch.randn(6, 5), "x", torch.randn(6, 5)]), TypeError, r"deltas\[1\]"),
        (lambda a: a.update(deltas=[torch.randn(6, 5), torch.ones(6, 5, dtype=torch.int64), torch.randn(6, 5)]),
         TypeError, r"deltas\[1\]"),
        (lambda a: a.update(deltas=torch.ones(3, 6, 5, dtype=torch.int64)), TypeError, "deltas"),
        (lambda a: a.update(deltas=torch.ones(3, 6, 5, dtype=torch.bool)), TypeError, "deltas"),
        (lambda a: a.update(deltas={"a": 1}), TypeError, "deltas"),
        (lambda a: a.update(deltas=None), TypeError, "deltas"),
        (lambda a: a.update(pref=torch.full((4,), 0.25)), ValueError, "pref"),
        (lambda a: a.update(pref=torch.tensor([1.2, -0.1, -0.1])), ValueError, "pref"),
        (lambda a: a.update(pref=[0.3, 0.3, 0.4]), TypeError, "pref"),
        (lambda a: a.update(U=torch.randn(6, 3)), ValueError, "U"),
        (lambda a: a.update(V=torch.randn(5, 3)), ValueError, "V"),
        (lambda a: a.update(G=torch.randn(2, 3, 3)), ValueError, "G"),
        (lambda a: a.update(U="U"), TypeError, "U"),
    ],
)
def test_bad_input(good, impl, mutate, exc, match):
    U, G, V, pref, D = good
    args = dict(U=U, G=G, V=V, pref=pref, deltas=D)
    mutate(args)
    with pytest.raises(exc, match=match):
        weight_distances(args["U"], args["G"], args["V"], args["pref"], args["deltas"], impl=impl)


def test_bad_impl(good):
    U, G, V, pref, D = good
    with pytest.raises(ValueError, match="impl"):
        weight_distances(U, G, V, pref, D, impl="cuda")


def test_impl_device_mismatch():
    with pytest.raises(ValueError, match="impl='cpp' needs CPU tensors"):
        resolve_impl("cpp", torch.device("cuda"))


# ---------------------------------------------------------------- torch.library integration
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
def test_projections_opcheck(backend):
    from pmkernels import fused_weight_distances  # noqa: F401  (registers the op)

    U, G, V, pref, D = [t.float() for t in make_wd(23, 19, 3, 4)]
    torch.library.opcheck(torch.ops.pmkernels.weight_distances_projections.default,
                          (U.requires_grad_(), V.requires_grad_(), list(D), backend))


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(impl):
    # The fused path is a custom op with autograd + fake rules: torch.compile traces it with no graph break.
    U, G, V, pref, D = [t.float() for t in make_wd(23, 19, 3, 4)]
    w = torch.randn(4)

    def f(u, g, v, p):
        return weight_distances(u, g, v, p, D, impl=impl, check_values=False)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    f_c, g_c = _grads(lambda u, g, v, p, _d: cf(u, g, v, p), U, G, V, pref, D, w)
    f_e, g_e = _grads(lambda *a: _run(impl, *a), U, G, V, pref, D, w)
    assert rel_err(f_c, f_e) < 1e-6
    for name, a, b in zip("UGVp", g_c, g_e):
        assert rel_err(a, b) < 1e-6, name


@needs_cpp
@pytest.mark.parametrize("dtype,delta_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(23, 19, 3, 2), (301, 70, 5, 2), (1100, 33, 17, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_pass_bitwise_independent_of_threads(dtype, delta_dtype, shape):
    # The C++ pass sums its partials in an order fixed by the shape, never by the thread count.
    out, in_, r, K = shape
    D = torch.randn(K, out, in_).to(delta_dtype)
    U, V = torch.randn(out, r, dtype=dtype), torch.randn(in_, r, dtype=dtype)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(torch.ops.pmkernels.weight_distances_pass(list(D), U, V))
    for res in results[1:]:
        for a, b in zip(results[0], res):
            assert torch.equal(a, b)
