"""FusionBench method: ``ParetoMergingAlgorithm`` (Pareto Merging on a FusionBench model pool).

In code::

    from paretomerge.integrations.fusion_bench import ParetoMergingAlgorithm
    algo = ParetoMergingAlgorithm(base_method="task_arithmetic", base_options={"lam": 0.3},
                                  rank=8, include="attention", steps=200, preference=[0.7, 0.3])
    merged = algo.run(modelpool)         # a plain nn.Module with W(γ) baked in

From the ``fusion_bench`` CLI, with the configs shipped in this package (run it from a directory
without a ``config/`` folder: FusionBench would use that one instead of its own)::

    fusion_bench hydra.searchpath=[pkg://paretomerge.integrations.fusion_bench_config] \\
        method=pareto_merging modelpool=pareto_merging_example taskpool=dummy \\
        modelpool.models._pretrained_=/path/pre modelpool.models.math=/path/math ... \\
        merged_model_save_path=merged

Model pools are taken as they are and never modified: ``BaseModelPool`` (instances or configs; an
instance is read by reference), ``CausalLMPool`` eager or lazy (``enable_lazy_loading: true``: the
fine-tuned weights are read tensor by tensor from the ``LazyStateDict``), and any pool whose models are
local Hugging Face directories with safetensors (read lazily from the files, never loaded whole).
A plain ``{name: nn.Module}`` mapping is wrapped in a ``BaseModelPool`` as FusionBench's own methods do.
Only one fine-tuned model is ever held in memory unless the pool itself holds instances.

``ParetoMergingCLIPAlgorithm`` is the paper's own setting on a ``CLIPVisionModelPool``: AdaMerging + PM on the
test sets' unlabeled inputs with FusionBench's zero-shot heads. The recipe over FusionBench's TA8 pools
(CLIP ViT-B/32, 8 tasks; FusionBench downloads models and datasets)::

    PM_CONFIGS=$(python -c "import paretomerge.integrations.fusion_bench_config as c; print(c.__path__[0])")
    fusion_bench --config-dir "$PM_CONFIGS" --config-name pareto_merging_clip_vit_b32_ta8
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

try:
    from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
    from fusion_bench.mixins import CLIPClassificationMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("paretomerge.integrations.fusion_bench needs FusionBench: pip install "
                      "'pmkernels[fusionbench]' (fusion-bench==0.2.33)") from e

from ..config import BaseConfig, TrainerConfig, plain_data
from ..layers import export, set_preference, single_preference
from ..methods import merge_base
from ..methods.pareto_merging import ParetoMergingTrainer
from ..pools import ModelPool
from ..pools.sources import LoaderSource, ModuleSource, Source, hf_safetensors_source, hub_kernels_off
from .factors import save_factors

__all__ = ["RETURNS", "MappingSource", "ParetoMergingAlgorithm", "ParetoMergingCLIPAlgorithm",
           "clip_task_pool_compat", "pool_from_fusion_bench"]

RETURNS = ("exported", "pareto")
PRETRAINED = "_pretrained_"


class MappingSource(Source):
    """A lazy ``Mapping[str, Tensor]`` (FusionBench's ``LazyStateDict``) as a weight source: tensors are read
    when asked for. ``aliases`` maps a tied key to the key it shares storage with (read instead: a
    ``LazyStateDict`` lists tied copies it does not store)."""

    def __init__(self, mapping: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                 aliases: Mapping[str, str]) -> None:
        self.mapping, self._shapes, self.aliases = mapping, dict(shapes), dict(aliases)
        missing = [k for k in self._shapes if self.aliases.get(k, k) not in mapping]
        if missing:
            raise KeyError(f"the lazy state dict has no tensor for {missing[:5]} (nor a tied alias)")

    def keys(self):
        return list(self._shapes)

    def shapes(self):
        return dict(self._shapes)

    def get(self, names=None):
        names = list(self._shapes) if names is None else list(names)
        return {n: self.mapping[self.aliases.get(n, n)] for n in names}


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """{key: first key with the same tensor} for state-dict keys that share storage (tied weights)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        ident = (v.data_ptr(), tuple(v.shape), v.dtype) if v.device.type != "meta" else (id(v),)
        if ident in first:
            aliases[k] = first[ident]
        else:
            first[ident] = k
    return aliases


def _is_lazy_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and not isinstance(obj, nn.Module) and hasattr(obj, "meta_module")


@torch.no_grad()
def _materialize(lazy) -> nn.Module:
    """A real module from a ``LazyStateDict`` (its meta module, weights read from the files)."""
    meta = getattr(lazy, "meta_module", None)
    if meta is None:
        raise TypeError("the pool returned a lazy state dict without a meta_module: cannot build the model")
    model = copy.deepcopy(meta).to_empty(device=getattr(lazy, "_device", "cpu"))
    if hasattr(model, "tie_weights"):  # to_empty gives tied parameters separate storage: tie them again
        model.tie_weights()
    aliases = _tied_aliases(model)
    sd = {k: lazy[k] for k in lazy.keys() if k not in aliases}  # a tied copy may be listed but not stored
    res = model.load_state_dict(sd, strict=False)
    if res.unexpected_keys:
        raise ValueError(f"the lazy state dict has keys the model does not: {res.unexpected_keys[:5]}")
    missing = [k for k in res.missing_keys if k not in aliases]
    if missing:
        raise ValueError(f"the lazy state dict misses {missing[:5]}")
    return model.eval()


def _local_dir(modelpool, name: str) -> Optional[Path]:
    try:
        p = modelpool.get_model_path(name)
    except Exception:  # not a path-configured model
        return None
    return Path(p) if isinstance(p, str) and Path(p).is_dir() else None


def _load(modelpool, name: str):
    """``modelpool.load_model(name)`` with transformers' hub kernels off (no downloads; the lazy
    ``CausalLMPool`` builds on the meta device, which ``kernelize`` rejects)."""
    with hub_kernels_off():
        return modelpool.load_model(name)


def pool_from_fusion_bench(modelpool) -> ModelPool:
    """A ``paretomerge.ModelPool`` over a FusionBench model pool (or a ``{name: nn.Module}`` mapping with
    ``_pretrained_``), reading the fine-tuned weights lazily where the pool allows; nothing is modified."""
    if isinstance(modelpool, Mapping):
        modelpool = BaseModelPool(dict(modelpool))
    if not isinstance(modelpool, BaseModelPool):
        raise TypeError(f"modelpool must be a fusion_bench BaseModelPool or a mapping of name -> nn.Module, "
                        f"got {type(modelpool).__name__}")
    if not modelpool.has_pretrained:
        raise ValueError(f"modelpool has no '{PRETRAINED}' model (Pareto Merging merges task vectors "
                         f"from a pretrained model); models are {modelpool.all_model_names}")
    names = list(modelpool.model_names)
    if not names:
        raise ValueError("modelpool has no fine-tuned models")
    pre = _load(modelpool, PRETRAINED)
    if _is_lazy_state_dict(pre):
        pre = _materialize(pre)
    if not isinstance(pre, nn.Module):
        raise TypeError(f"modelpool.load_model('{PRETRAINED}') returned {type(pre).__name__}, not an nn.Module")
    ref = {k: tuple(v.shape) for k, v in pre.state_dict().items()}
    aliases = _tied_aliases(pre)
    sources: list[Source] = []
    for name in names:
        held = modelpool._models[name] if hasattr(modelpool, "_models") else None
        if isinstance(held, nn.Module):  # an instance the pool holds: read it by reference
            sources.append(ModuleSource(held))
            continue
        d = _local_dir(modelpool, name)
        lazy = hf_safetensors_source(d, ref) if d is not None else None
        if lazy is not None:  # the directory's safetensors are exactly the model's state dict
            sources.append(lazy)
            continue
        obj = _load(modelpool, name)
        if _is_lazy_state_dict(obj) or (isinstance(obj, Mapping) and not isinstance(obj, nn.Module)):
            sources.append(MappingSource(obj, ref, aliases))
        elif isinstance(obj, nn.Module):  # instantiated on each load: keep only the last one in memory
            shapes = {k: tuple(v.shape) for k, v in obj.state_dict().items()}
            del obj
            sources.append(LoaderSource(
                (lambda n=name: {k: v.detach() for k, v in _load(modelpool, n).state_dict().items()}),
                shapes))
        else:
            raise TypeError(f"modelpool.load_model({name!r}) returned {type(obj).__name__}, "
                            f"not an nn.Module or a state dict")
    return ModelPool(pre, names, sources)


@auto_register_config
class ParetoMergingAlgorithm(BaseAlgorithm):
    """Pareto Merging (Chen & Kwok, ICML 2025) as a FusionBench method.

    base_method / base_options: the base merge ("task_arithmetic" {lam}, "ties" {k, lam, scope},
        "pretrained"), as ``paretomerge`` configs' ``base`` section.
    mode: "datafree" (weight-space objectives; what works on any pool) or "unlabeled" (entropy of
        each task's head: set ``algo.logits_fn(model, k, x)`` and ``algo.unlabeled`` (K input tensors)
        in code before ``run``, or use ``ParetoMergingCLIPAlgorithm``, which builds both from a CLIP pool,
        or override ``unlabeled_data``); it is the paper's AdaMerging + PM: AdaMerging's layer-wise λ are learned
        first on ``unlabeled`` and frozen, then the tensor (``trainer_options.adamerging``: "auto" =
        "before" | "joint" | "off" = the base merge alone).
    rank, include, steps: as ``TrainerConfig``; ``trainer_options``: any other ``TrainerConfig`` field.
    returns: "exported" (default): a plain model with W(γ) baked in for γ = ``preference`` (default
        1/K each); "pareto": the Pareto model itself (evaluate it under ``paretomerge.use_preference``),
        with ``preference``, when given, set as the process-wide default (``set_preference``).
    factors_path: also write the trained factors there (``paretomerge-mergekit`` reads them).
    All arguments accept Hydra's ListConfig/DictConfig. After ``run``: ``task_names``, ``history``.
    """

    # the algorithm's own options that are TrainerConfig fields (``trainer_options`` may not repeat them)
    TRAINER_FIELDS: tuple[str, ...] = ("mode", "rank", "include", "steps")

    def __init__(self, base_method: str = "task_arithmetic", base_options: Optional[Mapping[str, Any]] = None,
                 mode: str = "datafree", rank: int = 8, include: str = "attention", steps: int = 200,
                 trainer_options: Optional[Mapping[str, Any]] = None, returns: str = "exported",
                 preference: Optional[Sequence[float]] = None, factors_path: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Checked now, before any model is loaded.
        self._base = BaseConfig(method=base_method, **plain_data(base_options or {}))
        opts = plain_data(trainer_options or {})
        own = {f: getattr(self, f) for f in self.TRAINER_FIELDS}  # set from the arguments by auto_register_config
        for fixed in own:
            if fixed in opts:
                raise ValueError(f"trainer_options.{fixed}: set it as the algorithm's own option {fixed}=")
        self._trainer_cfg = TrainerConfig(**{**opts, **own})
        if returns not in RETURNS:
            raise ValueError(f"returns must be one of {RETURNS}, got {returns!r}")
        self._pref = None if preference is None else single_preference(plain_data(preference), name="preference")
        self.logits_fn: Optional[Callable] = None
        self.unlabeled: Optional[Sequence[torch.Tensor]] = None
        self.task_names: list[str] = []
        self.history: list[dict] = []

    def base_merge(self, pool: ModelPool) -> nn.Module:
        return merge_base(self._base, pool)

    def unlabeled_data(self, modelpool, task_names: Sequence[str]) -> tuple[Callable, Sequence]:
        """Mode "unlabeled": ``(logits_fn(model, k, x), unlabeled)`` (task k's inputs: a tensor or a list of
        batches) for the trainer; here the ones set in code (``algo.logits_fn``, ``algo.unlabeled``)."""
        if self.logits_fn is None or self.unlabeled is None:
            raise ValueError("mode 'unlabeled' needs algo.logits_fn(model, k, x) and algo.unlabeled (K input "
                             "tensors) set before run(); use mode 'datafree' on a pool without data")
        return self.logits_fn, self.unlabeled

    def run(self, modelpool) -> nn.Module:
        pool = pool_from_fusion_bench(modelpool)
        K = len(pool)
        if self._pref is not None and self._pref.shape[0] != K:
            raise ValueError(f"preference has {self._pref.shape[0]} entries but the pool has K = {K} models "
                             f"{pool.task_names}")
        logits_fn, unlabeled = (self.unlabeled_data(modelpool, pool.task_names)
                                if self._trainer_cfg.mode == "unlabeled" else (None, None))
        model = self.base_merge(pool)
        trainer = ParetoMergingTrainer(model, pool, copy.deepcopy(self._trainer_cfg), logits_fn=logits_fn,
                                       unlabeled=unlabeled, meta={"base": self._base.method})
        trainer.train()
        self.task_names, self.history = list(pool.task_names), list(trainer.history)
        if self.factors_path:
            save_factors(model, self.factors_path, base=self._base.model_dump(), task_names=pool.task_names)
        pool.release()
        if self.returns == "pareto":
            if self._pref is not None:
                set_preference(self._pref)
            return model
        pref = self._pref if self._pref is not None else torch.full((K,), 1.0 / K, dtype=torch.float64)
        return export(model, pref)


def clip_task_pool_compat() -> None:
    """Let FusionBench 0.2.33's CLIP task pools import under transformers >= 5: they import
    ``CLIPVisionTransformer`` from ``transformers.models.clip.modeling_clip``, which transformers 5 removed
    (``CLIPVisionModel`` holds its layers itself). Where the name is missing, it is set to ``CLIPVisionModel``:
    ``CLIPVisionModelTaskPool`` uses it in type hints and in one ``isinstance`` (of its layer-wise feature
    saving, off by default) only. Called by ``ParetoMergingCLIPAlgorithm()``, which FusionBench's program
    builds before the task pool; a no-op where transformers still has the class."""
    from transformers import CLIPVisionModel
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        modeling_clip.CLIPVisionTransformer = CLIPVisionModel


@auto_register_config
class ParetoMergingCLIPAlgorithm(CLIPClassificationMixin, ParetoMergingAlgorithm):
    """Pareto Merging on a FusionBench ``CLIPVisionModelPool``: the paper's own setting (CLIP image encoders,
    zero-shot heads), by default its headline variant AdaMerging + PM on unlabeled test inputs.

    mode: "unlabeled" (default): FusionBench's ``CLIPClassificationMixin`` builds the zero-shot head of every
        task from the pool's pretrained ``CLIPModel`` and processor (``setup_zero_shot_classification_head``)
        and serves shuffled batches of each task's test set without labels (``get_shuffled_test_loader_iter``);
        the logits are the mixin's ``compute_logits``. With ``trainer_options.adamerging`` "auto" (the
        default) AdaMerging's layer-wise λ are learned first on those inputs (entropy), then the tensor.
        "datafree": as ``ParetoMergingAlgorithm`` (no heads, no data).
    batch_size: inputs per task per step (AdaMerging's and the tensor's) and the test loader's batch size.
    unlabeled_batches: batches drawn once per task from the shuffled test loader and held on the CPU; the
        trainer samples its batches from these ``unlabeled_batches * batch_size`` inputs per task.
    num_workers: the test loader's worker processes.
    Every other option is ``ParetoMergingAlgorithm``'s. The pool's test datasets are keyed by task name (as
    FusionBench's CLIP pools are); the model trains on the Fabric's device (``fabric.accelerator``).
    Constructing it applies ``clip_task_pool_compat`` (FusionBench's CLIP task pool under transformers 5).
    """

    TRAINER_FIELDS = ParetoMergingAlgorithm.TRAINER_FIELDS + ("batch_size",)

    def __init__(self, mode: str = "unlabeled", batch_size: int = 16, unlabeled_batches: int = 32,
                 num_workers: int = 0, **kwargs: Any) -> None:
        for name, value, least in (("unlabeled_batches", unlabeled_batches, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        super().__init__(mode=mode, **kwargs)
        self.zeroshot_weights = {}  # the mixin's default is one dict shared by every instance
        clip_task_pool_compat()  # the recipe's task pool (CLIPVisionModelTaskPool) is built after the method

    def base_merge(self, pool: ModelPool) -> nn.Module:
        return super().base_merge(pool).to(self.fabric.device)

    def unlabeled_data(self, modelpool, task_names: Sequence[str]) -> tuple[Callable, Sequence]:
        if not hasattr(modelpool, "load_clip_model"):
            raise ValueError(f"mode 'unlabeled' needs a fusion_bench CLIPVisionModelPool (zero-shot heads and "
                             f"test sets), got {type(modelpool).__name__}; use mode 'datafree'")
        missing = [t for t in task_names if t not in (modelpool.test_dataset_names or [])]
        if missing:
            raise ValueError(f"mode 'unlabeled': modelpool.test_datasets has no entry for {missing} (the unlabeled "
                             f"inputs are each task's test set, keyed by the model's name)")
        self.modelpool = modelpool
        names = list(task_names)
        self.setup_zero_shot_classification_head(task_names=names)
        unlabeled = []
        for task in names:
            it = self.get_shuffled_test_loader_iter(task, batch_size=self._trainer_cfg.batch_size,
                                                    num_workers=self.num_workers)
            unlabeled.append([next(it)[0].cpu() for _ in range(self.unlabeled_batches)])  # labels unused
        return (lambda model, k, x: self.compute_logits(model, x, names[k])), unlabeled
