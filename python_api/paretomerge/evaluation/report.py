"""Results of evaluating merged models: one row per (method, scenario), hypervolumes, JSON.

All metrics are "higher is better" (accuracies). Report JSON schema::

    {"tasks": [str, ...],
     "results": [{"method": str, "scenario": str | null, "pref": [float] | null,
                  "metrics": {task: float}}],
     "hypervolume": {method: float},   # over that method's result points, ref point 0
     "base_methods": {method: str},    # optional: the base merge of each Pareto method
     "cost": {method: {field: float | int | null}}}  # optional: the cost table (COST_FIELDS)

Method names: ``finetuned:<task>``, ``task_arithmetic``, ``ties``, ``adamerging``,
``pareto_merging_datafree``, ``pareto_merging_unlabeled``, ``map``, ``ta_preference``,
``adamerging_preference`` (ablations: ``pareto_merging_datafree[<key>=<value>]``). Scenarios: ``equal``,
``priority:<task>``, ``onehot:<task>``, ``grid`` or null.

The cost table (the paper's Table 1, one row per method; null = does not apply):

* ``params_stored``: parameters kept to produce the model for any γ (merged model; θ0 + K task
  vectors for the per-γ baselines; base + factors for Pareto Merging);
* ``models_trained`` / ``models_merged``: training runs / weight-space merges the run performed;
* ``evaluations``: full-model evaluations on labelled data the method itself needs (MAP's budget);
* ``train_time_s``: the one-off cost before serving (training; MAP's evaluations + fits + NSGA-III);
* ``new_pref_time_s``: time to produce the model for one new γ (mean over the run's γ's);
* ``eval_time_s``: time spent evaluating the method's rows of this report.
"""
from __future__ import annotations

import json
import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..io import PathLike
from .front import hypervolume

__all__ = ["COST_FIELDS", "Report"]

COST_FIELDS = ("params_stored", "models_trained", "models_merged", "evaluations", "train_time_s",
               "new_pref_time_s", "eval_time_s")

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
        self.cost: dict[str, dict] = {}  # method -> {COST_FIELDS: number or None}
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

    def add_cost(self, method: str, **fields) -> None:
        """Record (or update) ``method``'s row of the cost table; fields from ``COST_FIELDS``, values
        finite numbers or None (does not apply)."""
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty str, got {method!r}")
        unknown = [k for k in fields if k not in COST_FIELDS]
        if unknown:
            raise ValueError(f"unknown cost field(s) {unknown}; fields are {list(COST_FIELDS)}")
        row = self.cost.setdefault(method, {k: None for k in COST_FIELDS})
        for k, v in fields.items():
            row[k] = None if v is None else (int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                             else _finite(v, f"cost[{method!r}][{k!r}]"))

    def cost_markdown(self) -> str:
        """The cost table (one row per method with a cost entry) with each method's hypervolume."""
        hv = self.hypervolumes()
        head = ["method", *COST_FIELDS, "hypervolume"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]

        def cell(v):
            if v is None:
                return "-"
            if isinstance(v, int):
                return f"{v:,}"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"

        for m, row in self.cost.items():
            lines.append("| " + " | ".join([m.replace("|", "\\|"), *(cell(row.get(k)) for k in COST_FIELDS),
                                            "-" if m not in hv else f"{hv[m]:.4f}"]) + " |")
        return "\n".join(lines) + "\n"

    def methods(self) -> list[str]:
        """Method names in order of first appearance."""
        return list(dict.fromkeys(r["method"] for r in self.results))

    def points(self, method: str, tasks: Optional[Sequence[str]] = None) -> np.ndarray:
        """(n, len(tasks)) metrics of ``method``'s results that have every one of ``tasks`` (default all)."""
        tasks = self.tasks if tasks is None else list(tasks)
        rows = [[r["metrics"][t] for t in tasks] for r in self.results
                if r["method"] == method and all(t in r["metrics"] for t in tasks)]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(tasks))

    def hypervolumes(self, ref_point: Union[None, Sequence[float], Mapping[str, float]] = None) -> dict[str, float]:
        """Hypervolume of each method's result points (those with every task's metric) above ``ref_point``:
        None = 0 (the report's JSON ``hypervolume``), len(tasks) numbers in task order, or {task: value}
        (e.g. the pretrained model's accuracies, so only gains over it count). Cached until the results change."""
        if ref_point is None:
            ref = None
        elif isinstance(ref_point, Mapping):
            missing = [t for t in self.tasks if t not in ref_point]
            if missing:
                raise ValueError(f"ref_point: no value for task(s) {missing}")
            ref = tuple(_finite(ref_point[t], f"ref_point[{t!r}]") for t in self.tasks)
        else:
            if isinstance(ref_point, str) or len(ref_point) != len(self.tasks):
                raise ValueError(f"ref_point must hold len(tasks) = {len(self.tasks)} numbers or a {{task: value}} "
                                 f"mapping, got {ref_point!r}")
            ref = tuple(_finite(v, f"ref_point[{i}]") for i, v in enumerate(ref_point))
        key = (ref, tuple((r["method"], tuple(sorted(r["metrics"].items()))) for r in self.results))
        if self._hv_cache is not None and self._hv_cache[0] == key:
            return dict(self._hv_cache[1])
        hv = {m: hypervolume(self.points(m), None if ref is None else np.asarray(ref)) if len(self.points(m))
              else 0.0 for m in self.methods()}
        self._hv_cache = (key, hv)
        return dict(hv)

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks),
                "results": [{"method": r["method"], "scenario": r["scenario"],
                             "pref": None if r["pref"] is None else list(r["pref"]),
                             "metrics": dict(r["metrics"])} for r in self.results],
                "hypervolume": self.hypervolumes(),
                **({"base_methods": dict(self.base_methods)} if self.base_methods else {}),
                **({"cost": {m: dict(r) for m, r in self.cost.items()}} if self.cost else {})}

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
        for m, row in (d.get("cost") or {}).items():
            if not isinstance(row, Mapping):
                raise ValueError(f"report cost[{m!r}] must be a mapping of cost fields, got {row!r}")
            rep.add_cost(m, **row)
        return rep

    def save(self, path: PathLike) -> None:
        """Write the JSON atomically (temp file in the same directory, then rename)."""
        from ..io import atomic_write

        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(path, write)

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
