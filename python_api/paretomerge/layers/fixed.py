"""``fixed_preference(model, γ)``: W(γ) baked into every Pareto layer for inference, restored on exit.

The paper: "once the preference is fixed, the low-rank tensor can be merged into the base model,
resulting in no inference overhead". Inside the block every Pareto layer's base weight holds
W(γ) = W + U M(γ) Vᵀ (``pmkernels.merged_weight``: the arithmetic of ``export``, bit for bit) and its
forward is the original layer's (``F.linear``, ``nn.MultiheadAttention``, GPT-2 ``Conv1D``,
``F.conv2d``): no factored path, no γ. On exit the base weights are put back.

Two ways to put them back (``exact``):

* ``exact=True`` (default): each base weight is copied before W(γ) is written and the copy is written
  back on exit: bit-identical, at the cost of one extra copy of every converted weight while the block
  is open (one per nesting level).
* ``exact=False``: PEFT's ``merge_adapter``/``unmerge_adapter``: W ← W(γ) on entry and
  W ← W(γ) − U M(γ) Vᵀ on exit, no extra weight memory, but the restored W differs from the original
  by the rounding of the two additions (bench/RESULTS.md, "Fixed preference": one 768² layer,
  ‖W'−W‖/‖W‖ = 2e-4 in bf16 and 6e-9 in fp32 after one block, 1.7e-3 and 5e-8 after 100 blocks).

The state lives on the layers (``_fixed_levels``, one entry per open block); layers whose forward
finds it non-empty take the plain path (``fixed_forward``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn

import pmkernels

from .preference import PrefLike, as_preference

# (U, G, V, base weight as an (out, in) view that can be written in place)
Slot = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Level:
    """One open ``fixed_preference`` block on one layer."""

    pref: torch.Tensor                          # (K,), checked, on the layer's device
    saved: Optional[list[torch.Tensor]]         # exact: each slot's weight as it was at entry
    token: object = field(default_factory=object)


def is_fixed(layer: nn.Module) -> bool:
    """True while ``layer`` is inside a ``fixed_preference`` block (its weights hold W(γ))."""
    return bool(getattr(layer, "_fixed_levels", ()))


def check_not_fixed(layer: nn.Module, what: str) -> None:
    """RuntimeError if ``layer``'s weights hold W(γ): ``what`` (export, merged_weight) needs the base W."""
    if is_fixed(layer):
        raise RuntimeError(f"{what}: {type(layer).__name__} is inside paretomerge.fixed_preference (its weight "
                           f"holds W(γ), not the base W); call it after the block")


def check_fixed_call(layer: nn.Module, pref: Optional[PrefLike], params: tuple[torch.Tensor, ...]) -> None:
    """The checks of a forward inside ``fixed_preference`` (cheap: no tensor work, no device sync).

    ``params``: the base weights and factors of the layer. With grad mode on and any of them requiring
    grad the plain forward would give wrong gradients (none for the factors; the base weight's would be
    taken at W(γ)), so that is an error; so is an explicit ``pref``, which the baked weight cannot honour.
    """
    if pref is not None:
        raise ValueError(f"{type(layer).__name__}: called with pref=... inside paretomerge.fixed_preference, "
                         f"whose γ is baked into the weights; call it without pref")
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{type(layer).__name__}: a forward with gradients enabled inside "
                           f"paretomerge.fixed_preference (its weights and factors require grad); the baked "
                           f"weights are for inference: run it under torch.no_grad() / torch.inference_mode(), "
                           f"or requires_grad_(False) the Pareto parameters")


def _owners(model: nn.Module) -> list[nn.Module]:
    """Every module holding factored weights: each Pareto layer, and an attention's Pareto ``out_proj``."""
    from .convert import pareto_layers  # convert imports the layers, which import this module

    out: list[nn.Module] = []
    for _, layer in pareto_layers(model):
        out.append(layer)
        inner = getattr(layer, "out_proj", None)
        if inner is not None and hasattr(inner, "_fixed_slots"):
            out.append(inner)
    return out


def _write(layer: nn.Module, target: Optional[torch.Tensor], current: Optional[torch.Tensor]) -> None:
    """Make each slot's weight hold W + U M(target) Vᵀ (target None: W), given that it holds
    W + U M(current) Vᵀ now. From the exact copy of W when the outermost open block kept one (then the
    result is bit for bit ``export``'s), else by unmerging ``current`` and merging ``target`` in place."""
    levels = layer._fixed_levels
    base = levels[0].saved if levels and levels[0].saved is not None else None
    for i, (U, G, V, W) in enumerate(layer._fixed_slots()):
        if base is not None:
            new = base[i] if target is None else pmkernels.merged_weight(base[i], U, G, V, target, check_values=False)
        else:
            new = W
            if current is not None:
                new = pmkernels.merged_weight(new, -U, G, V, current, check_values=False)
            if target is not None:
                new = pmkernels.merged_weight(new, U, G, V, target, check_values=False)
        if new is not W:
            W.copy_(new)


