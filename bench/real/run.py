"""The real-weights benchmark: prepare data, fine-tune K task models from pretrained weights, run every merge
method, evaluate all of them the same way, write report.json, table.md and plots.

Every stage is cached under ``<cache>/<pool>-<hash of the settings>/``: trunk features, fine-tuned tails and
heads, each method's evaluated rows, and Pareto Merging's trainer checkpoints. A killed run continues from
the last finished stage (mid-training for Pareto Merging, from its last checkpoint).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import paretomerge as pm
from paretomerge.demo import preference_control
from paretomerge.evaluation import Report, evaluate_tasks, preference_set
from paretomerge.io import atomic_write
from paretomerge.methods import MERGE_METHODS, merge
from paretomerge.methods.pareto_merging import ParetoMergingTrainer

from . import data as D
from .models import text_backbone, vision_backbone

CACHE_VERSION = "realbench-v1"
PARETO_MODES = ("datafree", "unlabeled")


@dataclass(frozen=True)
class Settings:
    """Everything that changes a number (the cache key hashes all of it)."""

    pool: str                       # "text" | "vision"
    tasks: tuple[str, ...]
    per_class: int                  # training examples per class (fine-tuning, and the unlabeled data)
    test_per_class: int
    max_len: int = 32               # text: tokens per input
    tail_layers: int = 2            # text: BERT layers fine-tuned and merged (of 6)
    image_size: int = 32            # vision: input resolution
    start_block: int = 8            # vision: EfficientNet blocks[start_block:] fine-tuned and merged (of 16)
    head_scale: float = 10.0        # logit scale of the frozen prototype heads (see _fine_tune)
    head_shots: int = 4             # examples per class the prototype heads are built from
    ft_steps: int = 60              # fine-tuning steps of the tail, head frozen
    ft_lr: float = 2e-4
    ft_batch: int = 32
    ta_lam: float = 0.3
    ties_k: float = 0.2
    ties_lam: float = 1.0
    adamerging_steps: int = 40
    adamerging_lr: float = 1e-3
    pareto_include: Any = "attention+mlp"  # a TrainerConfig include preset, or fnmatch patterns (pointwise convs)
    pareto_rank: int = 8
    pareto_steps_datafree: int = 200
    pareto_steps_unlabeled: int = 60
    pareto_lr_datafree: float = 1e-2
    pareto_lr_unlabeled: float = 5e-3
    pareto_batch: int = 16
    priority: float = 0.5
    grid_resolution: int = 2
    seed: int = 0

    def key(self, fields: Optional[Iterable[str]] = None) -> str:
        """A hash of the settings (or of ``fields`` only) and the cache version."""
        d = dataclasses.asdict(self)
        if fields is not None:
            d = {k: d[k] for k in fields}
        blob = json.dumps({"version": CACHE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The settings the trunk features depend on: features are shared by every run that agrees on these.
FEATURE_FIELDS = ("pool", "tasks", "per_class", "test_per_class", "max_len", "tail_layers", "image_size",
                  "start_block", "seed")


def settings_for(pool: str, quick: bool) -> Settings:
    """The full benchmark's settings, or ``quick`` ones (fewer examples and steps: the CI test).

    Sized for a shared 2-core CPU VM: a 1-layer text tail over 16 tokens, a 4-block vision tail at 32×32 px,
    tens of examples per class. Larger settings (``dataclasses.replace``) give steadier numbers."""
    if pool == "text":
        s = Settings("text", tuple(D.TEXT_TASKS), per_class=32, test_per_class=16, max_len=16, tail_layers=1,
                     ft_steps=20, ft_lr=5e-4, adamerging_steps=20, pareto_steps_datafree=200,
                     pareto_steps_unlabeled=40)
        if quick:
            s = dataclasses.replace(s, per_class=24, ft_steps=15, adamerging_steps=8, pareto_steps_datafree=60,
                                    pareto_steps_unlabeled=20, grid_resolution=1)
        return s
    if pool == "vision":
        s = Settings("vision", tuple(D.VISION_TASKS), per_class=32, test_per_class=16, start_block=12, ft_steps=20,
                     ft_lr=1e-4, adamerging_steps=20, pareto_include=("*",), pareto_steps_datafree=200,
                     pareto_steps_unlabeled=40, grid_resolution=3)
        if quick:
            s = dataclasses.replace(s, per_class=24, ft_steps=15, adamerging_steps=8, pareto_steps_datafree=60,
                                    pareto_steps_unlabeled=20, grid_resolution=1)
        return s
    raise ValueError(f"pool must be 'text' or 'vision', got {pool!r}")


# ----------------------------------------------------------------------------------------------------- caching
def _save_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _cached_tensors(path: Path, make: Callable[[], dict]) -> dict:
    if path.exists():
        return torch.load(path, weights_only=True)
    obj = make()
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return obj


@dataclass
class Bench:
    """What every method needs: the pool, heads, test and unlabeled inputs, and the seeded logits function."""

    settings: Settings
    tasks: list[str]
    pool: pm.ModelPool
    heads: dict[str, nn.Module]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]
    unlabeled: dict[str, torch.Tensor]
    timings: dict[str, float] = field(default_factory=dict)

    def logits_fn(self, model: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.tasks[k]](model(x))

    def metrics(self, model: nn.Module, pref=None) -> dict[str, float]:
        return evaluate_tasks(model, self.heads, self.test, pref)

    def unlabeled_batches(self) -> list[list[torch.Tensor]]:
        b = self.settings.pareto_batch
        return [[x[i:i + b] for i in range(0, len(x), b)] for x in (self.unlabeled[t] for t in self.tasks)]


# Preference-aware baselines other helpers add (MAP, TA + preference, AdaMerging + preference): name → fn(bench,
# scenarios) yielding (scenario, pref, model) for each (scenario, pref) asked for. Evaluated and reported like
# Pareto Merging's rows (priority control, HV over its points).
PREFERENCE_BASELINES: dict[str, Callable[[Bench, list[tuple[str, list[float]]]],
                                         Iterable[tuple[str, list[float], nn.Module]]]] = {}


def _single_options(bench: Bench) -> dict[str, dict]:
    """Options of every single-model method in ``MERGE_METHODS`` this benchmark knows how to call."""
    s = bench.settings
    return {"pretrained": {},
            "task_arithmetic": {"lam": s.ta_lam},
            "ties": {"k": s.ties_k, "lam": s.ties_lam},
            "adamerging": {"logits_fn": bench.logits_fn, "unlabeled": bench.unlabeled_batches(),
                           "steps": s.adamerging_steps, "lr": s.adamerging_lr, "init_lam": s.ta_lam, "seed": s.seed}}


# ----------------------------------------------------------------------------------------------------- stages
def prepare(settings: Settings, cache: Path, log: Callable = print) -> Bench:
    """Data → trunk features (cached) → prototype heads → fine-tuned tails (cached) → a ModelPool."""
    s = settings
    torch.manual_seed(s.seed)
    if s.pool == "text":
        trunk, tail, dim = text_backbone(s.tail_layers)
    else:
        trunk, tail, dim = vision_backbone(s.start_block)
    tail.eval()

    def features() -> dict:
        out = {}
        for name in s.tasks:
            fn = (D.TEXT_TASKS if s.pool == "text" else D.VISION_TASKS)[name]
            extra = {} if s.pool == "text" else {"size": s.image_size}
            task = fn(s.per_class, s.test_per_class, s.seed, **extra)
            run = (lambda x, d: trunk(x, s.max_len, d)) if s.pool == "text" else trunk
            out[name] = {"classes": len(task.classes),
                         "train_x": run(task.train[0], f"trunk {name} train"),
                         "train_y": torch.tensor(task.train[1]),
                         "test_x": run(task.test[0], f"trunk {name} test"),
                         "test_y": torch.tensor(task.test[1])}
        return out

    t0 = time.perf_counter()
    feats = _cached_tensors(cache.parent / f"features-{s.pool}-{s.key(FEATURE_FIELDS)}.pt", features)
    tasks = list(s.tasks)
    finetuned, heads = {}, {}
    for k, name in enumerate(tasks):
        f = feats[name]
        path = cache / f"finetuned_{name}.pt"

        def fine_tune(f=f, name=name, k=k) -> dict:
            return _fine_tune(tail, dim, f, s, seed=s.seed * 1000 + k, desc=f"fine-tune {name}")

        state = _cached_tensors(path, fine_tune)
        head = nn.Linear(dim, int(f["classes"]))
        head.load_state_dict(state["head"])
        ft = copy.deepcopy(tail)
        ft.load_state_dict(state["tail"])
        finetuned[name], heads[name] = ft.eval(), head.eval()
    pool = pm.ModelPool.from_modules(tail, finetuned, heads=heads)
    bench = Bench(s, tasks, pool, heads, {t: (feats[t]["test_x"], feats[t]["test_y"]) for t in tasks},
                  {t: feats[t]["train_x"] for t in tasks})
    bench.timings["prepare"] = time.perf_counter() - t0
    log(f"prepared {s.pool} pool ({', '.join(tasks)}) in {bench.timings['prepare']:.1f}s")
    return bench


def _fine_tune(pretrained: nn.Module, dim: int, f: dict, s: Settings, seed: int, desc: str) -> dict:
    """A few-shot prototype head from the pretrained features, then the tail fine-tuned with that head frozen.

    The head plays the part of CLIP's zero-shot head in task arithmetic: fixed, so it stays valid for merged
    tails, and weak enough that fine-tuning has work to do. Row c of its weight is τ·(m_c − m)/‖m_c − m‖,
    m_c the class mean and m the overall mean of the pretrained pooled features, bias −W m: logits are scaled
    cosines to centred class prototypes (nearest-centroid classification), τ = ``head_scale`` / mean ‖z − m‖,
    m_c from the first ``head_shots`` training examples of class c only: fine-tuning on all of them is what
    lifts the task's accuracy. (A linear probe fitted on the whole small training set already separates it:
    fine-tuning then only overfits, and never beats the pretrained model.)
    Eval mode throughout: no dropout, BatchNorm statistics frozen.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = f["train_x"], f["train_y"]
    C = int(f["classes"])
    with torch.no_grad():
        z = torch.cat([pretrained(x[i:i + 256]) for i in range(0, len(x), 256)])
        m = z.mean(0)
        shots = [torch.nonzero(y == c).flatten()[:s.head_shots] for c in range(C)]  # the first examples of each class
        protos = torch.stack([z[i].mean(0) - m for i in shots])
        scale = s.head_scale / (z - m).norm(dim=1).mean()
        head = nn.Linear(dim, C)
        head.weight.copy_(scale * protos / protos.norm(dim=1, keepdim=True))
        head.bias.copy_(-head.weight @ m)
    head.requires_grad_(False)
    tail = copy.deepcopy(pretrained).eval()
    opt = torch.optim.Adam(tail.parameters(), lr=s.ft_lr)
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for _ in tqdm(range(s.ft_steps), desc=desc, leave=False):
        if pos + s.ft_batch > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos:pos + s.ft_batch]
        pos += s.ft_batch
        opt.zero_grad()
        nn.functional.cross_entropy(head(tail(x[idx])), y[idx]).backward()
        opt.step()
    return {"tail": {k: v.detach().clone() for k, v in tail.state_dict().items()},
            "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}


def scenarios(bench: Bench) -> list[tuple[str, list[float]]]:
    """equal, priority:<task> for each task, and the simplex grid: the preferences every preference-aware method
    is evaluated at."""
    s, tasks = bench.settings, bench.tasks
    out = preference_set("equal", tasks) + preference_set("priority", tasks, priority=s.priority)
    if s.grid_resolution:
        out += preference_set("grid", tasks, resolution=s.grid_resolution)
    return out


def _evaluate_all(bench: Bench, model: nn.Module, scen, desc: str) -> list[dict]:
    return [{"scenario": sc, "pref": list(p), "metrics": bench.metrics(model, torch.tensor(p))}
            for sc, p in tqdm(scen, desc=desc, leave=False)]


def run_method(bench: Bench, name: str, cache: Path, log: Callable = print) -> dict:
    """Run (or load from the cache) one method; returns {"rows": [...], "seconds": float, "base": str|None}."""
    path = cache / "results" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    s = bench.settings
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    base = None
    if name.startswith("finetuned:"):
        model = bench.pool.finetuned_model(name.split(":", 1)[1])
        rows = [{"scenario": None, "pref": None, "metrics": bench.metrics(model)}]
    elif name in MERGE_METHODS:
        model = merge(name, bench.pool, **_single_options(bench)[name])
        seconds = time.perf_counter() - t0
        rows = [{"scenario": None, "pref": None, "metrics": bench.metrics(model)}]
    elif name.startswith("pareto_merging_"):
        mode = name.removeprefix("pareto_merging_")
        base = "task_arithmetic"
        model = merge(base, bench.pool, lam=s.ta_lam)
        K = len(bench.tasks)
        include = s.pareto_include
        if not isinstance(include, str):  # fnmatch patterns (e.g. pointwise convs): convert here, seeded as the trainer
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s.seed)
                pm.convert(model, K, s.pareto_rank, include=list(include))
            include = "attention"  # unused: the trainer keeps an already-converted model's layers
        steps = s.pareto_steps_datafree if mode == "datafree" else s.pareto_steps_unlabeled
        ckdir = cache / "checkpoints" / name
        cfg = pm.TrainerConfig(mode=mode, include=include, rank=s.pareto_rank, steps=steps,
                               lr=s.pareto_lr_datafree if mode == "datafree" else s.pareto_lr_unlabeled,
                               batch_size=s.pareto_batch, seed=s.seed, checkpoint_dir=str(ckdir),
                               checkpoint_every=max(1, steps // 4))
        trainer = ParetoMergingTrainer(model, bench.pool, cfg, logits_fn=bench.logits_fn,
                                       unlabeled=[bench.unlabeled[t] for t in bench.tasks], task_names=bench.tasks)
        last = ckdir / "last.pt"
        trainer.train(resume=last if last.exists() else None)
        seconds = time.perf_counter() - t0
        rows = _evaluate_all(bench, model, scenarios(bench), f"evaluate {name}")
    elif name in PREFERENCE_BASELINES:
        rows = []
        for sc, p, model in PREFERENCE_BASELINES[name](bench, scenarios(bench)):
            rows.append({"scenario": sc, "pref": list(p), "metrics": bench.metrics(model)})
        seconds = time.perf_counter() - t0
    else:
        raise ValueError(f"unknown method {name!r}")
    total = time.perf_counter() - t0
    out = {"rows": rows, "seconds": total if name.startswith("finetuned:") else seconds,
           "seconds_with_evaluation": total, "base": base}
    _save_json(path, out)
    log(f"{name}: {out['seconds']:.1f}s (with evaluation {total:.1f}s)")
    return out


def method_names(bench: Bench) -> tuple[list[str], list[str]]:
    """(methods run, single-model methods in MERGE_METHODS skipped because this benchmark has no options for them)."""
    known = _single_options(bench)
    singles = [m for m in MERGE_METHODS if m in known]
    skipped = [m for m in MERGE_METHODS if m not in known]
    return ([f"finetuned:{t}" for t in bench.tasks] + singles + [f"pareto_merging_{m}" for m in PARETO_MODES]
            + list(PREFERENCE_BASELINES)), skipped


# ----------------------------------------------------------------------------------------------------- report
PRETTY = {"pretrained": "Pretrained", "task_arithmetic": "Task Arithmetic", "ties": "TIES-Merging",
          "adamerging": "AdaMerging", "pareto_merging_datafree": "Pareto Merging (data-free)",
          "pareto_merging_unlabeled": "Pareto Merging (unlabeled)"}


def table(report: Report, seconds: dict[str, float]) -> str:
    """The paper's layout: rows = methods, columns = tasks + average + HV (+ wall time). Preference-aware methods
    appear twice: at the equal preference, and with each task's column taken under that task's priority preference."""
    tasks = report.tasks
    hv = report.hypervolumes()
    by = {}
    for r in report.results:
        by.setdefault(r["method"], {})[r["scenario"]] = r["metrics"]
    head = ["method", *tasks, "avg", "HV", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(tasks) + 3)]

    def row(label, vals, h, sec):
        avg = sum(vals) / len(vals)
        cells = [f"{100 * v:.1f}" for v in vals] + [f"{100 * avg:.1f}", h, sec]
        lines.append("| " + " | ".join([label, *cells]) + " |")

    diag = [by[f"finetuned:{t}"][None][t] for t in tasks]
    row("Individual (fine-tuned, own task)", diag, "-", f"{sum(seconds.get(f'finetuned:{t}', 0) for t in tasks):.0f}")
    for m in report.methods():
        if m.startswith("finetuned:"):
            continue
        label = PRETTY.get(m, m)
        sec = f"{seconds.get(m, 0):.0f}"
        if None in by[m]:
            row(label, [by[m][None][t] for t in tasks], f"{100 * hv[m]:.2f}", sec)
        else:
            row(label + " [equal]", [by[m]["equal"][t] for t in tasks], f"{100 * hv[m]:.2f}", sec)
            row(label + " [priority on the column's task]", [by[m][f"priority:{t}"][t] for t in tasks], "", "")
    return "\n".join(lines) + "\n"


def run_pool(pool: str, *, quick: bool, cache_root: Path, out: Path, log: Callable = print) -> dict:
    """The whole benchmark for one pool; returns the report.json dict (also written under ``out``)."""
    s = settings_for(pool, quick)
    cache = cache_root / f"{pool}{'-quick' if quick else ''}-{s.key()}"
    cache.mkdir(parents=True, exist_ok=True)
    _save_json(cache / "settings.json", dataclasses.asdict(s))
    t0 = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)
    bench = prepare(s, cache, log)
    names, skipped = method_names(bench)
    results, seconds = {}, {}
    for name in tqdm(names, desc=f"{pool} methods", leave=True):
        results[name] = run_method(bench, name, cache, log)
        seconds[name] = results[name]["seconds"]
    report = Report(bench.tasks)
    for name in names:
        for r in results[name]["rows"]:
            report.add(name, r["scenario"], r["pref"], r["metrics"], base=results[name]["base"])
    preference_aware = [m for m in names if m.startswith("pareto_merging_") or m in PREFERENCE_BASELINES]
    doc = report.to_dict()
    doc.update({
        "pool": pool, "quick": quick, "settings": dataclasses.asdict(s), "cache_key": s.key(),
        "seconds": seconds, "prepare_seconds": bench.timings["prepare"], "wall_seconds": time.perf_counter() - t0,
        "preference_control": preference_control(report, bench.tasks, preference_aware),
        "skipped_methods": skipped,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
    })
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "report.json", doc)
    md = table(report, seconds)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(md))
    try:
        from paretomerge.evaluation.plots import plot_scenarios, plot_tradeoff

        plot_tradeoff(report, out / "tradeoff.png", tasks=(bench.tasks[0], bench.tasks[1]))
        plot_scenarios(report, out / "scenarios.png")
    except Exception as e:  # plots are a convenience: never lose the numbers over them
        log(f"plots skipped: {type(e).__name__}: {e}")
    log(md)
    return doc
