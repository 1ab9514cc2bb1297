"""The ``paretomerge`` command line.

    paretomerge demo   [--out DIR] [--device cpu|cuda] [--steps N]
    paretomerge merge  --config FILE.yaml [--fresh] [--nproc N]     (or: torchrun --nproc-per-node N -m paretomerge merge ...)
    paretomerge export --checkpoint CKPT --pref 0.4,0.2,0.2,0.2 --out model.safetensors [--format hf|peft]
    paretomerge generate --checkpoint CKPT --pref 0.7,0.3 [--pref 0.2,0.8] [--prompts FILE]
    paretomerge serve  --checkpoint CKPT [--tokenizer DIR] [--host 127.0.0.1] [--port 8000] [--max-batch 32]
                       [--batch-wait-ms 10]
    paretomerge eval   --checkpoint CKPT --config FILE.yaml [--prefs equal,priority,onehot] [--out DIR]
    paretomerge validate FILE.yaml [...]
    paretomerge plan   CONFIG.yaml [--lowrank-rank R]
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch

import pmkernels


def _parse_pref(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pref must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-3:
        raise argparse.ArgumentTypeError(f"--pref must be K finite non-negative numbers summing to 1, got {text!r}")
    return vals


def _output_file(text: str) -> str:
    """An output file path: not a directory (existing, or written with a trailing slash)."""
    if text.endswith(("/", "\\")) or Path(text).is_dir():
        raise ValueError(f"--out must be a file path (e.g. model.safetensors), got the directory {text!r}")
    return text


def _output_dir(text: str) -> str:
    """An output directory path: not an existing file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"--out must be a directory, but {text!r} is an existing file")
    return text


# The program functions (program.py, serve.py) start their errors with the parameter's name; the CLI reports
# the flag that sets it.
_FLAGS = {"pref": "--pref", "prefs": "--pref", "fmt": "--format", "out_dir": "--out", "tokenizer_dir": "--tokenizer",
          "max_new_tokens": "--max-new-tokens", "prompts": "--prompts (or lines on stdin)", "device": "--device",
          "max_batch": "--max-batch", "batch_wait_ms": "--batch-wait-ms", "host/port": "--host/--port"}
_LEADING_NAME = re.compile(r"^(" + "|".join(re.escape(k) for k in sorted(_FLAGS, key=len, reverse=True))
                           + r")(?=[\s:])")


def _with_flag_names(msg: str) -> str:
    """``msg`` with its leading program parameter name (``pref``, ``fmt`` …) replaced by the CLI flag that sets it
    (``--pref``, ``--format`` …)."""
    return _LEADING_NAME.sub(lambda m: _FLAGS[m[1]], msg)


class _InputError(Exception):
    """A bad argument of export / generate / serve, named by its flag: reported in one line, exit status 2."""


@contextmanager
def _input_errors():
    try:
        yield
    except (ValueError, TypeError, OSError) as e:
        if not (isinstance(e, OSError) or _raised_by_library(e)):
            raise  # a bug: keep its traceback
        raise _InputError(_with_flag_names(str(e))) from None


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(device=args.device, seed=args.seed, progress=not args.quiet,
                     num_threads=args.threads or 1)
    if args.steps is not None:
        cfg.pareto_steps = args.steps
    if args.per_sample:
        cfg.pareto_per_sample = True
    if args.ablations:
        cfg.ablations = True
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
    print("cost (params stored, models trained/merged, full-model evaluations, seconds):")
    print(summary["report"].cost_markdown())
    print(f"wall time {time.perf_counter() - t0:.1f}s; report: {Path(args.out) / 'report.json'}")
    return 0 if ok_all else 1


# ----------------------------------------------------------------------------- merge
def _launch_workers(args) -> int:
    """``--nproc N``: run this command on N local processes through torchrun's launcher."""
    from torch.distributed.run import main as torchrun

    argv = ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "paretomerge"]
    argv += (["--threads", str(args.threads)] if args.threads else [])
    argv += ["merge", "--config", str(args.config), "--dist-timeout", str(args.dist_timeout)]
    argv += ["--fresh"] if args.fresh else []
    try:
        torchrun(argv)
    except Exception as e:  # torchrun's ChildFailedError: the workers printed their own errors
        print(f"paretomerge merge: error: {args.nproc} processes launched, some failed "
              f"({type(e).__name__}; see their messages above)", file=sys.stderr)
        return 2
    return 0


