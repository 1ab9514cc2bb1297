"""The programs the CLI and the demo run: merge from a config, evaluate and export a checkpoint.

``cli.py`` parses arguments and calls these; nothing here parses arguments.
"""
from __future__ import annotations

import copy
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .config import ConfigError, MergeConfig
from .distributed import DistContext
from .evaluation import Report, evaluate_tasks, preference_set
from .io import OutputLockedError, check_export_target, load_state_dict, remove_stale_temp_files, save_model
from .layers import export
from .layers.convert import QKV_PRESETS
from .methods import merge_base
from .methods.pareto_merging import ParetoMergingTrainer, RunMismatchError, load_checkpoint, reconvert
from .pools import ModelPool
from .pools.architectures import build_architecture, hf_model_class
from .pools.formats import POOL_LOADERS, need_file

__all__ = ["OutputLockedError", "base_merge", "checkpoint_architecture", "evaluate_checkpoint", "export_checkpoint",
           "export_checkpoint_dir", "generate_from_checkpoint", "lm_from_checkpoint", "load_pool", "load_tensors",
           "model_from_checkpoint", "output_lock", "run_identity", "run_merge"]


def base_merge(cfg: MergeConfig, pool: ModelPool) -> nn.Module:
    """The base merge ``cfg.base`` names (λ and k from the config where given, else each method's default)."""
    return merge_base(cfg.base, pool)


def logits_fn_of(pool: ModelPool):
    """(model, k, x) -> task k's head applied to model(x)."""
    heads = pool.heads or {}
    names = list(pool.task_names)

    def logits_fn(model, k, x):
        return heads[names[k]](model(x))

    return logits_fn


def load_pool(cfg: MergeConfig):
    """The ``ModelPool`` the config describes, loaded by its format's loader (``pools.formats.POOL_LOADERS``);
    every file is checked first, naming its field."""
    p = cfg.pool
    need_file(cfg, p.pretrained, "pool.pretrained")
    for t, f in p.finetuned.items():
        need_file(cfg, f, f"pool.finetuned.{t}")
    for t, f in (p.heads or {}).items():
        need_file(cfg, f, f"pool.heads.{t}")
    return _compressed(cfg, POOL_LOADERS[p.format].load(cfg))


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
        sd = load_state_dict(need_file(cfg, f, f"{fieldname}.{t}"))
        for k in keys:
            if k not in sd:
                raise ConfigError(f"{fieldname}.{t}", f"file has no tensor {k!r} (has {sorted(sd)})")
        out[t] = {k: sd[k] for k in keys}
    return out


LOCK_FILE = ".paretomerge.lock"
_RUN_OUTPUT = re.compile(r"pareto_merged\.pt|report\.json|last\.pt|step\d{6}\.pt")  # the files a merge run writes


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output directory ``out`` (``filelock``; fails at once if taken)."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputLockedError(f"output directory {str(out)!r} is in use by another paretomerge run (it holds "
                                f"{str(out / LOCK_FILE)!r}); wait for it to finish or choose another "
                                f"output.dir") from None
    try:
        yield
    finally:
        lock.release()


