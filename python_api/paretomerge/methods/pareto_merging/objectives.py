"""Objectives of Pareto Merging and their scalarisation.

Two families of per-task objectives f = (f_1, …, f_K), both minimised:

* **data-free** (:class:`DataFreeObjective`): the squared distance, summed
  over every converted layer, between the preference-conditioned merged
  weight and fine-tuned model k's weight,

      f_k(γ) = Σ_layers ‖W(γ) − W_k‖²_F.

  With W(γ) = W_base + U M(γ) Vᵀ (the base merge plus the low-rank tensor
  update, M(γ) = Σ_k γ_k G[:, :, k]) and D_k = W_k − W_base,

      W(γ) − W_k = U M(γ) Vᵀ − D_k,

  which is exactly what ``pmkernels.weight_distances(U, G, V, γ, deltas)``
  computes in factored form (‖UMVᵀ‖² − 2⟨M, Uᵀ D_k V⟩ + ‖D_k‖², only r×r
  temporaries). The deltas D_k are prepared once per layer, from the pool's
  fine-tuned weights and the frozen base weight held by the converted
  model. A ``ParetoMultiheadAttention`` contributes two layers: its packed
  ``in_proj`` (3E×E) and its ``out_proj``. When the pool holds a layer's
  task vectors low-rank (LoRA adapters, compressed task vectors),
  ``DataFreeObjective.from_pool`` keeps D_k = A_k B_kᵀ factored and the layer
  uses ``pmkernels.low_rank_distances`` (O(K (out+in) r R) per step).

* **unlabeled data** (:func:`entropy_objectives`): f_k = the mean
  prediction entropy of task k's head on an unlabeled batch of task k
  (AdaMerging's surrogate; ``methods.losses.entropy``).

Scalarisation (:func:`scalarize`): smooth Tchebycheff

      STCH_μ(f | γ) = μ · log Σ_k exp(γ_k (f_k − z_k) / μ)

(→ max_k γ_k (f_k − z_k) as μ → 0; ≥ it always, by at most μ log K),
Tchebycheff (hard max) max_k γ_k (f_k − z_k), or linear Σ_k γ_k (f_k − z_k)
(``TrainerConfig.scalarization``: "stch" | "tch" | "linear"). The ideal point z defaults to 0 (both
objective families are ≥ 0 and reach 0 only at their own optimum).

Normalisation (:class:`Normalizer`): tasks' objectives live on different
scales (one task vector can be far larger than another), so by default each
f_k is divided by its value at initialisation (the base merge, where
U M Vᵀ = 0): f̃_k = f_k / f_k(init). Every task then starts at 1 and γ
trades relative improvements, which is what a user's preference means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Sequence

import torch
import torch.nn as nn

import pmkernels
from pmkernels import check_pref_values

from ...config import SCALARIZATIONS  # the one list of choices
from ...layers import factored_weights, transposed_keys, use_preference
from ..losses import masked_entropy, mean_prediction, mean_prediction_gap, per_sample_entropy



# ----------------------------------------------------------------------------- scalarisation
def stch(f: torch.Tensor, pref: torch.Tensor, mu: float = 0.1, ideal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Smooth Tchebycheff μ · logsumexp_k(γ_k (f_k − z_k) / μ).

    f (..., K) objectives, pref (..., K) (broadcast against f), ideal z (K,)
    or None (= 0). Returns shape f.shape[:-1].
    """
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    z = 0.0 if ideal is None else ideal
    return mu * torch.logsumexp(pref * (f - z) / mu, dim=-1)


