"""Preference sets, Pareto fronts, hypervolume, Report, plots."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from paretomerge.evaluation import (
    Report,
    hypervolume,
    hypervolume_exact,
    hypervolume_pymoo,
    non_dominated,
    preference_set,
    simplex_grid,
)

TASKS = ["A", "B", "C"]


# -------- simplex grid and preference sets --------
def test_simplex_grid():
    g = simplex_grid(2, 4)
    torch.testing.assert_close(g, torch.tensor([[1, 0], [.75, .25], [.5, .5], [.25, .75], [0, 1]], dtype=torch.float64))
    for K, res in [(1, 3), (3, 4), (4, 2)]:
        g = simplex_grid(K, res)
        assert g.shape == (math.comb(res + K - 1, K - 1), K)
        torch.testing.assert_close(g.sum(1), torch.ones(len(g), dtype=torch.float64))
        assert bool((g >= 0).all())
        assert len({tuple(r) for r in g.tolist()}) == len(g)
    with pytest.raises(ValueError, match="resolution"):
        simplex_grid(3, 0)
    with pytest.raises(ValueError, match="K"):
        simplex_grid(0, 3)


def test_preference_set_each_spec():
    assert preference_set("equal", TASKS) == [("equal", [1 / 3] * 3)]
    assert preference_set("priority:B", TASKS) == [("priority:B", [0.25, 0.5, 0.25])]
    (sc, p), = preference_set("priority:C", TASKS, priority=0.8)
    assert sc == "priority:C" and p == pytest.approx([0.1, 0.1, 0.8])
    assert preference_set("onehot:A", TASKS) == [("onehot:A", [1.0, 0.0, 0.0])]
    grid = preference_set("grid", TASKS, resolution=2)
    assert [s for s, _ in grid] == ["grid"] * 6
    assert [p for _, p in grid] == simplex_grid(3, 2).tolist()
    assert [s for s, _ in preference_set("priority", TASKS)] == ["priority:A", "priority:B", "priority:C"]
    assert preference_set("priority:A", ["A"]) == [("priority:A", [1.0])]
    for _, p in preference_set("grid", TASKS) + preference_set("priority:A", TASKS, priority=0.7):
        assert sum(p) == pytest.approx(1.0)


@pytest.mark.parametrize("spec,match", [("uniform", "unknown preference spec"), ("priority:D", "unknown task"),
                                        ("onehot:", "unknown task"), ("", "unknown preference spec")])
def test_preference_set_bad_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        preference_set(spec, TASKS)


def test_preference_set_bad_priority():
    with pytest.raises(ValueError, match="priority"):
        preference_set("priority:A", TASKS, priority=1.5)


# -------- non-dominated filtering and hypervolume --------
def test_non_dominated():
    pts = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0.5, 3]])
    assert non_dominated(pts).tolist() == [True, True, True, False, True, False]
    assert non_dominated(np.array([[1.0, 2.0, 3.0]])).tolist() == [True]


def test_hypervolume_hand_computed_2d():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # staircase: 3*1 + 2*(2-1) + 1*(3-2) = 6
    assert hypervolume(pts) == pytest.approx(6.0, abs=1e-12)
    assert hypervolume_exact(pts) == pytest.approx(6.0, abs=1e-12)
    assert hypervolume_pymoo(pts) == pytest.approx(6.0, abs=1e-12)
    # dominated points add nothing; reference point shifts the box
    assert hypervolume(np.vstack([pts, [[1, 1], [0.5, 0.5]]])) == pytest.approx(6.0)
    assert hypervolume(pts, ref_point=np.array([1.0, 1.0])) == pytest.approx(1.0)  # only (2,2) is strictly above
    assert hypervolume(np.array([[0.5, 0.4]])) == pytest.approx(0.2)
    assert hypervolume(np.zeros((0, 2))) == 0.0


def test_hypervolume_3d_hand_computed():
    # two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlap in a unit cube: 2 + 2 - 1 = 3
    pts = np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]])
    assert hypervolume_exact(pts) == pytest.approx(3.0)
    # plus a box [0,1]^2 x [0,3]: adds 1*1*2 = 2
    assert hypervolume_exact(np.vstack([pts, [[1.0, 1.0, 3.0]]])) == pytest.approx(5.0)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_hypervolume_exact_matches_pymoo(K):
    rng = np.random.default_rng(K)
    for n in (1, 5, 30):
        pts = rng.uniform(0.0, 1.0, size=(n, K))
        ref = np.full(K, 0.1)
        assert hypervolume_exact(pts, ref) == pytest.approx(hypervolume_pymoo(pts, ref), rel=1e-10, abs=1e-12)


def test_hypervolume_4d_uses_pymoo():
    pts = np.array([[1.0, 1.0, 1.0, 2.0], [2.0, 1.0, 1.0, 1.0]])
    assert hypervolume(pts) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="K <= 3"):
        hypervolume_exact(pts)


def test_hypervolume_bad_input():
    with pytest.raises(ValueError, match="ref_point"):
        hypervolume(np.ones((2, 2)), ref_point=np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[np.nan, 1.0]]))


# -------- Report --------
def _report():
    r = Report(["A", "B"])
    r.add("finetuned:A", None, None, {"A": 0.9, "B": 0.2})
    r.add("task_arithmetic", None, None, {"A": 0.6, "B": 0.6})
    r.add("pareto_merging_datafree", "equal", [0.5, 0.5], {"A": 0.7, "B": 0.65})
    r.add("pareto_merging_datafree", "priority:A", [0.75, 0.25], {"A": 0.8, "B": 0.5})
    for a in (0.0, 0.5, 1.0):
        r.add("pareto_merging_unlabeled", "grid", [a, 1 - a], {"A": 0.5 + 0.4 * a, "B": 0.9 - 0.4 * a})
    return r


def test_report_schema_and_hypervolume():
    d = _report().to_dict()
    assert set(d) == {"tasks", "results", "hypervolume"}
    assert d["tasks"] == ["A", "B"]
    for r in d["results"]:
        assert set(r) == {"method", "scenario", "pref", "metrics"}
        assert isinstance(r["method"], str)
        assert r["scenario"] is None or isinstance(r["scenario"], str)
        assert r["pref"] is None or all(isinstance(v, float) for v in r["pref"])
        assert all(isinstance(v, float) for v in r["metrics"].values())
    hv = d["hypervolume"]
    assert list(hv) == ["finetuned:A", "task_arithmetic", "pareto_merging_datafree", "pareto_merging_unlabeled"]
    assert hv["task_arithmetic"] == pytest.approx(0.36)
    # (0.7, 0.65) and (0.8, 0.5): 0.7*0.65 + 0.1*0.5
    assert hv["pareto_merging_datafree"] == pytest.approx(0.7 * 0.65 + 0.1 * 0.5)
    # (0.5,0.9),(0.7,0.7),(0.9,0.5): 0.9*0.5 + 0.7*0.2 + 0.5*0.2
    assert hv["pareto_merging_unlabeled"] == pytest.approx(0.45 + 0.14 + 0.10)
    json.dumps(d, allow_nan=False)


def test_report_round_trip_and_atomic_save(tmp_path):
    r = _report()
    path = tmp_path / "sub" / "report.json"
    r.save(path)
    assert sorted(os.listdir(path.parent)) == ["report.json"]  # no temp file left behind
    loaded = Report.load(path)
    assert loaded.to_dict() == r.to_dict()
    assert json.loads(path.read_text()) == r.to_dict()
    # overwrite: the old file is replaced whole
    r.add("ties", None, None, {"A": 0.1, "B": 0.1})
    r.save(path)
    assert len(Report.load(path)) == len(r)
    assert sorted(os.listdir(path.parent)) == ["report.json"]


def test_report_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    _report().save(path)
    old = path.read_text()
    import paretomerge.evaluation.report as ev

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ev.json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _report().save(path)
    assert path.read_text() == old
    assert os.listdir(tmp_path) == ["report.json"]


def test_report_bad_input(tmp_path):
    r = Report(["A", "B"])
    with pytest.raises(ValueError, match="unknown task"):
        r.add("ties", None, None, {"C": 0.5})
    with pytest.raises(ValueError, match="pref has 3 entries"):
        r.add("ties", "equal", [0.3, 0.3, 0.4], {"A": 0.5})
    with pytest.raises(ValueError, match="finite"):
        r.add("ties", None, None, {"A": float("nan")})
    with pytest.raises(ValueError, match="method"):
        r.add("", None, None, {"A": 0.5})
    with pytest.raises(ValueError, match="tasks"):
        Report([])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": ["A"], "results": [{"method": "x"}]}))
    with pytest.raises(ValueError, match="results\\[0\\]"):
        Report.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Report.load(bad)


def test_report_markdown():
    md = _report().markdown()
    lines = md.strip().splitlines()
    assert lines[0] == "| method | scenario | A | B | mean |"
    assert len(lines) == 2 + len(_report())
    assert "| task_arithmetic | - | 0.6000 | 0.6000 | 0.6000 |" in lines
    assert any(line.startswith("| pareto_merging_unlabeled | grid (0.50, 0.50) |") for line in lines)


# -------- plots --------
def test_plots_render(tmp_path):
    from paretomerge.evaluation.plots import plot_scenarios, plot_tradeoff

    r = _report()
    plot_tradeoff(r, tmp_path / "tradeoff.png")
    plot_scenarios(r, tmp_path / "scenarios.png")
    for name in ("tradeoff.png", "scenarios.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="unknown task"):
        plot_tradeoff(r, tmp_path / "x.png", tasks=("A", "Z"))


def test_plots_of_a_report_without_named_scenarios(tmp_path):
    # one panel of every result ("all results"), fronts on the two tasks, and the pair check shared by both
    from paretomerge.evaluation.plots import plot_fronts, plot_scenarios, plot_tradeoff

    r = Report(["A", "B"])
    r.add("task_arithmetic", None, None, {"A": 0.6, "B": 0.6})
    for g in (0.0, 0.5, 1.0):
        r.add("pareto_merging_datafree", "grid", [g, 1 - g], {"A": 0.5 + 0.3 * g, "B": 0.8 - 0.3 * g})
    for name, plot in (("s.png", plot_scenarios), ("t.png", plot_tradeoff), ("f.png", plot_fronts)):
        plot(r, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for plot in (plot_tradeoff, plot_fronts):
        with pytest.raises(ValueError, match="two different tasks"):
            plot(r, tmp_path / "x.png", tasks=("A", "A"))


@pytest.mark.parametrize("K", [2, 3])
def test_hypervolume_depends_only_on_the_front(K):
    rng = np.random.default_rng(10 + K)
    pts = rng.uniform(0.05, 1.0, size=(25, K))
    mask = non_dominated(pts)
    assert 0 < mask.sum() < len(pts)
    assert hypervolume(pts[mask]) == pytest.approx(hypervolume(pts), rel=1e-12)
    # every dropped point is dominated by a kept one; adding a point never lowers the hypervolume
    for p in pts[~mask]:
        assert np.any(np.all(pts[mask] >= p, axis=1))
    assert hypervolume(np.vstack([pts, rng.uniform(0, 1, size=(1, K))])) >= hypervolume(pts) - 1e-15


def test_report_hypervolume_follows_new_results():
    r = _report()
    assert r.hypervolumes()["task_arithmetic"] == pytest.approx(0.36)
    r.add("task_arithmetic", "equal", [0.5, 0.5], {"A": 0.9, "B": 0.5})
    # (0.6, 0.6) and (0.9, 0.5): 0.6*0.6 + 0.3*0.5
    assert r.to_dict()["hypervolume"]["task_arithmetic"] == pytest.approx(0.36 + 0.15)
