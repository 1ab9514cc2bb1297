"""Base merges of a ``ModelPool``: task arithmetic, TIES, AdaMerging.

Each function returns a NEW module (a deep copy of ``pool.pretrained`` with
merged weights); ``pool.pretrained`` never changes. Only floating tensors are
merged; integer buffers keep the pretrained values. Task vectors are
streamed one task at a time (task arithmetic, TIES), so memory stays at a
few model sizes whatever K is; AdaMerging needs all K task vectors of the
merged tensors at once (it differentiates through them).

* task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k
* TIES (Yadav et al. 2023): trim each τ_k to its top-k fraction of magnitudes
  (over the whole flattened task vector), elect a sign per entry from the sum
  of the trimmed vectors, take the mean of the entries that agree with it
  (disjoint mean), θ = θ0 + λ·merged
* AdaMerging (Yang et al. 2024), layer-wise: θ_l = θ0_l + Σ_k λ_{l,k} τ_{k,l},
  λ learned by minimising Σ_k entropy(logits_fn(model, k, batch)) on unlabeled
  batches with Adam, through ``torch.func.functional_call``
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn

from .pool import ModelPool, is_float

__all__ = ["adamerging", "entropy", "task_arithmetic", "ties_merging"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the last dim, averaged over all other dims."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating Tensor, got {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1, got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _check_pool(pool) -> None:
    if not isinstance(pool, ModelPool):
        raise TypeError(f"pool must be a ModelPool, got {type(pool).__name__}")


def _check_number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


@torch.no_grad()
def _apply(pool: ModelPool, delta: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of the pretrained model with θ0 + delta written into its floating tensors."""
    model = copy.deepcopy(pool.pretrained)
    sd = model.state_dict()
    base = pool.pretrained_state()
    for name, d in delta.items():
        sd[name].copy_((base[name].to(d.dtype) + d).to(sd[name].dtype))
    return model


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def task_arithmetic(pool: ModelPool, lam: float = 0.3) -> nn.Module:
    """θ = θ0 + λ Σ_k τ_k (a new module)."""
    _check_pool(pool)
    lam = _check_number(lam, "lam")
    total: dict[str, torch.Tensor] = {}
    for k in range(len(pool)):
        for n, t in pool.task_vector(k).items():
            t = t.to(_acc_dtype(t))
            total[n] = t.clone() if n not in total else total[n].add_(t)
    return _apply(pool, {n: lam * t for n, t in total.items()})


def _trim_threshold(tv: dict[str, torch.Tensor], keep: float) -> float:
    """The magnitude of the n_keep-th largest entry of the flattened task vector, n_keep = max(1, int(keep·d))."""
    flat = torch.cat([t.reshape(-1).abs().to(_acc_dtype(t)) for t in tv.values()]) if tv else torch.zeros(0)
    d = flat.numel()
    if d == 0:
        return 0.0
    n_keep = max(1, int(keep * d + 1e-9))
    if n_keep >= d:
        return 0.0  # keep everything (including zeros)
    return float(torch.kthvalue(flat, d - n_keep + 1).values)


@torch.no_grad()
def ties_merging(pool: ModelPool, *, k: float = 0.2, lam: float = 1.0) -> nn.Module:
    """TIES merging (a new module). ``k``: the fraction of each task vector's entries kept
    (largest magnitudes, threshold over the whole flattened vector; entries tied with the
    threshold are kept); ``lam``: scale of the merged vector.

    Sign election: sign of Σ_k trimmed τ_k, entries where that sum is exactly 0 take the
    majority sign of the whole summed vector (as the reference implementation does).
    Disjoint mean: mean over the tasks whose trimmed entry is non-zero and has the elected sign.
    Two passes over the task vectors: memory stays at a few model sizes.
    """
    _check_pool(pool)
    keep = _check_number(k, "k")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"k (the fraction of entries kept) must be in (0, 1], got {k}")
    lam = _check_number(lam, "lam")
    K = len(pool)
    # Pass 1: trim thresholds and the summed trimmed vectors (sign election).
    thresholds: list[float] = []
    total: dict[str, torch.Tensor] = {}
    for i in range(K):
        tv = pool.task_vector(i)
        th = _trim_threshold(tv, keep)
        thresholds.append(th)
        for n, t in tv.items():
            t = t.to(_acc_dtype(t))
            tr = torch.where(t.abs() >= th, t, torch.zeros_like(t))
            total[n] = tr if n not in total else total[n].add_(tr)
        del tv
    signs = {n: torch.sign(t) for n, t in total.items()}
    majority = torch.sign(sum((s.sum() for s in signs.values()), torch.tensor(0.0, dtype=torch.float64)))
    if majority == 0:
        majority = torch.tensor(1.0, dtype=torch.float64)
    for n, s in signs.items():
        s[s == 0] = majority.to(s.dtype)
    del total
    # Pass 2: disjoint mean of the trimmed entries agreeing with the elected sign.
    acc: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    cnt: dict[str, torch.Tensor] = {n: torch.zeros_like(s) for n, s in signs.items()}
    for i in range(K):
        tv = pool.task_vector(i)
        for n, t in tv.items():
            t = t.to(_acc_dtype(t))
            agree = (t.abs() >= thresholds[i]) & (t != 0) & (torch.sign(t) == signs[n])
            acc[n].add_(torch.where(agree, t, torch.zeros_like(t)))
            cnt[n].add_(agree.to(cnt[n].dtype))
        del tv
    merged = {n: lam * acc[n] / cnt[n].clamp_min(1) for n in acc}
    return _apply(pool, merged)


