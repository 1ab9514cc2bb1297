"""Plots of a ``Report`` (matplotlib Figures rendered with Agg, pyplot untouched; files written atomically).

* ``plot_tradeoff``: the 2-task trade-off of every method. Methods with a
  series of preference points (Pareto Merging over its grid) are connected
  curves ordered by the preference; single-point methods are markers.
* ``plot_fronts``: every method's points on two tasks and its non-dominated front (in those two
  tasks) as a staircase, all methods on one figure.
* ``plot_scenarios``: per-task bar charts, one panel per scenario (equal,
  priority:<task>, …); preference-free methods (scenario null) appear in
  every panel as references.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .report import Report

PathLike = Union[str, os.PathLike]

__all__ = ["plot_fronts", "plot_scenarios", "plot_tradeoff"]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]


def _figure(**kw):
    """A matplotlib Figure rendered with Agg, without touching pyplot's global state or backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _cmap():
    import matplotlib

    return matplotlib.colormaps["tab10"]


def _save(fig, path: PathLike) -> None:
    from ..io import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))


def _pretty(method: str) -> str:
    return method.replace("pareto_merging_", "Pareto Merging (").replace("datafree", "data-free)").replace(
        "unlabeled", "unlabeled)") if method.startswith("pareto_merging_") else method


def _task_pair(report: Report, tasks: Optional[tuple[str, str]]) -> tuple[str, str]:
    """The two tasks a 2-D plot shows (default: the report's first two), checked against the report."""
    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report, got {type(report).__name__}")
    if tasks is None:
        if len(report.tasks) < 2:
            raise ValueError(f"a trade-off plot needs two tasks; the report has {report.tasks}")
        tasks = (report.tasks[0], report.tasks[1])
    tasks = tuple(tasks)
    if len(tasks) != 2:
        raise ValueError(f"tasks must be a pair of task names, got {tasks!r}")
    for t in tasks:
        if t not in report.tasks:
            raise ValueError(f"unknown task {t!r}; the report's tasks are {report.tasks}")
    if tasks[0] == tasks[1]:
        raise ValueError(f"tasks must be two different tasks, got {tasks!r}")
    return tasks


def _xy(rows: list, tasks: tuple[str, str]) -> tuple[list, list]:
    return [r["metrics"][tasks[0]] for r in rows], [r["metrics"][tasks[1]] for r in rows]


def _label_scenarios(ax, rows: list, tasks: tuple[str, str], color) -> None:
    """Name the named-scenario points (equal, priority:<task>) beside them."""
    for r in rows:
        if r["scenario"] and r["scenario"] != "grid":
            ax.annotate(r["scenario"], (r["metrics"][tasks[0]], r["metrics"][tasks[1]]),
                        textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)


def _draw_finetuned(ax, method: str, rows: list, tasks: tuple[str, str]) -> None:
    xs, ys = _xy(rows, tasks)
    ax.scatter(xs, ys, marker="x", s=70, color="0.35", zorder=3)
    for x, y in zip(xs, ys):
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color="0.35")


def _draw_method(ax, method: str, rows: list, tasks: tuple[str, str], edge: tuple[int, int],
                 others: list[int], color, marker: str) -> None:
    """One method's rows: a curve over its preference points on the two tasks' edge (all of them when
    K = 2; named scenarios emphasised), its other grid points faint, its remaining points as markers."""
    ia, ib = edge
    curve = [r for r in rows if r["pref"] is not None and all(r["pref"][i] <= 1e-9 for i in others)]
    label = _pretty(method)
    if len(curve) < 2:
        singles = rows
    else:
        singles = [r for r in rows if r not in curve]
        curve.sort(key=lambda r: (r["pref"][ia], -r["pref"][ib]))
        ax.plot(*_xy(curve, tasks), "-", marker=marker, color=color, markersize=5, linewidth=1.8, label=label,
                zorder=2)
        label = None
        named = [r for r in curve if r["scenario"] and r["scenario"] != "grid"]
        for xy in zip(*_xy(named, tasks)):
            ax.scatter(*xy, marker=marker, s=55, color=color, edgecolor="black", linewidth=0.8, zorder=4)
        _label_scenarios(ax, named, tasks, color)
        faint = [r for r in singles if r["scenario"] == "grid"]  # off the edge when K > 2: faint, unlabelled
        singles = [r for r in singles if r["scenario"] != "grid"]
        if faint:
            ax.scatter(*_xy(faint, tasks), marker=marker, s=14, color=color, alpha=0.3, linewidth=0, zorder=1)
    if singles:
        ax.scatter(*_xy(singles, tasks), marker=marker, s=55, color=color, edgecolor="black", linewidth=0.6,
                   label=label, zorder=4)
        if len(curve) >= 2 or len(singles) > 1:  # name the scenario points of preference-aware methods
            for r in singles:
                if r["scenario"]:
                    ax.annotate(r["scenario"], (r["metrics"][tasks[0]], r["metrics"][tasks[1]]),
                                textcoords="offset points", xytext=(5, -10), fontsize=7, color=color)


