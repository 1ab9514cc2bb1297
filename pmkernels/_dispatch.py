"""Dispatch helpers shared by the pmkernels ops.

Each op module declares its implementations as a tuple ``IMPLS`` (``pareto_linear.IMPLS``,
``weight_distances.IMPLS``, ``low_rank_distances.IMPLS``) and resolves a requested ``impl`` with its
own ``resolve_impl(impl, device)``, which calls ``resolve_impl(op, impl, device)`` here. The rules are
the same for every op:

* ``"auto"``: the fused Triton kernels on CUDA when the op has them and they
  import; the C++ CPU kernel on CPU when the op has one and it builds;
  otherwise the factored PyTorch path (``"torch"``). ``pareto_linear`` then
  refines a CPU ``"torch"`` to ``"naive"`` where merging W(γ) first is faster
  (``merge_first_is_faster``).
* ``"triton"``: needs the op's Triton module to import (else
  ``NotImplementedError``) and CUDA tensors, or CPU tensors under the Triton
  interpreter (``TRITON_INTERPRET=1``; else ``ValueError``).
* ``"cpp"``: needs CPU tensors (``ValueError``) and the C++ kernel to build
  (``RuntimeError`` with the build error).
* any other member of the op's tuple is returned as is.
"""
from __future__ import annotations

import importlib
import os

import torch

# op name -> (its implementations, its Triton module or None, whether it has a C++ kernel)
_OPS: dict[str, tuple[tuple[str, ...], str | None, bool]] = {}


def register_op(op: str, impls: tuple[str, ...], *, triton_module: str | None = None, cpp: bool = False) -> None:
    """Declare an op's implementation tuple, its Triton module (``pmkernels.<name>``) and C++ kernel."""
    _OPS[op] = (impls, triton_module, cpp)


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under torch.compile both availability checks run once at trace time and their result is baked in
# (dynamo cannot trace importlib or the build lock; the answer does not change within a process).
@torch.compiler.assume_constant_result
def triton_importable(module: str) -> bool:
    """True when ``pmkernels.<module>`` (a file of Triton kernels) imports, i.e. triton is usable."""
    try:
        importlib.import_module(f"pmkernels.{module}")
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def cpp_available() -> bool:
    """True when the C++ CPU kernel builds and loads (builds it on first call)."""
    from .cpp_weight_distances import available

    return available()


def pad_rank(r: int) -> int:
    """r padded to a power of two >= 16: a kernel's BLOCK_R (tl.dot needs every dim >= 16)."""
    return max(16, 1 << max(0, int(r) - 1).bit_length())


def cuda_capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as major * 10 + minor (90 for an H100): the key of the
    kernels' config pruners."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# Where merging W(γ) once per call (out·in·r MACs and a few passes over an (out, in) fp32 buffer) beats
# the factored path's per-row low-rank work (N·(in+out)·r MACs in rank-16 GEMMs, one more pass over x
# and the output): N ≥ MERGE_FIRST_ROWS[dtype] · in·out/(in+out). Measured with
# `bench/scripts/time_pareto_linear_cpu.py crossover` (2-core Xeon VM with AVX-512/AMX, 1 thread, r = 16,
# K = 8, shared γ, forward, square 64…768; bench/RESULTS.md "pareto_linear on CPU"): naive/torch time
# fell below 1 from N = 2–4 × in·out/(in+out) in fp32; in bf16 (AMX makes the GEMM, not the merge, fast)
# from N ≤ 1 × for in ≤ 384 but only from ≈ 5 × at 768. Both factors are the conservative end, so auto
# does not pick a path measured slower (it leaves some bf16 wins to the factored path instead).
MERGE_FIRST_ROWS = {torch.float32: 4, torch.float64: 4, torch.bfloat16: 6, torch.float16: 6}


def merge_first_is_faster(n_rows: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32) -> bool:
    """True when a CPU forward of ``pareto_linear`` with one shared γ over ``n_rows`` rows is faster
    merging W(γ) first (impl "naive") than factored (impl "torch"); see ``MERGE_FIRST_ROWS``."""
    return n_rows * (d_in + d_out) >= MERGE_FIRST_ROWS.get(dtype, 4) * d_in * d_out


def resolve_impl(op: str, impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete implementation of ``op`` for tensors on ``device`` (rules: module docstring)."""
    impls, triton_module, has_cpp = _OPS[op]
    if impl not in impls:
        raise ValueError(f"impl must be one of {impls}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and triton_module is not None and triton_importable(triton_module):
            return "triton"
        if device.type == "cpu" and has_cpp and cpp_available():
            return "cpp"
        return "torch"
    if impl == "triton":
        if not triton_importable(triton_module):
            raise NotImplementedError(
                f"impl='triton' needs the fused Triton kernels (pmkernels.{triton_module}), "
                "which could not be imported here (is triton installed?); use impl='torch'"
            )
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors on {device}"
            )
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' needs CPU tensors, got tensors on {device}")
        if not cpp_available():
            from .cpp_weight_distances import build_error

            raise RuntimeError(f"impl='cpp': the C++ kernel could not be built ({build_error()}); use impl='torch'")
    return impl
