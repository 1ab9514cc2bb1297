"""The ``paretomerge`` command line.

    paretomerge demo   [--out DIR] [--device cpu|cuda] [--steps N]
    paretomerge merge  --config FILE.yaml
    paretomerge export --checkpoint CKPT --pref 0.4,0.2,0.2,0.2 --out model.safetensors
    paretomerge eval   --checkpoint CKPT --config FILE.yaml [--prefs equal,priority,onehot] [--out DIR]
    paretomerge validate FILE.yaml [...]
    paretomerge plan   CONFIG.yaml [--lowrank-rank R]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch


def _parse_pref(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pref must be comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-3:
        raise argparse.ArgumentTypeError(f"--pref must be K non-negative numbers summing to 1, got {text!r}")
    return vals


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(device=args.device, seed=args.seed, progress=not args.quiet,
                     num_threads=args.threads or 1)
    if args.steps is not None:
        cfg.pareto_steps = args.steps
    if args.per_sample:
        cfg.pareto_per_sample = True
    t0 = time.perf_counter()
    summary = run_demo(args.out, cfg, log=(lambda *a: None) if args.quiet else print)
    print(summary["report"].markdown(3))
    print("preference control (accuracy on task k: priority:<k> vs equal):")
    ok_all = True
    for m, rows in summary["preference_control"].items():
        for t, r in rows.items():
            ok_all &= r["ok"]
            print(f"  {m:18s} {t:8s} equal {r['equal']:.3f}  priority {r['priority']:.3f}  "
                  f"{'ok' if r['ok'] else 'NOT HIGHER'}")
    print("hypervolume: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["report"].hypervolumes().items()
                                       if not k.startswith("finetuned")))
    print(f"wall time {time.perf_counter() - t0:.1f}s; report: {Path(args.out) / 'report.json'}")
    return 0 if ok_all else 1


# ----------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    from .config import load_config
    from .program import evaluate_checkpoint, run_merge

    cfg = load_config(args.config)
    ckpt = run_merge(cfg)
    print(f"trained Pareto Merging checkpoint: {ckpt}")
    if cfg.eval_data:
        rep = evaluate_checkpoint(ckpt, cfg, ["equal", "priority", "onehot"])
        rep.save(ckpt.parent / "report.json")
        print(rep.markdown(3))
    return 0


def cmd_validate(args) -> int:
    from .config import load_config

    for f in args.configs:
        load_config(f)
        print(f"{f}: ok")
    return 0


# ----------------------------------------------------------------------------- export / eval
def cmd_export(args) -> int:
    from .program import export_checkpoint

    export_checkpoint(args.checkpoint, args.pref, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config
    from .program import evaluate_checkpoint

    cfg = load_config(args.config)
    rep = evaluate_checkpoint(args.checkpoint, cfg, [s for s in args.prefs.split(",") if s],
                              priority=args.priority, resolution=args.resolution)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep.save(out / "report.json")
    print(rep.markdown(3))
    print(f"wrote {out / 'report.json'}")
    return 0


# ----------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from .config import load_config
    from .plan import plan_for_config

    print(plan_for_config(load_config(args.config), lowrank_R=args.lowrank_rank).markdown())
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paretomerge", description="Preference-aware (Pareto) model merging: "
                                "train once, get a merged model for any preference over the tasks.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's; small models on shared CPUs run "
                        "fastest with 1 — the demo uses 1 unless this is given)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the end-to-end digits demo (CPU, a few minutes)",
                       description="Pretrain a small open_clip ViT on scikit-learn digits, fine-tune 4 task "
                                   "models (digits, rot90, mirror, invert), merge them with task arithmetic, "
                                   "TIES, AdaMerging and Pareto Merging (data-free and unlabeled), evaluate "
                                   "under equal / priority / one-hot preferences; write report.json and plots.")
    d.add_argument("--out", default="pmdemo", help="output directory (default: %(default)s)")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: %(default)s)")
    d.add_argument("--steps", type=int, default=None, help="Pareto Merging training steps (default: 200)")
    d.add_argument("--seed", type=int, default=0, help="seed of everything (default: %(default)s)")
    d.add_argument("--per-sample", action="store_true", help="one preference per sample while training")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("merge", help="train Pareto Merging on a model pool described by a YAML config",
                       description="Build the base merge, convert it, train the preference-conditioned tensors "
                                   "(resuming from OUTPUT/checkpoints/last.pt if present), write "
                                   "OUTPUT/pareto_merged.pt and, with eval_data, OUTPUT/report.json. "
                                   "See examples/merge_demo.yaml.")
    m.add_argument("--config", required=True, help="YAML config (paths relative to the file)")
    m.set_defaults(func=cmd_merge)

    v = sub.add_parser("validate", help="validate YAML configs without running them")
    v.add_argument("configs", nargs="+", help="YAML config files")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="memory plan of a merge config, computed without allocating weights",
                        description="Bytes of the base model, the K task vectors dense vs low-rank, the Pareto "
                                    "parameters and optimizer state (meta device, safetensors headers, config.json), "
                                    "and whether it fits a 24 GB CPU box and an 80 GB GPU.")
    pl.add_argument("config", help="YAML config (as for merge)")
    pl.add_argument("--lowrank-rank", type=int, default=None,
                    help="plan low-rank deltas at this rank R (default: pool.compress.rank, if any)")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("export", help="bake one preference into a plain model (safetensors)",
                       description="Load a Pareto Merging checkpoint, bake W(γ) = W + U M(γ) Vᵀ into every "
                                   "Pareto layer and save a state dict with the original architecture's keys.")
    e.add_argument("--checkpoint", required=True, help="checkpoint written by merge/demo (pareto_merged.pt)")
    e.add_argument("--pref", required=True, type=_parse_pref, help="preference, e.g. 0.4,0.2,0.2,0.2 (sums to 1)")
    e.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    e.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="evaluate a checkpoint over a preference set, write report.json")
    ev.add_argument("--checkpoint", required=True, help="Pareto Merging checkpoint")
    ev.add_argument("--config", required=True, help="YAML config naming the pool heads and eval_data")
    ev.add_argument("--prefs", default="equal,priority,onehot",
                    help="comma-separated preference specs: equal, priority[:task], onehot[:task], grid "
                         "(default: %(default)s)")
    ev.add_argument("--priority", type=float, default=0.5, help="γ of the prioritised task (default: %(default)s)")
    ev.add_argument("--resolution", type=int, default=4, help="simplex grid resolution (default: %(default)s)")
    ev.add_argument("--out", default="paretomerge_eval", help="output directory (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"paretomerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
