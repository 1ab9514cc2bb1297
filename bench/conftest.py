"""Setup of the benchmark suites (``pytest bench --benchmark-only`` from the repo root).

This conftest is independent of tests/conftest.py: pytest only loads
conftest.py files on the path from the rootdir to the collected files, so
``pytest bench`` never imports tests/conftest.py (which switches Triton to
its interpreter on CPU-only machines: the benchmarks must not). bench/ is a
package (see ``__init__.py``); this file also puts bench/ on sys.path so the
suites can import ``pmbench_util`` under any ``--import-mode``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pmbench_util  # noqa: E402

SIZES = ("small", "full")


def pytest_addoption(parser):
    group = parser.getgroup("pmkernels benchmarks")
    group.addoption(
        "--pm-size",
        choices=SIZES,
        default=None,
        help="problem sizes of the pmkernels benchmarks: 'small' (scaled down, default on CPU) or "
        "'full' (the docs/design.md shapes, default on CUDA)",
    )
    group.addoption(
        "--pm-threads",
        type=int,
        default=None,
        help="torch CPU threads for the benchmarks; default 1 on CPU-only machines (OpenMP spin-waits make "
        "multi-threaded timings useless on a shared, oversubscribed box), 0 = leave torch's default",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    threads = config.getoption("--pm-threads", default=None)
    if threads is None:
        threads = 0 if torch.cuda.is_available() else 1
    if threads > 0:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        # CPU peak-memory measure: make freed tensors give their pages back (see pmbench_util).
        pmbench_util.tune_glibc_malloc()


def pytest_report_header(config):
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (
        f"pmkernels bench: size={pmbench_util.pm_size(config)} device={dev} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} peak-memory={pmbench_util.MEM_METHOD}"
    )


@pytest.fixture(scope="session")
def size(request) -> str:
    return pmbench_util.pm_size(request.config)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
