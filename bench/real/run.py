"""The real-weights benchmark: prepare data, fine-tune K task models from pretrained weights, run every merge
method, evaluate all of them the same way, write report.json, table.md and plots.

Every stage is cached under ``<cache>/<pool>-<hash of the settings>/``: trunk features, fine-tuned tails and
heads, each method's evaluated rows, and Pareto Merging's trainer checkpoints. A killed run continues from
the last finished stage (mid-training for Pareto Merging, from its last checkpoint).
"""
from __future__ import annotations

import contextlib
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
from paretomerge.evaluation import Report, paired_bootstrap, preference_set, priority_control
from paretomerge.io import atomic_write
from paretomerge.methods import MERGE_METHODS, adamerging_preference, merge, ta_preference
from paretomerge.methods.pareto_merging import ParetoMergingTrainer
from paretomerge.pools import prototype_head

from . import data as D
from .models import text_backbone, vision_backbone

CACHE_VERSION = "realbench-v2"
# Pareto Merging's rows: method name -> (TrainerConfig mode, fields over the settings'). "unlabeled" is the paper's
# AdaMerging + PM (entropy trains the tensor); "adamerging_datafree" takes λ from the unlabeled inputs the same way
# and trains the tensor on the anchor alone (TrainerConfig.entropy = 0; docs/design.md §6).
PARETO_METHODS = {"pareto_merging_datafree": ("datafree", {}),
                  "pareto_merging_unlabeled": ("unlabeled", {"entropy": 1.0}),
                  "pareto_merging_adamerging_datafree": ("unlabeled", {"entropy": 0.0})}
