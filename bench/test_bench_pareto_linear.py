"""Op-level benchmark of ``pmkernels.pareto_linear`` against ``F.linear`` and naive merging.

Every case of one group (shape × dtype × pass × γ mode) is measured in the
same run, side by side:

    linear  plain F.linear(x, W, b): the floor (it ignores γ)
    naive   materialise W(γ) (B copies for a per-sample γ), then F.linear / bmm
    torch   factored PyTorch: x Wᵀ + b + ((x V) M(γ)ᵀ) Uᵀ
    triton  the fused kernels (only on CUDA with pmkernels.triton_available())

Passes: ``fwd`` (under no_grad), ``fwdbwd-frozenW`` (forward + grads of x and
the Pareto tensors U, G, V; for ``linear`` forward + dx) and
``fwdbwd-trainW`` (+ dW and db).

Before timing, each case's output and all its gradients are checked against
the reference on the same inputs (``impl="torch"``; for ``torch`` itself and
for ``linear``, the same computation in float64), so a fast wrong kernel never
posts a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import pmkernels
from pmkernels import reference
from pmkernels._validation import check_pref_values
from pmbench_util import (DEVICE, pm_size, DTYPE_NAMES, GUARD_TOL, GUARD_TOL_DELTA, HAS_CUDA, MEM_METHOD,
                          peak_memory, rel_err, run_pedantic, skip_if_oom, sync, timed)

R, K = 16, 8


@dataclass(frozen=True)
class Shape:
    name: str      # family and layer, e.g. "vit-attn"
    tokens: int    # N = B * L
    d_in: int
    d_out: int
    batch: int     # B: number of samples (rows of a per-sample γ); tokens split evenly

    @property
    def label(self) -> str:
        return f"{self.name} {self.tokens}tok {self.d_in}->{self.d_out}"

    @property
    def per_sample_tokens(self) -> int:
        return self.tokens // self.batch


# docs/design.md §5 shapes; per-sample γ: B = 64 for ViT/LLM (6400 = 64×100, 8192 = 64×128), B = 16 for decode.
FULL_SHAPES = [
    Shape("vit-attn", 6400, 768, 768, 64),
    Shape("vit-mlp", 6400, 768, 3072, 64),
    Shape("llm-attn", 8192, 4096, 4096, 64),
    Shape("llm-mlp", 8192, 4096, 14336, 64),
    Shape("decode", 16, 4096, 4096, 16),
]
# Scaled down for CPU runs (same families, same out/in ratios, same r and K).
SMALL_SHAPES = [
    Shape("vit-attn", 512, 64, 64, 16),
    Shape("vit-mlp", 512, 64, 256, 16),
    Shape("llm-attn", 512, 128, 128, 16),
    Shape("llm-mlp", 512, 128, 448, 16),
    Shape("decode", 16, 128, 128, 16),
]

PASSES = ("fwd", "fwdbwd-frozenW", "fwdbwd-trainW")
GAMMAS = ("shared", "per_sample")
IMPLS = ("linear", "naive", "torch", "triton")


def dtypes_for_device():
    return [torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    shapes = FULL_SHAPES if pm_size(metafunc.config) == "full" else SMALL_SHAPES
    params, ids = [], []
    for shape in shapes:
        for dtype in dtypes_for_device():
            for pass_ in PASSES:
                for gamma in GAMMAS:
                    for impl in IMPLS:
                        # plain strings/ints only, so --benchmark-json can serialise the params
                        params.append(dict(shape=shape.name, tokens=shape.tokens, d_in=shape.d_in, d_out=shape.d_out,
                                           batch=shape.batch, dtype=DTYPE_NAMES[dtype], pass_=pass_, gamma=gamma,
                                           impl=impl))
                        ids.append(f"{shape.name}-{shape.d_in}x{shape.d_out}-{DTYPE_NAMES[dtype]}-{pass_}-{gamma}-{impl}")
    metafunc.parametrize("case", params, ids=ids)


DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


# --------------------------------------------------------------------------
# Inputs and the functions timed
# --------------------------------------------------------------------------
def make_inputs(shape: Shape, dtype: torch.dtype, gamma: str) -> dict:
    """Fresh random inputs; the low-rank term x (U M Vᵀ)ᵀ is about as large as x Wᵀ."""
    B, L = shape.batch, shape.per_sample_tokens
    d = dict(device=DEVICE, dtype=torch.float32)
    x = torch.randn(B, L, shape.d_in, **d)
    W = torch.randn(shape.d_out, shape.d_in, **d) / math.sqrt(shape.d_in)
    b = 0.1 * torch.randn(shape.d_out, **d)
    U = torch.randn(shape.d_out, R, **d) / math.sqrt(R)
    G = torch.randn(R, R, K, **d)
    V = torch.randn(shape.d_in, R, **d) / math.sqrt(shape.d_in)
    dy = torch.randn(B, L, shape.d_out, **d)
    conc = torch.ones(K, device=DEVICE)
    pref_shape = (B,) if gamma == "per_sample" else ()
    pref = torch.distributions.Dirichlet(conc).sample(pref_shape).float()
    pref = check_pref_values(pref)  # validate once, off the hot path (calls pass check_values=False)
    t = {k: v.to(dtype) for k, v in dict(x=x, W=W, b=b, U=U, G=G, V=V, dy=dy).items()}
    t["pref"] = pref
    return t


def grad_names(impl: str, pass_: str) -> list[str]:
    if pass_ == "fwd":
        return []
    names = ["x"] if impl == "linear" else ["x", "U", "G", "V"]
    if pass_ == "fwdbwd-trainW":
        names += ["W", "b"]
    return names


def forward(impl: str, t: dict) -> torch.Tensor:
    if impl == "linear":
        return F.linear(t["x"], t["W"], t["b"])
    if impl == "torch64":  # the factored form in float64: the reference of impl="torch"
        return reference.torch_pareto_linear(t["x"], t["W"], t["b"], t["U"], t["G"], t["V"], t["pref"])
    return pmkernels.pareto_linear(t["x"], t["W"], t["b"], t["U"], t["G"], t["V"], t["pref"], impl=impl,
                                   check_values=False)


def make_fn(impl: str, pass_: str, t: dict):
    """The function timed: returns the output (fwd) or the tuple of gradients (fwd+bwd)."""
    names = grad_names(impl, pass_)
    if not names:
        def fwd():
            with torch.no_grad():
                return forward(impl, t)
        return fwd
    leaves = [t[n].detach().requires_grad_(True) for n in names]
    tt = dict(t)
    tt.update(zip(names, leaves))
    dy = t["dy"]

    def fwdbwd():
        y = forward(impl, tt)
        return (y,) + torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return fwdbwd


def reference_outputs(impl: str, pass_: str, t: dict):
    """What impl's outputs are checked against: impl='torch' for naive/triton, float64 for torch and linear."""
    if impl in ("naive", "triton"):
        return make_fn("torch", pass_, t)()
    t64 = {k: (v.double() if k != "pref" else v) for k, v in t.items()}
    return make_fn("linear" if impl == "linear" else "torch64", pass_, t64)()


