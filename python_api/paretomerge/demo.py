"""An end-to-end Pareto Merging demo on real data that runs on a laptop CPU in minutes.

    paretomerge demo --out pmdemo

1. Data: scikit-learn's ``load_digits`` (1797 8×8 images, 10 classes), split
   once into train / held-out test. Four genuinely different tasks share the
   labels but not the inputs: ``digits`` (as given), ``rot90`` (rotated 90°),
   ``mirror`` (left-right flipped), ``invert`` (intensities 1 − x).
2. Model: a small open_clip ``VisionTransformer`` built from a custom
   ``CLIPVisionCfg`` (random init; ``nn.MultiheadAttention`` blocks with
   ``batch_first=True``), "pretrained" briefly on plain digits, then fully
   fine-tuned into K = 4 task models, each with its own linear head (heads are
   per task and never merged).
3. Merging: task arithmetic, TIES, AdaMerging, Pareto Merging data-free and
   Pareto Merging with unlabeled data (the base merge of both is task
   arithmetic unless ``base=`` says otherwise); then the preference-aware
   baselines MAP (``map_budget`` evaluations on a labelled validation split)
   and task arithmetic with preference (one merge per γ), and with
   ``ablations=True`` (``paretomerge demo --ablations``) Pareto Merging
   (data-free) with other scalarisations / structures / ranks and AdaMerging
   with preference (one training per γ). The report holds a cost table
   (``Report.cost``; docs/baselines.md).
4. Evaluation on every task's held-out data under ``equal``, each
   ``priority:<task>`` and each ``onehot:<task>`` preference (plus the
   fine-tuned models, ``finetuned:<task>``): a table, ``report.json``, plots,
   and the preference-control check (Pareto Merging under ``priority:<k>``
   must beat itself under ``equal`` on task k).

Everything is seeded; the same config gives the same numbers on the same
machine. Also writes the pool (``pool/``), the test/unlabeled data
(``data/``) and a ready-to-run ``merge.yaml`` for ``paretomerge merge``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .evaluation.control import priority_control

TASKS = ("digits", "rot90", "mirror", "invert")


def transform(task: str, x: torch.Tensor) -> torch.Tensor:
    """Task ``task``'s version of images x (..., 8, 8) with values in [0, 1]."""
    if task == "digits":
        return x
    if task == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if task == "mirror":
        return torch.flip(x, dims=(-1,))
    if task == "invert":
        return 1.0 - x
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of the demo (defaults: < 5 min on a 2-core CPU)."""

    seed: int = 0
    device: str = "cpu"
    # torch intra-op threads while the demo runs (None: leave as is). The model is tiny: with more
    # threads than free cores (shared CPUs) each step gets ~20x slower, so 1 is the default.
    num_threads: Optional[int] = 1
    # model: open_clip CLIPVisionCfg fields + the output embedding size
    layers: int = 2
    width: int = 64
    head_width: int = 32
    patch_size: int = 2
    embed_dim: int = 32
    # data
    test_size: int = 500
    unlabeled_size: int = 256     # per task, taken from the train split, labels dropped
    # training of the pool
    pretrain_steps: int = 150
    finetune_steps: int = 120
    train_batch: int = 64
    lr: float = 2e-3
    # merging
    base: str = "task_arithmetic"  # base merge of Pareto Merging: task_arithmetic | ties | adamerging
    ta_lam: float = 0.3
    adamerging_steps: int = 60
    pareto_steps: int = 200
    pareto_rank: int = 8
    pareto_include: str = "attention"
    pareto_lr: float = 1e-2            # data-free mode
    pareto_lr_unlabeled: float = 5e-3  # unlabeled mode (3e-3: weaker control on some seeds)
    pareto_diversity: float = 1.0      # see TrainerConfig.diversity / anchor
    pareto_anchor: float = 1.0
    pareto_adamerging: bool = False    # unlabeled mode: learn AdaMerging's λ jointly (lower HV on this demo)
    pareto_batch: int = 32
    pareto_mu: float = 0.05
    pareto_alpha: float = 1.0
    pareto_per_sample: bool = False
    pareto_reg_frobenius: float = 0.0
    priority: float = 0.5          # γ_k of the prioritised task in priority:<task>
    grid_resolution: int = 0       # > 0 also evaluates Pareto Merging on a simplex grid (for the front)
    methods: tuple = ("task_arithmetic", "ties", "adamerging", "pareto_merging_datafree", "pareto_merging_unlabeled",
                      "map", "ta_preference")
    # baselines (run after the methods above, so their numbers do not depend on these)
    map_budget: int = 32           # MAP's full-model evaluations (≥ 1 + K + K(K+1)/2 = 15 for K = 4)
    map_val_size: int = 64         # labelled validation images per task for MAP (the train split's last ones)
    map_low: float = 0.0           # MAP's coefficient box [low, high]^K
    map_high: float = 1.0
    map_generations: int = 100     # NSGA-III generations on the surrogates
    # --ablations: Pareto Merging (data-free) with one setting changed at a time, and AdaMerging+pref
    ablations: bool = False
    ablation_scalarizations: tuple = ("linear", "tch")
    ablation_structures: tuple = ("lora_sum", "diag")
    ablation_ranks: tuple = (4, 16)
    progress: bool = False
    write_pool: bool = True
    plots: bool = True


# ----------------------------------------------------------------------------- data
def load_data(cfg: DemoConfig) -> dict:
    """{'train': (x, y), 'test': (x, y)} of plain digits, x (N, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    te, tr = perm[: cfg.test_size], perm[cfg.test_size:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def to_input(x: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] → (N, 3, 8, 8), standardised."""
    return ((x - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def task_inputs(task: str, x: torch.Tensor) -> torch.Tensor:
    return to_input(transform(task, x))


# ----------------------------------------------------------------------------- model
def architecture(cfg: DemoConfig) -> dict:
    return {"kind": "open_clip_vision", "embed_dim": cfg.embed_dim,
            "vision_cfg": {"layers": cfg.layers, "width": cfg.width, "head_width": cfg.head_width,
                           "patch_size": cfg.patch_size, "image_size": 8}}


def build_encoder(cfg: DemoConfig) -> nn.Module:
    from .pools.architectures import build_architecture

    enc = build_architecture(architecture(cfg))
    if not getattr(enc.transformer, "batch_first", True):
        raise RuntimeError("expected open_clip's transformer with batch_first=True")
    return enc


def _train(encoder: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, cfg: DemoConfig,
           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    encoder.train(), head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (cfg.train_batch,), generator=g)
        loss = F.cross_entropy(head(encoder(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval(), head.eval()


def build_pool(cfg: DemoConfig, data: dict, log: Callable = print):
    """Pretrain on plain digits, fine-tune one model + head per task; return (pool, heads)."""
    from .pools import ModelPool

    dev = torch.device(cfg.device)
    xtr, ytr = data["train"]
    torch.manual_seed(cfg.seed)
    pre = build_encoder(cfg).to(dev)
    pre_head = nn.Linear(cfg.embed_dim, 10).to(dev)
    t0 = time.perf_counter()
    _train(pre, pre_head, to_input(xtr).to(dev), ytr.to(dev), cfg.pretrain_steps, cfg, cfg.seed + 1)
    log(f"pretrained ({cfg.pretrain_steps} steps, {time.perf_counter() - t0:.1f}s)")
    fts, heads = {}, {}
    for i, task in enumerate(TASKS):
        enc, head = copy.deepcopy(pre), copy.deepcopy(pre_head)
        _train(enc, head, task_inputs(task, xtr).to(dev), ytr.to(dev), cfg.finetune_steps, cfg, cfg.seed + 10 + i)
        for p in list(enc.parameters()) + list(head.parameters()):
            p.requires_grad_(False)
        fts[task], heads[task] = enc, head
    for p in pre.parameters():
        p.requires_grad_(False)
    log(f"fine-tuned {len(TASKS)} task models ({cfg.finetune_steps} steps each, {time.perf_counter() - t0:.1f}s)")
    return ModelPool.from_modules(pre, fts, heads=heads), heads


# ----------------------------------------------------------------------------- the demo
def _scenarios(tasks, priority):
    from .evaluation import preference_set

    out = list(preference_set("equal", tasks))
    for spec in ("priority", "onehot"):
        for t in tasks:
            out += preference_set(f"{spec}:{t}", tasks, priority=priority)
    return out


def run_demo(out: Optional[str | Path] = None, cfg: Optional[DemoConfig] = None, log: Callable = print) -> dict:
    """Run the whole demo; write report.json (+ plots, pool, data, merge.yaml) under ``out``; return a summary."""
    cfg = cfg or DemoConfig()
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run_demo(out, cfg, log)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _DemoRun:
    """What the demo's stages share: the config, the pool and data, the report, and the clocks."""

    cfg: DemoConfig
    log: Callable
    outdir: Optional[Path]
    data: dict
    pool: object
    heads: dict
    tasks: list
    test: dict                 # task -> (inputs, labels) on the device
    unlabeled: dict            # task -> inputs on the device
    report: object
    timings: dict = dataclasses.field(default_factory=dict)
    eval_time: dict = dataclasses.field(default_factory=dict)
    merged: dict = dataclasses.field(default_factory=dict)         # base merges by name
    pareto_models: dict = dataclasses.field(default_factory=dict)  # trained Pareto models by method name
    scen: list = dataclasses.field(default_factory=list)           # (scenario, γ) every preference method runs

    def logits_fn(self, model, k, x):
        return self.heads[self.tasks[k]](model(x))

    def metrics(self, model, pref=None, method=None) -> dict:
        """Accuracy per task under γ; the evaluation time is charged to ``method`` (the cost table)."""
        from .evaluation import evaluate_tasks

        t0 = time.perf_counter()
        out = evaluate_tasks(model, self.heads, self.test, pref)
        if method is not None:
            self.eval_time[method] = self.eval_time.get(method, 0.0) + time.perf_counter() - t0
        return out

    def timed(self, name: str, fn: Callable):
        t0 = time.perf_counter()
        r = fn()
        self.timings[name] = time.perf_counter() - t0
        self.log(f"{name}: {self.timings[name]:.1f}s")
        return r

    def batches(self) -> list:
        """Each task's unlabeled inputs cut into ``pareto_batch`` batches (AdaMerging's input)."""
        b = self.cfg.pareto_batch
        return [[self.unlabeled[t][i:i + b] for i in range(0, len(self.unlabeled[t]), b)] for t in self.tasks]

    @property
    def per_pref_store(self) -> int:
        """θ0 + K task vectors: what a one-merge-per-γ method keeps."""
        return (len(self.tasks) + 1) * sum(p.numel() for p in self.pool.pretrained.parameters())


def _start(out, cfg: DemoConfig, log: Callable) -> _DemoRun:
    """Data, the pool of fine-tuned models, held-out and unlabeled inputs, the fine-tuned models' rows."""
    from .evaluation import Report

    t0 = time.perf_counter()
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    data = load_data(cfg)
    tasks = list(TASKS)
    pool, heads = build_pool(cfg, data, log)
    xte, yte = data["test"]
    xun = data["train"][0][: cfg.unlabeled_size]
    run = _DemoRun(cfg, log, outdir, data, pool, heads, tasks,
                   test={t: (task_inputs(t, xte).to(dev), yte.to(dev)) for t in tasks},
                   unlabeled={t: task_inputs(t, xun).to(dev) for t in tasks}, report=Report(tasks))
    run.timings["pool"] = time.perf_counter() - t0
    for t in tasks:
        run.report.add(f"finetuned:{t}", None, None, run.metrics(pool.finetuned_model(t)))
    run.scen = _scenarios(tasks, cfg.priority)
    if cfg.grid_resolution:
        from .evaluation import preference_set
        run.scen += preference_set("grid", tasks, resolution=cfg.grid_resolution)
    return run


def _run_base_merges(run: _DemoRun) -> None:
    """Task arithmetic, TIES, AdaMerging: those asked for, and the one Pareto Merging builds on."""
    from .methods import merge

    cfg, want = run.cfg, set(run.cfg.methods)
    base_needed = {"pareto_merging_datafree", "pareto_merging_unlabeled"} & want
    build = {"task_arithmetic": lambda: merge("task_arithmetic", run.pool, lam=cfg.ta_lam),
             "ties": lambda: merge("ties", run.pool),
             "adamerging": lambda: merge("adamerging", run.pool, logits_fn=run.logits_fn, unlabeled=run.batches(),
                                         steps=cfg.adamerging_steps, seed=cfg.seed, init_lam=cfg.ta_lam)}
    for name, fn in build.items():
        if name in want or (base_needed and cfg.base == name):
            run.merged[name] = run.timed(name, fn)
    for name in build:
        if name in want:
            run.report.add(name, None, None, run.metrics(run.merged[name], method=name))


def _run_pareto(run: _DemoRun) -> None:
    """Pareto Merging, data-free and unlabeled, on the base merge; evaluated on every scenario."""
    from .config import TrainerConfig
    from .methods.pareto_merging import ParetoMergingTrainer

    cfg, tasks = run.cfg, run.tasks
    for mode in ("datafree", "unlabeled"):
        name = f"pareto_merging_{mode}"
        if name not in cfg.methods:
            continue
        model = copy.deepcopy(run.merged[cfg.base])
        tcfg = TrainerConfig(mode=mode, steps=cfg.pareto_steps, rank=cfg.pareto_rank, include=cfg.pareto_include,
                             lr=cfg.pareto_lr if mode == "datafree" else cfg.pareto_lr_unlabeled,
                             diversity=cfg.pareto_diversity, anchor=cfg.pareto_anchor,
                             adamerging=cfg.pareto_adamerging and mode == "unlabeled",
                             batch_size=cfg.pareto_batch, mu=cfg.pareto_mu, alpha=cfg.pareto_alpha,
                             per_sample=cfg.pareto_per_sample, reg_frobenius=cfg.pareto_reg_frobenius,
                             seed=cfg.seed, progress=cfg.progress,
                             checkpoint_dir=str(run.outdir / "checkpoints" / name) if run.outdir is not None else None)
        trainer = ParetoMergingTrainer(model, run.pool, tcfg, logits_fn=run.logits_fn,
                                       unlabeled=[run.unlabeled[t] for t in tasks], task_names=tasks,
                                       meta={"architecture": architecture(cfg), "base": cfg.base})
        if trainer.datafree is not None and "op_warmup" not in run.timings:
            # The data-free op's first call in a process loads (or JIT-builds) its C++ extension; do it
            # outside the timed training so the cost table shows training, not a one-off load (no RNG used).
            t0 = time.perf_counter()
            with torch.no_grad():
                trainer.datafree(torch.full((len(tasks),), 1.0 / len(tasks), device=torch.device(cfg.device)))
            run.timings["op_warmup"] = time.perf_counter() - t0
        run.timed(name, trainer.train)
        run.pareto_models[name] = model
        for scenario, pref in run.scen:
            run.report.add(name, scenario, list(pref), run.metrics(model, torch.tensor(pref), method=name),
                           base=cfg.base)


def _add_costs(run: _DemoRun) -> None:
    """Cost-table rows of the base merges and the Pareto methods."""
    model_params = sum(p.numel() for p in run.pool.pretrained.parameters())
    for name in ("task_arithmetic", "ties", "adamerging"):
        if name in run.cfg.methods:
            run.report.add_cost(name, params_stored=model_params, models_trained=int(name == "adamerging"),
                                models_merged=1, evaluations=0,
                                train_time_s=run.timings[name] if name == "adamerging" else None,
                                eval_time_s=run.eval_time.get(name))
    for name, model in run.pareto_models.items():
        _pareto_cost(run, name, model)


def _run_ta_preference(run: _DemoRun) -> None:
    """Task arithmetic with preference: one merge per γ."""
    from .methods import ta_preference

    merge_time = 0.0
    for scenario, pref in run.scen:
        t0 = time.perf_counter()
        m = ta_preference(run.pool, pref, lam=run.cfg.ta_lam)
        merge_time += time.perf_counter() - t0
        run.report.add("ta_preference", scenario, list(pref), run.metrics(m, method="ta_preference"))
    run.timings["ta_preference"] = merge_time
    run.report.add_cost("ta_preference", params_stored=run.per_pref_store, models_trained=0,
                        models_merged=len(run.scen), evaluations=0, new_pref_time_s=merge_time / len(run.scen),
                        eval_time_s=run.eval_time.get("ta_preference"))


def _write_outputs(run: _DemoRun, summary: dict) -> None:
    """report.json, summary.json, plots, and the pool/data/merge.yaml for ``paretomerge merge``."""
    outdir, tasks = run.outdir, run.tasks
    run.report.save(outdir / "report.json")
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if run.cfg.plots:
        try:
            from .evaluation.plots import plot_fronts, plot_scenarios, plot_tradeoff
            plot_tradeoff(run.report, outdir / "tradeoff.png", tasks=(tasks[1], tasks[2]))
            plot_fronts(run.report, outdir / "fronts.png", tasks=(tasks[1], tasks[2]))
            plot_scenarios(run.report, outdir / "scenarios.png")
        except Exception as e:  # plots are a convenience: never fail the demo on them
            run.log(f"plots skipped: {type(e).__name__}: {e}")
    if run.cfg.write_pool:
        write_pool(outdir, run.pool, run.heads, run.cfg, run.data)


def _run_demo(out, cfg: DemoConfig, log: Callable) -> dict:
    t_start = time.perf_counter()
    run = _start(out, cfg, log)
    _run_base_merges(run)
    _run_pareto(run)
    # baselines (after the methods above, so their numbers do not depend on these), ablations, costs
    _add_costs(run)
    map_info = run_map(run) if "map" in cfg.methods else None
    if "ta_preference" in cfg.methods:
        _run_ta_preference(run)
    if cfg.ablations:
        run_ablations(run)
    checks = preference_control(run.report, run.tasks, list(run.pareto_models))
    run.timings["total"] = time.perf_counter() - t_start
    summary = {"config": _jsonable(dataclasses.asdict(cfg)), "timings_s": run.timings, "preference_control": checks}
    if map_info is not None:
        summary["map"] = map_info
    if run.outdir is not None:
        _write_outputs(run, summary)
    summary["report"] = run.report
    return summary


def _pareto_cost(run: _DemoRun, name: str, model: nn.Module) -> None:
    """A Pareto Merging row of the cost table: a new γ costs one export (no training)."""
    from .layers import export

    K = len(run.tasks)
    t0 = time.perf_counter()
    export(model, torch.full((K,), 1.0 / K))
    run.report.add_cost(name, params_stored=sum(p.numel() for p in model.parameters()), models_trained=1,
                        models_merged=1, evaluations=0, train_time_s=run.timings[name],
                        new_pref_time_s=time.perf_counter() - t0, eval_time_s=run.eval_time.get(name))


def run_map(run: _DemoRun) -> dict:
    """MAP on the pool: labelled validation split from the train split's last ``map_val_size`` images
    (the fine-tuned models saw them; the demo's test split stays untouched), then one model per γ."""
    from .methods import MAP

    cfg, data = run.cfg, run.data
    dev = torch.device(cfg.device)
    xva, yva = data["train"][0][-cfg.map_val_size:], data["train"][1][-cfg.map_val_size:]
    val = {t: (task_inputs(t, xva).to(dev), yva.to(dev)) for t in run.tasks}
    t0 = time.perf_counter()
    mp = MAP(run.pool, val, logits_fn=run.logits_fn, budget=cfg.map_budget, low=cfg.map_low, high=cfg.map_high,
             seed=cfg.seed, n_gen=cfg.map_generations)
    front = mp.fit()
    run.timings["map"] = time.perf_counter() - t0
    r2 = ", ".join("-" if v is None else f"{v:.3f}" for v in front.r2_holdout)
    run.log(f"map: {run.timings['map']:.1f}s ({front.evaluations} evaluations {front.eval_time_s:.1f}s, "
            f"{len(front.solutions)} non-dominated solutions, held-out R² per task {r2})")
    serve = 0.0
    for scenario, pref in run.scen:
        t1 = time.perf_counter()
        model = mp.model(pref)
        serve += time.perf_counter() - t1
        run.report.add("map", scenario, list(pref), run.metrics(model, method="map"))
    run.report.add_cost("map", params_stored=run.per_pref_store + front.solutions.size, models_trained=0,
                        models_merged=front.evaluations + len(run.scen), evaluations=front.evaluations,
                        train_time_s=run.timings["map"], new_pref_time_s=serve / len(run.scen),
                        eval_time_s=run.eval_time.get("map"))
    return {"r2_holdout": front.r2_holdout, "solutions": int(len(front.solutions)),
            "evaluations": front.evaluations, "eval_time_s": front.eval_time_s, "search_time_s": front.search_time_s}


def run_ablations(run: _DemoRun) -> None:
    """Pareto Merging (data-free) with one of scalarisation / structure / rank changed, and AdaMerging
    with preference (one AdaMerging training per γ)."""
    from .config import TrainerConfig
    from .methods import adamerging_preference
    from .methods.pareto_merging import ParetoMergingTrainer
    from .methods.pareto_merging.structures import trainable_count

    cfg, tasks = run.cfg, run.tasks
    variants = ([("scalarization", v) for v in cfg.ablation_scalarizations]
                + [("structure", v) for v in cfg.ablation_structures]
                + [("rank", int(v)) for v in cfg.ablation_ranks])
    for key, value in variants:
        name = f"pareto_merging_datafree[{key}={value}]"
        model = copy.deepcopy(run.merged[cfg.base])
        fields = dict(mode="datafree", steps=cfg.pareto_steps, rank=cfg.pareto_rank, include=cfg.pareto_include,
                      lr=cfg.pareto_lr, batch_size=cfg.pareto_batch, mu=cfg.pareto_mu, alpha=cfg.pareto_alpha,
                      per_sample=cfg.pareto_per_sample, reg_frobenius=cfg.pareto_reg_frobenius, seed=cfg.seed,
                      progress=False)
        fields[key] = value
        trainer = ParetoMergingTrainer(model, run.pool, TrainerConfig(**fields), task_names=tasks)
        t0 = time.perf_counter()
        trainer.train()
        run.timings[name] = time.perf_counter() - t0
        run.log(f"{name}: {run.timings[name]:.1f}s ({trainable_count(model, trainer.cfg.structure):,} trainable "
                f"factor entries)")
        for scenario, pref in run.scen:
            run.report.add(name, scenario, list(pref), run.metrics(model, torch.tensor(pref), method=name),
                           base=cfg.base)
        _pareto_cost(run, name, model)
    batches = run.batches()
    train_time = 0.0
    for scenario, pref in run.scen:
        t0 = time.perf_counter()
        m = adamerging_preference(run.pool, pref, run.logits_fn, batches, steps=cfg.adamerging_steps,
                                  seed=cfg.seed, init_lam=cfg.ta_lam)
        train_time += time.perf_counter() - t0
        run.report.add("adamerging_preference", scenario, list(pref), run.metrics(m, method="adamerging_preference"))
    run.timings["adamerging_preference"] = train_time
    run.log(f"adamerging_preference: {train_time:.1f}s ({len(run.scen)} trainings)")
    run.report.add_cost("adamerging_preference", params_stored=run.per_pref_store, models_trained=len(run.scen),
                        models_merged=len(run.scen), evaluations=0, train_time_s=train_time,
                        new_pref_time_s=train_time / len(run.scen),
                        eval_time_s=run.eval_time.get("adamerging_preference"))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def preference_control(report, tasks, methods) -> dict:
    """``paretomerge.priority_control(report, methods, tasks)`` (kept for callers of the old name)."""
    return priority_control(report, methods, tasks)


def write_pool(outdir: Path, pool, heads, cfg: DemoConfig, data: dict) -> None:
    """pool/*.safetensors, data/*.safetensors and merge.yaml, ready for ``paretomerge merge``."""
    import yaml

    from .io import save_model, save_state_dict

    (outdir / "pool").mkdir(exist_ok=True)
    (outdir / "data").mkdir(exist_ok=True)
    save_model(pool.pretrained, outdir / "pool" / "pretrained.safetensors")
    for t in pool.task_names:
        save_state_dict(pool.finetuned_state(t), outdir / "pool" / f"{t}.safetensors")
        save_model(heads[t], outdir / "pool" / f"head_{t}.safetensors")
        xte, yte = data["test"]
        save_state_dict({"inputs": task_inputs(t, xte), "labels": yte}, outdir / "data" / f"{t}_test.safetensors")
        save_state_dict({"inputs": task_inputs(t, data["train"][0][: cfg.unlabeled_size])},
                        outdir / "data" / f"{t}_unlabeled.safetensors")
    conf = merge_config_dict(cfg, list(pool.task_names))
    (outdir / "merge.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))


def merge_config_dict(cfg: DemoConfig, tasks, mode: str = "unlabeled", prefix: str = "") -> dict:
    """The ``paretomerge merge`` config of the demo's pool (paths relative to ``prefix``)."""
    return {
        "pool": {"format": "files", "architecture": architecture(cfg),
                 "pretrained": f"{prefix}pool/pretrained.safetensors",
                 "finetuned": {t: f"{prefix}pool/{t}.safetensors" for t in tasks},
                 "heads": {t: f"{prefix}pool/head_{t}.safetensors" for t in tasks}},
        "base": {"method": "task_arithmetic", "lam": cfg.ta_lam},
        "mode": mode,
        "unlabeled": {t: f"{prefix}data/{t}_unlabeled.safetensors" for t in tasks},
        "eval_data": {t: f"{prefix}data/{t}_test.safetensors" for t in tasks},
        "trainer": {"steps": cfg.pareto_steps, "rank": cfg.pareto_rank, "include": cfg.pareto_include,
                    "lr": cfg.pareto_lr if mode == "datafree" else cfg.pareto_lr_unlabeled,
                    "diversity": cfg.pareto_diversity, "anchor": cfg.pareto_anchor, "batch_size": cfg.pareto_batch, "mu": cfg.pareto_mu,
                    "alpha": cfg.pareto_alpha, "seed": cfg.seed, "checkpoint_every": 50},
        "output": {"dir": f"{prefix}merged"},
    }