# Bumped when the trainer computes differently under the same TrainerConfig (its cached rows are then stale):
# 2 = the unlabeled normaliser taken at the training batch size.
PARETO_CODE_VERSION = 2
# The merge every Pareto row starts from (``pareto_base``), named as the rows' base in the report.
PARETO_BASE = "task_arithmetic"


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
    pareto_adamerging: str = "auto"           # unlabeled mode: TrainerConfig.adamerging (auto = AdaMerging + PM)
    pareto_diversity: Optional[float] = None  # unlabeled mode: TrainerConfig.diversity / anchor (None = default)
    pareto_anchor: Optional[float] = None
    priority: float = 0.5
    preference_baselines: tuple[str, ...] = ("ta_preference", "adamerging_preference", "map")  # of PREFERENCE_BASELINES
    grid_resolution: int = 2
    seed: int = 0

    def key(self, fields: Optional[Iterable[str]] = None) -> str:
        """A hash of the settings (or of ``fields`` only) and the cache version."""
        d = dataclasses.asdict(self)
        d.pop("preference_baselines")  # which baselines run, not what any of them computes
        if fields is not None:
            d = {k: d[k] for k in fields}
        blob = json.dumps({"version": CACHE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The settings the trunk features depend on: features are shared by every run that agrees on these.
FEATURE_FIELDS = ("pool", "tasks", "per_class", "test_per_class", "max_len", "tail_layers", "image_size",
                  "start_block", "seed")
# ... and the fine-tuned tails and heads: shared by every run (any merge settings) that agrees on these.
FINETUNE_FIELDS = FEATURE_FIELDS + ("head_scale", "head_shots", "ft_steps", "ft_lr", "ft_batch")


def top2(s: Settings) -> Settings:
    """The text pool on the top 2 BERT layers only (the other 4 in the cached trunk; 30 fine-tuning steps at lr
    3e-4): ~8× less CPU than the whole encoder; ``--quick``'s layers, and ``--top2`` of the CLI and ablation."""
    return dataclasses.replace(s, tail_layers=2, ft_steps=30, ft_lr=3e-4)


def settings_for(pool: str, quick: bool, seed: int = 0) -> Settings:
    """The full benchmark's settings, or ``quick`` ones (the CI test), for ``seed``.

    text: all-MiniLM-L6-v2's whole encoder (6 BERT layers) fine-tuned and merged (Pareto layers on attention +
    MLP; the trunk is the embeddings, its outputs cached, exact since no merge touches it), 72 test examples
    per class (402–576 per task); quick: the last 2 layers only (``top2``), fewer AdaMerging / unlabeled
    steps. vision (issue 22): the whole
    EfficientNet-Lite0 (``start_block=0``: every block's pointwise convs and the conv head are Pareto layers,
    the depthwise convs and BatchNorm affines merged as the base merge; the trunk is the stem, which no merge
    touches and whose BatchNorm is in eval mode, so caching its outputs is exact) at 32×32 px; 50 test examples
    per class (500 fashion and digits, 400 texture: texture's test patches from checkerboard cells disjoint from
    the training patches'), 32 training examples per class; fine-tunes of 80 steps at lr 1e-4 (each beats the
    pretrained model with the frozen prototype head by ≥ 5 points on its task in each of seeds 0–2, the
    smallest margin 9.8: bench/RESULTS.md; lr 2e-4 sometimes collapsed digits' fine-tune); AdaMerging's and
    Pareto Merging's steps and lrs as text's. quick: the same fine-tunes, 16 test examples per class, fewer
    merge steps, TA with preference as the only preference baseline. γ set of every preference-aware method:
    equal and each task's priority (0.5), plus the simplex grid where ``grid_resolution`` > 0."""
    if pool == "text":
        s = Settings("text", tuple(D.TEXT_TASKS), per_class=32, test_per_class=72, max_len=16, tail_layers=6,
                     ft_steps=60, ft_lr=1e-4, adamerging_steps=30, adamerging_lr=1e-2, pareto_steps_datafree=200,
                     pareto_steps_unlabeled=60, grid_resolution=0, seed=seed)
        if quick:
            # the top 2 layers only (the trunk's 4 cached: ~8× less CPU), the full setting's data and 200-step
            # data-free run, so the CI test can assert Pareto Merging's priority control where a seed's CI tells;
            # AdaMerging and the unlabeled mode shorter; TA with preference and MAP as the preference baselines
            s = dataclasses.replace(top2(s), adamerging_steps=20, pareto_steps_unlabeled=30,
                                    preference_baselines=("ta_preference", "map"))
        return s
    if pool == "vision":
        s = Settings("vision", tuple(D.VISION_TASKS), per_class=32, test_per_class=50, image_size=32, start_block=0,
                     ft_steps=80, ft_lr=1e-4, adamerging_steps=30, adamerging_lr=1e-2, pareto_include=("*",),
                     pareto_steps_datafree=200, pareto_steps_unlabeled=60, grid_resolution=0, seed=seed)
        if quick:
            # the full setting's fine-tunes (fewer examples and steps are less reliable)
            s = dataclasses.replace(s, test_per_class=16, adamerging_steps=8, pareto_steps_datafree=60,
                                    pareto_steps_unlabeled=20, preference_baselines=("ta_preference",))
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
    labels: dict[str, torch.Tensor]  # the training split's labels (MAP's labelled validation data; no other merge reads them)
    timings: dict[str, float] = field(default_factory=dict)

    def logits_fn(self, model: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.tasks[k]](model(x))

    @torch.no_grad()
    def correct(self, model: nn.Module, pref=None) -> dict[str, list[int]]:
        """{task: per-test-example 1/0 correct} under ``pref`` (the bootstrap CIs resample these)."""
        was = model.training
        model.eval()
        out = {}
        try:
            with pm.use_preference(pref) if pref is not None else contextlib.nullcontext():
                for t, (x, y) in self.test.items():
                    pred = torch.cat([self.heads[t](model(x[i:i + 256])).argmax(-1) for i in range(0, len(x), 256)])
                    out[t] = (pred == y).int().tolist()
        finally:
            model.train(was)
        return out

    def row(self, scenario, pref, model: nn.Module) -> dict:
        """One result row: metrics (accuracy per task) and the per-example correctness they come from."""
        corr = self.correct(model, None if pref is None else torch.tensor(pref))
        return {"scenario": scenario, "pref": None if pref is None else list(pref),
                "metrics": {t: sum(c) / len(c) for t, c in corr.items()}, "correct": corr}

    def unlabeled_batches(self) -> list[list[torch.Tensor]]:
        b = self.settings.pareto_batch
        return [[x[i:i + b] for i in range(0, len(x), b)] for x in (self.unlabeled[t] for t in self.tasks)]


def _ta_preference(bench: Bench, scen):
    for sc, p in scen:
        yield sc, p, ta_preference(bench.pool, p, lam=bench.settings.ta_lam)


def _adamerging_preference(bench: Bench, scen):
    s = bench.settings
    for sc, p in scen:
        yield sc, p, adamerging_preference(bench.pool, p, bench.logits_fn, bench.unlabeled_batches(),
                                           steps=s.adamerging_steps, lr=s.adamerging_lr, init_lam=s.ta_lam,
                                           seed=s.seed)


def _map_preference(bench: Bench, scen):
    """MAP (Li et al., ICLR 2025): one amortized front per run (its 32 sampled merges evaluated on the *labelled*
    training split, the only method here that reads labels besides the fine-tunes), then one merge per γ."""
    from paretomerge.methods.map import MAP

    fitted = MAP(bench.pool, {t: (bench.unlabeled[t], bench.labels[t]) for t in bench.tasks},
                 logits_fn=bench.logits_fn, seed=bench.settings.seed)
    fitted.fit()
    for sc, p in scen:
        yield sc, p, fitted.model(p)


# Preference-aware baselines: name → fn(bench, scenarios) yielding (scenario, pref, model) for each (scenario,
# pref) asked for (one merge or one training per γ). Evaluated and reported like Pareto Merging's rows
# (priority control, HV over its points), on the same γ set.
PREFERENCE_BASELINES: dict[str, Callable[[Bench, list[tuple[str, list[float]]]],
                                         Iterable[tuple[str, list[float], nn.Module]]]] = {
    "ta_preference": _ta_preference, "adamerging_preference": _adamerging_preference,
    "map": _map_preference}


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
        path = cache.parent / f"finetuned-{s.pool}-{s.key(FINETUNE_FIELDS)}" / f"{name}.pt"

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
                  {t: feats[t]["train_x"] for t in tasks}, {t: feats[t]["train_y"] for t in tasks})
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
    head = prototype_head(z, y, C, shots=s.head_shots, scale=s.head_scale)
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
    return [bench.row(sc, p, model) for sc, p in tqdm(scen, desc=desc, leave=False)]


def run_method(bench: Bench, name: str, cache: Path, log: Callable = print) -> dict:
    """Run (or load from the cache) one method; returns {"rows": [...], "seconds": float, "base": str|None}."""
    path = cache / "results" / f"{_cache_name(name, bench.settings)}.json"
    if path.exists():
        return json.loads(path.read_text())
    s = bench.settings
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    base = None
    if name.startswith("finetuned:"):
        model = bench.pool.finetuned_model(name.split(":", 1)[1])
        rows = [bench.row(None, None, model)]
    elif name in MERGE_METHODS and name not in PREFERENCE_BASELINES:
        model = merge(name, bench.pool, **_single_options(bench)[name])
        seconds = time.perf_counter() - t0
        rows = [bench.row(None, None, model)]
    elif name in PARETO_METHODS:
        mode = PARETO_METHODS[name][0]
        base = PARETO_BASE
        model, include = pareto_base(bench)
        steps = s.pareto_steps_datafree if mode == "datafree" else s.pareto_steps_unlabeled
        ckdir = cache / "checkpoints" / _cache_name(name, s)
        cfg = pm.TrainerConfig(mode=mode, include=include, rank=s.pareto_rank, steps=steps,
                               lr=s.pareto_lr_datafree if mode == "datafree" else s.pareto_lr_unlabeled,
                               batch_size=s.pareto_batch, seed=s.seed, checkpoint_dir=str(ckdir),
                               checkpoint_every=max(1, steps // 4), **_pareto_options(s, name))
        trainer = ParetoMergingTrainer(model, bench.pool, cfg, logits_fn=bench.logits_fn,
                                       unlabeled=[bench.unlabeled[t] for t in bench.tasks], task_names=bench.tasks)
        last = ckdir / "last.pt"
        trainer.train(resume=last if last.exists() else None)
        seconds = time.perf_counter() - t0
        rows = _evaluate_all(bench, model, scenarios(bench), f"evaluate {name}")
    elif name in PREFERENCE_BASELINES:
        rows = []
        t_eval = 0.0
        for sc, p, model in PREFERENCE_BASELINES[name](bench, scenarios(bench)):
            t1 = time.perf_counter()
            rows.append(bench.row(sc, list(p), model))
            t_eval += time.perf_counter() - t1
        seconds = time.perf_counter() - t0 - t_eval
    else:
        raise ValueError(f"unknown method {name!r}")
    total = time.perf_counter() - t0
    out = {"rows": rows, "seconds": total if name.startswith("finetuned:") else seconds,
           "seconds_with_evaluation": total, "base": base}
    _save_json(path, out)
    log(f"{name}: {out['seconds']:.1f}s (with evaluation {total:.1f}s)")
    return out


def pareto_base(bench: Bench) -> tuple[torch.nn.Module, str]:
    """Pareto Merging's starting model (task arithmetic at ``ta_lam``) and the TrainerConfig ``include`` for it.
    fnmatch patterns (the vision pool's pointwise convs) are converted here, seeded as the trainer would; the
    trainer then keeps the already-converted layers (the returned include is unused)."""
    s = bench.settings
    model = merge(PARETO_BASE, bench.pool, lam=s.ta_lam)
    include = s.pareto_include
    if not isinstance(include, str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            pm.convert(model, len(bench.tasks), s.pareto_rank, include=list(include))
        include = "attention"
    return model, include


def _cache_name(name: str, s: Settings) -> str:
    """A method's cache file name: Pareto Merging's also hashes the trainer's defaults (``TrainerConfig()``)
    and its options, so a change of the library's defaults is a new run, not a stale cached one."""
    if name not in PARETO_METHODS:
        return name
    blob = json.dumps([pm.TrainerConfig().model_dump(), _pareto_options(s, name), PARETO_CODE_VERSION],
                      sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _pareto_options(s: Settings, name: str) -> dict:
    """A Pareto Merging row's TrainerConfig fields beyond mode, steps and lr: the unlabeled mode's from the settings
    (AdaMerging + PM's λ phase gets the AdaMerging baseline's own steps and lr) and the row's own
    (``PARETO_METHODS``)."""
    mode, extra = PARETO_METHODS[name]
    if mode != "unlabeled":
        return dict(extra)
    out = {"adamerging": s.pareto_adamerging, "adamerging_steps": s.adamerging_steps,
           "adamerging_lr": s.adamerging_lr, "adamerging_init": s.ta_lam, **extra}
    if s.pareto_diversity is not None:
        out["diversity"] = s.pareto_diversity
    if s.pareto_anchor is not None:
        out["anchor"] = s.pareto_anchor
    return out


def method_names(bench: Bench) -> tuple[list[str], list[str]]:
    """(methods run, single-model methods in MERGE_METHODS skipped because this benchmark has no options for them)."""
    known = _single_options(bench)
    singles = [m for m in MERGE_METHODS if m in known]
    skipped = [m for m in MERGE_METHODS if m not in known and m not in PREFERENCE_BASELINES]
    return ([f"finetuned:{t}" for t in bench.tasks] + singles + list(PARETO_METHODS)
            + [m for m in PREFERENCE_BASELINES if m in bench.settings.preference_baselines]), skipped


# ----------------------------------------------------------------------------------------------------- report
PRETTY = {"pretrained": "Pretrained", "task_arithmetic": "Task Arithmetic", "ties": "TIES-Merging",
          "adamerging": "AdaMerging", "pareto_merging_datafree": "Pareto Merging (data-free)",
          "pareto_merging_unlabeled": "Pareto Merging (unlabeled: AdaMerging + PM)",
          "pareto_merging_adamerging_datafree": "Pareto Merging (AdaMerging λ + data-free tensor)",
          "ta_preference": "Task Arithmetic + preference", "adamerging_preference": "AdaMerging + preference",
          "map": "MAP (labelled val.)"}


def table(report: Report, seconds: dict[str, float], ref: Optional[dict[str, float]] = None,
          pretty: Optional[dict[str, str]] = None) -> str:
    """The paper's layout: rows = methods, columns = tasks + average + HV (+ wall time). Preference-aware methods
    appear twice: at the equal preference, and with each task's column taken under that task's priority preference."""
    tasks = report.tasks
    hv = report.hypervolumes(ref_point=ref)
    if ref is not None:  # HV^(1/K): the side of the cube of equal volume, a gain over the reference in points
        hv = {m: v ** (1.0 / len(tasks)) for m, v in hv.items()}
    by = {}
    for r in report.results:
        by.setdefault(r["method"], {})[r["scenario"]] = r["metrics"]
    head = ["method", *tasks, "avg", "HV^(1/K) (ref pretrained)" if ref is not None else "HV", "time (s)"]
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
        label = (pretty or PRETTY).get(m, m)
        sec = f"{seconds.get(m, 0):.0f}"
        if None in by[m]:
            row(label, [by[m][None][t] for t in tasks], f"{100 * hv[m]:.2f}", sec)
        else:
            row(label + " [equal]", [by[m]["equal"][t] for t in tasks], f"{100 * hv[m]:.2f}", sec)
            row(label + " [priority on the column's task]", [by[m][f"priority:{t}"][t] for t in tasks], "", "")
    return "\n".join(lines) + "\n"


def run_pool(pool: str, *, quick: bool, cache_root: Path, out: Path, log: Callable = print, seed: int = 0,
             settings: Optional[Settings] = None) -> dict:
    """The whole benchmark for one pool and seed; returns the report.json dict (also written under ``out``).
    ``settings`` overrides ``settings_for(pool, quick, seed)`` (ablations)."""
    s = settings or settings_for(pool, quick, seed)
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
    preference_aware = [m for m in names if m in PARETO_METHODS or m in PREFERENCE_BASELINES]
    pretrained = results["pretrained"]["rows"][0]["metrics"]
    doc = report.to_dict()
    doc.update({
        "pool": pool, "quick": quick, "seed": s.seed, "settings": dataclasses.asdict(s), "cache_key": s.key(),
        "hypervolume_ref_pretrained": report.hypervolumes(ref_point=pretrained),
        "seconds": seconds, "prepare_seconds": bench.timings["prepare"], "wall_seconds": time.perf_counter() - t0,
        **dict(zip(("preference_control", "preference_control_pooled"),
                   _control_with_ci(report, results, bench.tasks, preference_aware).values())),
        "correct": {m: [r["correct"] for r in results[m]["rows"]] for m in names},
        "skipped_methods": skipped,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
    })
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "report.json", doc)
    md = table(report, seconds, ref=pretrained)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(md))
    try:
        from paretomerge.evaluation.plots import plot_scenarios, plot_tradeoff

        plot_tradeoff(report, out / "tradeoff.png", tasks=(bench.tasks[0], bench.tasks[1]))
        plot_scenarios(report, out / "scenarios.png")
    except Exception as e:  # plots are a convenience: never lose the numbers over them
        log(f"plots skipped: {type(e).__name__}: {e}")
    log(md)
    return doc


def _correct(results: dict, method: str, scenario) -> dict[str, list[int]]:
    return next(r["correct"] for r in results[method]["rows"] if r["scenario"] == scenario)


def _control_with_ci(report: Report, results: dict, tasks: list[str], methods: list[str]) -> dict:
    """``priority_control`` plus, per (method, task), the paired bootstrap CI of priority − equal accuracy."""
    ctl = priority_control(report, methods, tasks)
    pooled = {}
    for m in methods:
        pa, pb = [], []
        for t in tasks:
            a, b = _correct(results, m, f"priority:{t}")[t], _correct(results, m, "equal")[t]
            ci = paired_bootstrap(a, b)
            ctl[m][t].update({"ci_low": ci["low"], "ci_high": ci["high"], "significant": ci["low"] > 0})
            pa, pb = pa + a, pb + b
        ci = paired_bootstrap(pa, pb)  # every task's test examples, each under its own task's priority
        pooled[m] = {"diff": ci["diff"], "ci_low": ci["low"], "ci_high": ci["high"], "significant": ci["low"] > 0}
    return {"per_task": ctl, "pooled": pooled}


def run_seeds(pool: str, *, quick: bool, seeds: Iterable[int], cache_root: Path, out: Path,
              log: Callable = print, settings: Optional[Callable[[int], Settings]] = None) -> dict:
    """``run_pool`` for each seed (out/seed<N>/), then summary.json and summary.md under ``out``: mean ± std over
    seeds of every method's accuracies (preference-aware: at equal, and each task under its own priority), HV
    (ref 0 and ref = the pretrained model's accuracies), and priority − equal per (method, task) with a paired
    bootstrap CI over test examples and seeds."""
    seeds = list(seeds)
    docs = [run_pool(pool, quick=quick, cache_root=cache_root, out=out / f"seed{sd}", log=log, seed=sd,
                     settings=None if settings is None else settings(sd)) for sd in seeds]
    return summarize_seeds(pool, quick, seeds, docs, out, log)


def mean_std(vals) -> dict[str, float]:
    """{"mean", "std"} of a list of per-seed values (std with ddof 1; 0 for one seed)."""
    import numpy as np

    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarize_seeds(pool: str, quick: bool, seeds: list[int], docs: list[dict], out: Path, log: Callable = print,
                    extra_md: str = "", pretty: Optional[dict[str, str]] = None) -> dict:
    """summary.json and summary.md under ``out`` from one report.json dict per seed (``run_pool``'s, or any with
    its keys: results, tasks, hypervolume, hypervolume_ref_pretrained, seconds, preference_control, correct,
    wall_seconds). ``extra_md`` is appended to summary.md."""
    import numpy as np

    tasks = docs[0]["tasks"]
    methods = list(dict.fromkeys(r["method"] for r in docs[0]["results"]))
    pref_aware = list(docs[0]["preference_control"])

    def metric(doc, m, sc, t):
        return next(r["metrics"][t] for r in doc["results"] if r["method"] == m and r["scenario"] == sc)

    summary = {"pool": pool, "quick": quick, "seeds": seeds, "tasks": tasks, "methods": {}, "control": {}}
    for m in methods:
        sc = "equal" if m in pref_aware else None
        entry = {t: mean_std([metric(d, m, sc, t) for d in docs]) for t in tasks}
        entry["avg"] = mean_std([np.mean([metric(d, m, sc, t) for t in tasks]) for d in docs])
        entry["hv_ref0"] = mean_std([d["hypervolume"][m] for d in docs])
        entry["hv_ref_pretrained"] = mean_std([d["hypervolume_ref_pretrained"][m] ** (1.0 / len(tasks)) for d in docs])
        entry["seconds"] = mean_std([d["seconds"][m] for d in docs])
        if m in pref_aware:
            entry["priority"] = {t: mean_std([metric(d, m, f"priority:{t}", t) for d in docs]) for t in tasks}
        summary["methods"][m] = entry
    for m in pref_aware:
        summary["control"][m] = {}
        for t in tasks:
            ci = paired_bootstrap([_row_correct(d, m, f"priority:{t}")[t] for d in docs],
                                  [_row_correct(d, m, "equal")[t] for d in docs])
            summary["control"][m][t] = {**ci, "significant": ci["low"] > 0}
    for m in pref_aware:
        pa, pb = [], []
        for d in docs:
            a = [x for t in tasks for x in _row_correct(d, m, f"priority:{t}")[t]]
            b = [x for t in tasks for x in _row_correct(d, m, "equal")[t]]
            pa.append(a)
            pb.append(b)
        ci = paired_bootstrap(pa, pb)
        summary["control"][m]["pooled"] = {**ci, "significant": ci["low"] > 0}
    summary["wall_seconds"] = [d["wall_seconds"] for d in docs]
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "summary.json", summary)
    md = summary_table(summary, pretty) + extra_md
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(md))
    log(md)
    return summary


def _row_correct(doc: dict, method: str, scenario) -> dict[str, list[int]]:
    rows = [r for r in doc["results"] if r["method"] == method]
    return doc["correct"][method][next(i for i, r in enumerate(rows) if r["scenario"] == scenario)]


def summary_table(summary: dict, pretty: Optional[dict[str, str]] = None) -> str:
    """Mean ± std over seeds (accuracy %, HV ×100) and the priority-control differences with their CIs."""
    tasks = summary["tasks"]
    PRETTY_ = pretty or PRETTY
    f = lambda e: f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"  # noqa: E731
    lines = [f"Seeds {summary['seeds']}; accuracy % (mean ± std over seeds); HV over each method's points: with ref = "
             f"the pretrained model's accuracies as HV^(1/K) ×100 (the side of the cube of equal volume: a gain over "
             f"pretrained in points), and with ref 0 ×100.", "",
             "| method | " + " | ".join(tasks) + " | avg | HV^(1/K) (ref pretrained) | HV (ref 0) |",
             "|---|" + "---:|" * (len(tasks) + 3)]
    for m, e in summary["methods"].items():
        label = PRETTY_.get(m, m) + (" [equal]" if "priority" in e else "")
        lines.append(f"| {label} | " + " | ".join(f(e[t]) for t in tasks) + f" | {f(e['avg'])} | "
                     f"{100 * e['hv_ref_pretrained']['mean']:.2f} ± {100 * e['hv_ref_pretrained']['std']:.2f} | "
                     f"{100 * e['hv_ref0']['mean']:.2f} ± {100 * e['hv_ref0']['std']:.2f} |")
        if "priority" in e:
            lines.append(f"| {PRETTY_.get(m, m)} [priority on the column's task] | "
                         + " | ".join(f(e["priority"][t]) for t in tasks) + " | | | |")
    lines += ["", "Priority control: accuracy under priority:<task> − under equal, points, [95 % paired bootstrap "
              "CI over test examples and seeds]; * = CI excludes 0.", "",
              "| method | " + " | ".join(tasks) + " | pooled over tasks |", "|---|" + "---:|" * (len(tasks) + 1)]
    for m, c in summary["control"].items():
        lines.append(f"| {PRETTY_.get(m, m)} | " + " | ".join(
            f"{100 * c[t]['diff']:+.1f} [{100 * c[t]['low']:+.1f}, {100 * c[t]['high']:+.1f}]"
            + ("*" if c[t]["significant"] else "") for t in [*tasks, "pooled"]) + " |")
    return "\n".join(lines) + "\n"
