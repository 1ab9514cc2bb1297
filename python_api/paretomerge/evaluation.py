"""Evaluating merged models: preference sets, Pareto fronts, hypervolume, reports.

All metrics are "higher is better" (accuracies). Hypervolume is the volume
dominated by a set of points and bounded below by a reference point (0 by
default). ``hypervolume`` uses an exact sweep for K ≤ 3 objectives and
pymoo's ``HV`` (which minimises, so points are negated) otherwise.

Report JSON schema::

    {"tasks": [str, ...],
     "results": [{"method": str, "scenario": str | null, "pref": [float] | null,
                  "metrics": {task: float}}],
     "hypervolume": {method: float},   # over that method's result points, ref point 0
     "base_methods": {method: str}}    # optional: the base merge of each Pareto method

Method names: ``finetuned:<task>``, ``task_arithmetic``, ``ties``, ``adamerging``,
``pareto_merging_datafree``, ``pareto_merging_unlabeled``. Scenarios: ``equal``,
``priority:<task>``, ``onehot:<task>``, ``grid`` or null.
"""
from __future__ import annotations

import json
import math
import os
from itertools import combinations
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

__all__ = [
    "Report",
    "hypervolume",
    "hypervolume_exact",
    "hypervolume_pymoo",
    "non_dominated",
    "preference_set",
    "simplex_grid",
]

METHODS = ("task_arithmetic", "ties", "adamerging", "pareto_merging_datafree", "pareto_merging_unlabeled")
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


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _finite(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) and not (
            isinstance(x, torch.Tensor) and x.numel() == 1):
        raise TypeError(f"{what} must be a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v


class Report:
    """Results of many (method, scenario, preference) evaluations on the same tasks."""

    def __init__(self, tasks: Sequence[str]) -> None:
        if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks) or len(tasks) == 0:
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks: list[str] = list(tasks)
        self.results: list[dict] = []
        self.base_methods: dict[str, str] = {}  # Pareto method -> the base merge it was trained on
        self._hv_cache: Optional[tuple] = None  # (results snapshot, {method: hv}): exact HV is costly for K >= 6

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return f"Report(tasks={self.tasks}, results={len(self.results)}, methods={self.methods()})"

    def add(self, method: str, scenario: Optional[str], pref: Optional[Sequence[float]],
            metrics: Mapping[str, float], *, base: Optional[str] = None) -> None:
        """Record one evaluation. ``metrics`` maps (some or all) task names to a finite number;
        ``base`` names the base merge a Pareto method was trained on (kept in ``base_methods``)."""
        if base is not None:
            self.base_methods[method] = str(base)
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty str, got {method!r}")
        if scenario is not None and not isinstance(scenario, str):
            raise TypeError(f"scenario must be a str or None, got {type(scenario).__name__}")
        if pref is not None:
            if isinstance(pref, torch.Tensor):
                pref = pref.detach().cpu().reshape(-1).tolist()
            pref = [_finite(v, "pref entries") for v in pref]
            if len(pref) != len(self.tasks):
                raise ValueError(f"pref has {len(pref)} entries but the report has {len(self.tasks)} tasks "
                                 f"{self.tasks}")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping task -> float, got {type(metrics).__name__}")
        unknown = [t for t in metrics if t not in self.tasks]
        if unknown:
            raise ValueError(f"metrics has unknown task(s) {unknown}; tasks are {self.tasks}")
        m = {t: _finite(metrics[t], f"metrics[{t!r}]") for t in self.tasks if t in metrics}
        self.results.append({"method": method, "scenario": scenario, "pref": pref, "metrics": m})

    def methods(self) -> list[str]:
        """Method names in order of first appearance."""
        return list(dict.fromkeys(r["method"] for r in self.results))

    def points(self, method: str, tasks: Optional[Sequence[str]] = None) -> np.ndarray:
        """(n, len(tasks)) metrics of ``method``'s results that have every one of ``tasks`` (default all)."""
        tasks = self.tasks if tasks is None else list(tasks)
        rows = [[r["metrics"][t] for t in tasks] for r in self.results
                if r["method"] == method and all(t in r["metrics"] for t in tasks)]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(tasks))

    def hypervolumes(self) -> dict[str, float]:
        """Hypervolume (ref point 0) of each method's result points (those with every task's metric).
        Cached until the results change."""
        key = tuple((r["method"], tuple(sorted(r["metrics"].items()))) for r in self.results)
        if self._hv_cache is not None and self._hv_cache[0] == key:
            return dict(self._hv_cache[1])
        hv = {m: hypervolume(self.points(m)) if len(self.points(m)) else 0.0 for m in self.methods()}
        self._hv_cache = (key, hv)
        return dict(hv)

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks),
                "results": [{"method": r["method"], "scenario": r["scenario"],
                             "pref": None if r["pref"] is None else list(r["pref"]),
                             "metrics": dict(r["metrics"])} for r in self.results],
                "hypervolume": self.hypervolumes(),
                **({"base_methods": dict(self.base_methods)} if self.base_methods else {})}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        if not isinstance(d, Mapping) or "tasks" not in d or "results" not in d:
            raise ValueError("a report must be a mapping with 'tasks' and 'results'")
        rep = cls(d["tasks"])
        if not isinstance(d["results"], list):
            raise ValueError("report 'results' must be a list")
        for i, r in enumerate(d["results"]):
            if not isinstance(r, Mapping) or not {"method", "scenario", "pref", "metrics"} <= set(r):
                raise ValueError(f"report results[{i}] must have keys method, scenario, pref, metrics; got {r!r}")
            rep.add(r["method"], r["scenario"], r["pref"], r["metrics"])
        rep.base_methods.update(d.get("base_methods") or {})
        return rep

    def save(self, path: PathLike) -> None:
        """Write the JSON atomically (temp file in the same directory, then rename)."""
        from .io import _atomic_write

        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        _atomic_write(path, write)

    @classmethod
    def load(cls, path: PathLike) -> "Report":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def markdown(self, digits: int = 4) -> str:
        """One markdown table: method, scenario, one column per task, mean (of the tasks present)."""
        head = ["method", "scenario", *self.tasks, "mean"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(self.tasks) + 1)) + "|"]
        for r in self.results:
            sc = r["scenario"] if r["scenario"] is not None else "-"
            if r["scenario"] == "grid" and r["pref"] is not None:
                sc = "grid (" + ", ".join(f"{v:.2f}" for v in r["pref"]) + ")"
            vals = [r["metrics"].get(t) for t in self.tasks]
            present = [v for v in vals if v is not None]
            mean = sum(present) / len(present) if present else None
            cells = ["-" if v is None else f"{v:.{digits}f}" for v in vals + [mean]]
            lines.append("| " + " | ".join([r["method"].replace("|", "\\|"), sc.replace("|", "\\|"), *cells]) + " |")
        return "\n".join(lines) + "\n"
