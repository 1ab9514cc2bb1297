"""`paretomerge demo`'s pool and merge.yaml (unlabeled mode) at 1 and 2 processes: how far apart are the results?

    PYTHONPATH=.:python_api python bench/scripts/distributed_equality_demo.py OUT [--steps 20] [--per-sample]

Writes the demo's default pool, data and merge.yaml under OUT (once; no merging), then runs
``paretomerge merge`` on it with ``--steps`` steps in one process and with ``--nproc 2`` (evaluation on the
demo's test split under equal / priority / onehot preferences) and prints one JSON line: the largest
|Δ| over every tensor of the two checkpoints, the largest factor, and the largest |Δ accuracy| over every
(preference, task). Figures: docs/distributed.md ("Equality, measured").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-sample", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (args.out / "merge.yaml").exists():
        from paretomerge.demo import DemoConfig, build_pool, load_data, write_pool

        args.out.mkdir(parents=True, exist_ok=True)
        cfg = DemoConfig()
        data = load_data(cfg)
        pool, heads = build_pool(cfg, data)
        write_pool(args.out, pool, heads, cfg, data)
    conf = yaml.safe_load((args.out / "merge.yaml").read_text())
    conf["trainer"].update(steps=args.steps, checkpoint_every=0, per_sample=args.per_sample)
    tag = f"eq{args.steps}{'_ps' if args.per_sample else ''}"
    res = {}
    for n in (1, 2):
        c = {**conf, "output": {"dir": f"{tag}_n{n}"}}
        path = args.out / f"{tag}_n{n}.yaml"
        path.write_text(yaml.safe_dump(c))
        cmd = [sys.executable, "-m", "paretomerge", "--threads", "1", "merge", "--config", str(path), "--fresh"]
        p = subprocess.run(cmd + (["--nproc", str(n)] if n > 1 else []), capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        ck = torch.load(args.out / f"{tag}_n{n}" / "pareto_merged.pt", weights_only=True)
        rep = json.loads((args.out / f"{tag}_n{n}" / "report.json").read_text())
        res[n] = (ck["model"], {(r["method"], r["scenario"], t): v for r in rep["results"]
                                for t, v in r["metrics"].items()})
    (m1, a1), (m2, a2) = res[1], res[2]
    print(json.dumps({"steps": args.steps, "per_sample": args.per_sample,
                      "max_abs_param_diff": max(float((m1[k].float() - m2[k].float()).abs().max()) for k in m1),
                      "max_abs_factor": max(float(m1[k].float().abs().max()) for k in m1
                                            if k.endswith((".U", ".G", ".V"))),
                      "max_abs_acc_diff": max(abs(a1[k] - a2[k]) for k in a1)}))


if __name__ == "__main__":
    main()
