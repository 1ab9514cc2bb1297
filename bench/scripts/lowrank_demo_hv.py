"""Digits demo, data-free Pareto Merging: dense task vectors vs compressed ones — hypervolume of the trained front.

    PYTHONPATH=.:python_api python bench/scripts/lowrank_demo_hv.py [--ranks 4,8,16] [--steps 200] [--resolution 4]

Builds the demo's pool (pretrain + 4 fine-tunes, as ``paretomerge demo``), the task-arithmetic base, then trains
data-free Pareto Merging once on the dense pool and once per rank R on a copy of the pool whose converted
weights' task vectors are truncated SVDs at rank R (``ModelPool.compress(rank=R, keys=...)``; the objective
then runs ``pmkernels.low_rank_distances``). Each trained model is evaluated on a simplex grid of
preferences; reported: the hypervolume (ref point 0) of its accuracy points, as a fraction of the dense run's,
the compression error and the training time. Markdown on stdout.
"""
from __future__ import annotations

import copy
import time

import argparse
import torch

from paretomerge.config import TrainerConfig
from paretomerge.demo import DemoConfig, TASKS, build_pool, load_data, task_inputs
from paretomerge.evaluation import Report, evaluate_tasks, preference_set
from paretomerge.layers import factored_weights
from paretomerge.methods import merge
from paretomerge.methods.pareto_merging import ParetoMergingTrainer
from paretomerge.pools import ModelPool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--resolution", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(seed=args.seed)
    data = load_data(cfg)
    pool, heads = build_pool(cfg, data, log=lambda *a: None)
    tasks = list(TASKS)
    xte, yte = data["test"]
    test = {t: (task_inputs(t, xte), yte) for t in tasks}
    base = merge("task_arithmetic", pool, lam=cfg.ta_lam)
    prefs = preference_set("grid", tasks, resolution=args.resolution)
    tcfg = TrainerConfig(mode="datafree", steps=args.steps, rank=cfg.pareto_rank, include=cfg.pareto_include,
                         lr=cfg.pareto_lr, mu=cfg.pareto_mu, seed=cfg.seed, progress=False)
    report = Report(tasks)
    rows = []

    def run(name: str, p: ModelPool, err: str) -> None:
        model = copy.deepcopy(base)
        trainer = ParetoMergingTrainer(model, p, tcfg, task_names=tasks)
        factored = sum(t.deltas is None for t in trainer.datafree.terms)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
        for scenario, pref in prefs:
            report.add(name, scenario, list(pref), evaluate_tasks(model, heads, test, torch.tensor(pref)))
        rows.append((name, err, f"{factored}/{len(trainer.datafree.terms)}", secs))

    run("dense", pool, "0")
    # the weights the trainer converts (attention): their keys in the pool's state dicts
    probe = copy.deepcopy(base)
    from paretomerge.methods.pareto_merging.trainer import convert_for_config
    convert_for_config(probe, len(tasks), tcfg)
    keys = [k for k, *_ in factored_weights(probe)]
    for R in [int(r) for r in args.ranks.split(",") if r]:
        p = ModelPool.from_modules(pool.pretrained, {t: pool.finetuned_model(t) for t in tasks}, heads=heads)
        ctv = p.compress(rank=R, keys=keys)
        err = ", ".join(f"{e:.3f}" for e in ctv.total_errors().values())
        run(f"R = {R}", p, err)
    hv = report.hypervolumes()
    print(f"digits demo, data-free Pareto Merging, TA base, r = {cfg.pareto_rank}, {args.steps} steps, "
          f"{len(prefs)} grid preferences, seed {args.seed}\n")
    print("| task vectors | rel. error per task | factored layers | train time | hypervolume | ÷ dense |")
    print("|---|---|---|---|---|---|")
    for name, err, fac, secs in rows:
        print(f"| {name} | {err} | {fac} | {secs:.1f} s | {hv[name]:.4f} | {hv[name] / hv['dense']:.4f} |")


if __name__ == "__main__":
    main()
