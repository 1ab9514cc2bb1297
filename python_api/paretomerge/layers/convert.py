"""One-call conversion of a model's layers to Pareto layers, and export back.

``convert`` swaps matching ``nn.Linear`` / ``nn.MultiheadAttention`` modules
(and pointwise ``nn.Conv2d`` ones, when an include pattern names them) in place; ``export`` returns a plain copy with W(γ) baked into every Pareto
layer, loadable by the original architecture's code.
"""
from __future__ import annotations

import copy
from fnmatch import fnmatchcase
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from .attention import ParetoMultiheadAttention
from .conv1x1 import ParetoConv1x1, is_pointwise_conv
from .linear import ParetoLinear
from .preference import PrefLike, single_preference

# Name patterns (fnmatch, on the module's qualified name) of common layouts:
# open_clip (`attn`, `mlp.c_fc`), Hugging Face BERT/CLIP/LLaMA-style names.
ATTENTION: tuple[str, ...] = ("*attn*", "*attention*")
MLP: tuple[str, ...] = ("*mlp*", "*intermediate*", "*.output.dense", "*ffn*", "*feed_forward*")
ATTENTION_MLP: tuple[str, ...] = ATTENTION + MLP
PRESETS = {"attention": ATTENTION, "mlp": MLP, "attention+mlp": ATTENTION_MLP, "all": ("*",)}

Patterns = Union[None, str, Sequence[str]]
PARETO_TYPES = (ParetoLinear, ParetoMultiheadAttention, ParetoConv1x1)


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


def convert(
    model: nn.Module,
    num_objectives: int,
    rank: int,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    impl: str = "auto",
    batch_dim: Optional[int] = None,
) -> list[str]:
    """Swap matching layers of ``model`` for Pareto layers, in place; return the converted names.

    include / exclude: fnmatch patterns on qualified module names, or a preset
    ("attention", "mlp", "attention+mlp", "all"); include=None means every
    ``nn.Linear`` and ``nn.MultiheadAttention``. An attention module is
    converted whole (its ``out_proj`` comes with it). Pointwise convolutions
    (``nn.Conv2d`` with a 1×1 kernel, stride 1, groups 1: a linear map over
    channels, see ``ParetoConv1x1``) are opt-in: converted only when an
    explicit include pattern or preset matches them, never with include=None. batch_dim: where
    per-sample preferences index linear layers' inputs; None infers it from
    the nearest enclosing module's ``batch_first`` flag (1 if False), else 0.
    """
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    converted: list[str] = []
    skip_prefixes: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(mod, PARETO_TYPES):
            skip_prefixes.append(name + ".")
            continue
        pointwise = inc is not None and is_pointwise_conv(mod)  # opt-in: only an explicit include converts convs
        if not (pointwise or isinstance(mod, (nn.Linear, nn.MultiheadAttention))):
            continue
        if (inc is not None and not _matches(name, inc)) or _matches(name, exc):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            new: nn.Module = ParetoMultiheadAttention.from_mha(mod, num_objectives, rank, impl=impl)
            skip_prefixes.append(name + ".")
        elif pointwise:
            new = ParetoConv1x1.from_conv(mod, num_objectives, rank, impl=impl)
        else:
            bd = _infer_batch_dim(model, name) if batch_dim is None else batch_dim
            new = ParetoLinear.from_linear(mod, num_objectives, rank, impl=impl, batch_dim=bd)
        _set_submodule(model, name, new)
        converted.append(name)
    if not converted:
        raise ValueError(f"convert: no nn.Linear, nn.MultiheadAttention (or, with include, pointwise nn.Conv2d) matched include={include!r}, "
                         f"exclude={exclude!r}")
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