class _Call(nn.Module):
    """Wraps ``logits_fn(model, k, batch)`` as a module so ``functional_call`` can swap model's parameters."""

    def __init__(self, model: nn.Module, logits_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self._fn = logits_fn

    def forward(self, k: int, batch):
        return self._fn(self.model, k, batch)


def adamerging(pool: ModelPool, logits_fn: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
               unlabeled: Sequence[Sequence[torch.Tensor]], *, steps: int = 100, lr: float = 1e-3,
               init_lam: float = 0.3, seed: int = 0, return_coefficients: bool = False
               ) -> Union[nn.Module, tuple[nn.Module, torch.Tensor]]:
    """Layer-wise AdaMerging (a new module; with ``return_coefficients`` also λ (L, K)).

    One coefficient λ_{l,k} per floating parameter tensor l (in ``named_parameters`` order) and
    task k, initialised to ``init_lam``, learned with Adam (``lr``, ``steps``) to minimise
    Σ_k entropy(logits_fn(model, k, batch_k)): ``logits_fn`` receives the model with the merged
    parameters swapped in (``torch.func.functional_call``), the task index k and one batch of
    ``unlabeled[k]`` (batches taken in a seeded random order). After each step λ is clipped to
    [0, 1] as in the reference implementation. Floating buffers are merged with ``init_lam``
    (task arithmetic). The run is deterministic for a given ``seed`` (global RNG untouched).
    """
    _check_pool(pool)
    K = len(pool)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable (model, k, batch) -> logits, got {type(logits_fn).__name__}")
    if isinstance(unlabeled, (torch.Tensor, str)) or len(unlabeled) != K:
        raise ValueError(f"unlabeled must be a sequence of K = {K} sequences of batches (one per task), got "
                         f"{type(unlabeled).__name__}" + ("" if isinstance(unlabeled, (torch.Tensor, str))
                                                          else f" of length {len(unlabeled)}"))
    for i, b in enumerate(unlabeled):
        if isinstance(b, torch.Tensor) or len(b) == 0:
            raise ValueError(f"unlabeled[{i}] must be a non-empty sequence of batches (a list of inputs), got "
                             f"{'a Tensor' if isinstance(b, torch.Tensor) else 'an empty sequence'}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    lr = _check_number(lr, "lr")
    init_lam = _check_number(init_lam, "init_lam")

    model = copy.deepcopy(pool.pretrained)
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if is_float(p)]
    buffer_names = [n for n in pool.float_keys() if n not in set(names)]
    stacked: dict[str, torch.Tensor] = {}
    for k in range(K):  # (K, *shape) per parameter: AdaMerging needs every τ_{k,l} at once
        tv = pool.task_vector(k, names)
        for n in names:
            stacked.setdefault(n, []).append(tv[n])
        del tv
    stacked = {n: torch.stack(v) for n, v in stacked.items()}
    base = {n: p.detach() for n, p in model.named_parameters()}
    L = len(names)
    lam = torch.full((L, K), init_lam, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    wrapper = _Call(model, logits_fn)
    gen = torch.Generator().manual_seed(int(seed))
    orders = [torch.randperm(len(b), generator=gen).tolist() for b in unlabeled]
    pos = [0] * K

    def merged_params(coef: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, n in enumerate(names):
            tau = stacked[n]
            c = coef[i].to(tau.dtype).view(K, *([1] * (tau.dim() - 1)))
            out["model." + n] = base[n] + (c * tau).sum(0)
        return out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            params = merged_params(lam)
            loss = torch.zeros((), dtype=torch.float32)
            for k in range(K):
                batches = unlabeled[k]
                if pos[k] >= len(batches):
                    orders[k] = torch.randperm(len(batches), generator=gen).tolist()
                    pos[k] = 0
                batch = batches[orders[k][pos[k]]]
                pos[k] += 1
                logits = torch.func.functional_call(wrapper, params, (k, batch), strict=False)
                loss = loss + entropy(logits).float()
            loss.backward()
            opt.step()
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)

    coef = lam.detach().clone()
    with torch.no_grad():
        final = merged_params(coef)
        for n in names:
            model.get_parameter(n).copy_(final["model." + n])
        if buffer_names:
            sd = model.state_dict()
            total: dict[str, torch.Tensor] = {}
            for k in range(K):
                for n, t in pool.task_vector(k, buffer_names).items():
                    total[n] = t.clone() if n not in total else total[n] + t
            base_sd = pool.pretrained_state()
            for n, t in total.items():
                sd[n].copy_(base_sd[n] + init_lam * t)
    model.requires_grad_(True)
    for n, p in pool.pretrained.named_parameters():  # keep the pretrained model's requires_grad flags
        model.get_parameter(n).requires_grad_(p.requires_grad)
    model.train(was_training)
    return (model, coef) if return_coefficients else model
