"""``python -m bench.real [--pool text|vision|llm|all] [--quick | --top2] [--seeds 0,1,2] [--cache DIR] [--out DIR]``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .data import MissingData


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__)
    ap.add_argument("--pool", choices=("text", "vision", "llm", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small subsets and few steps (the CI test)")
    ap.add_argument("--top2", action="store_true", help="text: the full setting on the top 2 BERT layers only "
                    "(~8x less CPU than the whole encoder)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "PMK_REALBENCH_CACHE", Path.home() / ".cache" / "pmkernels-realbench")),
        help="cache directory (default $PMK_REALBENCH_CACHE or ~/.cache/pmkernels-realbench)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data split, fine-tunes, merges); with "
                    "several, out/<pool>/summary.md holds mean ± std and the priority-control CIs")
    ap.add_argument("--out", type=Path, default=Path("bench/real/out"), help="report.json, table.md, plots per pool")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    from .run import run_seeds, settings_for, top2

    t0 = time.perf_counter()
    pools = ("text", "vision") if args.pool == "all" else (args.pool,)
    try:
        for pool in pools:
            dest = args.out / (pool + ("-quick" if args.quick else "") + ("-top2" if args.top2 else ""))
            if pool == "llm":  # LoRA adapters on SmolLM2-135M (bench/real/llm.py); not part of "all"
                from .llm import run_llm_seeds

                run_llm_seeds(quick=args.quick, seeds=seeds, cache_root=args.cache, out=dest)
            else:
                run_seeds(pool, quick=args.quick, seeds=seeds, cache_root=args.cache, out=dest,
                          settings=(lambda sd, p=pool: top2(settings_for(p, args.quick, sd))) if args.top2 else None)
    except MissingData as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"total wall time {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
