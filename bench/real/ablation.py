"""The unlabeled mode's ablation on the real-weights pools: which base (TA, AdaMerging before / jointly) and which
terms (plain entropy, ``diversity``, ``anchor``, the tensor regulariser, lr) give priority control and accuracy.

    python -m bench.real.ablation [--quick | --top2] [--seeds 0,1] [--variants before_plain,before_div,...] [--out DIR]

For every variant and seed: accuracy at equal and under each task's priority (0.5) on the test set, and what
the collapse diagnosis needs: the share of test predictions that fall in the most frequent class (1/C = even,
1 = every input one class) and the mean prediction entropy, at equal and under priority. Fine-tunes and
features come from the benchmark's cache (``bench.real.run.prepare``). Writes ablation.json and ablation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import paretomerge as pm
from paretomerge.evaluation import paired_bootstrap, preference_set
from paretomerge.methods.pareto_merging import ParetoMergingTrainer

from .run import pareto_base, prepare, settings_for, top2

# name → TrainerConfig fields over the benchmark's unlabeled settings
VARIANTS: dict[str, dict] = {
    "ta_plain": {"adamerging": "off", "diversity": 0.0, "anchor": 0.0},
    "ta_div_anchor": {"adamerging": "off", "diversity": 1.0, "anchor": 1.0},
    "before_plain": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0},
    "before_plain_lr1e-3": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "lr": 1e-3},
    "before_plain_reg": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "reg_frobenius": 1e-3},
    "before_plain_lr2e-2": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "lr": 2e-2},
    "before_plain_alpha0.3": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "alpha": 0.3},
    "before_plain_linear": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "scalarization": "linear"},
    "before_div_anchor_lr2e-2": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "lr": 2e-2},
    "before_anchor_lr2e-2": {"adamerging": "before", "diversity": 0.0, "anchor": 1.0, "lr": 2e-2},
    "before_div_anchor3": {"adamerging": "before", "diversity": 1.0, "anchor": 3.0},
    "before_div": {"adamerging": "before", "diversity": 1.0, "anchor": 0.0},
    "before_anchor": {"adamerging": "before", "diversity": 0.0, "anchor": 1.0},
    "before_div_anchor": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0},
    "before_div_anchor_linear": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "scalarization": "linear"},
    "before_div_anchor_mu0.5": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "mu": 0.5},
    "before_div_anchor_alpha0.3": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "alpha": 0.3},
    "before_div_anchor3_linear": {"adamerging": "before", "diversity": 1.0, "anchor": 3.0, "scalarization": "linear"},
    "before_div_anchor_lr1e-3": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "lr": 1e-3},
    "before_div_anchor10": {"adamerging": "before", "diversity": 1.0, "anchor": 10.0},
    "before_div_anchor_diag": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "structure": "diag"},
    "before_div_anchor_lora_sum": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "structure": "lora_sum"},
    "before_div_anchor_sf": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "scale_free": True},
    "before_plain_sf": {"adamerging": "before", "diversity": 0.0, "anchor": 0.0, "scale_free": True},
    "before_div_sf": {"adamerging": "before", "diversity": 1.0, "anchor": 0.0, "scale_free": True},
    "before_anchor1000": {"adamerging": "before", "diversity": 0.0, "anchor": 1000.0},  # ≈ data-free on the λ base
    "before_anchor1000_df": {"adamerging": "before", "diversity": 0.0, "anchor": 1000.0, "steps": 200, "lr": 1e-2},
    "before_only": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "lr": 1e-12},  # the λ phase alone
    "before_div_anchor_b64": {"adamerging": "before", "diversity": 1.0, "anchor": 1.0, "batch_size": 64},
    "joint_plain": {"adamerging": "joint", "diversity": 0.0, "anchor": 0.0},
    "joint_div_anchor": {"adamerging": "joint", "diversity": 1.0, "anchor": 1.0},
}


@torch.no_grad()
def _diagnose(bench, model, pref) -> dict:
    out = {}
    with pm.use_preference(torch.tensor(pref)):
        for t, (x, y) in bench.test.items():
            logits = torch.cat([bench.heads[t](model(x[i:i + 256])) for i in range(0, len(x), 256)])
            pred = logits.argmax(-1)
            counts = torch.bincount(pred, minlength=logits.shape[-1]).float()
            out[t] = {"acc": float((pred == y).float().mean()), "correct": (pred == y).int().tolist(),
                      "top_share": float(counts.max() / counts.sum()),
                      "entropy": float(pm.entropy(logits)), "logit_norm": float(logits.norm(dim=-1).mean())}
    return out


def run_variant(bench, name: str, options: dict, log=print) -> dict:
    s = bench.settings
    base, include = pareto_base(bench)
    options = dict(options)
    scale_free = options.pop("scale_free", False)
    opts = {"adamerging_steps": s.adamerging_steps, "adamerging_lr": s.adamerging_lr, "adamerging_init": s.ta_lam,
            "lr": s.pareto_lr_unlabeled, **options}
    cfg = pm.TrainerConfig(**{"mode": "unlabeled", "include": include, "rank": s.pareto_rank,
                              "steps": s.pareto_steps_unlabeled, "batch_size": s.pareto_batch, "seed": s.seed,
                              "progress": False, **opts})
    logits_fn = bench.logits_fn
    if scale_free:  # probe: entropy of centred logits rescaled per row to the base's mean norm
        with torch.no_grad(), pm.use_preference(torch.full((len(bench.tasks),), 1 / len(bench.tasks))):
            c = [float((lambda l: (l - l.mean(-1, keepdim=True)).norm(dim=-1).mean())(
                bench.logits_fn(base, k, bench.unlabeled[t][:256]))) for k, t in enumerate(bench.tasks)]

        def logits_fn(model, k, x):
            lg = bench.logits_fn(model, k, x)
            lg = lg - lg.mean(-1, keepdim=True)
            return c[k] * lg / lg.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t0 = time.perf_counter()
    trainer = ParetoMergingTrainer(base, bench.pool, cfg, logits_fn=logits_fn,
                                   unlabeled=[bench.unlabeled[t] for t in bench.tasks], task_names=bench.tasks)
    trainer.train()
    seconds = time.perf_counter() - t0
    rows = {sc: _diagnose(bench, base, p) for sc, p in
            preference_set("equal", bench.tasks) + preference_set("priority", bench.tasks, priority=s.priority)}
    hist = [{k: v for k, v in h.items()} for h in trainer.history[:: max(1, len(trainer.history) // 6)]]
    log(f"{name} seed {s.seed}: {seconds:.0f}s; equal " + " ".join(
        f"{t} {100 * rows['equal'][t]['acc']:.1f}/{100 * rows[f'priority:{t}'][t]['acc']:.1f}" for t in bench.tasks))
    return {"rows": rows, "seconds": seconds, "history": hist}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real.ablation", description=__doc__)
    ap.add_argument("--pool", default="text")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--top2", action="store_true", help="text: the full setting on the top 2 BERT layers only (30 "
                    "fine-tuning steps at lr 3e-4, as --quick's), ~8x less CPU than the whole encoder")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "PMK_REALBENCH_CACHE", Path.home() / ".cache" / "pmkernels-realbench")))
    ap.add_argument("--out", type=Path, default=Path("bench/real/out/ablation"))
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ablation.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        s = settings_for(args.pool, args.quick, seed)
        if args.top2:
            s = top2(s)
        cache = args.cache / f"{args.pool}{'-quick' if args.quick else ''}-{s.key()}"
        cache.mkdir(parents=True, exist_ok=True)
        bench = prepare(s, cache)
        for name in names:
            key = f"{name}/seed{seed}/{s.key()}"
            if key in done:
                continue
            done[key] = {"variant": name, "seed": seed, "settings": dataclasses.asdict(s),
                         **run_variant(bench, name, VARIANTS[name])}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done))
            os.replace(tmp, path)
    md = summarize(done)
    (args.out / "ablation.md").write_text(md)
    print(md)
    return 0


def summarize(done: dict) -> str:
    by: dict[str, list] = {}
    for v in done.values():
        by.setdefault(v["variant"], []).append(v)
    tasks = list(next(iter(done.values()))["rows"]["equal"])
    lines = ["| variant | seeds | equal avg | " + " | ".join(f"{t} prio−eq [CI]" for t in tasks)
             + " | pooled prio−eq [CI] | top-class share eq → prio (mean) | s |",
             "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
    for name, runs in by.items():
        eq = sum(sum(r["rows"]["equal"][t]["acc"] for t in tasks) / len(tasks) for r in runs) / len(runs)
        cells = []
        for t in tasks:
            ci = paired_bootstrap([r["rows"][f"priority:{t}"][t]["correct"] for r in runs],
                                  [r["rows"]["equal"][t]["correct"] for r in runs])
            cells.append(f"{100 * ci['diff']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]")
        ci = paired_bootstrap([sum((r["rows"][f"priority:{t}"][t]["correct"] for t in tasks), []) for r in runs],
                              [sum((r["rows"]["equal"][t]["correct"] for t in tasks), []) for r in runs])
        cells.append(f"{100 * ci['diff']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]")
        share_eq = sum(r["rows"]["equal"][t]["top_share"] for r in runs for t in tasks) / (len(runs) * len(tasks))
        share_pr = sum(r["rows"][f"priority:{t}"][t]["top_share"] for r in runs for t in tasks) / (len(runs) * len(tasks))
        sec = sum(r["seconds"] for r in runs) / len(runs)
        lines.append(f"| {name} | {len(runs)} | {100 * eq:.1f} | " + " | ".join(cells)
                     + f" | {share_eq:.2f} → {share_pr:.2f} | {sec:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
