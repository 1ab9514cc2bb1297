"""Shared test setup (fixtures and the Triton interpreter switch); shared helpers live in helpers.py.

Without CUDA the Triton kernels run under the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any kernel module is imported, so it is
set here, before the tests import pmkernels' Triton modules.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")



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


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection in this process (and keep the hubs offline)."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in this test (tried {address!r})")
        return real_connect(self, address, *a, **k)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield attempts
    assert attempts == [], f"a network request was made: {attempts}"
