"""Shared test setup.

Without CUDA the Triton kernels run under the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any kernel module is imported, so it is
set here, before the tests import pmkernels' Triton modules.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pmkernels.testing import poisoned, rel_err  # noqa: E402,F401  (re-exported to the test modules)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


# PMKERNELS_TEST_SEED / PMKERNELS_TEST_THREADS re-run the suite on other random inputs / thread counts
# (tolerance audits); the defaults are what CI runs.
SEED = int(os.environ.get("PMKERNELS_TEST_SEED", "0"))
THREADS = int(os.environ.get("PMKERNELS_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: extra intra-op threads only contend for shared CPUs (and slow the tests ~5x).
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(h)


def random_pref(K: int, B: int | None = None, generator=None) -> torch.Tensor:
    """Random point(s) of the simplex, strictly inside it."""
    shape = (K,) if B is None else (B, K)
    p = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    return p / p.sum(-1, keepdim=True)


def make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=False, bias=True, dtype=torch.float64,
                 device="cpu"):
    """Fresh random inputs of pareto_linear at odd shapes; all factors non-zero."""
    x = torch.randn(*N, d_in, dtype=dtype, device=device)
    weight = torch.randn(d_out, d_in, dtype=dtype, device=device) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype, device=device) if bias else None
    U = torch.randn(d_out, r, dtype=dtype, device=device) / r**0.5
    G = torch.randn(r, r, K, dtype=dtype, device=device)
    V = torch.randn(d_in, r, dtype=dtype, device=device) / d_in**0.5
    pref = random_pref(K, N[0] if per_sample else None).to(device)
    return x, weight, b, U, G, V, pref
