"""Memory plan of a Pareto Merging run, computed without allocating a single weight.

The model is built on the ``meta`` device (shapes and dtypes only) from a Hugging Face ``config.json``
(or any module factory), converted as the trainer would convert it, and the bytes are summed:

* ``base_model``: the pretrained model (the pool holds it) — from the safetensors headers when a
  directory with weights is given, else from the meta model in ``dtype``;
* ``base_merge``: the merged model being trained (a second copy of the base weights);
* ``pareto_params`` / ``pareto_grads`` / ``optimizer``: U, G, V of every converted layer (in the
  weight's dtype), their gradients, and Adam's two moments;
* ``deltas_dense``: the data-free objective's K dense deltas (out × in per converted layer);
* ``deltas_lowrank``: the same compressed at rank R, K × (out + in) × min(R, out, in) per layer (or the
  adapters' own factors for a LoRA pool).

Totals for the dense and the low-rank objective, and whether each fits a 24 GB CPU box and an 80 GB GPU.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .config import TrainerConfig
from .io import PathLike

__all__ = ["BUDGETS", "MemoryPlan", "memory_plan", "meta_model", "safetensors_bytes"]

GB = 10**9
BUDGETS = {"24 GB CPU box": 24 * GB, "80 GB GPU": 80 * GB}
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class MemoryPlan:
    """Bytes of each part of a run (see the module docstring); ``totals`` and ``fits`` derived from them."""

    K: int
    rank: int
    lowrank_R: Optional[int]
    converted_layers: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, int]:
        common = sum(v for k, v in self.parts.items() if not k.startswith("deltas_"))
        out = {"dense": common + self.parts["deltas_dense"]}
        if "deltas_lowrank" in self.parts:
            out["lowrank"] = common + self.parts["deltas_lowrank"]
        return out

    @property
    def fits(self) -> dict[str, dict[str, bool]]:
        return {kind: {b: total <= cap for b, cap in BUDGETS.items()} for kind, total in self.totals.items()}

    def markdown(self) -> str:
        lines = [f"memory plan: K = {self.K} tasks, Pareto rank r = {self.rank}, {self.converted_layers} converted "
                 f"layers" + (f", low-rank deltas at R = {self.lowrank_R}" if self.lowrank_R else ""),
                 "", "| part | bytes | GB |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {v / GB:.2f} |" for k, v in self.parts.items()]
        for kind, total in self.totals.items():
            fit = ", ".join(f"{b}: {'fits' if ok else 'does NOT fit'}" for b, ok in self.fits[kind].items())
            lines.append(f"| **total ({kind} objective)** | {total} | {total / GB:.2f} ({fit}) |")
        return "\n".join(lines)


def safetensors_bytes(paths: Union[PathLike, list[PathLike]]) -> int:
    """Bytes of the tensors in safetensors file(s), from their JSON headers only (nothing else is read)."""
    total = 0
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            total += end - start
    return total


def meta_model(config, auto_class="AutoModelForCausalLM", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A Hugging Face model of ``config`` (a PretrainedConfig or a local directory with config.json) on the meta
    device: every tensor has its shape and dtype, none has storage. ``auto_class``: a transformers auto class
    or model class, or its name."""
    import transformers

    if not isinstance(config, transformers.PretrainedConfig):
        d = Path(config)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{str(d)!r} has no config.json (the memory plan reads the architecture there)")
        config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = getattr(transformers, auto_class, None) if isinstance(auto_class, str) else auto_class
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"auto_class: {auto_class!r} is not a transformers auto class")
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # an auto class
            return cls.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)  # a model class (PreTrainedModel's config constructor)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the state dict holds: parameters (tied ones once) and persistent buffers."""
    tensors = {id(p): p for p in model.parameters()}
    for m in model.modules():
        tensors.update({id(b): b for n, b in m._buffers.items()
                        if b is not None and n not in m._non_persistent_buffers_set})
    return list(tensors.values())


def _check_ranks_fit(trainer: TrainerConfig, largest: int, K: int) -> None:
    """A rank whose U (out, r) or G (r, r, K) cannot exist (more bytes than a tensor's size can count) is a
    config error, not the storage overflow building it on the meta device would raise."""
    from .config import ConfigError

    for name, r in (("trainer.rank", trainer.rank), ("trainer.rank_mlp", trainer.rank_mlp)):
        if r is not None and max(largest * r, r * r * K) * 8 >= 2**63:
            raise ConfigError(name, f"{r} is too large: a Pareto layer's U (out, r) or G (r, r, K) would hold "
                                    f"more elements than a tensor can (largest dimension {largest}, K = {K})")


