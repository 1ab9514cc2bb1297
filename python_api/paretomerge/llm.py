"""Causal language models (Hugging Face Llama / Mistral / Qwen2 / GPT-2) under Pareto Merging.

* ``generate``: ``model.generate`` with one γ per request: prefs (B, K), row i for
  prompt i, through the KV cache (the prefill sees x (B, L, in), every decode step
  x (B, 1, in); per-sample preferences index dim 0 of both).
* ``export_hf``: bake one γ into a plain model and write a ``save_pretrained``
  directory (safetensors, config untouched) that plain transformers loads.
* ``export_peft``: the base merge as a Hugging Face directory plus one PEFT LoRA
  adapter per γ: ΔW(γ) = U M(γ) Vᵀ is exactly rank r, so ``lora_B = U M(γ)``,
  ``lora_A = Vᵀ``, ``lora_alpha = r`` (scaling 1); GPT-2 ``Conv1D`` targets get
  ``fan_in_fan_out=True``.
* ``causal_lm_logits_fn``: the unlabeled objective for LMs (mean next-token entropy
  of task k's texts, padding masked), for ``ParetoMergingTrainer(logits_fn=...)``.

Every directory is written atomically (temporary directory + rename); an existing
target is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from pmkernels import core_matrix

from .io import PathLike, atomic_directory, check_export_target
from .layers import ParetoConv1D, ParetoLinear, as_preference, export, pareto_layers, single_preference, use_preference
from .layers.preference import PrefLike

__all__ = ["base_model", "causal_lm_logits_fn", "check_hf_dir", "export_hf", "export_peft", "generate"]


def check_hf_dir(path: PathLike, name: str = "model_dir") -> Path:
    """``path`` as a local Hugging Face model directory (with a config.json), else FileNotFoundError naming
    ``name``. Nothing is ever downloaded."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{name}: {str(p)!r} is not an existing local directory (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{name}: {str(p)!r} has no config.json; not a Hugging Face model directory")
    return p


def _prefs_for_batch(prefs: PrefLike, batch: int, expand: int) -> torch.Tensor:
    p = as_preference(prefs, name="prefs")
    if p.dim() == 2:
        if p.shape[0] != batch:
            raise ValueError(f"prefs has {p.shape[0]} rows but input_ids holds {batch} prompts; give one "
                             f"preference (K,) for all or one row per prompt (B, K)")
        if expand > 1:  # generate repeats each prompt num_beams * num_return_sequences times, row-adjacent
            p = p.repeat_interleave(expand, dim=0)
    return p


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, prefs: PrefLike, *,
             attention_mask: Optional[torch.Tensor] = None, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with preference(s) ``prefs``: (K,) for every prompt or (B, K), one per prompt.

    input_ids (B, L) (left-padded, with ``attention_mask`` (B, L), for prompts of different lengths).
    Returns the token ids ``generate`` returns; with ``num_beams`` > 1 (beam search) or
    ``num_return_sequences`` > 1 (sampling) each prompt's preference row is repeated for its rows.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, L) tensor of token ids, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    gc = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str) -> int:
        return int(generate_kwargs.get(name, getattr(gc, name, 1)) or 1)

    # A model with a fixed context (GPT-2's learned positions fail with an index error past n_positions)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    new_tokens = generate_kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
    needed = input_ids.shape[1] + (int(new_tokens) if new_tokens is not None else 0)
    if isinstance(limit, int) and needed > limit:
        raise ValueError(f"input_ids: prompts of {input_ids.shape[1]} tokens (padded) plus max_new_tokens = "
                         f"{new_tokens} need {needed} positions but the model has {limit} "
                         f"(config.max_position_embeddings); shorten the prompts or max_new_tokens")
    # generate runs B · num_beams rows in beam search, else B · num_return_sequences, each prompt's adjacent
    expand = setting("num_beams") if setting("num_beams") > 1 else setting("num_return_sequences")
    p = _prefs_for_batch(prefs, input_ids.shape[0], expand)
    with use_preference(p):
        return model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)