def linear_scalarization(f: torch.Tensor, pref: torch.Tensor, ideal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_k γ_k (f_k − z_k)."""
    z = 0.0 if ideal is None else ideal
    return (pref * (f - z)).sum(-1)


def tch(f: torch.Tensor, pref: torch.Tensor, ideal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tchebycheff max_k γ_k (f_k − z_k) (hard max: its gradient flows to the worst weighted task only)."""
    z = 0.0 if ideal is None else ideal
    return (pref * (f - z)).amax(-1)


def scalarize(f: torch.Tensor, pref: torch.Tensor, method: str = "stch", *, mu: float = 0.1,
              ideal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scalarise objectives f (..., K) under preference(s) pref (..., K): "stch", "tch" or "linear"."""
    if method == "stch":
        return stch(f, pref, mu, ideal)
    if method == "tch":
        return tch(f, pref, ideal)
    if method == "linear":
        return linear_scalarization(f, pref, ideal)
    raise ValueError(f"scalarization must be one of {SCALARIZATIONS}, got {method!r}")


class Normalizer(nn.Module):
    """f̃_k = f_k / s_k with s_k fixed at initialisation (``mode="init"``) or 1 (``mode="none"``).

    The scales are a buffer, so they travel with checkpoints.
    """

    def __init__(self, K: int, mode: str = "init", eps: float = 1e-12) -> None:
        super().__init__()
        if mode not in ("init", "none"):
            raise ValueError(f"normalize must be 'init' or 'none', got {mode!r}")
        self.mode, self.eps = mode, eps
        self.register_buffer("scale", torch.ones(K))
        self.register_buffer("initialized", torch.tensor(mode == "none"))

    @torch.no_grad()
    def fit(self, f_init: torch.Tensor) -> None:
        if self.mode == "init":
            self.scale.copy_(f_init.detach().float().clamp_min(self.eps))
        self.initialized.fill_(True)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            raise RuntimeError("Normalizer used before fit(f_init)")
        return f / self.scale.to(f.device)


# ----------------------------------------------------------------------------- data-free
@dataclass
class _LayerTerm:
    name: str                     # the weight's state-dict key in the converted model
    U: nn.Parameter
    G: nn.Parameter
    V: nn.Parameter
    deltas: Optional[list[torch.Tensor]]   # K tensors D_k = W_k − W_base (out, in), no grad; or None when
    A: Optional[list[torch.Tensor]] = None  # factored: D_k = A_k B_kᵀ, A_k (out, R_k), B_k (in, R_k)
    B: Optional[list[torch.Tensor]] = None
    delta_sq: Optional[torch.Tensor] = None  # (K,) ‖A_k B_kᵀ‖², computed once


class DataFreeObjective(nn.Module):
    """f_k(γ) = Σ_layers ‖W(γ) − W_k‖²_F for every task k, via ``pmkernels.weight_distances``.

    Built once from a converted model and the fine-tuned weights:
    ``finetuned[k]`` maps state-dict keys of the *unconverted* architecture
    (e.g. ``transformer.resblocks.0.attn.in_proj_weight``) to task k's
    tensors (``ModelPool.finetuned_state(k)`` or any mapping). The deltas
    D_k = W_k − W_base are computed here, once, from the converted model's
    (frozen) base weights, and kept in ``delta_dtype`` (default: the
    weight's dtype). Call ``objective(pref)`` with pref (K,) → (K,).
    ``impl`` is passed to ``weight_distances`` ("auto"/"torch"/"naive").
    ``keys``: only these factored weights (a rank's shard in distributed training; ``finetuned`` then
    needs only their tensors); None = all.
    """

    def __init__(self, model: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], *, impl: str = "auto",
                 delta_dtype: Optional[torch.dtype] = None, keys: Optional[Collection[str]] = None) -> None:
        super().__init__()
        slots = [s for s in factored_weights(model) if keys is None or s[0] in keys]
        if not slots:
            raise ValueError("DataFreeObjective: the model has no Pareto layers (convert it first)")
        self.K = len(finetuned)
        self.impl = impl
        self.terms: list[_LayerTerm] = []
        transposed = transposed_keys(model)  # GPT-2 Conv1D: stored (in, out), the factors are (out, in)
        for key, U, G, V, W in slots:
            if G.shape[-1] != self.K:
                raise ValueError(f"layer {key}: G has K = {G.shape[-1]} objectives but {self.K} fine-tuned "
                                 f"models were given")
            deltas = []
            for k, sd in enumerate(finetuned):
                if key not in sd:
                    raise KeyError(f"fine-tuned model {k} has no tensor {key!r} (needed for the data-free "
                                   f"objective of a converted layer)")
                wk = sd[key].t() if key in transposed else sd[key]
                if wk.dim() == 4 and wk.shape[2:] == (1, 1) and wk.shape[:2] == W.shape:
                    wk = wk.flatten(1)  # a pointwise conv's (out, in, 1, 1) weight, factored as (out, in)
                if wk.shape != W.shape:
                    raise ValueError(f"fine-tuned model {k}: {key} has shape {tuple(wk.shape)}, the base has "
                                     f"{tuple(W.shape)}")
                d = wk.detach().to(W.device, torch.float32) - W.detach().float()
                deltas.append(d.to(delta_dtype or W.dtype).contiguous())
            self.terms.append(_LayerTerm(key, U, G, V, deltas))

    @classmethod
    def from_pool(cls, model: nn.Module, pool, *, impl: str = "auto", delta_dtype: Optional[torch.dtype] = None,
                  keys: Optional[Collection[str]] = None) -> "DataFreeObjective":
        """Built from a pool, layer by layer: per converted weight, the pool's ``data_free_deltas`` gives K
        dense deltas or K low-rank factor pairs (LoRA / compressed pools), and the layer's term uses
        ``pmkernels.weight_distances`` or ``pmkernels.low_rank_distances`` accordingly. Tensors are read one at
        a time. ``base_errors[key]``: relative error of the factored form of W_base − W_0 (0 when exact).
        A pool without ``data_free_deltas`` is read through ``finetuned_state``. ``keys``: only these
        factored weights (a rank's shard in distributed training).
        """
        slots = [s for s in factored_weights(model) if keys is None or s[0] in keys]
        if not hasattr(pool, "data_free_deltas"):
            names = [key for key, *_ in slots]
            return cls(model, [pool.finetuned_state(k, names) for k in range(len(pool))], impl=impl,
                       delta_dtype=delta_dtype, keys=keys)
        transposed = transposed_keys(model)  # GPT-2 Conv1D: stored (in, out), the factors are (out, in)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        if not slots:
            raise ValueError("DataFreeObjective: the model has no Pareto layers (convert it first)")
        obj.K, obj.impl, obj.terms, obj.base_errors = len(pool), impl, [], {}
        for key, U, G, V, W in slots:
            if G.shape[-1] != obj.K:
                raise ValueError(f"layer {key}: G has K = {G.shape[-1]} objectives but the pool has {obj.K} tasks")
            if key in transposed:  # the pool holds the stored (in, out) orientation
                stored, obj.base_errors[key] = pool.data_free_deltas(key, W.t())
                deltas = [d.t() if isinstance(d, torch.Tensor) else type(d)(d.B, d.A) for d in stored]
            else:
                deltas, obj.base_errors[key] = pool.data_free_deltas(key, W)
            dt = delta_dtype or W.dtype
            if all(isinstance(d, torch.Tensor) for d in deltas):
                obj.terms.append(_LayerTerm(key, U, G, V, [d.to(dt).contiguous() for d in deltas]))
                continue
            A = [d.A.to(W.device) for d in deltas]
            B = [d.B.to(W.device) for d in deltas]
            delta_sq = pmkernels.low_rank_delta_sq(A, B)  # in fp32 before any cast of the factors
            obj.terms.append(_LayerTerm(key, U, G, V, None, [a.to(dt).contiguous() for a in A],
                                        [b.to(dt).contiguous() for b in B], delta_sq))
        return obj

    @property
    def layer_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def per_layer(self, pref: torch.Tensor) -> torch.Tensor:
        """(num_layers, K) objectives of each factored weight."""
        check_pref_values(pref)  # once here, not once per layer (each check syncs with the device)
        rows = []
        for t in self.terms:
            p = pref.to(device=t.U.device, dtype=torch.float32)
            if t.deltas is None:
                rows.append(pmkernels.low_rank_distances(t.U, t.G, t.V, p, t.A, t.B, delta_sq=t.delta_sq,
                                                         check_values=False))
            else:
                rows.append(pmkernels.weight_distances(t.U, t.G, t.V, p, t.deltas, impl=self.impl,
                                                       check_values=False))
        return torch.stack(rows)

    def forward(self, pref: torch.Tensor) -> torch.Tensor:
        """(K,) Σ_layers ‖W(γ) − W_k‖²_F for one preference γ (K,)."""
        return self.per_layer(pref).sum(0)

    def delta_norms(self) -> torch.Tensor:
        """(K,) Σ_layers ‖D_k‖²_F: the objectives at init (U M Vᵀ = 0)."""
        return torch.stack([t.delta_sq.float() if t.deltas is None else
                            torch.stack([d.float().pow(2).sum() for d in t.deltas]) for t in self.terms]).sum(0)


# ----------------------------------------------------------------------------- unlabeled data
LogitsFn = Callable[[nn.Module, int, torch.Tensor], torch.Tensor]


def entropy_objectives(model: nn.Module, logits_fn: LogitsFn, batches: Sequence[torch.Tensor],
                       pref: torch.Tensor, diversity: float = 0.0,
                       batch_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Entropy objectives of the merged model at preference(s) ``pref``.

    batches[k]: an unlabeled input batch of task k; ``logits_fn(model, k, x)``
    runs the (converted) model and task k's head. pref (K,): one preference
    for every batch, returns f (K,) with f_k = mean entropy on task k
    (``losses.entropy``). pref (B, K): per-sample preferences, row j used by
    sample j of every task's batch (all batches must hold B samples); returns
    (B, K), entry (j, k) the entropy of task k's sample j under γ_j, so row j
    is an objective vector for γ_j.

    logits_fn may also return (logits (B, L, C), mask (B, L)): a causal LM's next-token predictions and the
    positions that count (padding masked; ``paretomerge.llm.causal_lm_logits_fn``); f_k is then the mean
    entropy over the masked positions (per sample: over each sample's own).

    diversity > 0 adds diversity · (log C − H(p̄)) to f_k, p̄ the batch's mean prediction (the
    information-maximisation term of SHOT/IM): a free low-rank update otherwise minimises entropy by
    predicting one class for every input. It is a batch statistic: with per-sample preferences it is
    computed over task k's whole batch and added to every row.

    batch_mean: for a batch split over processes in equal shards (``batches`` then hold this process's
    shard): maps a 1-D tensor of means over the shard to the means over the whole batch (the trainer passes
    the mean over ranks, one all-reduce, identity backward). Every batch statistic goes through it in one
    call: the mean entropies (the masked entropy's sums of entropy and of positions), and p̄; per-sample
    entropies are the shard's own. None: the batches are whole.
    """
    per_sample = pref.dim() == 2
    if per_sample:
        for k, x in enumerate(batches):
            if x.shape[0] != pref.shape[0]:
                raise ValueError(f"per-sample preferences: batch of task {k} has {x.shape[0]} samples, pref has "
                                 f"{pref.shape[0]} rows")
    entropies, stats = [], []  # stats[k]: task k's batch statistics, means over the (shard of the) batch
    with use_preference(pref):
        for k, x in enumerate(batches):
            logits, mask = _logits_mask(logits_fn(model, k, x), diversity)
            if per_sample:
                entropies.append(per_sample_entropy(logits) if mask is None
                                 else masked_entropy(logits, mask, per_sample=True))
                parts = []
            elif mask is None:
                parts = [per_sample_entropy(logits).mean().reshape(1)]
            else:  # Σ H·mask / B and Σ mask / B: their ratio is the mean entropy over the masked positions
                w = mask.to(torch.float32)
                parts = [torch.stack([(per_sample_entropy(logits) * w).sum(), w.sum()]) / mask.shape[0]]
            if diversity:
                parts.append(mean_prediction(logits).reshape(-1))
            stats.append((parts, logits.shape[-1]))
    sizes = [[t.numel() for t in parts] for parts, _ in stats]
    if any(sizes):  # one call (one all-reduce when distributed) for every task's statistics
        flat = torch.cat([t for parts, _ in stats for t in parts])
        means = iter((flat if batch_mean is None else batch_mean(flat)).split(sum(sizes, [])))
    cols = []
    for k, (parts, C) in enumerate(stats):
        got = [next(means) for _ in parts]
        if per_sample:
            f = entropies[k]
        elif got[0].numel() == 1:
            f = got[0][0]
        else:  # a batch without a masked position gives 0, as masked_entropy
            f = got[0][0] / got[0][1].clamp_min(torch.finfo(torch.float32).tiny)
        if diversity:
            f = f + diversity * mean_prediction_gap(got[-1].view(-1, C))
        cols.append(f)
    return torch.stack(cols, dim=-1)


def _logits_mask(out, diversity: float):
    """A logits_fn's result as (logits, mask or None)."""
    if isinstance(out, tuple):
        logits, mask = out
        if diversity:
            raise ValueError("diversity applies to (N, C) classifier logits, not to masked token logits; set "
                             "diversity: 0 for causal LMs")
        return logits, mask
    return out, None


# ----------------------------------------------------------------------------- regularisation
def factor_regularizer(model: nn.Module, frobenius: float = 0.0, orthogonal: float = 0.0,
                       keys: Optional[Collection[str]] = None) -> torch.Tensor:
    """frobenius · Σ (‖U‖² + ‖G‖² + ‖V‖²) + orthogonal · Σ (‖UᵀU − diag(UᵀU)‖² + ‖VᵀV − I‖²).

    The orthogonality term of U only penalises off-diagonal Gram entries
    (U starts at 0, so pushing UᵀU to I would force an update at init);
    V is pushed to orthonormal columns. Sums run over every factored weight (or those named in ``keys``).
    """
    total = None
    for key, U, G, V, _W in factored_weights(model):
        if keys is not None and key not in keys:
            continue
        term = U.new_zeros(())
        if frobenius:
            term = term + frobenius * (U.pow(2).sum() + G.pow(2).sum() + V.pow(2).sum())
        if orthogonal:
            gu = U.t() @ U
            gv = V.t() @ V
            eye = torch.eye(gv.shape[0], device=V.device, dtype=V.dtype)
            term = term + orthogonal * ((gu - torch.diag(torch.diagonal(gu))).pow(2).sum() + (gv - eye).pow(2).sum())
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