def memory_plan(model: nn.Module, K: int, trainer: Optional[TrainerConfig] = None, *,
                lowrank_R: Optional[int] = None, adapter_bytes: Optional[int] = None,
                base_bytes: Optional[int] = None) -> MemoryPlan:
    """The bytes of a data-free Pareto Merging run on ``model`` (a meta-device model; it is converted in place).

    ``trainer``: include / rank / rank_mlp as the trainer converts (default TrainerConfig()). ``lowrank_R``:
    also plan the low-rank objective with deltas compressed at rank R; ``adapter_bytes``: or with a LoRA pool's
    factors of that size (per task: the adapters' file bytes, summed over tasks, as the caller read them).
    ``base_bytes``: the pretrained weights' bytes when known (safetensors headers), else from ``model``.
    """
    from .methods.pareto_merging.trainer import convert_for_config
    from .layers import factored_weights

    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an int >= 1, got {K!r}")
    if lowrank_R is not None and (not isinstance(lowrank_R, int) or lowrank_R < 1):
        raise ValueError(f"lowrank_R must be an int >= 1, got {lowrank_R!r}")
    trainer = trainer or TrainerConfig()
    tensors = _state_tensors(model)
    model_bytes = sum(_nbytes(t) for t in tensors)
    _check_ranks_fit(trainer, max((max(t.shape) for t in tensors if t.dim()), default=1), K)
    convert_for_config(model, K, trainer)
    slots = factored_weights(model)
    pareto = sum(_nbytes(U) + _nbytes(G) + _nbytes(V) for _, U, G, V, _ in slots)
    parts = {
        "base_model": int(base_bytes) if base_bytes is not None else model_bytes,
        "base_merge": model_bytes,
        "pareto_params": pareto,
        "pareto_grads": pareto,
        "optimizer": 2 * pareto,  # Adam: exp_avg and exp_avg_sq, in the parameters' dtype
        "deltas_dense": K * sum(_nbytes(W) for *_, W in slots),
    }
    if adapter_bytes is not None:
        parts["deltas_lowrank"] = int(adapter_bytes)
    elif lowrank_R is not None:
        parts["deltas_lowrank"] = K * sum((W.shape[0] + W.shape[1]) * min(lowrank_R, *W.shape) * W.element_size()
                                          for *_, W in slots)
    return MemoryPlan(K, trainer.rank, lowrank_R, len(slots), parts)


def _hf_weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []


def plan_for_config(cfg, lowrank_R: Optional[int] = None) -> MemoryPlan:
    """The memory plan of a ``paretomerge merge`` config (a validated MergeConfig), nothing allocated.

    The pool's format (``pools.formats.POOL_LOADERS``) says where the architecture is: the pretrained
    directory's config.json (formats hf, peft; compressed without ``pool.architecture``) or ``pool.architecture``
    built on the meta device (files, compressed); the base bytes come from the safetensors headers when there
    are any. Low-rank deltas: the factored files' bytes (peft adapters, a compressed file), else at
    ``lowrank_R`` if given, else ``pool.compress.rank``.
    """
    from .config import ConfigError
    from .pools.architectures import build_architecture, hf_model_class
    from .pools.formats import POOL_LOADERS

    p = cfg.pool
    fmt = POOL_LOADERS[p.format]
    if not fmt.plannable:
        raise ConfigError("pool.format", f"the memory plan cannot read format {p.format!r} (open_clip pickles "
                                         "cannot be inspected without unpickling them)")
    pre = cfg.path(p.pretrained)
    base_bytes = None
    hf = fmt.hf_dir(cfg)
    if hf is not None:
        model = meta_model(hf, hf_model_class(hf, p.auto_class))  # the class merge builds
        files = _hf_weight_files(hf)
        base_bytes = safetensors_bytes(files) if files else None
    else:
        with torch.device("meta"):
            model = build_architecture(p.architecture.model_dump())
        if pre.is_file() and pre.suffix == ".safetensors":
            base_bytes = safetensors_bytes(pre)
    factored = fmt.factored_files(cfg)
    adapter_bytes = safetensors_bytes(factored) if factored else None
    R = lowrank_R if lowrank_R is not None else (p.compress.rank if p.compress is not None else None)
    return memory_plan(model, len(p.finetuned), cfg.trainer, lowrank_R=R, adapter_bytes=adapter_bytes,
                       base_bytes=base_bytes)