def guard(impl: str, pass_: str, t: dict, fn, dtype) -> None:
    out = fn()
    ref = reference_outputs(impl, pass_, t)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    names = ["y"] + grad_names(impl, pass_)
    tol = GUARD_TOL[dtype]
    for name, o, r in zip(names, out, ref):
        assert o is not None, f"guard: {impl} returned no gradient for {name} (not used in its graph)"
        assert o.shape == r.shape, f"guard: {impl} {name} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"guard: {impl} {name} has non-finite values"
        err = rel_err(o, r)
        assert err < tol, f"guard: {impl} {name} rel err {err:.3g} >= {tol:g} against the reference"
    if impl != "linear":
        # The low-rank term alone, so a kernel that drops or garbles it cannot hide behind x Wᵀ.
        with torch.no_grad():
            base = F.linear(t["x"].double(), t["W"].double(), t["b"].double())
        err = rel_err(out[0].double() - base, ref[0].double() - base)
        tol_d = GUARD_TOL_DELTA[dtype]
        assert err < tol_d, f"guard: {impl} low-rank term rel err {err:.3g} >= {tol_d:g} against the reference"


# --------------------------------------------------------------------------
# FLOPs and bytes (same count for every impl of a group except linear)
# --------------------------------------------------------------------------
def flops(shape: Shape, impl: str, pass_: str) -> float:
    """Algorithmic FLOPs of the factored form (naive does more; its TFLOP/s is 'useful' work).

    base = 2 N in out, lr = 2 N (in r + r² + r out). fwd: base + lr; fwd+bwd
    frozen W: 2 base + 3 lr (dx, dU, dV, dM); trainable: + base (dW).
    linear: base per GEMM (1, 2 or 3 of them).
    """
    N, i, o = shape.tokens, shape.d_in, shape.d_out
    base = 2.0 * N * i * o
    lr = 0.0 if impl == "linear" else 2.0 * N * (i * R + R * R + R * o)
    n_gemm = {"fwd": 1, "fwdbwd-frozenW": 2, "fwdbwd-trainW": 3}[pass_]
    n_lr = 1 if pass_ == "fwd" else 3
    return n_gemm * base + n_lr * lr


