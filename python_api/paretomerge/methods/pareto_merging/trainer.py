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
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ...config import TrainerConfig
from ...io import atomic_write
from ...layers import convert, factored_weights, pareto_layers, pareto_parameters
from ..merge_utils import LayerwiseMerge
from .objectives import DataFreeObjective, Normalizer, entropy_objectives, factor_regularizer, scalarize

CHECKPOINT_FORMAT = "paretomerge-checkpoint-v1"


def convert_for_config(model: nn.Module, K: int, cfg: TrainerConfig) -> dict[str, int]:
    """Convert ``model`` in place as ``cfg`` says (rank per layer type); return {layer name: rank}."""
    ranks: dict[str, int] = {}
    if cfg.include in ("attention", "attention+mlp"):
        for n in convert(model, K, cfg.rank, include="attention", impl=cfg.impl):
            ranks[n] = cfg.rank
    if cfg.include in ("attention+mlp", "mlp"):
        r = cfg.rank_mlp or cfg.rank
        for n in convert(model, K, r, include="mlp", impl=cfg.impl):
            ranks[n] = r
    if cfg.include == "all":
        for n in convert(model, K, cfg.rank, include=None, impl=cfg.impl):
            ranks[n] = cfg.rank
    return ranks


def reconvert(model: nn.Module, K: int, layers: Mapping[str, int], impl: str = "auto") -> None:
    """Convert exactly the named layers with their ranks (rebuilding a checkpoint's architecture)."""
    for name, r in layers.items():
        convert(model, K, int(r), include=[name], impl=impl)


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> None:
    """torch.save to a temp file in the same directory, then os.replace (never a half-written file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a paretomerge checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def _unlabeled_tensor(data: Union[torch.Tensor, Sequence[torch.Tensor]], k: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, torch.Tensor) for b in data):
        return torch.cat(list(data), 0)
    raise TypeError(f"unlabeled[{k}] must be a tensor of inputs or a list of input batches")


class ParetoMergingTrainer:
    """Trains Pareto Merging's tensors on a base-merged model.

    model: the base merge (architecture of ``pool.pretrained``); converted in place unless it already
        has Pareto layers (then used as is; their K must equal len(pool)).
    pool: a ``ModelPool`` (needs ``finetuned_state(k)``, ``len``) — for the data-free mode — or None
        with ``finetuned=`` a list of K state dicts.
    logits_fn(model, k, x) -> logits, and unlabeled[k] (inputs of task k: a tensor or a list of
        batches): needed in mode "unlabeled".
    meta: anything JSON-like to store in checkpoints (e.g. how to rebuild the architecture).
    """

    def __init__(self, model: nn.Module, pool=None, config: Optional[TrainerConfig] = None, *,
                 finetuned: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
                 logits_fn: Optional[Callable] = None,
                 unlabeled: Optional[Sequence[Union[torch.Tensor, Sequence[torch.Tensor]]]] = None,
                 task_names: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> None:
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
        existing = list(pareto_layers(model))
        if existing:
            self.layers = {n: int(m.rank) for n, m in existing}
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.layers = convert_for_config(model, self.K, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = list(pareto_parameters(model))
        for p in self.params:
            p.requires_grad_(True)
        self.device = self.params[0].device
        self.meta = dict(meta or {})

        self.datafree: Optional[DataFreeObjective] = None
        if (cfg.mode == "datafree" or cfg.anchor) and pool is None and finetuned is None:
            raise ValueError("trainer.anchor > 0 needs pool= or finetuned= (the fine-tuned weights); set "
                             "anchor: 0 to train on unlabeled data alone")
        if cfg.adamerging and pool is None:
            raise ValueError("trainer.adamerging needs pool= (pretrained weights and task vectors)")
        if cfg.mode == "datafree" or cfg.anchor:
            if finetuned is None:
                # Only the converted layers' weights, one tensor at a time, dense or low-rank as the pool holds
                # them: with a file-backed pool the K models are never all in memory.
                self.datafree = DataFreeObjective.from_pool(model, pool, impl=cfg.objective_impl)
            else:
                self.datafree = DataFreeObjective(model, finetuned, impl=cfg.objective_impl)
        if cfg.mode == "unlabeled":
            if logits_fn is None or unlabeled is None:
                raise ValueError("mode 'unlabeled' needs logits_fn= and unlabeled= (inputs of every task)")
            if len(unlabeled) != self.K:
                raise ValueError(f"unlabeled must hold K = {self.K} input sets, got {len(unlabeled)}")
            self.logits_fn = logits_fn
            self.unlabeled = [_unlabeled_tensor(u, k) for k, u in enumerate(unlabeled)]
        self.normalizer = Normalizer(self.K, cfg.normalize).to(self.device)
        self.anchor_normalizer = Normalizer(self.K, "init").to(self.device)
        self.ideal = None if cfg.ideal is None else torch.tensor(cfg.ideal, dtype=torch.float32, device=self.device)
        groups = [{"params": self.params}]
        self.lam: Optional[torch.Tensor] = None
        if cfg.adamerging:
            self._setup_adamerging(pool)
            groups.append({"params": [self.lam], "lr": cfg.adamerging_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []

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

    def _forward_model(self) -> nn.Module:
        if self.lam is None:
            return self.model
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
            out.append(x[idx].to(self.device))
        return out

    def objectives(self, pref: torch.Tensor, batches: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Raw (unnormalised) objectives: (K,) for pref (K,); (B, K) for per-sample pref (B, K)."""
        if self.cfg.mode == "datafree":
            return self._datafree(pref)
        return entropy_objectives(self._forward_model(), self.logits_fn,
                                  batches if batches is not None else self._batches(), pref,
                                  diversity=self.cfg.diversity)

    def _datafree(self, pref: torch.Tensor) -> torch.Tensor:
        if pref.dim() == 1:
            return self.datafree(pref)
        return torch.stack([self.datafree(p) for p in pref])

    @torch.no_grad()
    def _fit_normalizer(self) -> None:
        if bool(self.normalizer.initialized):
            return
        if self.datafree is not None:
            self.anchor_normalizer.fit(self.datafree.delta_norms())
        if self.cfg.mode == "datafree":
            f0 = self.datafree.delta_norms()  # U M Vᵀ = 0 at init: f_k = Σ ‖D_k‖²
        else:
            # The base merge's objectives on the first (up to) 256 inputs of each task: no RNG used.
            uniform = torch.full((self.K,), 1.0 / self.K, device=self.device)
            f0 = entropy_objectives(self._forward_model(), self.logits_fn, [x[:256].to(self.device) for x in self.unlabeled],
                                    uniform, diversity=self.cfg.diversity)
        self.normalizer.fit(f0)

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's (loss, normalised objectives averaged over the step's preferences)."""
        cfg = self.cfg
        if cfg.per_sample:
            pref = self._sample_pref(cfg.batch_size)
        else:
            pref = self._sample_pref(None)
        batches = None if cfg.mode == "datafree" else self._batches()
        f = self.normalizer(self.objectives(pref, batches))
        if cfg.mode == "unlabeled" and cfg.anchor:
            f = f + cfg.anchor * self.anchor_normalizer(self._datafree(pref))
        scal = scalarize(f, pref, cfg.scalarization, mu=cfg.mu, ideal=self.ideal)
        loss = scal.mean()
        if cfg.reg_frobenius or cfg.reg_orthogonal:
            loss = loss + factor_regularizer(self.model, cfg.reg_frobenius, cfg.reg_orthogonal)
        return loss, (f.detach() if f.dim() == 1 else f.detach().mean(0))

    # ------------------------------------------------------------------ loop
    def train(self, resume: Union[None, str, Path] = None, steps: Optional[int] = None) -> nn.Module:
        """Run until ``steps`` (default cfg.steps) total steps; ``resume`` a checkpoint path first."""
        if resume is not None:
            self.load_state(load_checkpoint(resume, map_location=self.device))
        total = self.cfg.steps if steps is None else steps
        self._fit_normalizer()
        was_training = self.model.training
        self.model.eval()  # no dropout: deterministic objectives
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"pareto-merging ({self.cfg.mode})", leave=False)
        try:
            while self.step < total:
                self.optimizer.zero_grad(set_to_none=True)
                loss, f = self.loss()
                loss.backward()
                self.optimizer.step()
                if self.lam is not None:
                    with torch.no_grad():
                        self.lam.clamp_(0.0, 1.0)  # as AdaMerging's reference implementation
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
        finally:
            if bar is not None:
                bar.close()
            self.bake_adamerging()
            self.model.train(was_training)
        return self.model

    # ------------------------------------------------------------------ state
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
            "layers": dict(self.layers),
            "num_objectives": self.K,
            "task_names": list(self.task_names),
            "meta": self.meta,
            "adamerging_lambda": None if self.lam is None else self.lam.detach().clone(),
        }

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        atomic_torch_save(self.state(), path)

    def _checkpoint(self, directory: Path) -> None:
        """stepNNNNNN.pt, and last.pt as a byte copy of it (the state is serialised once)."""
        path = directory / f"step{self.step:06d}.pt"
        self.save_checkpoint(path)
        atomic_write(directory / "last.pt", lambda tmp: shutil.copyfile(path, tmp))

    def load_state(self, ckpt: Mapping) -> None:
        if dict(ckpt["layers"]) != self.layers:
            raise ValueError(f"checkpoint layers {ckpt['layers']} do not match the model's {self.layers}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.lam is not None:
            with torch.no_grad():
                self.lam.copy_(ckpt["adamerging_lambda"])
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