def _enter(layer: nn.Module, pref: torch.Tensor, exact: bool) -> object:
    if not is_fixed(layer):
        layer._fixed_levels = []
    levels = layer._fixed_levels
    p = pref.to(layer._fixed_slots()[0][0].device)
    saved = [W.clone() for *_, W in layer._fixed_slots()] if exact else None
    _write(layer, p, levels[-1].pref if levels else None)
    level = _Level(p, saved)
    levels.append(level)
    return level.token


def _exit(layer: nn.Module, token: object) -> None:
    levels = layer._fixed_levels
    if not levels or levels[-1].token is not token:
        raise RuntimeError("fixed_preference: blocks on one model must be closed in the reverse order they were "
                           "opened")
    level = levels.pop()
    if not levels:
        layer.__dict__.pop("_fixed_plain", None)  # a layer's plain twin (ParetoMultiheadAttention)
    if level.saved is not None:
        for (*_, W), w in zip(layer._fixed_slots(), level.saved):
            W.copy_(w)
    else:
        # the layer held W + ΔW(level.pref); put back what the block below (or none) had written
        _write(layer, levels[-1].pref if levels else None, level.pref)


def _one_preference(pref: PrefLike) -> torch.Tensor:
    p = as_preference(pref)
    if p.dim() == 2:
        if p.shape[0] != 1:
            raise ValueError(f"fixed_preference: pref must be one preference (K,) or (1, K), got a per-sample "
                             f"{tuple(p.shape)}; one weight can hold one W(γ) (use use_preference for "
                             f"per-sample γ)")
        p = p[0]
    return p.detach()


@contextmanager
def fixed_preference(model: nn.Module, pref: PrefLike, *, exact: bool = True) -> Iterator[nn.Module]:
    """Bake W(γ) into every Pareto layer of ``model`` for the block; restore the base weights on exit.

    Inside, every Pareto layer runs the plain forward of the module it replaced (``F.linear``,
    ``nn.MultiheadAttention``, GPT-2 ``Conv1D``, ``F.conv2d``) on weights holding
    W(γ) = W + U M(γ) Vᵀ, computed by ``pmkernels.merged_weight`` as ``export`` does (outputs are
    bit-identical to ``export(model, pref)``'s): a forward costs what the original model's does, and
    needs no γ (``use_preference`` / ``set_preference`` are ignored by these layers).

    pref: one preference, (K,) or (1, K); a per-sample (B, K) with B > 1 is a ``ValueError``, so is a K
    that differs from a layer's. Errors inside the block: calling a Pareto layer with ``pref=``
    (``ValueError``); a forward with grad mode on while a base weight or factor requires grad
    (``RuntimeError``: wrap inference in ``torch.no_grad()``); ``export`` / ``merged_weight`` of a
    layer (``RuntimeError``). ``state_dict()`` inside the block holds W(γ) under the weight keys.

    exact=True (default): each converted base weight is copied on entry and the copy written back on
    exit, so the model is bit-identical afterwards; memory: one extra copy of every converted weight
    while the block is open (one per nesting level). exact=False: merge in place on entry and subtract
    U M(γ) Vᵀ on exit (PEFT's merge/unmerge): no extra weight memory, but W comes back with the
    rounding error of the two additions (bench/RESULTS.md, "Fixed preference"). Both compute each
    layer's W(γ) through one (out, in) fp32 temporary at a time.

    Blocks nest (the inner γ is baked from the base W, the outer one is back on inner exit) and are
    restored when the block raises. Yields ``model``.
    """
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    p = _one_preference(pref)
    owners = _owners(model)
    if not owners:
        raise ValueError("fixed_preference: model has no Pareto layers (convert it first)")
    K = p.shape[0]
    for layer in owners:
        for U, G, V, W in layer._fixed_slots():
            if G.shape[-1] != K:
                raise ValueError(f"fixed_preference: pref has K = {K} entries but {type(layer).__name__} has "
                                 f"{G.shape[-1]} objectives")
    entered: list[tuple[nn.Module, object]] = []
    with torch.no_grad():
        try:
            for layer in owners:
                entered.append((layer, _enter(layer, p, exact)))
        except BaseException:
            for layer, token in reversed(entered):
                _exit(layer, token)
            raise
    try:
        yield model
    finally:
        errors = []
        with torch.no_grad():
            for layer, token in reversed(entered):  # every layer, even if one of them fails
                try:
                    _exit(layer, token)
                except Exception as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)
        if errors:
            raise errors[0]
