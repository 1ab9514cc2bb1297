"""Data-free Pareto Merging step time at 1 and N processes (layers sharded, gloo on CPU, 1 torch thread each).

    PYTHONPATH=.:python_api python bench/scripts/time_distributed_datafree.py [--nproc 2] [--layers 16] [--width 384]
        [--K 8] [--rank 16] [--steps 30] [--repeats 3]

The pool: a stack of ``--layers`` square Linear layers (all converted), K fine-tuned copies. Each measurement
trains ``--steps`` steps after 3 warm-up steps and reports the mean step time; the best of ``--repeats``
measurements is kept (1 process is measured before and after the N-process run). In the N-process run, the
time spent in all-reduces (f's, and the one non-finite check at the end of each measurement; waiting for
the slowest rank included) is measured inside the steps, and the collective alone is timed with 200
back-to-back all-reduces of the same K+1 floats.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "python_api")]

from paretomerge import TrainerConfig  # noqa: E402
from paretomerge.methods.pareto_merging import ParetoMergingTrainer  # noqa: E402


def build(args, dist=None) -> ParetoMergingTrainer:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    sd = model.state_dict()
    fts = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()} for _ in range(args.K)]
    cfg = TrainerConfig(steps=10 ** 6, rank=args.rank, include="all", progress=False, lr=1e-3)
    return ParetoMergingTrainer(model, None, cfg, finetuned=fts, dist=dist)


def time_steps(t: ParetoMergingTrainer, steps: int, barrier=None, on_start=None) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per step."""
    t.train(steps=t.step + 3)  # warm-up
    if barrier:
        barrier()
    if on_start:
        on_start()
    t0, c0 = time.perf_counter(), time.process_time()
    t.train(steps=t.step + steps)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from paretomerge import distributed as pmdist

    ctx = pmdist.init_from_env(timeout_s=120)
    t = build(args, ctx)
    spent = [0.0]
    real = dist.all_reduce

    def timed_all_reduce(*a, **kw):  # the f all-reduce inside a step, waiting for the slowest rank included
        t0 = time.perf_counter()
        r = real(*a, **kw)
        spent[0] += time.perf_counter() - t0
        return r

    results = []
    for _ in range(args.repeats):
        pmdist.dist.all_reduce = timed_all_reduce
        step, cpu = time_steps(t, args.steps, ctx.barrier, on_start=lambda: spent.__setitem__(0, 0.0))
        pmdist.dist.all_reduce = real
        results.append({"step_s": step, "cpu_s": cpu, "allreduce_in_step_s": spent[0] / args.steps})
    x = torch.zeros(args.K + 1)
    ctx.barrier()
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(x)
    collective = (time.perf_counter() - t0) / 200
    best = min(results, key=lambda r: r["step_s"])
    Path(f"{out}.{rank}").write_text(json.dumps({**best, "collective_s": collective, "own_weights": len(t.shard_keys)}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    single = build(args)
    one = min(time_steps(single, args.steps) for _ in range(args.repeats))
    out = Path(f"/tmp/pm_dist_bench_{os.getpid()}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args.nproc, port, args, str(out)), nprocs=args.nproc, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(args.nproc)]
    for r in range(args.nproc):
        Path(f"{out}.{r}").unlink()
    r = ranks[0]
    one = min([one] + [time_steps(single, args.steps) for _ in range(args.repeats)])  # 1 process again, after
    params = sum(p.numel() for p in single.params)
    print(f"pool: {args.layers} Linear {args.width}x{args.width} layers, K={args.K}, r={args.rank}, "
          f"{params} trained parameters, deltas {args.layers * args.K * args.width ** 2 * 4 / 2 ** 20:.0f} MiB fp32")
    cpu = max(x["cpu_s"] for x in ranks)
    print("| processes | step wall (ms) | speed-up (wall) | CPU ms/step of the busiest process | speed-up (CPU) | "
          "all-reduce in step (ms, share) | all-reduce alone (ms) | bytes/step |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 | {one[0] * 1e3:.2f} | 1.00 | {one[1] * 1e3:.2f} | 1.00 | – | – | 0 |")
    print(f"| {args.nproc} | {r['step_s'] * 1e3:.2f} | {one[0] / r['step_s']:.2f} | {cpu * 1e3:.2f} | "
          f"{one[1] / cpu:.2f} | {r['allreduce_in_step_s'] * 1e3:.3f} "
          f"({100 * r['allreduce_in_step_s'] / r['step_s']:.1f} %) | {r['collective_s'] * 1e3:.3f} | {(args.K + 1) * 4} |")


if __name__ == "__main__":
    main()
