"""Priority control: does putting priority on task k raise task k's metric above the equal preference's?

``priority_control(report)`` reads it off a :class:`Report` (rows ``equal`` and ``priority:<task>`` of each
preference-aware method); ``paired_bootstrap`` gives a confidence interval for such a difference from the two
models' per-example correctness on the same test examples (and over seeds).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .report import Report

__all__ = ["paired_bootstrap", "priority_control"]


def priority_control(report: Report, methods: Optional[Sequence[str]] = None,
                     tasks: Optional[Sequence[str]] = None) -> dict[str, dict[str, dict]]:
    """{method: {task: {"equal": m_eq, "priority": m_prio, "ok": m_prio > m_eq}}}: task k's metric under the
    ``priority:<task>`` scenario against the ``equal`` scenario, for ``methods`` (default: every method of
    the report that has an ``equal`` row) and ``tasks`` (default: the report's). ValueError naming the
    missing row when a method lacks one of them."""
    rows = {(r["method"], r["scenario"]): r["metrics"] for r in report.results}
    tasks = list(report.tasks if tasks is None else tasks)
    if methods is None:
        methods = [m for m in report.methods() if (m, "equal") in rows]
    out: dict[str, dict[str, dict]] = {}
    for m in methods:
        if (m, "equal") not in rows:
            raise ValueError(f"priority_control: method {m!r} has no 'equal' row")
        eq = rows[(m, "equal")]
        out[m] = {}
        for t in tasks:
            if (m, f"priority:{t}") not in rows:
                raise ValueError(f"priority_control: method {m!r} has no 'priority:{t}' row")
            pr = rows[(m, f"priority:{t}")][t]
            out[m][t] = {"equal": eq[t], "priority": pr, "ok": pr > eq[t]}
    return out


def paired_bootstrap(correct_a: Sequence, correct_b: Sequence, *, samples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean of (a − b) and its percentile bootstrap CI, a and b per-example scores (e.g. 0/1 correct) of two
    models on the same examples. ``correct_a``/``correct_b``: one array (n,) each, or a list of arrays, one per
    seed (each seed's examples are resampled on their own; the statistic is the mean over seeds of the
    per-seed mean difference). Returns {"diff", "low", "high"}."""
    a_list = [np.asarray(a, dtype=np.float64).reshape(-1) for a in _per_seed(correct_a)]
    b_list = [np.asarray(b, dtype=np.float64).reshape(-1) for b in _per_seed(correct_b)]
    if len(a_list) != len(b_list) or any(a.shape != b.shape or a.size == 0 for a, b in zip(a_list, b_list)):
        raise ValueError("correct_a and correct_b must hold the same number of non-empty, equally long arrays")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    diffs = [a - b for a, b in zip(a_list, b_list)]
    stat = np.zeros(samples)
    for d in diffs:
        idx = rng.integers(0, d.size, size=(samples, d.size))
        stat += d[idx].mean(1)
    stat /= len(diffs)
    lo, hi = np.quantile(stat, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "low": float(lo), "high": float(hi)}


def _per_seed(x) -> list:
    if isinstance(x, np.ndarray) and x.ndim == 1:
        return [x]
    if len(x) and np.ndim(x[0]) == 0:
        return [x]
    return list(x)