# ----------------------------------------------------------------------------- export
def _saveable(plain: nn.Module) -> nn.Module:
    """A plain exported copy ready for ``save_pretrained``. A model loaded from a GGUF file keeps its
    ``hf_quantizer`` although its weights were dequantized into ordinary float tensors (transformers'
    legacy GGUF loader), and ``save_pretrained`` refuses it: with every weight a float tensor the copy is
    a plain model, so its quantization record is dropped (from the copy only)."""
    quantizer = getattr(plain, "hf_quantizer", None)
    if quantizer is None:
        return plain
    packed = [n for n, p in plain.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ValueError(f"model: quantized weights ({packed[0]!r}, ...) cannot be exported; load the model "
                         f"dequantized (float weights)")
    quantizer.remove_quantization_config(plain)
    return plain


def export_hf(model: nn.Module, pref: PrefLike, out_dir: PathLike, *, overwrite: bool = False) -> Path:
    """Bake γ (K,) into a plain copy of ``model`` and ``save_pretrained`` it (safetensors) to ``out_dir``.

    The directory loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and no pmkernels import;
    config.json is the model's own. Returns the directory.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel (with save_pretrained), got "
                        f"{type(model).__name__}")
    check_export_target(out_dir, overwrite, "out_dir")  # before the work
    plain = _saveable(export(model, pref))
    with atomic_directory(out_dir, overwrite=overwrite, name="out_dir", kind="hf") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


@torch.no_grad()
def base_model(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` holding the base merge only (every Pareto layer's W, ΔW left out)."""
    names = [n for n, _ in pareto_layers(model)]
    if not names:
        raise ValueError("model has no Pareto layers (convert it first)")
    zeroed = copy.deepcopy(model)
    K = None
    for _, layer in pareto_layers(zeroed):
        for _, U, G, _, _ in layer.factored_weights():
            U.zero_()
            K = G.shape[-1]
    return export(zeroed, torch.full((K,), 1.0 / K))


def _lora_targets(model: nn.Module) -> tuple[list[str], dict[str, ParetoLinear], bool]:
    layers: dict[str, ParetoLinear] = {}
    for name, layer in pareto_layers(model):
        if not isinstance(layer, ParetoLinear):
            raise ValueError(f"model: Pareto layer {name!r} is a {type(layer).__name__}; a PEFT LoRA adapter holds "
                             f"only Linear / Conv1D layers (convert with an include that leaves it out, or export "
                             f"format 'hf')")
        layers[name] = layer
    if not layers:
        raise ValueError("model has no Pareto layers (convert it first)")
    conv = {isinstance(m, ParetoConv1D) for m in layers.values()}
    if len(conv) > 1:
        raise ValueError("model mixes Conv1D and Linear Pareto layers; one PEFT adapter has one fan_in_fan_out")
    return list(layers), layers, conv.pop()


def _named_preferences(prefs: Union[Mapping[str, PrefLike], Sequence[PrefLike]]) -> dict[str, torch.Tensor]:
    """{adapter name: γ} of export_peft's ``prefs``: each name a valid directory name, each γ a checked (K,)."""
    named = dict(prefs) if isinstance(prefs, Mapping) else {f"pref_{i}": p for i, p in enumerate(prefs)}
    if not named:
        raise ValueError("prefs must hold at least one preference")
    for n in named:  # each name is a directory: one path component, nothing the filesystem refuses
        if not isinstance(n, str) or not n or n.startswith(".") or any(c in n for c in "/\\\0"):
            raise ValueError(f"prefs: adapter name {n!r} must be a non-empty string without '/', '\\', a NUL "
                             f"byte or a leading '.'")
    return {n: single_preference(p, name=f"prefs[{n!r}]") for n, p in named.items()}


@torch.no_grad()
def _set_lora_weights(peft_model: nn.Module, layers: Mapping[str, nn.Module], pref: torch.Tensor) -> None:
    """Every target's LoRA pair at γ = ``pref``: lora_B = U M(γ) (out, r), lora_A = Vᵀ (r, in)."""
    for name, src in layers.items():
        dst = peft_model.base_model.model.get_submodule(name)
        M = core_matrix(src.G, pref.to(src.G.device))
        dst.lora_B["default"].weight.copy_(src.U.float() @ M.float())
        dst.lora_A["default"].weight.copy_(src.V.t())


def export_peft(model: nn.Module, prefs: Union[Mapping[str, PrefLike], Sequence[PrefLike]], out_dir: PathLike, *,
                overwrite: bool = False, task_names: Optional[Sequence[str]] = None) -> Path:
    """The base merge and one PEFT LoRA adapter per preference, in one tree::

        out_dir/base/                 save_pretrained of the base merge (ΔW = 0)
        out_dir/adapters/<name>/      adapter_config.json + adapter_model.safetensors for γ_name
        out_dir/preferences.json      {"task_names": [...], "adapters": {name: γ}}

    prefs: {name: γ (K,)} or a sequence of γ (named ``pref_0``, ``pref_1``, …). Each adapter has
    lora_B = U M(γ) (out, r), lora_A = Vᵀ (r, in), lora_alpha = r, target_modules = the converted
    layers; ``PeftModel.from_pretrained(base, out_dir/adapters/<name>)`` computes the Pareto model at γ.
    Needs the ``peft`` package.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the test extras
        raise ImportError("export_peft needs the 'peft' package (pip install peft)") from e
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel (with save_pretrained), got "
                        f"{type(model).__name__}")
    checked = _named_preferences(prefs)
    names, layers, fan_in_fan_out = _lora_targets(model)
    K = layers[names[0]].G.shape[-1]
    for n, p in checked.items():
        if p.shape[0] != K:
            raise ValueError(f"prefs[{n!r}] has {p.shape[0]} entries but the model has K = {K} objectives")
    ranks = {n: layers[n].rank for n in names}
    r0 = ranks[names[0]]
    odd = {n: r for n, r in ranks.items() if r != r0}
    target = Path(out_dir)
    check_export_target(target, overwrite, "out_dir")  # before the work
    with atomic_directory(target, overwrite=overwrite, name="out_dir", kind="peft") as tmp:
        base = _saveable(base_model(model))
        base.save_pretrained(tmp / "base", safe_serialization=True)
        base_path = str((target / "base").resolve())
        base.name_or_path = base_path  # what PEFT records as base_model_name_or_path
        cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=names, fan_in_fan_out=fan_in_fan_out,
                         lora_dropout=0.0, bias="none", rank_pattern=odd, alpha_pattern=dict(odd),
                         base_model_name_or_path=base_path)
        peft_model = get_peft_model(base, cfg)
        for adapter, p in checked.items():
            _set_lora_weights(peft_model, layers, p)
            peft_model.save_pretrained(tmp / "adapters" / adapter)
        (tmp / "preferences.json").write_text(json.dumps(
            {"task_names": list(task_names) if task_names is not None else None,
             "adapters": {n: [float(v) for v in p.tolist()] for n, p in checked.items()}}, indent=1))
    return target


# ----------------------------------------------------------------------------- unlabeled objective
def causal_lm_logits_fn(pad_token_id: int) -> Callable[[nn.Module, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A ``logits_fn`` for ``ParetoMergingTrainer`` / ``entropy_objectives`` on causal LMs.

    Task k's unlabeled inputs are right-padded token ids (N, L) with ``pad_token_id`` as padding.
    Returns (model, k, ids) -> (logits (B, L-1, V), mask (B, L-1)): the next-token predictions at the
    positions whose next token is a real token; the objective is their mean entropy (padding masked).
    """
    def logits_fn(model: nn.Module, k: int, ids: torch.Tensor):
        real = ids != pad_token_id
        logits = model(input_ids=ids, attention_mask=real.long()).logits
        return logits[:, :-1], real[:, :-1] & real[:, 1:]

    return logits_fn