def min_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> float:
    """Compulsory traffic: read x, W, write y; backward: read dy, W, x, write dx (and dW)."""
    e = torch.tensor([], dtype=dtype).element_size()
    N, i, o = shape.tokens, shape.d_in, shape.d_out
    fwd = N * i + i * o + N * o
    extra = {"fwd": 0, "fwdbwd-frozenW": N * o + i * o + N * i, "fwdbwd-trainW": 2 * (N * o + i * o + N * i)}[pass_]
    return float(e * (fwd + extra))


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------
def test_pareto_linear(benchmark, size, case):
    shape = Shape(case["shape"], case["tokens"], case["d_in"], case["d_out"], case["batch"])
    dtype, pass_, gamma, impl = DTYPES_BY_NAME[case["dtype"]], case["pass_"], case["gamma"], case["impl"]
    if impl == "triton" and not (HAS_CUDA and pmkernels.triton_available()):
        pytest.skip("impl='triton' needs CUDA and pmkernels.triton_available(); "
                    f"cuda={HAS_CUDA}, triton_available={pmkernels.triton_available()}")
    dname = DTYPE_NAMES[dtype]
    benchmark.group = f"{shape.label} | {dname} | {pass_} | gamma={gamma}"
    with skip_if_oom():
        t = make_inputs(shape, dtype, gamma)
        fn = make_fn(impl, pass_, t)
        guard(impl, pass_, t, fn, dtype)
        sync()
        mem = peak_memory(fn)
        median = run_pedantic(benchmark, timed(fn))
    fl = flops(shape, impl, pass_)
    nb = min_bytes(shape, dtype, pass_)
    benchmark.extra_info.update({"impl": impl, "pass": pass_})
    benchmark.extra_info.update(
        shape=shape.name,
        tokens=shape.tokens,
        d_in=shape.d_in,
        d_out=shape.d_out,
        r=R,
        K=K,
        batch=shape.batch if gamma == "per_sample" else 1,
        dtype=dname,
        gamma=gamma,
        size=size,
        device=str(DEVICE),
        threads=torch.get_num_threads(),
        peak_mem_bytes=mem,
        peak_mem_method=MEM_METHOD,
        flops=fl,
        tflops=(fl / median / 1e12) if median else None,
        gbps=(nb / median / 1e9) if median else None,
    )
