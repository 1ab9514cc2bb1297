"""The op-level correctness guard must reject wrong implementations (not a benchmark).

Runs under plain ``pytest bench`` (``--benchmark-only`` skips it): a
"naive" path that drops the low-rank term, scales it by 0.97, or loses the
gradient of U must fail the guard; the real one must pass.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_bench_pareto_linear as T
from pmkernels import reference

_ORIG = reference.naive_pareto_linear


def _drop(x, W, b, U, G, V, pref):
    return F.linear(x, W, b)


def _scaled(x, W, b, U, G, V, pref):
    y0 = F.linear(x, W, b)
    return y0 + 0.97 * (_ORIG(x, W, b, U, G, V, pref) - y0)


def _no_grad_U(x, W, b, U, G, V, pref):
    return _ORIG(x, W, b, U.detach(), G, V, pref)


@pytest.mark.parametrize("gamma", T.GAMMAS)
@pytest.mark.parametrize("pass_", T.PASSES)
@pytest.mark.parametrize("broken", [None, _drop, _scaled, _no_grad_U], ids=["correct", "drop", "scaled", "no-grad-U"])
def test_guard_rejects_wrong_impl(monkeypatch, broken, pass_, gamma):
    if broken is not None:
        monkeypatch.setattr(reference, "naive_pareto_linear", broken)
    shape = T.SMALL_SHAPES[2]
    t = T.make_inputs(shape, torch.float32, gamma)
    fn = T.make_fn("naive", pass_, t)
    if broken is None or (broken is _no_grad_U and pass_ == "fwd"):
        T.guard("naive", pass_, t, fn, torch.float32)
    else:
        with pytest.raises(AssertionError, match="guard"):
            T.guard("naive", pass_, t, fn, torch.float32)


def test_skip_if_oom_skips_oom_and_passes_other_errors():
    from _pytest.outcomes import Skipped

    from pmbench_util import skip_if_oom

    with pytest.raises(Skipped, match="out of memory"):
        with skip_if_oom():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
    with pytest.raises(ValueError):
        with skip_if_oom():
            raise ValueError("a real failure")