def cmd_merge(args) -> int:
    from .config import load_config
    from .distributed import init_from_env
    from .program import evaluate_checkpoint, run_merge

    if args.nproc < 1:
        print(f"paretomerge merge: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
        return _launch_workers(args)
    dist = init_from_env(args.dist_timeout)
    try:
        ckpt = run_merge(cfg, fresh=args.fresh, dist=dist)
        if dist is not None and not dist.is_main:
            return 0
        print(f"trained Pareto Merging checkpoint: {ckpt}")
        if cfg.eval_data:
            rep = evaluate_checkpoint(ckpt, cfg, ["equal", "priority", "onehot"])
            rep.save(ckpt.parent / "report.json")
            print(rep.markdown(3))
        return 0
    finally:
        if dist is not None:
            import torch.distributed

            torch.distributed.destroy_process_group()


def cmd_validate(args) -> int:
    from .config import load_config

    for f in args.configs:
        load_config(f)
        print(f"{f}: ok")
    return 0


# ----------------------------------------------------------------------------- export / eval
def cmd_export(args) -> int:
    from .program import export_checkpoint, export_checkpoint_dir

    if args.format == "safetensors":
        _output_file(args.out)
        if len(args.pref) != 1:
            raise ValueError(f"--format safetensors writes one model: give one --pref, got {len(args.pref)}")
        with _input_errors():
            export_checkpoint(args.checkpoint, args.pref[0], args.out)
    else:
        with _input_errors():
            export_checkpoint_dir(args.checkpoint, args.pref, args.out, args.format, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- generate (causal LMs)
def cmd_generate(args) -> int:
    import json

    from .program import generate_from_checkpoint

    if args.prompts in (None, "-"):
        text = sys.stdin.read()
    else:
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts: no such file: {args.prompts!r}")
        text = Path(args.prompts).read_text()
    prompts = [line for line in text.splitlines() if line.strip()]
    with _input_errors():
        rows = generate_from_checkpoint(args.checkpoint, prompts, args.pref, tokenizer_dir=args.tokenizer,
                                        max_new_tokens=args.max_new_tokens, sample=args.sample,
                                        temperature=args.temperature, seed=args.seed)
    for r in rows:
        print(json.dumps(r, ensure_ascii=False))
    return 0


def cmd_serve(args) -> int:
    from .serve import ServedModel, run_server

    with _input_errors():
        served = ServedModel.from_checkpoint(args.checkpoint, args.tokenizer, device=args.device)
        return run_server(served, host=args.host, port=args.port, max_batch=args.max_batch,
                          batch_wait_ms=args.batch_wait_ms, log_level=args.log_level,
                          announce=lambda line: print(line, flush=True))


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
                                   "TIES, AdaMerging, Pareto Merging (data-free and unlabeled), MAP and task "
                                   "arithmetic with preference, evaluate "
                                   "under equal / priority / one-hot preferences; write report.json (with a cost "
                                   "table) and plots.")
    d.add_argument("--out", default="pmdemo", type=_output_dir, help="output directory (default: %(default)s)")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: %(default)s)")
    d.add_argument("--steps", type=int, default=None, help="Pareto Merging training steps (default: 200)")
    d.add_argument("--seed", type=int, default=0, help="seed of everything (default: %(default)s)")
    d.add_argument("--per-sample", action="store_true", help="one preference per sample while training")
    d.add_argument("--ablations", action="store_true",
                   help="also run the ablations: Pareto Merging (data-free) with linear / Tchebycheff "
                        "scalarisation, lora_sum / diag structures, ranks 4 / 16, and AdaMerging with preference")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("merge", help="train Pareto Merging on a model pool described by a YAML config",
                       description="Build the base merge, convert it, train the preference-conditioned tensors "
                                   "(resuming from OUTPUT/checkpoints/last.pt if present), write "
                                   "OUTPUT/pareto_merged.pt and, with eval_data, OUTPUT/report.json. "
                                   "See examples/merge_demo.yaml.")
    m.add_argument("--config", required=True, help="YAML config (paths relative to the file)")
    m.add_argument("--fresh", action="store_true",
                   help="delete an earlier run's outputs first (OUTPUT/checkpoints, pareto_merged.pt, report.json) "
                        "instead of resuming (a checkpoint of a different config or pool is refused without this)")
    m.add_argument("--nproc", type=int, default=1,
                   help="train on N local processes (torch.distributed via torchrun; gloo on CPU, nccl on GPU): "
                        "data-free shards the layers, unlabeled shards each batch (default: %(default)s)")
    m.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a process waits for the others in a collective before failing "
                        "(default: %(default)s)")
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
    e.add_argument("--pref", required=True, type=_parse_pref, action="append",
                   help="preference, e.g. 0.4,0.2,0.2,0.2 (sums to 1); repeat it with --format peft for one "
                        "adapter per preference")
    e.add_argument("--out", required=True, help="output .safetensors file, or directory for --format hf/peft "
                                                "(written atomically)")
    e.add_argument("--format", default="safetensors", choices=["safetensors", "hf", "peft"],
                   help="safetensors: one state dict; hf: a save_pretrained directory (causal LMs); peft: "
                        "OUT/base (the base merge) + OUT/adapters/pref_<i> LoRA adapters (default: %(default)s)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate text from a causal-LM checkpoint, one preference per row",
                       description="Every prompt (one per line of --prompts, or of stdin) under every --pref, "
                                   "in one batch with one γ per row (KV cache, left padding); prints one JSON "
                                   "line per (prompt, pref): {prompt, pref, completion}.")
    g.add_argument("--checkpoint", required=True, help="Pareto Merging checkpoint of a Hugging Face causal LM")
    g.add_argument("--pref", required=True, type=_parse_pref, action="append",
                   help="preference, e.g. 0.5,0.5; repeat for several in one batch")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line (default: stdin)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's model dir)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="serve a causal-LM checkpoint over an OpenAI-compatible HTTP API, one "
                                      "preference per request",
                        description="GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions "
                                    "(OpenAI schema plus 'preference': K floats summing to 1, default equal). "
                                    "Concurrent requests with different preferences share one batch. SIGTERM "
                                    "finishes the requests in flight and exits 0. See docs/serve.md.")
    sv.add_argument("--checkpoint", required=True, help="Pareto Merging checkpoint of a Hugging Face causal LM")
    sv.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's model dir)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    sv.add_argument("--max-batch", type=int, default=32,
                    help="most requests decoded together; 1 turns batching off (default: %(default)s)")
    sv.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long a batch waits for more requests after its first (default: %(default)s)")
    sv.add_argument("--device", default="cpu", help="torch device of the model (default: %(default)s)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default: %(default)s)")
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate a checkpoint over a preference set, write report.json")
    ev.add_argument("--checkpoint", required=True, help="Pareto Merging checkpoint")
    ev.add_argument("--config", required=True, help="YAML config naming the pool heads and eval_data")
    ev.add_argument("--prefs", default="equal,priority,onehot",
                    help="comma-separated preference specs: equal, priority[:task], onehot[:task], grid "
                         "(default: %(default)s)")
    ev.add_argument("--priority", type=float, default=0.5, help="γ of the prioritised task (default: %(default)s)")
    ev.add_argument("--resolution", type=int, default=4, help="simplex grid resolution (default: %(default)s)")
    ev.add_argument("--out", default="paretomerge_eval", type=_output_dir,
                    help="output directory (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)
    return p


_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (sys.modules[__package__], pmkernels))


