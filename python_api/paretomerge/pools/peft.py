"""LoRA-adapter pools: K PEFT adapter directories on one base model, kept factored.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per target
module ``m``, ``base_model.model.<m>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r). The task
vector of the module's weight is

    τ = scaling · lora_B lora_A,   scaling = lora_alpha / r   (lora_alpha / √r with use_rslora)

(``alpha_pattern`` overrides lora_alpha per module; r is read from the tensors, so ``rank_pattern`` needs
no handling). It is kept as ``LowRankDelta(A = scaling · lora_B, B = lora_Aᵀ)``: never densified unless a
method needs dense values. ``fan_in_fan_out`` adapters (GPT-2's Conv1D stores weights as (in, out)) give
the transposed factors. Full tensors the adapter saves (``modules_to_save``) become dense task vectors.
Only safetensors adapter files are read (no pickles); DoRA and embedding LoRA are rejected.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch

from ..io import PathLike
from .compress import LowRankDelta

__all__ = ["PeftAdapter", "load_peft_adapter"]

PREFIX = "base_model.model."


class PeftAdapter:
    """One adapter directory read: ``factors[key]`` / ``dense[key]`` keyed by the base model's state-dict keys."""

    def __init__(self, directory: Path, config: dict, factors: dict[str, LowRankDelta],
                 dense: dict[str, torch.Tensor]) -> None:
        self.directory, self.config, self.factors, self.dense = directory, config, factors, dense

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")


def _alpha_for(module: str, config: dict) -> float:
    # PEFT matches pattern keys against the end of the module name (get_pattern_key)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def _read_config(d: Path) -> dict:
    """adapter_config.json of a LoRA (not DoRA) adapter."""
    cfg_path = d / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable adapter config ({e})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora) are not low-rank task vectors; not supported")
    return config


def _read_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import safe_open

        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # truncated / corrupt file
        raise ValueError(f"{w_path}: unreadable adapter weights ({e})") from None


def _split_tensors(w_path: Path, tensors: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {"A": lora_A, "B": lora_B}}, {key: dense task vector of a saved full module})."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        bare = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", bare)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        if "lora_embedding" in bare or "lora_magnitude" in bare:
            raise ValueError(f"{w_path}: tensor {name!r}: embedding LoRA / DoRA magnitudes are not supported")
        key = bare.replace(".modules_to_save.default.", ".")
        if key not in base_state:
            raise ValueError(f"{w_path}: tensor {name!r} names {key!r}, which is not in the base model")
        if tuple(t.shape) != tuple(base_state[key].shape):
            raise ValueError(f"{w_path}: tensor {name!r} has shape {tuple(t.shape)} but the base model's {key!r} "
                             f"is {tuple(base_state[key].shape)}")
        dense[key] = t.float() - base_state[key].float()  # a saved full module (modules_to_save)
    return pairs, dense


def _lora_delta(w_path: Path, module: str, ab: Mapping[str, torch.Tensor], config: dict,
                base_state: Mapping[str, torch.Tensor]) -> LowRankDelta:
    """The task vector s·B A of one module's LoRA pair as factors (checked against the base weight)."""
    key = f"{module}.weight"
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "B" not in ab else "lora_A"
        raise ValueError(f"{w_path}: module {module!r} has no {missing} weight (incomplete LoRA pair)")
    if key not in base_state:
        raise ValueError(f"{w_path}: tensor {PREFIX}{module}.lora_A.weight targets {key!r}, which is not in "
                         f"the base model (adapter for another architecture?)")
    lora_A, lora_B = ab["A"], ab["B"]
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != r:
        raise ValueError(f"{w_path}: module {module!r}: lora_A {tuple(lora_A.shape)} and lora_B "
                         f"{tuple(lora_B.shape)} are not (r, in) and (out, r)")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    out, in_ = lora_B.shape[0], lora_A.shape[1]
    expect = (in_, out) if fan_in_fan_out else (out, in_)
    if tuple(base_state[key].shape) != expect:
        raise ValueError(f"{w_path}: module {module!r}: the adapter's weight update has shape {expect} but the "
                         f"base model's {key!r} is {tuple(base_state[key].shape)}")
    alpha = _alpha_for(module, config)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if fan_in_fan_out:  # stored (in, out): τ = (s B A)ᵀ = Aᵀ (s B)ᵀ
        return LowRankDelta(lora_A.t().float().contiguous(), scaling * lora_B.float())
    return LowRankDelta(scaling * lora_B.float(), lora_A.t().float().contiguous())


def load_peft_adapter(directory: PathLike, base_state: Mapping[str, torch.Tensor]) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory against the base model's state dict.

    Raises FileNotFoundError / ValueError naming the file and tensor for: a missing config or weights
    file, a corrupt file, a non-LoRA or DoRA adapter, a tensor of a module the base model does not
    have, a lora_A/lora_B pair that is incomplete or whose shapes disagree with the base weight.
    """
    d = Path(directory)
    w_path = d / "adapter_model.safetensors"
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} is not a PEFT adapter directory: no adapter_config.json")
    if not w_path.is_file():
        raise FileNotFoundError(f"{str(d)!r}: no adapter_model.safetensors (only safetensors adapters are read; "
                                f"convert a .bin adapter with PeftModel.save_pretrained(safe_serialization=True))")
    config = _read_config(d)
    pairs, dense = _split_tensors(w_path, _read_tensors(w_path), base_state)
    factors = {f"{module}.weight": _lora_delta(w_path, module, ab, config, base_state) for module, ab in pairs.items()}
    if not factors:
        raise ValueError(f"{w_path}: no lora_A/lora_B weights found")
    return PeftAdapter(d, config, factors, dense)
