"""End to end at reduced size: demo → report.json, then merge / eval / export via the CLI on its pool."""
from __future__ import annotations

import json

import yaml

from paretomerge.cli import main
from paretomerge.demo import TASKS, DemoConfig, run_demo

# (one intra-op thread: the autouse fixture in conftest.py)


METHODS = ("task_arithmetic", "ties", "adamerging", "pareto_merging_datafree", "pareto_merging_unlabeled",
           "map", "ta_preference")
PER_PREFERENCE = ("pareto_merging_datafree", "pareto_merging_unlabeled", "map", "ta_preference")


def tiny() -> DemoConfig:
    return DemoConfig(layers=1, width=32, head_width=16, patch_size=4, embed_dim=16, test_size=200,
                      unlabeled_size=64, pretrain_steps=15, finetune_steps=10, train_batch=32,
                      adamerging_steps=3, pareto_steps=4, pareto_rank=2, pareto_batch=16, plots=True,
                      map_budget=20, map_val_size=32, map_generations=10)


def assert_cost_table_filled(d: dict, methods) -> None:
    """Every (non-fine-tuned) method of the report has a full cost row; HV per method is in the report."""
    from paretomerge.evaluation.report import COST_FIELDS

    assert set(d["cost"]) == set(methods)
    for m in methods:
        row = d["cost"][m]
        assert set(row) == set(COST_FIELDS), m
        for k in ("params_stored", "models_trained", "models_merged", "evaluations", "eval_time_s"):
            assert row[k] is not None and row[k] >= 0, (m, k)
        assert row["params_stored"] > 0 and row["models_merged"] >= 1, m
        if m in PER_PREFERENCE or m.startswith("pareto_merging"):
            assert row["new_pref_time_s"] is not None and row["new_pref_time_s"] >= 0, m
        assert m in d["hypervolume"]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, tiny(), log=lambda *a: None)
    d = json.loads((out / "report.json").read_text())
    assert set(d) == {"tasks", "results", "hypervolume", "base_methods", "cost"}
    assert d["base_methods"] == {"pareto_merging_datafree": "task_arithmetic",
                                 "pareto_merging_unlabeled": "task_arithmetic"}
    assert d["tasks"] == list(TASKS)
    for r in d["results"]:
        assert set(r) == {"method", "scenario", "pref", "metrics"}
        assert set(r["metrics"]) == set(TASKS), r  # every method has metrics for every task
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    methods = {r["method"] for r in d["results"]}
    assert methods == set(METHODS) | {f"finetuned:{t}" for t in TASKS}  # the report's method names, no others
    assert {f"finetuned:{t}" for t in TASKS} <= methods
    assert_cost_table_filled(d, METHODS)
    assert d["cost"]["map"]["evaluations"] == 20 and d["cost"]["ta_preference"]["models_merged"] == 1 + 2 * len(TASKS)
    assert (out / "fronts.png").exists()
    for m in PER_PREFERENCE:
        scen = {r["scenario"] for r in d["results"] if r["method"] == m}
        assert scen == {"equal"} | {f"priority:{t}" for t in TASKS} | {f"onehot:{t}" for t in TASKS}
    assert set(summary["preference_control"]) == {"pareto_merging_datafree", "pareto_merging_unlabeled"}
    assert (out / "summary.json").exists() and (out / "merge.yaml").exists()

    # the written pool runs through merge -> eval -> export
    conf = yaml.safe_load((out / "merge.yaml").read_text())
    conf["trainer"].update(steps=2, rank=2, batch_size=8, checkpoint_every=1)
    (out / "merge.yaml").write_text(yaml.safe_dump(conf))
    assert main(["validate", str(out / "merge.yaml")]) == 0
    assert main(["merge", "--config", str(out / "merge.yaml")]) == 0
    ckpt = out / "merged" / "pareto_merged.pt"
    assert ckpt.exists() and (out / "merged" / "report.json").exists()
    assert main(["eval", "--checkpoint", str(ckpt), "--config", str(out / "merge.yaml"), "--prefs", "equal,onehot",
                 "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert len(ev["results"]) == 1 + len(TASKS)
    assert main(["export", "--checkpoint", str(ckpt), "--pref", "0.4,0.2,0.2,0.2",
                 "--out", str(tmp_path / "m.safetensors")]) == 0


def test_demo_is_deterministic(tmp_path):
    cfg = tiny()
    cfg.methods = ("pareto_merging_datafree",)
    cfg.write_pool = cfg.plots = False
    a = run_demo(None, cfg, log=lambda *a: None)["report"].to_dict()
    b = run_demo(None, cfg, log=lambda *a: None)["report"].to_dict()
    for d in (a, b):  # wall times in the cost table differ from run to run; everything else must not
        for row in d["cost"].values():
            for k in [k for k in row if k.endswith("_time_s")]:
                row[k] = row[k] is not None
    assert a == b


def test_demo_ablations_fill_the_cost_table():
    cfg = tiny()
    cfg.pareto_rank = 4  # lora_sum needs rank divisible by K = 4, diag rank >= K
    cfg.methods = ("pareto_merging_datafree",)
    cfg.ablations = True
    cfg.ablation_ranks = (2,)
    cfg.write_pool = cfg.plots = False
    d = run_demo(None, cfg, log=lambda *a: None)["report"].to_dict()
    ablations = [f"pareto_merging_datafree[{k}={v}]" for k, v in
                 (("scalarization", "linear"), ("scalarization", "tch"), ("structure", "lora_sum"),
                  ("structure", "diag"), ("rank", 2))]
    assert_cost_table_filled(d, ["pareto_merging_datafree", *ablations, "adamerging_preference"])
    assert d["cost"]["adamerging_preference"]["models_trained"] == 1 + 2 * len(TASKS)
