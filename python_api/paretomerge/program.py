"""The programs the CLI and the demo run: merge from a config, evaluate and export a checkpoint.

``cli.py`` parses arguments and calls these; nothing here parses arguments.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .config import ConfigError, MergeConfig
from .evaluation import Report, evaluate_tasks, preference_set
from .io import load_state_dict, save_model
from .layers import export
from .methods import merge
from .methods.pareto_merging import ParetoMergingTrainer, load_checkpoint, reconvert
from .pools import ModelPool
from .pools.architectures import build_architecture

__all__ = ["base_merge", "evaluate_checkpoint", "export_checkpoint", "load_pool", "load_tensors",
           "model_from_checkpoint", "run_merge"]


def base_merge(cfg: MergeConfig, pool: ModelPool) -> nn.Module:
    """The base merge ``cfg.base`` names (λ and k from the config where given, else each method's default)."""
    b = cfg.base
    options = {} if b.lam is None or b.method == "pretrained" else {"lam": b.lam}
    if b.method == "ties":
        options["k"] = b.k
    return merge(b.method, pool, **options)


def logits_fn_of(pool: ModelPool):
    """(model, k, x) -> task k's head applied to model(x)."""
    heads = pool.heads or {}
    names = list(pool.task_names)

    def logits_fn(model, k, x):
        return heads[names[k]](model(x))

    return logits_fn


def _need_file(cfg: MergeConfig, p: str, fieldname: str) -> Path:
    q = cfg.path(p)
    if not q.exists():
        raise ConfigError(fieldname, f"no such file or directory: {str(q)!r}")
    return q


def _head_from_state(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    w = sd["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
    head.load_state_dict(dict(sd))
    return head


def load_pool(cfg: MergeConfig):
    """The ``ModelPool`` the config describes (files are checked, naming the field)."""
    p = cfg.pool
    pre = _need_file(cfg, p.pretrained, "pool.pretrained")
    fts = {t: _need_file(cfg, f, f"pool.finetuned.{t}") for t, f in p.finetuned.items()}
    heads_paths = {t: _need_file(cfg, f, f"pool.heads.{t}") for t, f in (p.heads or {}).items()}
    if p.format == "files":
        model = build_architecture(p.architecture)
        model.load_state_dict(load_state_dict(pre))
        heads = {t: _head_from_state(load_state_dict(f)) for t, f in heads_paths.items()} or None
        return _compressed(cfg, ModelPool.from_state_dict_files(model, fts, heads=heads))
    if p.format == "open_clip":
        return _compressed(cfg, ModelPool.from_open_clip_checkpoints(pre, fts, heads_paths or None, trusted=p.trusted))
    heads = {t: _head_from_state(load_state_dict(f)) for t, f in heads_paths.items()} or None
    import transformers

    auto = getattr(transformers, p.auto_class, None)
    if auto is None or not hasattr(auto, "from_pretrained"):
        raise ConfigError("pool.auto_class", f"{p.auto_class!r} is not a transformers auto class")
    if p.format == "peft":
        if not (pre / "config.json").is_file():
            raise ConfigError("pool.pretrained", f"{str(pre)!r} is not a local Hugging Face model directory")
        model = auto.from_pretrained(str(pre), local_files_only=True).eval()
        pool = ModelPool.from_peft_adapters(model, fts)
    else:
        pool = ModelPool.from_hf_dirs(pre, fts, auto_class=auto)
    if heads:
        pool.heads = heads
    return _compressed(cfg, pool)


def _compressed(cfg: MergeConfig, pool: ModelPool) -> ModelPool:
    """The pool with its task vectors compressed as ``pool.compress`` says (in place); errors are printed."""
    c = cfg.pool.compress
    if c is None:
        return pool
    ctv = pool.compress(rank=c.rank, keep=c.keep, method=c.method)
    total = ", ".join(f"{t} {e:.4f}" for t, e in ctv.total_errors().items())
    print(f"compressed task vectors ({'rank ' + str(c.rank) if c.rank else 'keep ' + str(c.keep)}): relative "
          f"Frobenius error per task {total}; {ctv.nbytes() / 1e6:.1f} MB")
    if c.save:
        ctv.save(cfg.path(c.save))
    return pool


def load_tensors(cfg: MergeConfig, mapping: Mapping[str, str], fieldname: str, keys=("inputs",)) -> dict:
    """{task: {key: tensor}} from safetensors/torch files holding the named tensors."""
    out = {}
    for t, f in mapping.items():
        sd = load_state_dict(_need_file(cfg, f, f"{fieldname}.{t}"))
        for k in keys:
            if k not in sd:
                raise ConfigError(f"{fieldname}.{t}", f"file has no tensor {k!r} (has {sorted(sd)})")
        out[t] = {k: sd[k] for k in keys}
    return out


def run_merge(cfg) -> Path:
    """Base merge + Pareto Merging training as ``cfg`` (a validated MergeConfig) says; returns the checkpoint."""
    out = cfg.path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = load_pool(cfg)
    model = base_merge(cfg, pool)
    tcfg = copy.deepcopy(cfg.trainer)
    tcfg.checkpoint_dir = str(out / "checkpoints")
    unlabeled = None
    if cfg.mode == "unlabeled":
        data = load_tensors(cfg, cfg.unlabeled, "unlabeled")
        unlabeled = [data[t]["inputs"] for t in pool.task_names]
    arch = cfg.pool.architecture
    meta = {"architecture": None if arch is None else arch.model_dump(), "base": cfg.base.method}
    trainer = ParetoMergingTrainer(model, pool, tcfg, logits_fn=logits_fn_of(pool) if unlabeled else None,
                                   unlabeled=unlabeled, meta=meta)
    resume = out / "checkpoints" / "last.pt"
    trainer.train(resume=resume if resume.exists() else None)
    final = out / "pareto_merged.pt"
    trainer.save_checkpoint(final)
    return final


def model_from_checkpoint(ckpt_path, architecture: Optional[dict] = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the converted model of a trainer checkpoint (architecture from its meta unless given)."""
    ck = load_checkpoint(ckpt_path)
    arch = architecture or (ck.get("meta") or {}).get("architecture")
    if arch is None:
        raise ValueError(f"{ckpt_path}: the checkpoint does not say how to build its architecture "
                         f"(meta.architecture); pass one")
    model = build_architecture(arch)
    reconvert(model, int(ck["num_objectives"]), ck["layers"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def export_checkpoint(ckpt_path, pref: Sequence[float], out_path) -> torch.nn.Module:
    """Bake W(γ) into a plain model of the original architecture and save it (safetensors, atomic)."""
    model, ck = model_from_checkpoint(ckpt_path)
    if len(pref) != int(ck["num_objectives"]):
        raise ValueError(f"--pref has {len(pref)} entries but the checkpoint has K = {ck['num_objectives']} "
                         f"tasks {ck['task_names']}")
    plain = export(model, pref)
    save_model(plain, out_path)
    return plain


@torch.no_grad()
def evaluate_checkpoint(ckpt_path, cfg, specs: Sequence[str], priority: float = 0.5, resolution: int = 4):
    """Accuracy of a checkpoint on ``cfg.eval_data`` over the preference specs; a Report."""
    if not cfg.eval_data:
        raise ConfigError("eval_data", "required for evaluation (task -> file with 'inputs' and 'labels')")
    model, ck = model_from_checkpoint(ckpt_path, cfg.pool.architecture)
    tasks = list(ck["task_names"])
    pool = load_pool(cfg)
    if not pool.heads:
        raise ConfigError("pool.heads", "required for evaluation")
    data = load_tensors(cfg, cfg.eval_data, "eval_data", keys=("inputs", "labels"))
    rep = Report(tasks)
    prefs = [e for s in specs for e in preference_set(s, tasks, priority=priority, resolution=resolution)]
    for scenario, pref in prefs:
        m = evaluate_tasks(model, pool.heads, {t: (data[t]["inputs"], data[t]["labels"]) for t in tasks}, pref)
        rep.add(f"pareto_merging_{ck['config']['mode']}", scenario, pref, m, base=(ck.get("meta") or {}).get("base"))
    return rep
