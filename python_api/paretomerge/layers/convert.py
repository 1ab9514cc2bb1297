"""One-call conversion of a model's layers to Pareto layers, and export back.

``convert`` swaps matching ``nn.Linear`` / ``nn.MultiheadAttention`` / GPT-2
``Conv1D`` modules in place (a weight tied to another module's, e.g. an
``lm_head`` tied to the embeddings, is left alone; pointwise ``nn.Conv2d`` only
when an include pattern names them); ``export`` returns a plain copy with W(γ) baked into every Pareto
layer, loadable by the original architecture's code.
"""
from __future__ import annotations

import copy
from collections import Counter
from fnmatch import fnmatchcase
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from .attention import ParetoMultiheadAttention
from .conv1d import ParetoConv1D, is_conv1d
from .conv1x1 import ParetoConv1x1, is_pointwise_conv
from .linear import ParetoLinear
from .preference import PrefLike, single_preference

# Name patterns (fnmatch, on the module's qualified name) of common layouts:
# open_clip (`attn`, `mlp.c_fc`), Hugging Face BERT/CLIP/LLaMA-style names.
ATTENTION: tuple[str, ...] = ("*attn*", "*attention*")
MLP: tuple[str, ...] = ("*mlp*", "*intermediate*", "*.output.dense", "*ffn*", "*feed_forward*")
ATTENTION_MLP: tuple[str, ...] = ATTENTION + MLP
# Attention output projections: left out by the "qkv" presets (the paper's attention-only variant adapts
# the q/k/v projections only: 0.61 M parameters for ViT-B/32 at K = 8, r = 16, against 0.93 M with out_proj).
ATTENTION_OUT: tuple[str, ...] = ("*out_proj*", "*attention.output*", "*o_proj*", "*attn.c_proj*", "*attn.proj")
PRESETS = {"attention": ATTENTION, "mlp": MLP, "attention+mlp": ATTENTION_MLP, "all": ("*",),
           "qkv": ATTENTION, "qkv+mlp": ATTENTION_MLP}
QKV_PRESETS = ("qkv", "qkv+mlp")
# Causal LMs: Llama / Mistral / Qwen2 (q_proj … down_proj) and GPT-2 (Conv1D c_attn, attn.c_proj, c_fc,
# mlp.c_proj). Never lm_head or embeddings.
LLM_ATTENTION: tuple[str, ...] = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.attn.c_attn", "*.attn.c_proj")
LLM_MLP: tuple[str, ...] = ("*.gate_proj", "*.up_proj", "*.down_proj", "*.mlp.c_fc", "*.mlp.c_proj")
PRESETS.update({"llm-attention": LLM_ATTENTION, "llm-mlp": LLM_MLP, "llm-all": LLM_ATTENTION + LLM_MLP})

Patterns = Union[None, str, Sequence[str]]
PARETO_TYPES = (ParetoLinear, ParetoMultiheadAttention, ParetoConv1x1)  # ParetoConv1D is a ParetoLinear


def _patterns(arg: Patterns, name: str) -> Optional[tuple[str, ...]]:
    if arg is None:
        return None
    if isinstance(arg, str):
        return PRESETS.get(arg, (arg,))
    if not all(isinstance(p, str) for p in arg):
        raise TypeError(f"{name} must be a preset name, a pattern, or a sequence of patterns; got {arg!r}")
    return tuple(arg)


def _matches(name: str, patterns: Optional[tuple[str, ...]]) -> bool:
    return patterns is not None and any(fnmatchcase(name, p) for p in patterns)


