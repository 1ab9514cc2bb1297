"""The active preference γ: one for the whole call, or one per sample.

Pareto layers read the active preference when called without ``pref=``, so a
host model's ``forward`` keeps its signature::

    with paretomerge.use_preference([0.7, 0.1, 0.1, 0.1]):
        logits = model(images)

Values are checked once, here, so the layers' hot path needs no host sync.
The state is process-global (not per thread): one preference at a time.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from pmkernels import check_pref_values

PrefLike = Union[torch.Tensor, np.ndarray, Sequence[float], Sequence[Sequence[float]]]


class NoPreferenceError(RuntimeError):
    """A Pareto layer was called with no preference given and none active."""


def as_preference(pref: PrefLike, *, normalize: bool = False, name: str = "pref") -> torch.Tensor:
    """Turn ``pref`` into a checked float tensor of shape (K,) or (B, K).

    A tensor keeps its floating dtype; sequences become float64 (the ops
    use γ in fp32 or wider, whatever the model's dtype).

    Entries must be finite and non-negative and rows sum to 1 (±1e-3), or are
    rescaled to sum to 1 with ``normalize=True``.
    """
    if isinstance(pref, torch.Tensor):
        t = pref if pref.is_floating_point() else pref.double()
    else:
        try:
            t = torch.as_tensor(np.asarray(pref, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a tensor or a sequence of floats, got {type(pref).__name__}") from e
    if t.dim() not in (1, 2) or t.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (K,) or (B, K), got {tuple(t.shape)}")
    return check_pref_values(t, normalize=normalize, name=name)


def single_preference(pref: PrefLike, *, name: str = "pref") -> torch.Tensor:
    """``as_preference`` for places that need exactly one preference: a checked (K,) tensor."""
    p = as_preference(pref, name=name)
    if p.dim() != 1:
        raise ValueError(f"{name} must be one preference of shape (K,), got {tuple(p.shape)}")
    return p


class _PreferenceState:
    """The default preference and a stack of ``use_preference`` overrides.

    Every Pareto layer of a model asks for the active preference on its input's
    device; the copy to that device is made once per preference and device,
    not once per layer call.
    """

    def __init__(self) -> None:
        self.default: Optional[torch.Tensor] = None
        self.stack: list[torch.Tensor] = []
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def active(self) -> Optional[torch.Tensor]:
        return self.stack[-1] if self.stack else self.default

    def active_on(self, device: torch.device) -> Optional[torch.Tensor]:
        p = self.active()
        if p is None or p.device == device:
            return p
        if p.requires_grad:  # a cached copy would share one autograd node across backward passes
            return p.to(device)
        cached = self._on_device.get(device)
        if cached is None or cached[0] is not p:
            cached = (p, p.to(device))
            self._on_device[device] = cached
        return cached[1]


_STATE = _PreferenceState()


def _snapshot(p: torch.Tensor) -> torch.Tensor:
    """A copy of a checked preference: later in-place changes to the caller's tensor cannot bypass the
    checks. Gradients still flow through it to the caller's tensor."""
    return p.clone()


def set_preference(pref: Optional[PrefLike], *, normalize: bool = False) -> None:
    """Set the default preference for every Pareto layer (None clears it)."""
    _STATE.default = None if pref is None else _snapshot(as_preference(pref, normalize=normalize))


def get_preference() -> Optional[torch.Tensor]:
    """The active preference: the innermost ``use_preference``, else the default."""
    return _STATE.active()


@contextmanager
def use_preference(pref: PrefLike, *, normalize: bool = False) -> Iterator[torch.Tensor]:
    """Make ``pref`` (K,) or (B, K) active for every Pareto layer inside the block."""
    p = _snapshot(as_preference(pref, normalize=normalize))
    _STATE.stack.append(p)
    try:
        yield p
    finally:
        _STATE.stack.pop()


def resolve_preference(pref: Optional[PrefLike], device: torch.device) -> torch.Tensor:
    """The preference a layer should use: its argument if given, else the active one, on ``device``.

    Under ``torch.compile`` an explicit tensor ``pref`` is used unchecked (its values would need a
    data-dependent guard; shapes are still checked by the op): check it once outside the compiled
    region, or use ``use_preference``, whose values are checked when it is set.
    """
    if pref is not None and isinstance(pref, torch.Tensor) and torch.compiler.is_compiling():
        p = pref if pref.is_floating_point() else pref.double()
    else:
        p = as_preference(pref) if pref is not None else _STATE.active_on(device)
    if p is None:
        raise NoPreferenceError(
            "no preference: call the layer with pref=..., or wrap the call in "
            "paretomerge.use_preference(pref), or call paretomerge.set_preference(pref)"
        )
    return p.to(device, non_blocking=True)
