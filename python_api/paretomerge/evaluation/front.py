"""Preference sets on the simplex, Pareto fronts and hypervolume.

All metrics are "higher is better" (accuracies). Hypervolume is the volume
dominated by a set of points and bounded below by a reference point (0 by
default). ``hypervolume`` uses an exact sweep for K ≤ 3 objectives and
pymoo's ``HV`` (which minimises, so points are negated) otherwise.
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = [
    "hypervolume",
    "hypervolume_exact",
    "hypervolume_pymoo",
    "non_dominated",
    "preference_set",
    "simplex_grid",
]

SCENARIO_SPECS = ("equal", "priority:<task>", "onehot:<task>", "grid")


# ---------------------------------------------------------------------------------------------------------------
# preferences
# ---------------------------------------------------------------------------------------------------------------
def simplex_grid(K: int, resolution: int) -> torch.Tensor:
    """All points of the (K−1)-simplex with coordinates in {0, 1/res, …, 1}: shape (C(res+K−1, K−1), K),
    float64, in lexicographic order of the integer compositions, first coordinate descending
    (for K = 2: (1, 0), (1 − 1/res, 1/res), …, (0, 1))."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    # compositions of `resolution` into K parts via stars and bars (bar positions among res+K-1 slots)
    rows = []
    for bars in combinations(range(resolution + K - 1), K - 1):
        parts, prev = [], -1
        for b in bars:
            parts.append(b - prev - 1)
            prev = b
        parts.append(resolution + K - 1 - prev - 1)
        rows.append(parts)
    rows.sort(reverse=True)
    return torch.tensor(rows, dtype=torch.float64) / resolution


def _task(spec: str, task_names: Sequence[str]) -> str:
    _, _, task = spec.partition(":")
    if task not in task_names:
        raise ValueError(f"preference spec {spec!r}: unknown task {task!r}; tasks are {list(task_names)}")
    return task


def preference_set(spec: str, task_names: Sequence[str], *, priority: float = 0.5, resolution: int = 4
                   ) -> list[tuple[str, list[float]]]:
    """(scenario, pref) pairs for a spec:

    * ``"equal"``: 1/K each;
    * ``"priority:<task>"``: ``priority`` on that task, (1 − priority)/(K − 1) on each other;
    * ``"onehot:<task>"``: 1 on that task;
    * ``"grid"``: every ``simplex_grid(K, resolution)`` point (scenario "grid");
    * ``"priority"`` / ``"onehot"`` without a task: one entry per task.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    task_names = list(task_names)
    K = len(task_names)
    if K == 0:
        raise ValueError("task_names is empty")
    if len(set(task_names)) != K:
        raise ValueError(f"task names must be unique, got {task_names}")
    p = float(priority)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"priority must be in [0, 1], got {priority}")
    spec = spec.strip()
    kind = spec.split(":", 1)[0]
    if spec == "equal":
        return [("equal", [1.0 / K] * K)]
    if spec == "grid":
        return [("grid", row) for row in simplex_grid(K, resolution).tolist()]
    if spec in ("priority", "onehot"):
        return [e for t in task_names for e in preference_set(f"{spec}:{t}", task_names, priority=priority,
                                                              resolution=resolution)]
    if kind == "priority" and ":" in spec:
        t = _task(spec, task_names)
        if K == 1:
            return [(f"priority:{t}", [1.0])]
        rest = (1.0 - p) / (K - 1)
        return [(f"priority:{t}", [p if n == t else rest for n in task_names])]
    if kind == "onehot" and ":" in spec:
        t = _task(spec, task_names)
        return [(f"onehot:{t}", [1.0 if n == t else 0.0 for n in task_names])]
    raise ValueError(f"unknown preference spec {spec!r}; expected one of {list(SCENARIO_SPECS)} "
                     f"(tasks: {task_names})")


# ---------------------------------------------------------------------------------------------------------------
# Pareto fronts and hypervolume (maximisation)
# ---------------------------------------------------------------------------------------------------------------
def _as_points(points, name: str = "points") -> np.ndarray:
    a = np.asarray(points, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :] if a.size else a.reshape(0, 0)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (n, K), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (maximisation: a dominates b when
    a ≥ b everywhere and a > b somewhere). Duplicates are all kept."""
    a = _as_points(points)
    n = a.shape[0]
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        ge = np.all(a >= a[i], axis=1)
        gt = np.any(a > a[i], axis=1)
        if np.any(ge & gt):
            mask[i] = False
    return mask


def _hv2(p: np.ndarray) -> float:
    """Exact 2-D hypervolume of points already shifted so the reference is 0 and all > 0."""
    p = p[np.argsort(-p[:, 0], kind="stable")]
    hv, ymax = 0.0, 0.0
    for x, y in p:
        if y > ymax:
            hv += x * (y - ymax)
            ymax = y
    return hv


def hypervolume_exact(points: np.ndarray, ref_point: Optional[np.ndarray] = None) -> float:
    """Exact hypervolume for K ≤ 3 objectives (maximisation; sweep over the last objective)."""
    a = _as_points(points)
    K = a.shape[1] if a.size else (0 if ref_point is None else len(ref_point))
    ref = np.zeros(K) if ref_point is None else np.asarray(ref_point, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return 0.0
    if ref.shape != (K,):
        raise ValueError(f"ref_point must have shape ({K},), got {ref.shape}")
    if K > 3:
        raise ValueError(f"hypervolume_exact handles K <= 3 objectives, got K = {K}")
    p = a - ref
    p = p[np.all(p > 0, axis=1)]
    if p.shape[0] == 0:
        return 0.0
    if K == 1:
        return float(p[:, 0].max())
    if K == 2:
        return float(_hv2(p))
    # K == 3: slabs between consecutive distinct z levels
    zs = np.unique(p[:, 2])[::-1]
    hv = 0.0
    for i, z in enumerate(zs):
        nxt = zs[i + 1] if i + 1 < len(zs) else 0.0
        hv += _hv2(p[p[:, 2] >= z][:, :2]) * (z - nxt)
    return float(hv)


def hypervolume_pymoo(points: np.ndarray, ref_point: Optional[np.ndarray] = None) -> float:
    """Hypervolume through pymoo's ``HV`` (minimisation: points and ref are negated)."""
    from pymoo.indicators.hv import HV

    a = _as_points(points)
    if a.size == 0:
        return 0.0
    K = a.shape[1]
    ref = np.zeros(K) if ref_point is None else np.asarray(ref_point, dtype=np.float64).reshape(-1)
    if ref.shape != (K,):
        raise ValueError(f"ref_point must have shape ({K},), got {ref.shape}")
    a = a[np.all(a > ref, axis=1)]
    if a.shape[0] == 0:
        return 0.0
    a = a[non_dominated(a)]  # dominated points add nothing; fewer points, faster exact HV
    return float(HV(ref_point=-ref)(-a))


def hypervolume(points: np.ndarray, ref_point: Optional[np.ndarray] = None) -> float:
    """Hypervolume dominated by ``points`` (n, K) above ``ref_point`` (default 0), maximisation.
    Points not strictly above the reference in every objective add nothing."""
    a = _as_points(points)
    if a.size and a.shape[1] <= 3:
        return hypervolume_exact(a, ref_point)
    return hypervolume_pymoo(a, ref_point)


