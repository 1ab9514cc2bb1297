"""Layer-wise AdaMerging (Yang et al. 2024): θ_l = θ0_l + Σ_k λ_{l,k} τ_{k,l}, λ learned by minimising
Σ_k entropy(logits_fn(model, k, batch)) on unlabeled batches with Adam, through
``torch.func.functional_call``. Needs all K task vectors of the merged tensors at once (it
differentiates through them).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..pools import ModelPool, is_float
from .losses import entropy
from .merge_utils import LayerwiseMerge, check_number, check_pool
from .unlabeled import Unlabeled, as_batches


class _Call(nn.Module):
    """Wraps ``logits_fn(model, k, batch)`` as a module so ``functional_call`` can swap model's parameters."""

    def __init__(self, model: nn.Module, logits_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self._fn = logits_fn

    def forward(self, k: int, batch):
        return self._fn(self.model, k, batch)


def adamerging(pool: ModelPool, logits_fn: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
               unlabeled: Sequence[Unlabeled], *, steps: int = 100, lr: float = 1e-3,
               init_lam: float = 0.3, seed: int = 0, return_coefficients: bool = False,
               task_weights: Optional[Sequence[float]] = None, batch_size: int = 16
               ) -> Union[nn.Module, tuple[nn.Module, torch.Tensor]]:
    """Layer-wise AdaMerging (a new module; with ``return_coefficients`` also λ (L, K)).

    One coefficient λ_{l,k} per floating parameter tensor l (in ``named_parameters`` order) and
    task k, initialised to ``init_lam``, learned with Adam (``lr``, ``steps``) to minimise
    Σ_k entropy(logits_fn(model, k, batch_k)): ``logits_fn`` receives the model with the merged
    parameters swapped in (``torch.func.functional_call``), the task index k and one batch of
    ``unlabeled[k]`` (batches taken in a seeded random order). ``unlabeled[k]``: task k's inputs as the trainer
    takes them, one tensor (N, ...) — cut into batches of ``batch_size`` — or a list of batches
    (``methods.unlabeled``). As in the reference implementation,
    the merge uses clamp(λ, 0, 1) and Adam updates the raw λ (so a coefficient pushed past a bound
    stops receiving gradient but keeps its raw value); the returned coefficients are the clamped
    ones. One batch per task per step. ``task_weights`` (K non-negative numbers; None = all 1)
    weight each task's entropy, Σ_k w_k entropy_k (AdaMerging with preference; a task of weight 0 is
    not run). Floating buffers are merged with ``init_lam``
    (task arithmetic). The run is deterministic for a given ``seed`` (global RNG untouched).
    """
    check_pool(pool)
    K = len(pool)
    unlabeled, steps, lr, init_lam, task_weights = _checked_arguments(
        K, logits_fn, unlabeled, steps, lr, init_lam, task_weights, batch_size)

    model = copy.deepcopy(pool.pretrained)
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if is_float(p)]
    # (K, *shape) per parameter: AdaMerging needs every τ_{k,l} at once
    merge = LayerwiseMerge.from_pool(pool, names)
    lam = _fit_coefficients(merge, _Call(model, logits_fn), unlabeled, steps, lr, init_lam, task_weights, seed)
    coef = merge.coefficients(lam).clone()
    _write_merge(model, pool, merge, coef, names, init_lam)
    model.requires_grad_(True)
    for n, p in pool.pretrained.named_parameters():  # keep the pretrained model's requires_grad flags
        model.get_parameter(n).requires_grad_(p.requires_grad)
    model.train(was_training)
    return (model, coef) if return_coefficients else model


def _checked_arguments(K: int, logits_fn, unlabeled, steps, lr, init_lam, task_weights, batch_size):
    """Every argument check of ``adamerging`` (before any work); the unlabeled inputs as K lists of batches."""
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable (model, k, batch) -> logits, got {type(logits_fn).__name__}")
    if isinstance(unlabeled, (torch.Tensor, str)) or len(unlabeled) != K:
        raise ValueError(f"unlabeled must be a sequence of K = {K} input sets (one per task: a tensor or a list of "
                         f"batches), got {type(unlabeled).__name__}" + (
                             "" if isinstance(unlabeled, (torch.Tensor, str)) else f" of length {len(unlabeled)}"))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    unlabeled = [as_batches(b, i, batch_size) for i, b in enumerate(unlabeled)]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    lr = check_number(lr, "lr")
    init_lam = check_number(init_lam, "init_lam")
    if task_weights is not None:
        if isinstance(task_weights, (str, torch.Tensor)) or len(task_weights) != K:
            raise ValueError(f"task_weights must be K = {K} numbers, got {task_weights!r}")
        task_weights = [check_number(w, f"task_weights[{k}]") for k, w in enumerate(task_weights)]
        if any(w < 0 for w in task_weights) or not any(task_weights):
            raise ValueError(f"task_weights must be non-negative and not all 0, got {task_weights}")
    return unlabeled, steps, lr, init_lam, task_weights


def _merged_params(merge: LayerwiseMerge, coef: torch.Tensor) -> dict[str, torch.Tensor]:
    """The merged parameters under ``_Call``'s names ("model." + parameter name)."""
    return {"model." + n: t for n, t in merge.merged(coef).items()}


def _fit_coefficients(merge: LayerwiseMerge, wrapper: "_Call", unlabeled: list, steps: int, lr: float,
                      init_lam: float, task_weights: Optional[list], seed) -> torch.Tensor:
    """Raw λ (L, K) after ``steps`` Adam steps on Σ_k w_k entropy_k, one batch per task per step, each task's
    batches in seeded random orders reshuffled when used up (global RNG untouched)."""
    K = len(unlabeled)
    lam = torch.full((len(merge.names), K), init_lam, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    orders = [torch.randperm(len(b), generator=gen).tolist() for b in unlabeled]
    pos = [0] * K
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            params = _merged_params(merge, lam)
            loss = torch.zeros((), dtype=torch.float32)
            for k in range(K):
                batches = unlabeled[k]
                if pos[k] >= len(batches):
                    orders[k] = torch.randperm(len(batches), generator=gen).tolist()
                    pos[k] = 0
                batch = batches[orders[k][pos[k]]]
                pos[k] += 1
                if task_weights is not None and task_weights[k] == 0:
                    continue
                logits = torch.func.functional_call(wrapper, params, (k, batch), strict=False)
                h = entropy(logits).float()
                loss = loss + (h if task_weights is None else task_weights[k] * h)
            loss.backward()
            opt.step()
    return lam.detach()


def _write_merge(model: nn.Module, pool: ModelPool, merge: LayerwiseMerge, coef: torch.Tensor, names: list[str],
                 init_lam: float) -> None:
    """Write the merge at the (clamped) ``coef`` into ``model``'s parameters; floating buffers the
    parameters don't cover get task arithmetic at ``init_lam``."""
    buffer_names = [n for n in pool.float_keys() if n not in set(names)]
    with torch.no_grad():
        final = _merged_params(merge, coef)
        for n in names:
            model.get_parameter(n).copy_(final["model." + n])
        if buffer_names:
            sd = model.state_dict()
            total: dict[str, torch.Tensor] = {}
            for k in range(len(pool)):
                for n, t in pool.task_vector(k, buffer_names).items():
                    total[n] = t.clone() if n not in total else total[n] + t
            base_sd = pool.pretrained_state()
            for n, t in total.items():
                sd[n].copy_(base_sd[n] + init_lam * t)
