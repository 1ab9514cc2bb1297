"""The pool formats of a ``paretomerge merge`` config: ``pool.format`` name -> how to load and describe the pool.

``POOL_LOADERS`` is the one registry: ``program.load_pool`` loads through it, ``program`` asks it which
architecture a checkpoint records, and ``plan.plan_for_config`` asks it where the architecture and the
factored task vectors are. Its keys are ``config.POOL_FORMATS`` (the config module sits below this one and
names the choices; a test and the check at the bottom of this module keep the two equal).

Formats:

* ``files``: ``pool.architecture`` + state-dict files (safetensors or torch) for the pretrained and each
  fine-tuned model;
* ``open_clip``: open_clip checkpoints (pickles: ``pool.trusted`` must be true);
* ``hf``: local Hugging Face model directories;
* ``peft``: a local Hugging Face pretrained directory + one PEFT LoRA adapter directory per task;
* ``compressed``: a pretrained model (``pool.architecture`` + a state-dict file, or a Hugging Face directory)
  + the one file ``pool.compress.save`` / ``CompressedTaskVectors.save`` writes; every ``pool.finetuned``
  entry names that file, and the tasks must be the file's tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..config import POOL_FORMATS, ConfigError
from ..io import load_state_dict
from .architectures import build_architecture, hf_model_class
from .pool import ModelPool
from .sources import load_hf_model

__all__ = ["POOL_LOADERS", "PoolFormat", "need_file"]


def need_file(cfg, p: str, fieldname: str) -> Path:
    """``cfg.path(p)``; a ``ConfigError`` naming ``fieldname`` when it does not exist."""
    q = cfg.path(p)
    if not q.exists():
        raise ConfigError(fieldname, f"no such file or directory: {str(q)!r}")
    return q


def _head_from_state(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    w = sd["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
    head.load_state_dict(dict(sd))
    return head


def _heads(cfg) -> Optional[dict[str, nn.Module]]:
    """The linear heads ``pool.heads`` names (state-dict files), or None."""
    paths = {t: need_file(cfg, f, f"pool.heads.{t}") for t, f in (cfg.pool.heads or {}).items()}
    return {t: _head_from_state(load_state_dict(f)) for t, f in paths.items()} or None


def _hf_dir(cfg) -> Path:
    """The pretrained Hugging Face directory (``ConfigError`` when it is not one)."""
    pre = cfg.path(cfg.pool.pretrained)
    if not (pre / "config.json").is_file():
        raise ConfigError("pool.pretrained", f"{str(pre)!r} is not a local Hugging Face model directory")
    return pre


def _pretrained_from_files(cfg) -> nn.Module:
    model = build_architecture(cfg.pool.architecture)
    model.load_state_dict(load_state_dict(cfg.path(cfg.pool.pretrained)))
    return model


def _finetuned(cfg) -> dict[str, Path]:
    return {t: cfg.path(f) for t, f in cfg.pool.finetuned.items()}


def _load_files(cfg) -> ModelPool:
    return ModelPool.from_state_dict_files(_pretrained_from_files(cfg), _finetuned(cfg), heads=_heads(cfg))


def _load_open_clip(cfg) -> ModelPool:
    heads = {t: cfg.path(f) for t, f in (cfg.pool.heads or {}).items()} or None
    return ModelPool.from_open_clip_checkpoints(cfg.path(cfg.pool.pretrained), _finetuned(cfg), heads,
                                                trusted=cfg.pool.trusted)


def _with_heads(pool: ModelPool, heads: Optional[dict[str, nn.Module]]) -> ModelPool:
    if heads:
        pool.heads = heads
    return pool


def _load_hf(cfg) -> ModelPool:
    heads = _heads(cfg)
    pre = _hf_dir(cfg)
    return _with_heads(ModelPool.from_hf_dirs(pre, _finetuned(cfg), auto_class=hf_model_class(pre, cfg.pool.auto_class)),
                       heads)


def _load_peft(cfg) -> ModelPool:
    heads = _heads(cfg)
    pre = _hf_dir(cfg)
    model = load_hf_model(hf_model_class(pre, cfg.pool.auto_class), pre)
    return _with_heads(ModelPool.from_peft_adapters(model, _finetuned(cfg)), heads)


def _compressed_file(cfg) -> Path:
    """The one compressed task-vector file every ``pool.finetuned`` entry names."""
    files = {cfg.path(f).resolve() for f in cfg.pool.finetuned.values()}
    if len(files) != 1:
        raise ConfigError("pool.finetuned", "format 'compressed': every task names the same compressed file "
                                            f"(what pool.compress.save writes), got {len(files)} files")
    return files.pop()


def _load_compressed(cfg) -> ModelPool:
    from .compress import CompressedTaskVectors

    path = _compressed_file(cfg)
    heads = _heads(cfg)
    if cfg.pool.architecture is not None:
        model = _pretrained_from_files(cfg)
    else:
        pre = _hf_dir(cfg)
        model = load_hf_model(hf_model_class(pre, cfg.pool.auto_class), pre)
    ctv = CompressedTaskVectors.load(path)
    if sorted(ctv.tasks) != sorted(cfg.pool.finetuned):
        raise ConfigError("pool.finetuned", f"must name the tasks of {str(path)!r} ({sorted(ctv.tasks)}), "
                                            f"got {sorted(cfg.pool.finetuned)}")
    ctv.tasks = list(cfg.pool.finetuned)  # the config's task order, as in every other format
    pool = ModelPool.from_compressed(model, ctv)
    return _with_heads(pool, heads)


def _no_hf_dir(cfg) -> Optional[Path]:
    return None


def _hf_dir_unless_architecture(cfg) -> Optional[Path]:
    return None if cfg.pool.architecture is not None else _hf_dir(cfg)


def _no_factored_files(cfg) -> list[Path]:
    return []


def _adapter_files(cfg) -> list[Path]:
    files = [cfg.path(d) / "adapter_model.safetensors" for d in cfg.pool.finetuned.values()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError("pool.finetuned", f"no such adapter file: {missing[0]!r}")
    return files


def _compressed_files(cfg) -> list[Path]:
    return [need_file(cfg, str(_compressed_file(cfg)), "pool.finetuned")]


@dataclass(frozen=True)
class PoolFormat:
    """One ``pool.format``.

    load: the ``ModelPool`` of a validated MergeConfig (files already checked to exist);
    hf_dir: the Hugging Face directory whose config.json defines the architecture, or None when
        ``pool.architecture`` does (checkpoints record it; the memory plan builds it on the meta device);
    factored_files: the safetensors files holding the task vectors as factors (their bytes are the low-rank
        deltas of the memory plan);
    plannable: whether ``plan`` can read the pool without loading it (open_clip pickles cannot be read).
    """

    load: Callable[..., ModelPool]
    hf_dir: Callable[..., Optional[Path]] = _no_hf_dir
    factored_files: Callable[..., list[Path]] = _no_factored_files
    plannable: bool = True


POOL_LOADERS: dict[str, PoolFormat] = {
    "files": PoolFormat(_load_files),
    "open_clip": PoolFormat(_load_open_clip, plannable=False),
    "hf": PoolFormat(_load_hf, hf_dir=_hf_dir),
    "peft": PoolFormat(_load_peft, hf_dir=_hf_dir, factored_files=_adapter_files),
    "compressed": PoolFormat(_load_compressed, hf_dir=_hf_dir_unless_architecture, factored_files=_compressed_files),
}

if tuple(POOL_LOADERS) != POOL_FORMATS:  # pragma: no cover - a programming error, caught by the tests too
    raise ImportError(f"pools.formats.POOL_LOADERS {tuple(POOL_LOADERS)} != config.POOL_FORMATS {POOL_FORMATS}")
