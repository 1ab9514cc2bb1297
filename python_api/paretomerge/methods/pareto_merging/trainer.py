"""Training the preference-conditioned tensors of Pareto Merging.

    model = task_arithmetic(pool)                       # the base merge
    cfg = TrainerConfig(mode="datafree", steps=200)
    trainer = ParetoMergingTrainer(model, pool, cfg)    # converts ``model`` in place
    trainer.train()                                     # or train(resume="ckpt.pt")
    with paretomerge.use_preference([0.4, 0.2, 0.2, 0.2]):
        y = model(x)

Each step draws γ ~ Dirichlet(α·1) (or one γ per sample, ``per_sample=True``),
computes the K objectives (data-free weight distances, or entropies of each
task's head on an unlabeled batch of that task), normalises them, scalarises
them (smooth Tchebycheff by default), adds the factor regulariser and takes an
Adam step on ``paretomerge.pareto_parameters(model)`` (U, G, V of every Pareto
layer; the base weights stay frozen).

Determinism: one ``torch.Generator`` (seeded with ``seed``) draws every γ
and every batch index; the converted factors are initialised under
``torch.manual_seed(seed)``. Checkpoints (``checkpoint_every`` > 0) are
written atomically (temp file + ``os.replace``) and hold the full converted
model state, the optimizer state, the generator's and torch's RNG states,
the normalisation scales and the step; ``train(resume=path)`` continues
bit-for-bit where the checkpoint stopped.

Safety: a checkpoint records the run's identity (:meth:`ParetoMergingTrainer.run_identity`: the
config minus progress/checkpoint/impl fields, K, task names, converted layers and ranks, ``meta`` and
the caller's ``identity``, e.g. the pool's files) and its hash; resuming a checkpoint of another run is a
:class:`RunMismatchError` naming the differing fields. A non-finite loss or parameter stops training with
a :class:`NonFiniteTrainingError` before anything is written.

Distributed (``dist=`` a :class:`paretomerge.distributed.DistContext`, see docs/distributed.md): in
the data-free mode the converted weights are sharded over ranks, each rank holds only its shard's
deltas and steps only its shard's parameters; in the unlabeled mode each rank takes a 1/world_size
slice of every batch (and of per-sample γ), every batch statistic is all-reduced to the whole batch's and
gradients are averaged, so a step equals the single-process one. Checkpoints are world-size independent
(rank 0 gathers the shards and alone writes them); ranks that resume different states fail together.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ...config import TrainerConfig
from ...distributed import (DistContext, DistributedSetupError, average_gradients, mean_across_ranks, shard_layers,
                            sum_across_ranks)
from ...io import atomic_write
from ...layers import convert, factored_weights, pareto_layers, pareto_parameters
from ..merge_utils import LayerwiseMerge
from ..unlabeled import Unlabeled, as_tensor
from .objectives import DataFreeObjective, Normalizer, entropy_objectives, factor_regularizer, scalarize
from .structures import apply_structure

CHECKPOINT_FORMAT = "paretomerge-checkpoint-v1"

# TrainerConfig fields that say how far or how a run goes, not what it computes: changing them keeps
# a checkpoint resumable (steps extends a run; impl/objective_impl choose kernels for the same maths).
NOT_RUN_DEFINING = ("steps", "checkpoint_every", "checkpoint_dir", "progress", "impl", "objective_impl")


class NonFiniteTrainingError(FloatingPointError):
    """The loss or a trained parameter became NaN/Inf; training stopped before writing anything."""


class RunMismatchError(ValueError):
    """A checkpoint (or another rank) belongs to a different run: its identity differs from this run's."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def identity_hash(identity: Mapping) -> str:
    """sha256 of the identity's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def identity_differences(old: Mapping, new: Mapping, limit: int = 6) -> str:
    """'field: old -> new' for the first ``limit`` differing dotted fields."""
    a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    diffs = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def convert_for_config(model: nn.Module, K: int, cfg: TrainerConfig) -> dict[str, int]:
    """Convert ``model`` in place as ``cfg`` says (rank per layer type); return {layer name: rank}."""
    ranks: dict[str, int] = {}
    if cfg.include in ("attention", "attention+mlp", "qkv", "qkv+mlp"):
        attn = "qkv" if cfg.include.startswith("qkv") else "attention"
        for n in convert(model, K, cfg.rank, include=attn, impl=cfg.impl):
            ranks[n] = cfg.rank
    if cfg.include in ("attention+mlp", "qkv+mlp", "mlp"):
        r = cfg.rank_mlp or cfg.rank
        for n in convert(model, K, r, include="mlp", impl=cfg.impl):
            ranks[n] = r
    if cfg.include == "all":
        for n in convert(model, K, cfg.rank, include=None, impl=cfg.impl):
            ranks[n] = cfg.rank
    return ranks


def reconvert(model: nn.Module, K: int, layers: Mapping[str, int], impl: str = "auto", *,
              attention_out_proj: bool = True) -> None:
    """Convert exactly the named layers with their ranks (rebuilding a checkpoint's architecture);
    ``attention_out_proj`` as the checkpoint's ``include`` implies (False for the "qkv" presets)."""
    for name, r in layers.items():
        convert(model, K, int(r), include=[name], impl=impl, attention_out_proj=attention_out_proj)


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temp file in the same directory, then os.replace (never a half-written file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """A trainer checkpoint (``torch.load(weights_only=True)``); ValueError naming the file if it is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such checkpoint file: {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a weights-only pickle
        raise ValueError(f"{path} is not a readable paretomerge checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a paretomerge checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


class ParetoMergingTrainer:
    """Trains Pareto Merging's tensors on a base-merged model.

    model: the base merge (architecture of ``pool.pretrained``); converted in place unless it already
        has Pareto layers (then used as is; their K must equal len(pool)).
    pool: a ``ModelPool`` (needs ``finetuned_state(k)``, ``len``) — for the data-free mode — or None
        with ``finetuned=`` a list of K state dicts.
    logits_fn(model, k, x) -> logits, and unlabeled[k] (inputs of task k: a tensor or a list of
        batches): needed in mode "unlabeled". With AdaMerging's coefficients in play (``adamerging``
        "before" or "joint"), ``model`` is a wrapper whose forward runs the model with the λ-merged
        weights: logits_fn must compute through ``model(...)``; one that reaches into submodules (e.g.
        runs cached top layers itself) needs ``adamerging="off"``.
    meta: anything JSON-like to store in checkpoints (e.g. how to rebuild the architecture); part of
        the run's identity.
    identity: anything JSON-like that further defines the run (e.g. the pool's file names, sizes and
        mtimes; ``program.run_merge`` passes them); part of the run's identity.
    dist: a ``DistContext`` for multi-process training (None or world size 1 = one process).
    """

    def __init__(self, model: nn.Module, pool=None, config: Optional[TrainerConfig] = None, *,
                 finetuned: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
                 logits_fn: Optional[Callable] = None,
                 unlabeled: Optional[Sequence[Unlabeled]] = None,
                 task_names: Optional[Sequence[str]] = None, meta: Optional[dict] = None,
                 identity: Optional[dict] = None, dist: Optional[DistContext] = None) -> None:
        self.cfg = (config or TrainerConfig()).validate()
        cfg = self.cfg
        if pool is None and finetuned is None and cfg.mode == "datafree":
            raise ValueError("mode 'datafree' needs pool= or finetuned= (the fine-tuned weights)")
        self.K = len(pool) if pool is not None else len(finetuned if finetuned is not None else unlabeled)
        self.task_names = list(task_names or getattr(pool, "task_names", None) or
                               [f"task{k}" for k in range(self.K)])
        if cfg.ideal is not None and len(cfg.ideal) != self.K:
            raise ValueError(f"trainer.ideal: must have K = {self.K} entries, got {len(cfg.ideal)}")
        self.model = model
        self._convert_and_freeze(model)
        self.meta = dict(meta or {})
        self.identity = dict(identity or {})
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self._shard(model)
        self._nonfinite: Optional[str] = None  # a parameter found non-finite after a step (distributed: deferred)
        self._objectives(model, pool, finetuned, logits_fn, unlabeled)
        self._optimizer(model, pool)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        if self.dist is not None:
            self._check_same_run_on_every_rank()

    # ------------------------------------------------------------------ construction steps
    def _convert_and_freeze(self, model: nn.Module) -> None:
        """Convert the model (seeded) unless it has Pareto layers; only the Pareto factors train."""
        existing = list(pareto_layers(model))
        if existing:
            self.layers = {n: int(m.rank) for n, m in existing}
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self.layers = convert_for_config(model, self.K, self.cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = list(pareto_parameters(model))
        for p in self.params:
            p.requires_grad_(True)
        self.device = self.params[0].device

    def _shard(self, model: nn.Module) -> None:
        """Several processes: the factored weights this rank owns in the data-free mode (``shard_keys``;
        None = all), the global batch's split in the unlabeled mode; ``_own_named``: this rank's factors."""
        cfg = self.cfg
        self.shard_keys: Optional[set[str]] = None
        if self.dist is not None and cfg.mode == "datafree":
            slots = factored_weights(model)
            owner = shard_layers([W.numel() for *_, W in slots], self.dist.world_size)
            self.shard_keys = {s[0] for s, o in zip(slots, owner) if o == self.dist.rank}
        if self.dist is not None and cfg.mode == "unlabeled":
            if cfg.batch_size % self.dist.world_size:
                raise ValueError(f"trainer.batch_size ({cfg.batch_size}, the global batch per task) must be a "
                                 f"multiple of the number of processes ({self.dist.world_size})")
        own = {id(p) for key, U, G, V, _ in factored_weights(model)
               if self.shard_keys is None or key in self.shard_keys for p in (U, G, V)}
        self._own_named = [(n, p) for n, p in model.named_parameters() if id(p) in own]

    def _objectives(self, model: nn.Module, pool, finetuned, logits_fn, unlabeled) -> None:
        """The data-free objective (mode "datafree", or the anchor), the unlabeled inputs, the AdaMerging
        variant, and the normalisers."""
        cfg = self.cfg
        self.datafree: Optional[DataFreeObjective] = None
        if (cfg.mode == "datafree" or cfg.anchor) and pool is None and finetuned is None:
            raise ValueError("trainer.anchor > 0 needs pool= or finetuned= (the fine-tuned weights); set "
                             "anchor: 0 to train on unlabeled data alone")
        # "auto": AdaMerging + PM (λ before the tensor) where it can be built, the model's own base otherwise
        self.adamerging = cfg.adamerging if cfg.adamerging != "auto" else (
            "before" if cfg.mode == "unlabeled" and pool is not None else "off")
        if self.adamerging != "off" and pool is None:
            raise ValueError("trainer.adamerging needs pool= (pretrained weights and task vectors)")
        # the entropy term's weight (None = auto: 0 on AdaMerging's λ fit first with an anchor to train the tensor,
        # where entropy on the tensor measured worse than the anchor alone, docs/design.md §6; else 1)
        self.entropy = 0.0 if cfg.mode != "unlabeled" else (
            cfg.entropy if cfg.entropy is not None else (0.0 if self.adamerging == "before" and cfg.anchor else 1.0))
        self._pool = pool
        self.adamerging_fitted = self.adamerging != "before"  # "before": λ is fit once, at the start of train()
        if cfg.mode == "datafree" or cfg.anchor:
            if finetuned is None:
                # Only the converted layers' weights (this rank's shard), one tensor at a time, dense or low-rank
                # as the pool holds them: with a file-backed pool the K models are never all in memory.
                self.datafree = DataFreeObjective.from_pool(model, pool, impl=cfg.objective_impl,
                                                            keys=self.shard_keys)
            else:
                self.datafree = DataFreeObjective(model, finetuned, impl=cfg.objective_impl, keys=self.shard_keys)
        if cfg.mode == "unlabeled":
            if logits_fn is None or unlabeled is None:
                raise ValueError("mode 'unlabeled' needs logits_fn= and unlabeled= (inputs of every task)")
            if len(unlabeled) != self.K:
                raise ValueError(f"unlabeled must hold K = {self.K} input sets, got {len(unlabeled)}")
            self.logits_fn = logits_fn
            self.unlabeled = [as_tensor(u, k) for k, u in enumerate(unlabeled)]
        self.normalizer = Normalizer(self.K, cfg.normalize).to(self.device)
        self.anchor_normalizer = Normalizer(self.K, "init").to(self.device)
        self.ideal = None if cfg.ideal is None else torch.tensor(cfg.ideal, dtype=torch.float32, device=self.device)

    def _optimizer(self, model: nn.Module, pool) -> None:
        """Adam over the factors (and λ in the joint AdaMerging variant); the structure's constraints."""
        cfg = self.cfg
        groups = [{"params": self.params}]
        self.lam: Optional[torch.Tensor] = None
        if self.adamerging != "off":
            self._setup_adamerging(pool)
        if self.adamerging == "joint":
            groups.append({"params": [self.lam], "lr": cfg.adamerging_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # structure variants: constrained cores G (projection + masked gradients; "tensor" leaves G free)
        self.structure = apply_structure(model, cfg.structure, self.optimizer)

    # ------------------------------------------------------------------ identity
    def run_identity(self) -> dict:
        """Everything that defines the run (JSON-like); a checkpoint resumes only into an equal identity."""
        return {"trainer": {k: v for k, v in self.cfg.model_dump().items() if k not in NOT_RUN_DEFINING},
                "num_objectives": self.K, "task_names": list(self.task_names), "layers": dict(self.layers),
                "meta": self.meta, "identity": self.identity}

    def run_hash(self) -> str:
        return identity_hash(self.run_identity())

    def _check_same_run_on_every_rank(self) -> None:
        mine = self.run_identity()
        idents = self.dist.all_objects(mine)
        bad = [r for r, i in enumerate(idents) if identity_hash(i) != identity_hash(idents[0])]
        if bad:
            raise RunMismatchError(f"the processes disagree on the run (config, pool or model): rank {bad[0]} "
                                   f"differs from rank 0 in {identity_differences(idents[0], idents[bad[0]])}")

    # ------------------------------------------------------------------ joint AdaMerging
    def _setup_adamerging(self, pool) -> None:
        factors = {id(p) for p in self.params}
        own = dict(self.model.named_parameters())
        pre = pool.pretrained_state()
        names = [n for n, p in own.items() if id(p) not in factors and p.is_floating_point() and n in pre]
        self.lam_merge = LayerwiseMerge.from_pool(pool, names, device=self.device)
        self.lam = torch.full((len(names), self.K), float(self.cfg.adamerging_init), device=self.device,
                              requires_grad=True)

    def _merged_base(self) -> dict[str, torch.Tensor]:
        return self.lam_merge.merged(self.lam)

    @torch.no_grad()
    def bake_adamerging(self) -> None:
        """Copy θ_0 + Σ_k λ τ_k into the model's own base weights."""
        if self.lam is None:
            return
        own = dict(self.model.named_parameters())
        for n, v in self._merged_base().items():
            own[n].copy_(v)

    def _fit_adamerging_first(self) -> None:
        """The "before" variant: AdaMerging itself (λ by Σ_k entropy_k, Adam at ``adamerging_lr``, one batch
        per task per step, the tensor still 0), then λ frozen and baked into the base weights, and the anchor's
        deltas re-taken from that base. Batches come from the trainer's generator (deterministic)."""
        if self.adamerging_fitted:
            return
        cfg = self.cfg
        opt = torch.optim.Adam([self.lam], lr=cfg.adamerging_lr)
        uniform = torch.full((self.K,), 1.0 / self.K, device=self.device)
        for _ in range(cfg.adamerging_steps):
            opt.zero_grad(set_to_none=True)
            h = entropy_objectives(self._forward_model(), self.logits_fn, self._batches(), uniform)
            if self.dist is not None:
                h = mean_across_ranks(h, self.dist.world_size)
            loss = h.sum()
            if not bool(torch.isfinite(loss)):
                self._raise_nonfinite(f"the AdaMerging loss is {float(loss.detach())}", 0)
            loss.backward()
            if self.dist is not None:
                average_gradients([self.lam], self.dist.world_size)
            opt.step()
        self.lam.requires_grad_(False)
        self.adamerging_fitted = True
        self.bake_adamerging()
        if self.datafree is not None:  # the anchor: distances from the AdaMerging base, not the initial one
            self.datafree = DataFreeObjective.from_pool(self.model, self._pool, impl=cfg.objective_impl,
                                                        keys=self.shard_keys)
            norms = self.datafree.delta_norms()
            self.anchor_normalizer.fit(sum_across_ranks(norms) if self.shard_keys is not None else norms)

    def _forward_model(self) -> nn.Module:
        if self.lam is None or (self.adamerging == "before" and self.adamerging_fitted):
            return self.model  # λ frozen and baked
        return _FunctionalBase(self.model, self._merged_base())

    # ------------------------------------------------------------------ objectives
    def _sample_pref(self, n: Optional[int]) -> torch.Tensor:
        conc = torch.full((n or 1, self.K), float(self.cfg.alpha), dtype=torch.float64)
        p = torch._sample_dirichlet(conc, generator=self.generator).float()
        p = p / p.sum(-1, keepdim=True)
        return (p if n else p[0]).to(self.device)

    def _batches(self) -> list[torch.Tensor]:
        out = []
        for x in self.unlabeled:
            idx = torch.randint(0, x.shape[0], (self.cfg.batch_size,), generator=self.generator)
            if self.dist is not None:
                # Every rank draws the same global batch and keeps its strided slice (as DistributedSampler).
                idx = idx[self.dist.rank::self.dist.world_size]
            out.append(x[idx].to(self.device))
        return out

    def objectives(self, pref: torch.Tensor, batches: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Raw (unnormalised) objectives: (K,) for pref (K,); (B, K) for per-sample pref (B, K).

        Distributed unlabeled mode: ``batches`` are this rank's shards (and a per-sample ``pref`` holds their
        rows); every batch statistic (mean entropies, mean predictions) is the whole batch's (one all-reduce).
        """
        if self.cfg.mode == "datafree":
            return self._datafree(pref)
        batch_mean = None
        if self.dist is not None:  # means over this rank's shard -> the whole batch's (equal shards)
            # Per-sample γ: each rank's loss is the mean over its own rows, so the gradient of a batch statistic
            # is the mean of the ranks' gradients (a second all-reduce, in the backward).
            batch_mean = functools.partial(mean_across_ranks, world_size=self.dist.world_size,
                                           same_loss=pref.dim() == 1)
        return entropy_objectives(self._forward_model(), self.logits_fn,
                                  batches if batches is not None else self._batches(), pref,
                                  diversity=self.cfg.diversity, batch_mean=batch_mean)

    def _datafree(self, pref: torch.Tensor) -> torch.Tensor:
        if pref.dim() == 1:
            return self.datafree(pref)
        return torch.stack([self.datafree(p) for p in pref])

    @torch.no_grad()
    def _fit_normalizer(self) -> None:
        if bool(self.normalizer.initialized):
            return
        norms = None
        if self.datafree is not None:
            norms = self.datafree.delta_norms()
            if self.shard_keys is not None:
                norms = sum_across_ranks(norms)
            self.anchor_normalizer.fit(norms)
        if self.cfg.mode == "datafree":
            f0 = norms  # U M Vᵀ = 0 at init: f_k = Σ ‖D_k‖²
        elif not self.entropy:
            f0 = torch.ones(self.K, device=self.device)  # no entropy term: nothing to normalise
        else:
            # The base merge's objectives on the first (up to) 256 inputs of each task, in chunks of the training
            # batch size, averaged: the diversity term is a batch statistic whose value grows as the batch shrinks
            # (log C − H(p̄) of a few samples stays > 0), so it is normalised at the size it is trained at. No RNG.
            uniform = torch.full((self.K,), 1.0 / self.K, device=self.device)
            bs = self.cfg.batch_size
            chunks = max(1, min(256, *(x.shape[0] for x in self.unlabeled)) // bs)
            model = self._forward_model()  # the joint variant merges its λ base here: once, not per chunk
            f0 = torch.stack([entropy_objectives(
                model, self.logits_fn, [x[j * bs:(j + 1) * bs].to(self.device) for x in self.unlabeled],
                uniform, diversity=self.cfg.diversity) for j in range(chunks)]).mean(0)
        self.normalizer.fit(f0)

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's (loss, normalised objectives averaged over the step's preferences)."""
        cfg = self.cfg
        if cfg.per_sample:
            pref = self._sample_pref(cfg.batch_size)
        else:
            pref = self._sample_pref(None)
        entropy = self.entropy > 0  # 0 in the data-free mode
        batches = self._batches() if entropy else None
        # Distributed unlabeled, per sample: this rank's samples are the rows idx[rank::world_size] of the
        # global batch (``_batches``), so it takes those rows of γ.
        split_rows = cfg.per_sample and self.dist is not None and batches is not None
        if split_rows:
            pref = pref[self.dist.rank::self.dist.world_size]
        # entropy 0 (unlabeled mode): the tensor trains on the anchor alone, no forward pass
        raw = self.objectives(pref, batches) if cfg.mode == "datafree" or entropy else None
        reg = None
        if cfg.reg_frobenius or cfg.reg_orthogonal:
            reg = factor_regularizer(self.model, cfg.reg_frobenius, cfg.reg_orthogonal, keys=self.shard_keys)
        if self.shard_keys is not None:
            # Partial f (and regulariser) of this rank's layers -> the full ones, in one all-reduce.
            parts = torch.cat([raw.reshape(-1)] + ([reg.reshape(1)] if reg is not None else []))
            total = sum_across_ranks(parts)
            raw, reg = total[:raw.numel()].view_as(raw), (total[-1] if reg is not None else None)
        f = self.normalizer(raw) if raw is not None else 0.0
        if entropy:
            f = self.entropy * f
        if cfg.mode == "unlabeled" and cfg.anchor:
            f = f + cfg.anchor * self.anchor_normalizer(self._datafree(pref))
        scal = scalarize(f, pref, cfg.scalarization, mu=cfg.mu, ideal=self.ideal)
        loss = scal.mean()
        if reg is not None:
            loss = loss + reg
        f_mean = f.detach() if f.dim() == 1 else f.detach().mean(0)
        if split_rows:
            # Each rank's loss is the mean over its own rows (its gradient, averaged over ranks, is the whole
            # batch's); the loss and f reported (and checked for finiteness) are the whole batch's, on every rank.
            whole = mean_across_ranks(torch.cat([loss.detach().reshape(1), f_mean]), self.dist.world_size)
            loss, f_mean = loss + (whole[0] - loss.detach()), whole[1:]
        return loss, f_mean

    # ------------------------------------------------------------------ non-finite guard
    def _first_nonfinite_parameter(self) -> Optional[str]:
        params = [p for _, p in self._own_named] + ([self.lam] if self.lam is not None else [])
        if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one sync per step
            return None
        return next((n for n, p in self._own_named if not bool(torch.isfinite(p).all())), "adamerging_lambda")

    def _raise_nonfinite(self, what: str, step: int) -> None:
        where = f" (parameter {self._nonfinite!r})" if self._nonfinite else ""
        raise NonFiniteTrainingError(
            f"training stopped at step {step}: {what}{where}; no checkpoint was written for it. "
            f"Lower trainer.lr, or check the pool's weights and the data for NaN/Inf")

    def _check_parameters_finite(self) -> None:
        """Collective in distributed runs: every rank raises if a parameter is non-finite on some rank."""
        bad = self._nonfinite is not None
        if self.dist is not None:
            bad = self.dist.any_flag(bad)
        if bad:
            self._raise_nonfinite("a trained parameter is NaN/Inf", self.step)

    # ------------------------------------------------------------------ loop
    def train(self, resume: Union[None, str, Path] = None, steps: Optional[int] = None) -> nn.Module:
        """Run until ``steps`` (default cfg.steps) total steps; ``resume`` a checkpoint path first."""
        self._resume(resume)
        total = self.cfg.steps if steps is None else steps
        self._fit_adamerging_first()
        self._fit_normalizer()
        was_training = self.model.training
        self.model.eval()  # no dropout: deterministic objectives
        bar = None
        if self.cfg.progress and (self.dist is None or self.dist.is_main):
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"pareto-merging ({self.cfg.mode})", leave=False)
        try:
            while self.step < total:
                self.optimizer.zero_grad(set_to_none=True)
                loss, f = self.loss()
                if not bool(torch.isfinite(loss)):
                    self._raise_nonfinite(f"the loss is {float(loss.detach())}", self.step + 1)
                loss.backward()
                if self.dist is not None and self.shard_keys is None:
                    average_gradients(self.params + ([self.lam] if self.adamerging == "joint" else []),
                                      self.dist.world_size)
                self.optimizer.step()
                self._nonfinite = self._nonfinite or self._first_nonfinite_parameter()
                if self._nonfinite is not None and self.dist is None:
                    self._raise_nonfinite("a trained parameter is NaN/Inf", self.step + 1)
                self.step += 1
                rec = {"step": self.step, "loss": float(loss.detach())}
                rec.update({f"f_{n}": float(v) for n, v in zip(self.task_names, f)})
                self.history.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{rec['loss']:.3f}",
                                     **{n[:8]: f"{float(v):.3f}" for n, v in zip(self.task_names, f)}})
                if self.cfg.checkpoint_dir and ((self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every
                                                 == 0) or self.step == total):
                    self._checkpoint(Path(self.cfg.checkpoint_dir))
            if self.dist is not None:
                self._check_parameters_finite()
        finally:
            if bar is not None:
                bar.close()
            self.bake_adamerging()
            self.model.train(was_training)
        return self.model

    # ------------------------------------------------------------------ state
    def _resume(self, resume: Union[None, str, Path]) -> None:
        """Load ``resume`` if given. Distributed: collective; every rank must be at the same step and have
        loaded the same state (or none): ranks resuming different checkpoints (node-local output directories,
        one with a checkpoint and one without) would otherwise wait for each other in different collectives
        until the timeout. A rank failing to load fails every rank."""
        error, loaded = None, None
        try:
            if resume is not None:
                self.load_state(load_checkpoint(resume, map_location=self.device))
                loaded = self._state_fingerprint() if self.dist is not None else None
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            if self.dist is None:
                raise
            error = e
        if self.dist is None:
            return
        self.dist.raise_if_any(error)
        states = self.dist.all_objects({"checkpoint": None if resume is None else str(resume), "step": self.step,
                                        "state": loaded})
        bad = [r for r, st in enumerate(states) if (st["step"], st["state"]) != (states[0]["step"], states[0]["state"])]
        if bad:
            def where(r: int) -> str:
                ck = states[r]["checkpoint"]
                return (f"rank {r} resumes {ck!r} at step {states[r]['step']}" if ck is not None
                        else f"rank {r} starts at step {states[r]['step']} (no checkpoint)")
            raise DistributedSetupError(
                f"the processes resume from different states: {where(0)}, {where(bad[0])}; every rank must see the "
                f"same checkpoint (one shared output directory), or remove the checkpoints on every node")

    def _state_fingerprint(self) -> str:
        """sha256 of the step, the trained tensors (U, G, V, λ) and the γ/batch generator's state (just after
        loading a checkpoint every rank holds all of them)."""
        h = hashlib.sha256(str(self.step).encode())
        for t in self.params + ([self.lam] if self.lam is not None else []) + [self.generator.get_state()]:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def state(self) -> dict:
        self.bake_adamerging()
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
            "normalizer": {k: v.clone() for k, v in self.normalizer.state_dict().items()},
            "anchor_normalizer": {k: v.clone() for k, v in self.anchor_normalizer.state_dict().items()},
            "config": self.cfg.model_dump(),
            "run_identity": self.run_identity(),
            "run_hash": self.run_hash(),
            "layers": dict(self.layers),
            "num_objectives": self.K,
            "task_names": list(self.task_names),
            "meta": self.meta,
            "adamerging_lambda": None if self.lam is None else self.lam.detach().clone(),
            "adamerging_fitted": self.adamerging_fitted,
        }

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Write the full state atomically (distributed: collective; rank 0 writes, then all wait)."""
        self._write_checkpoint(lambda: atomic_torch_save(self.state(), path))

    def _checkpoint(self, directory: Path) -> None:
        """stepNNNNNN.pt, and last.pt as a byte copy of it (the state is serialised once)."""
        path = directory / f"step{self.step:06d}.pt"

        def write() -> None:
            atomic_torch_save(self.state(), path)
            atomic_write(directory / "last.pt", lambda tmp: shutil.copyfile(path, tmp))

        self._write_checkpoint(write)

    def _write_checkpoint(self, write: Callable[[], None]) -> None:
        if self.dist is not None:
            self._check_parameters_finite()
        elif self._nonfinite is not None:
            self._raise_nonfinite("a trained parameter is NaN/Inf", self.step)
        if self.shard_keys is not None:
            self._gather_shards_on_main()
        if self.dist is None or self.dist.is_main:
            write()
        if self.dist is not None:
            self.dist.barrier()  # nobody goes on (or exits) before the file is in place

    @torch.no_grad()
    def _gather_shards_on_main(self) -> None:
        """Collective: rank 0's model and optimizer get every rank's own parameters and their Adam state, so
        its ``state()`` is exactly the single-process state (world-size independent)."""
        own = {id(p) for _, p in self._own_named}
        payload = {i: (p.detach().cpu(), {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                          for k, v in self.optimizer.state.get(p, {}).items()})
                   for i, p in enumerate(self.params) if id(p) in own}
        gathered = self.dist.gather_to_main(payload)
        if gathered is None:
            return
        for r, part in enumerate(gathered):
            if r == self.dist.rank:
                continue
            for i, (value, opt_state) in part.items():
                p = self.params[i]
                p.copy_(value.to(p.device))
                self.optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() else v)
                                           for k, v in opt_state.items()}

    def load_state(self, ckpt: Mapping) -> None:
        """Restore a checkpoint of this run (RunMismatchError when it belongs to another run)."""
        if "run_identity" not in ckpt:
            raise RunMismatchError("the checkpoint records no run identity (written by an older paretomerge): "
                                   "cannot tell whether it belongs to this run; start fresh")
        if identity_hash(ckpt["run_identity"]) != self.run_hash():
            raise RunMismatchError("the checkpoint belongs to a different run: "
                                   + identity_differences(ckpt["run_identity"], self.run_identity())
                                   + " (checkpoint -> this run); start fresh to discard it")
        if dict(ckpt["layers"]) != self.layers:
            raise ValueError(f"checkpoint layers {ckpt['layers']} do not match the model's {self.layers}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.lam is not None:
            with torch.no_grad():
                self.lam.copy_(ckpt["adamerging_lambda"])
            if self.adamerging == "before" and ckpt.get("adamerging_fitted", False) and not self.adamerging_fitted:
                # λ was fit and baked before this checkpoint: the loaded model weights hold it
                self.lam.requires_grad_(False)
                self.adamerging_fitted = True
                if self.datafree is not None:
                    self.datafree = DataFreeObjective.from_pool(self.model, self._pool,
                                                                impl=self.cfg.objective_impl, keys=self.shard_keys)
        self.normalizer.load_state_dict(ckpt["normalizer"])
        self.anchor_normalizer.load_state_dict(ckpt["anchor_normalizer"])
        self.step = int(ckpt["step"])


class _FunctionalBase(nn.Module):
    """Calls ``model`` with some of its parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = model
        self._params = params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self._params, args, kwargs, strict=False)


def train_pareto_merging(model: nn.Module, pool=None, config: Optional[TrainerConfig] = None, **kw) -> nn.Module:
    """Functional form: convert ``model`` (the base merge) and train it; returns the same module."""
    resume = kw.pop("resume", None)
    return ParetoMergingTrainer(model, pool, config, **kw).train(resume=resume)