def _raised_by_library(e: BaseException) -> bool:
    """Whether ``e`` comes from a ``raise`` statement of paretomerge or pmkernels itself (which name the
    argument, field or file), not from a failing lookup, conversion or call inside them or a dependency."""
    import linecache

    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    return (filename.startswith(_LIBRARY_DIRS)
            and linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise"))


def _expected_failure(e: BaseException) -> bool:
    """An expected failure (bad config, missing or corrupt file, bad input, a run that cannot go on): reported
    in one line, exit 2. The library's own error types always are; a ValueError, TypeError or KeyError only
    when the library raised it itself (input checks); an OSError always (files). Anything else is a bug."""
    from .config import ConfigError
    from .distributed import DistributedSetupError
    from .methods.pareto_merging import NonFiniteTrainingError, RunMismatchError
    from .io import OutputLockedError

    if isinstance(e, (ConfigError, _InputError, NonFiniteTrainingError, RunMismatchError, OutputLockedError,
                      DistributedSetupError, OSError)):
        return True
    return isinstance(e, (ValueError, TypeError, KeyError)) and _raised_by_library(e)


def _print_failure(command: str, e: BaseException) -> None:
    """An expected failure as one line on stderr (with the process's rank in a multi-process run)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
    print(f"paretomerge {command}: error{'' if rank is None else f' (rank {rank})'}: "
          f"{msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so every write in progress removes its temp files."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    import signal
    import threading

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM: the atomic writers have removed their temp files
        name = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
        print(f"paretomerge {args.command}: interrupted ({name}); nothing was left half written",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except Exception as e:
        if not _expected_failure(e):
            raise  # a bug: keep its traceback
        _print_failure(args.command, e)
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