def _infer_batch_dim(model: nn.Module, name: str) -> int:
    """1 when the nearest enclosing module with a ``batch_first`` flag has it False, else 0."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        mod = model.get_submodule(".".join(parts[:i])) if i else model
        flag = getattr(mod, "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
    return 0


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _convertible(mod: nn.Module, explicit_include: bool) -> bool:
    """A layer type ``convert`` swaps: nn.Linear, nn.MultiheadAttention, GPT-2's Conv1D, and pointwise convs
    when an explicit include asks (opt-in)."""
    return (isinstance(mod, (nn.Linear, nn.MultiheadAttention)) or is_conv1d(mod)
            or (explicit_include and is_pointwise_conv(mod)))


def _layers_to_convert(model: nn.Module, inc: Optional[tuple[str, ...]], exc: Optional[tuple[str, ...]]
                       ) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers ``convert`` swaps, outermost first: convertible, matched by ``inc`` (None:
    every one) and not by ``exc``, weight not tied, and not inside a Pareto layer or a converted attention."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    chosen: list[tuple[str, nn.Module]] = []
    skip_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(mod, PARETO_TYPES):
            skip_prefixes.append(name + ".")
            continue
        if not _convertible(mod, inc is not None):
            continue
        if (inc is not None and not _matches(name, inc)) or _matches(name, exc):
            continue
        if isinstance(getattr(mod, "weight", None), nn.Parameter) and uses[id(mod.weight)] > 1:
            continue  # tied weight: a low-rank update would untie it
        if isinstance(mod, nn.MultiheadAttention):
            skip_prefixes.append(name + ".")  # converted whole, out_proj included
        chosen.append((name, mod))
    return chosen


def convert(
    model: nn.Module,
    num_objectives: int,
    rank: int,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    impl: str = "auto",
    batch_dim: Optional[int] = None,
    attention_out_proj: Optional[bool] = None,
) -> list[str]:
    """Swap matching layers of ``model`` for Pareto layers, in place; return the converted names.

    include / exclude: fnmatch patterns on qualified module names, or a preset
    ("attention", "mlp", "attention+mlp", "qkv", "qkv+mlp", "all", "llm-attention",
    "llm-mlp", "llm-all"); include=None means every ``nn.Linear``,
    ``nn.MultiheadAttention`` and GPT-2 ``Conv1D``. Layers whose weight is tied to
    another module's (an ``lm_head`` sharing the embeddings) are never converted.
    An attention module is converted whole (its ``out_proj`` comes with it) unless
    ``attention_out_proj`` is False; the "qkv" presets leave attention output
    projections alone (attention_out_proj defaults to False for them, True
    otherwise, and their names are excluded). Pointwise convolutions
    (``nn.Conv2d`` with a 1×1 kernel, stride 1, groups 1: a linear map over
    channels, see ``ParetoConv1x1``) are opt-in: converted only when an
    explicit include pattern or preset matches them, never with include=None. batch_dim: where
    per-sample preferences index linear layers' inputs; None infers it from
    the nearest enclosing module's ``batch_first`` flag (1 if False), else 0.
    """
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    qkv = isinstance(include, str) and include in QKV_PRESETS
    if attention_out_proj is None:
        attention_out_proj = not qkv
    if qkv:
        exc = (exc or ()) + ATTENTION_OUT
    converted: list[str] = []
    for name, mod in _layers_to_convert(model, inc, exc):
        if isinstance(mod, nn.MultiheadAttention):
            new: nn.Module = ParetoMultiheadAttention.from_mha(mod, num_objectives, rank, impl=impl,
                                                              adapt_out_proj=attention_out_proj)
        elif isinstance(mod, nn.Conv2d):
            new = ParetoConv1x1.from_conv(mod, num_objectives, rank, impl=impl)
        else:
            bd = _infer_batch_dim(model, name) if batch_dim is None else batch_dim
            if isinstance(mod, nn.Linear):
                new = ParetoLinear.from_linear(mod, num_objectives, rank, impl=impl, batch_dim=bd)
            else:
                new = ParetoConv1D.from_conv1d(mod, num_objectives, rank, impl=impl, batch_dim=bd)
        _set_submodule(model, name, new)
        converted.append(name)
    if not converted:
        raise ValueError(f"convert: no nn.Linear, nn.MultiheadAttention, Conv1D (or, with include, pointwise "
                         f"nn.Conv2d) matched include={include!r}, exclude={exclude!r} (tied weights are never "
                         f"converted)")
    return converted


def pareto_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every Pareto layer of ``model`` (an attention's out_proj is part of it)."""
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(mod, PARETO_TYPES):
            skip.append(name + ".")
            yield name, mod


def factored_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter, nn.Parameter, torch.Tensor]]:
    """(weight's state-dict key, U, G, V, base weight) for every factored weight of every Pareto layer.

    A ``ParetoMultiheadAttention`` contributes two: its packed ``in_proj`` (3E, E) and ``out_proj``.
    """
    return [slot for name, layer in pareto_layers(model) for slot in layer.factored_weights(f"{name}." if name else "")]


def transposed_keys(model: nn.Module) -> set[str]:
    """State-dict keys of factored weights stored transposed, (in, out), e.g. GPT-2 ``Conv1D``: a tensor
    under such a key (a fine-tuned model's) is compared with U M(γ) Vᵀ after ``.t()``."""
    return {key for name, layer in pareto_layers(model) if getattr(layer, "stored_transposed", False)
            for key, *_ in layer.factored_weights(f"{name}." if name else "")}


def pareto_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The tensor factors (U, G, V) of every Pareto layer: what the trainer optimises."""
    for _, U, G, V, _ in factored_weights(model):
        yield from (U, G, V)


def set_impl(model: nn.Module, impl: str) -> None:
    """Set ``impl`` ("auto", "triton", "torch", "naive") on every Pareto layer."""
    for _, layer in pareto_layers(model):
        layer.impl = impl


@torch.no_grad()
def export(model: nn.Module, pref: PrefLike) -> nn.Module:
    """A plain copy of ``model`` with W(γ) baked into every Pareto layer.

    pref (K,). The copy has the original architecture's modules and state-dict
    keys (``nn.Linear``, ``nn.MultiheadAttention``, ``nn.Conv2d``); ``model`` is unchanged.
    """
    p = single_preference(pref)
    names = [n for n, _ in pareto_layers(model)]
    if not names:
        raise ValueError("export: model has no Pareto layers (convert it first)")
    out = copy.deepcopy(model)
    for name in names:
        layer = out.get_submodule(name)
        plain = layer._to_plain(p)  # p is checked once, above
        plain.train(layer.training)
        _set_submodule(out, name, plain)
    return out
