"""Helpers shared by the benchmark suites in bench/ (timing, peak memory, guards).

Imported by the test modules as a top-level module (``bench/`` is put on
``sys.path`` by ``bench/conftest.py``), so the suite runs the same with
``pytest bench`` from the repo root and with any pytest import mode.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from typing import Callable

import pytest
import torch

from pmkernels.testing import rel_err  # noqa: F401  (one definition, shared with tests/; re-exported)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Correctness guard: relative error ‖out − ref‖/‖ref‖ allowed against the
# reference implementation on the same inputs. Both sides round, so these are
# looser than tests/ (docs/design.md §4: fp32 1e-5, tf32 1e-3, half 1e-2) but far
# below what a wrong kernel produces: the inputs are built so that the
# low-rank term is as large as x Wᵀ, and the guard also checks that term alone.
GUARD_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
GUARD_TOL_DELTA = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def pm_size(config) -> str:
    """The --pm-size option: 'small' by default on CPU, 'full' on CUDA."""
    size = config.getoption("--pm-size", default=None)
    return size or ("full" if HAS_CUDA else "small")


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------
# CUDA: torch.cuda.max_memory_allocated() above the allocation level taken
# after the inputs are built (peak stats reset first): bytes of live tensors,
# exact, excluding the caching allocator's reserve and cuBLAS workspaces.
#
# CPU: the kernel's peak resident set size (VmHWM in /proc/self/status) above
# the current RSS, after resetting VmHWM by writing "5" to
# /proc/self/clear_refs (Linux >= 4.0). Freed memory that glibc malloc keeps
# would be reused without raising RSS, so conftest.py fixes glibc's mmap
# threshold (mallopt) to 64 KiB: every tensor of that size or more gets fresh
# pages and returns them on free. Best effort: pages a tensor allocates but
# never touches are not counted, small tensors (< 64 KiB) recycled from the
# heap are not counted, and anything else the process touches meanwhile
# (OpenMP thread stacks, first-call library buffers) is. The untimed call runs
# after the warmup so first-call buffers are already resident.

_CPU_MEM_OK: bool | None = None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_mem_available() -> bool:
    global _CPU_MEM_OK
    if _CPU_MEM_OK is None:
        _CPU_MEM_OK = sys.platform.startswith("linux") and os.path.exists("/proc/self/status") and _reset_hwm()
    return _CPU_MEM_OK


def tune_glibc_malloc() -> bool:
    """Fix glibc's mmap threshold so freed tensors return pages (see above). True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


MEM_METHOD = "cuda.max_memory_allocated" if HAS_CUDA else "cpu.VmHWM-minus-VmRSS"


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Peak bytes fn() allocates above what is live before it (one untimed call); None if unmeasurable."""
    if HAS_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    if not cpu_mem_available():
        return None
    base = _status_bytes("VmRSS")
    _reset_hwm()
    out = fn()
    peak = _status_bytes("VmHWM") - base
    del out
    return max(int(peak), 0)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with a device synchronisation at the end, so a timed call covers the GPU work."""
    if not HAS_CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_pedantic(benchmark, fn: Callable[[], object], *, rounds: int | None = None, target_round_s: float | None = None,
                 max_iterations: int = 1000, warmup_rounds: int = 2, calibrate: bool = True):
    """benchmark.pedantic with iterations calibrated so one round lasts ~target_round_s.

    fn must already synchronise (see ``timed``). Returns the median seconds per
    call, or None when benchmarking is disabled (plain ``pytest --benchmark-disable``).
    """
    if rounds is None:
        rounds = 20 if HAS_CUDA else 11
    if target_round_s is None:
        target_round_s = 0.005 if HAS_CUDA else 0.02
    iterations = 1
    if calibrate:  # for calls far shorter than a round; slow model-level calls skip this
        fn()  # warm (caches, autotuning); the guard already ran it once
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        iterations = max(1, min(max_iterations, int(target_round_s / one)))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return None
    return float(stats.stats.median)


def skip_on_oom(exc: BaseException) -> None:
    """Turn an out-of-memory error into a skip with the reason (the naive per-sample path can need B weight copies)."""
    if HAS_CUDA:
        torch.cuda.empty_cache()
    pytest.skip(f"out of memory on {DEVICE}: {str(exc).splitlines()[0][:200]}")


@contextlib.contextmanager
def skip_if_oom():
    """Inside the block, an out-of-memory error becomes a skip with the reason; anything else propagates."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            skip_on_oom(exc)
        raise


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