def _finish_2d(ax, fig, tasks: tuple[str, str], title: str, path: PathLike) -> None:
    ax.set_xlabel(f"{tasks[0]} (metric, higher is better)")
    ax.set_ylabel(f"{tasks[1]} (metric, higher is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    _save(fig, path)


def plot_tradeoff(report: Report, path: PathLike, tasks: Optional[tuple[str, str]] = None) -> None:
    """Scatter/curve of every method's results on two tasks (default: the report's first two)."""
    tasks = _task_pair(report, tasks)
    ia, ib = report.tasks.index(tasks[0]), report.tasks.index(tasks[1])
    others = [i for i in range(len(report.tasks)) if i not in (ia, ib)]
    fig = _figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    cmap = _cmap()
    color_i = 0
    for method in report.methods():
        rows = [r for r in report.results if r["method"] == method
                and tasks[0] in r["metrics"] and tasks[1] in r["metrics"]]
        if not rows:
            continue
        if method.startswith("finetuned:"):
            _draw_finetuned(ax, method, rows, tasks)
            continue
        _draw_method(ax, method, rows, tasks, (ia, ib), others, cmap(color_i % 10),
                     _MARKERS[color_i % len(_MARKERS)])
        color_i += 1
    title = f"Trade-off between {tasks[0]} and {tasks[1]}"
    if others:
        title += (f"\n(curves: preferences with 0 weight on {', '.join(report.tasks[i] for i in others)}; "
                  f"faint: other grid points)")
    _finish_2d(ax, fig, tasks, title, path)


def plot_fronts(report: Report, path: PathLike, tasks: Optional[tuple[str, str]] = None) -> None:
    """Every method's result points on two tasks (default: the first two) and its 2-task non-dominated
    front as a staircase line; fine-tuned models as grey crosses. One figure, one colour per method."""
    from .front import non_dominated

    tasks = _task_pair(report, tasks)
    fig = _figure(figsize=(7.2, 5.4))
    ax = fig.subplots()
    cmap = _cmap()
    ci = 0
    for method in report.methods():
        pts = report.points(method, tasks)
        if not len(pts):
            continue
        if method.startswith("finetuned:"):
            ax.scatter(pts[:, 0], pts[:, 1], marker="x", s=60, color="0.35", zorder=3)
            continue
        color, marker = cmap(ci % 10), _MARKERS[ci % len(_MARKERS)]
        ci += 1
        ax.scatter(pts[:, 0], pts[:, 1], marker=marker, s=28, color=color, alpha=0.75, edgecolor="black",
                   linewidth=0.3, label=_pretty(method), zorder=3)
        front = pts[non_dominated(pts)]
        front = front[np.argsort(front[:, 0])]
        if len(front) >= 2:
            # staircase: the boundary of the region the front dominates (down, then right, per point)
            xs, ys = [front[0, 0]], [front[0, 1]]
            for x, y in front[1:]:
                xs += [xs[-1], x]
                ys += [y, y]
            ax.plot(xs, ys, "-", color=color, linewidth=1.4, zorder=2)
    _finish_2d(ax, fig, tasks, f"Every method's points and non-dominated front on {tasks[0]} × {tasks[1]}", path)


def _scenario_panels(report: Report) -> list[tuple[str, list]]:
    """(title, rows) per panel: one per named scenario, each with the preference-free rows (scenario None)
    first; a report without named scenarios is one panel of every non-grid row, titled "all results"."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in report.results
                                   if r["scenario"] is not None and r["scenario"] != "grid"))
    if not scenarios:
        return [("all results", [r for r in report.results if r["scenario"] != "grid"])]
    refs = [r for r in report.results if r["scenario"] is None]
    return [(f"scenario: {sc}", refs + [r for r in report.results if r["scenario"] == sc]) for sc in scenarios]


def _draw_bars(ax, report: Report, rows: list, colors: dict, tag_scenario: bool) -> None:
    """Grouped bars: one group per task plus "mean", one bar per row (hatched: preference-free)."""
    labels = report.tasks + ["mean"]
    x = np.arange(len(labels))
    bw = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        vals = [r["metrics"].get(t, np.nan) for t in report.tasks]
        present = [v for v in vals if not np.isnan(v)]
        vals.append(float(np.mean(present)) if present else np.nan)
        hatch = "//" if r["scenario"] is None else None
        name = _pretty(r["method"]) + (f" [{r['scenario']}]" if tag_scenario and r["scenario"] else "")
        ax.bar(x - 0.4 + bw * (j + 0.5), vals, bw, color=colors[r["method"]], hatch=hatch,
               edgecolor="black", linewidth=0.4, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("metric (higher is better)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_scenarios(report: Report, path: PathLike) -> None:
    """Per-task bars, one panel per scenario; preference-free methods shown in every panel."""
    if not isinstance(report, Report):
        raise TypeError(f"report must be a Report, got {type(report).__name__}")
    panels = _scenario_panels(report)
    tag_scenario = panels[0][0] == "all results"
    n = len(panels)
    ncols = 1 if n <= 3 else 2
    nrows = (n + ncols - 1) // ncols
    max_bars = max(len(rows) for _, rows in panels)
    width = min(16.0, max(6.0, 0.12 * max_bars * (len(report.tasks) + 1) + 1.5))
    fig = _figure(figsize=(width * ncols, 3.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = _cmap()
    colors = {m: cmap(i % 10) for i, m in enumerate(report.methods())}
    handles: dict = {}
    for pi, (title, rows) in enumerate(panels):
        ax = axes[pi // ncols][pi % ncols]
        _draw_bars(ax, report, rows, colors, tag_scenario)
        ax.set_title(title)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    for pi in range(n, nrows * ncols):
        axes[pi // ncols][pi % ncols].axis("off")
    fig.suptitle("Per-task results by scenario (hatched: preference-free methods)", fontsize=11)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, frameon=False)
    _save(fig, path)