def _file_identity(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def run_identity(cfg: MergeConfig) -> dict:
    """What defines a merge run besides the trainer config: the base merge and the input files (resolved
    path, size, mtime) of the pool and the unlabeled data."""
    p = cfg.pool
    files = {"pool.pretrained": p.pretrained, **{f"pool.finetuned.{t}": f for t, f in p.finetuned.items()},
             **{f"pool.heads.{t}": f for t, f in (p.heads or {}).items()},
             **{f"unlabeled.{t}": f for t, f in ((cfg.unlabeled or {}) if cfg.mode == "unlabeled" else {}).items()}}
    return {"base": cfg.base.model_dump(), "pool_format": p.format,
            "files": {k: _file_identity(need_file(cfg, f, k)) for k, f in files.items()}}


def _prepare_output(out: Path, fresh: bool) -> None:
    """With the lock held: remove temp files a killed run left; with ``fresh``, every output of the earlier run
    (its checkpoints, and its pareto_merged.pt and report.json, so a fresh run killed before it finishes
    leaves no old result that looks like its own)."""
    ck = out / "checkpoints"
    for d in (out, ck):
        remove_stale_temp_files(d, lambda name: bool(_RUN_OUTPUT.fullmatch(name)))
    if fresh:
        for d in (out, ck):
            for f in (d.iterdir() if d.is_dir() else ()):
                if _RUN_OUTPUT.fullmatch(f.name) and f.is_file():
                    f.unlink()


def run_merge(cfg, fresh: bool = False, dist: Optional[DistContext] = None) -> Path:
    """Base merge + Pareto Merging training as ``cfg`` (a validated MergeConfig) says; returns the checkpoint.

    Holds an exclusive lock on the output directory for the run (``OutputLockedError`` if another run has
    it). Resumes from OUTPUT/checkpoints/last.pt when it belongs to this run (``RunMismatchError``
    otherwise); ``fresh=True`` deletes the old checkpoints first. ``dist``: run as one rank of a process
    group (every rank calls this; rank 0 takes the lock and alone writes files).
    """
    out = cfg.path(cfg.output.dir)
    with ExitStack() as held:
        error = None
        if dist is None or dist.is_main:
            try:
                held.enter_context(output_lock(out))
                _prepare_output(out, fresh)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = e
        if dist is not None:
            dist.raise_if_any(error)  # the other ranks fail with rank 0's error instead of waiting for it
        elif error is not None:
            raise error
        return _run_merge_locked(cfg, out, dist)


def checkpoint_architecture(cfg: MergeConfig) -> Optional[dict]:
    """How a checkpoint of this config rebuilds its model: ``pool.architecture``, or the pretrained Hugging Face
    directory's config.json (formats hf, peft, compressed without architecture)."""
    hf = POOL_LOADERS[cfg.pool.format].hf_dir(cfg)
    if hf is None:
        arch = cfg.pool.architecture
        return None if arch is None else arch.model_dump()
    pre = hf.resolve()
    return {"kind": "hf", "dir": str(pre), "auto_class": hf_model_class(pre, cfg.pool.auto_class).__name__}


def _run_merge_locked(cfg, out: Path, dist: Optional[DistContext]) -> Path:
    pool = load_pool(cfg)
    model = base_merge(cfg, pool)
    tcfg = copy.deepcopy(cfg.trainer)
    tcfg.checkpoint_dir = str(out / "checkpoints")
    unlabeled = None
    if cfg.mode == "unlabeled":
        data = load_tensors(cfg, cfg.unlabeled, "unlabeled")
        unlabeled = [data[t]["inputs"] for t in pool.task_names]
    meta = {"architecture": checkpoint_architecture(cfg), "base": cfg.base.method}
    trainer = ParetoMergingTrainer(model, pool, tcfg, logits_fn=logits_fn_of(pool) if unlabeled else None,
                                   unlabeled=unlabeled, meta=meta, identity=run_identity(cfg), dist=dist)
    resume = out / "checkpoints" / "last.pt"
    try:
        trainer.train(resume=resume if resume.exists() else None)
    except RunMismatchError as e:
        raise RunMismatchError(f"{resume}: {e} (rerun with --fresh, or choose another output.dir)") from None
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
    qkv = (ck.get("config") or {}).get("include") in QKV_PRESETS
    reconvert(model, int(ck["num_objectives"]), ck["layers"], attention_out_proj=not qkv)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def export_checkpoint(ckpt_path, pref: Sequence[float], out_path) -> torch.nn.Module:
    """Bake W(γ) into a plain model of the original architecture and save it (safetensors, atomic)."""
    model, ck = model_from_checkpoint(ckpt_path)
    if len(pref) != int(ck["num_objectives"]):
        raise ValueError(f"pref has {len(pref)} entries but the checkpoint has K = {ck['num_objectives']} "
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


# ----------------------------------------------------------------------------- causal LMs (paretomerge.llm)
def _check_prefs(prefs: Sequence[Sequence[float]], ck: Mapping) -> None:
    K = int(ck["num_objectives"])
    for p in prefs:
        if len(p) != K:
            raise ValueError(f"prefs: one has {len(p)} entries but the checkpoint has K = {K} tasks {ck['task_names']}")


def export_checkpoint_dir(ckpt_path, prefs: Sequence[Sequence[float]], out_dir, fmt: str,
                          overwrite: bool = False) -> Path:
    """Export a causal-LM checkpoint as a Hugging Face directory (``fmt`` "hf", one γ) or as the base merge
    plus one PEFT LoRA adapter per γ ("peft"); see ``paretomerge.llm``."""
    from .llm import export_hf, export_peft

    if fmt not in ("hf", "peft"):
        raise ValueError(f"fmt must be 'hf' or 'peft', got {fmt!r}")
    check_export_target(out_dir, overwrite, "out_dir")  # before loading anything
    model, ck = model_from_checkpoint(ckpt_path)
    _check_prefs(prefs, ck)
    if fmt == "hf":
        if len(prefs) != 1:
            raise ValueError(f"fmt hf writes one model: give one preference, got {len(prefs)}")
        return export_hf(model, prefs[0], out_dir, overwrite=overwrite)
    return export_peft(model, list(prefs), out_dir, overwrite=overwrite, task_names=ck["task_names"])


def lm_from_checkpoint(ckpt_path, tokenizer_dir=None) -> tuple[torch.nn.Module, object, dict]:
    """(model, tokenizer, checkpoint) of a causal-LM checkpoint. The tokenizer comes from ``tokenizer_dir``
    or the checkpoint's architecture directory (local files only), pads on the left, and pads with EOS
    when it has no pad token."""
    from transformers import AutoTokenizer

    from .llm import check_hf_dir

    model, ck = model_from_checkpoint(ckpt_path)
    tok_dir = tokenizer_dir or ((ck.get("meta") or {}).get("architecture") or {}).get("dir")
    if tok_dir is None:
        raise ValueError("tokenizer_dir is required: the checkpoint names no Hugging Face directory")
    tok = AutoTokenizer.from_pretrained(str(check_hf_dir(tok_dir, "tokenizer_dir")), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, ck


@torch.no_grad()
def generate_from_checkpoint(ckpt_path, prompts: Sequence[str], prefs: Sequence[Sequence[float]], *,
                             tokenizer_dir=None, max_new_tokens: int = 32, sample: bool = False,
                             temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Every prompt under every preference, in one left-padded batch with one γ per row.

    The tokenizer comes from ``tokenizer_dir`` or the checkpoint's architecture directory.
    Returns [{"prompt", "pref", "completion"}] in prompt-major order.
    """
    from .llm import generate

    if not prompts:
        raise ValueError("prompts: none given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model, tok, ck = lm_from_checkpoint(ckpt_path, tokenizer_dir)
    _check_prefs(prefs, ck)
    rows = [(t, list(p)) for t in prompts for p in prefs]
    enc = tok([t for t, _ in rows], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    out = generate(model, enc["input_ids"], torch.tensor([p for _, p in rows], dtype=torch.float64),
                   attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                   pad_token_id=tok.pad_token_id, **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    return [{"prompt": t, "pref": p, "completion": tok.decode(n, skip_special_tokens=True)}
            for (t, p), n in zip(rows, new)]
