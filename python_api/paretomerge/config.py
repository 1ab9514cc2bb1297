"""Configuration: pydantic models for the trainer and for ``paretomerge merge`` / ``eval`` files.

This module sits below the code it configures: it imports nothing else of
``paretomerge`` (only ``pmkernels``' impl names) (the trainer, the program and the CLI import it).

A YAML file (see ``examples/merge_demo.yaml``)::

    pool:
      format: files            # files | open_clip | hf | peft | compressed (see pools/formats.py)
      architecture: {kind: open_clip_vision, embed_dim: 32, vision_cfg: {layers: 2, width: 64, ...}}
      pretrained: pool/pretrained.safetensors
      finetuned: {digits: pool/digits.safetensors, ...}
      heads: {digits: pool/head_digits.safetensors, ...}      # optional; needed for mode unlabeled / eval
    base: {method: task_arithmetic, lam: 0.3}                   # task_arithmetic | ties | pretrained
    mode: datafree                                              # datafree | unlabeled
    unlabeled: {digits: data/digits_unlabeled.safetensors, ...} # mode unlabeled: tensor "inputs"
    eval_data: {digits: data/digits_test.safetensors, ...}      # tensors "inputs", "labels"
    trainer: {steps: 200, rank: 8, ...}                         # any TrainerConfig field
    output: {dir: merged}

Relative paths are resolved against the directory of the config file.
Types are strict (``"yes"`` is not a bool, ``true`` is not a number), floats
must be finite, unknown keys anywhere are errors, and every error is a
``ConfigError`` whose message starts with the dotted field name
(``pool.format``, ``trainer.rank`` …). ``MergeConfig.model_json_schema()``
gives the JSON schema. Missing files are reported (naming the field) when the
program loads them, not here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import pmkernels
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ARCH_KINDS", "BASE_METHODS", "COMPRESS_METHODS", "INCLUDES", "MODES", "NORMALIZATIONS", "POOL_FORMATS",
    "SCALARIZATIONS", "STRUCTURES", "TIES_SCOPES",
    "BaseConfig", "CompressConfig", "ConfigError", "MergeConfig", "OutputConfig", "PoolConfig", "TrainerConfig",
    "from_dict", "load_config", "plain_data",
]

# The choices of the config's fields, written once: the fields below are ``Literal[<list>]`` (TrainerConfig's
# spell theirs out; tests/test_config.py checks they are these lists), and the code they configure imports them.
MODES = ("datafree", "unlabeled")
INCLUDES = ("qkv", "qkv+mlp", "attention", "attention+mlp", "mlp", "all")
SCALARIZATIONS = ("stch", "tch", "linear")
STRUCTURES = ("tensor", "lora_sum", "diag")
POOL_FORMATS = ("files", "open_clip", "hf", "peft", "compressed")  # loaders: pools.formats.POOL_LOADERS
BASE_METHODS = ("task_arithmetic", "ties", "pretrained")
ARCH_KINDS = ("open_clip_vision", "open_clip", "hf")
NORMALIZATIONS = ("init", "none")
TIES_SCOPES = ("model", "tensor")
COMPRESS_METHODS = ("svd", "lowrank")


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted field name (``.field``)."""

    def __init__(self, fieldname: str, msg: str) -> None:
        super().__init__(f"{fieldname}: {msg}")
        self.field = fieldname


def _config_error(e: ValidationError, prefix: str = "") -> ConfigError:
    """The first error of a pydantic ``ValidationError`` as a ``ConfigError`` naming its field."""
    err = e.errors()[0]
    parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ARCH_KINDS)]  # union tags
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        # Raised by a validator (naming a sub-field), or by a nested section's __init__ (pydantic
        # calls a custom __init__ for nested models), whose field is then already the full path.
        here = ".".join(parts)
        if not (cause.field == here or cause.field.startswith(here + ".")):
            parts.append(cause.field)
        else:
            parts = [cause.field]
        msg = str(cause).split(": ", 1)[1]
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parts.append(err["ctx"]["discriminator"].strip("'"))
    return ConfigError(".".join(([prefix] if prefix else []) + parts) or "<root>", msg)


def plain_data(value: Any) -> Any:
    """``value`` with every mapping turned into a dict and every non-string sequence into a list, recursively.

    Strict pydantic fields take only ``dict``/``list``; Hydra/OmegaConf hand over ``DictConfig``/``ListConfig``
    (and callers tuples), which are the same data. Strings, bytes and everything else are returned as is.
    """
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return [plain_data(v) for v in value]
    return value


class _Strict(BaseModel):
    """Strict types, finite floats, no unknown keys, checked again on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True,
                              frozen=False)
    _prefix: ClassVar[str] = ""  # the dotted name of this section in a merge config, for errors raised on construction

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**plain_data(data))
        except ValidationError as e:
            raise _config_error(e, self._prefix) from None


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


# Named recipes: TrainerConfig fields a recipe fills in when the caller does not set them ("all" modes, then
# the mode's own). "paper" is the defaults (the paper's sizes, for a GPU, with the measured deviations of
# docs/design.md §6, e.g. ``entropy`` auto); "cpu" is what bench/real and
# the demo run on a 2-core CPU in minutes (docs/design.md §6).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "cpu": {"all": {"include": "attention+mlp", "rank": 8, "batch_size": 16, "adamerging_steps": 30,
                    "adamerging_lr": 1e-2},
            "datafree": {"steps": 200, "lr": 1e-2},
            "unlabeled": {"steps": 60, "lr": 5e-3}},
}


class TrainerConfig(_Strict):
    """Hyper-parameters of Pareto Merging training (every open choice of the paper is one of these).

    mode: "datafree" (weight-space objectives, no data) or "unlabeled" (entropy of each task's head).
    include: which layers get tensors: "qkv" (default: the attention q/k/v projections, the paper's
        attention-only variant), "qkv+mlp" (the paper's attention+MLP variant), "attention" (q/k/v and the
        attention output projection), "attention+mlp", "mlp", "all".
    rank: r of every converted layer (16, the paper's); ``rank_mlp`` overrides it for MLP layers.
    alpha: Dirichlet concentration of the sampled γ (1 = uniform on the simplex).
    per_sample: unlabeled mode: one γ per sample slot (row j of a (B, K) preference is used by sample j
        of every task's batch, through the op's per-sample path); data-free mode: ``batch_size`` γ's per
        step, objective averaged.
    scalarization: "stch" (smooth Tchebycheff, default), "tch" (Tchebycheff, hard max) or "linear";
        mu: STCH smoothing.
    structure: the preference-conditioned update as a constrained core G of the same op (see
        methods/pareto_merging/structures.py): "tensor" (free G ∈ R^{r×r×K}, default), "lora_sum"
        (Σ_k γ_k U_k G_kk V_kᵀ: block-diagonal G_k, rank divisible by K) or "diag" (Panacea-style
        U diag(σ + γ-part) Vᵀ, rank ≥ K).
    ideal: ideal point z (K floats) in the (normalised) objective space; None = 0.
    normalize: "init" divides f_k by its value at the base merge (default; unlabeled mode: the mean over the
        first inputs cut into batches of ``batch_size``, the size f_k is trained at) or "none".
    reg_frobenius / reg_orthogonal: weights of the factor regulariser (see objectives.factor_regularizer).
    entropy: unlabeled mode: weight of the (normalised) entropy objective that trains the tensor (AdaMerging's λ
        phase always uses AdaMerging's plain entropy). 0: the tensor is trained by the anchor alone, so the
        unlabeled inputs choose λ and the tensor is the data-free objective around that base (no forward pass
        per step; needs ``anchor`` > 0 and ``adamerging`` "before", "auto" or "off"). 1 with ``adamerging``
        "before" is the paper's AdaMerging + PM. None (default, "auto"): 0 when AdaMerging's λ is fit first
        ("before", which "auto" is with a pool) and ``anchor`` > 0, else 1: on the real-weights pools (text: whole MiniLM encoder
        and its top 2 layers; vision: whole EfficientNet-Lite0; 3 seeds each) entropy on the tensor lowered
        accuracy at the equal preference by up to 5 points and lost priority control on a task of each pool,
        while the anchor alone on AdaMerging's λ held control on every task (docs/design.md §6).
    diversity: unlabeled mode, entropy > 0: weight of the anti-collapse term log C − H(mean prediction) added to each
        task's entropy (see objectives.entropy_objectives; 0 = AdaMerging's plain entropy, which a free
        low-rank update minimises by predicting one class for everything).
    anchor: unlabeled mode: weight of the (normalised) data-free distance to model k added to f_k
        (needs the fine-tuned weights; 0 = off). On the digits demo, plain entropy (diversity = anchor = 0)
        collapses to one class within 200 steps at lr 3e-3; diversity alone keeps accuracy but gives
        weak preference control; both (the defaults) give the best mean accuracy and control.
    adamerging: unlabeled mode: build on AdaMerging's layer-wise coefficients λ (one per parameter
        tensor and task, init ``adamerging_init``, Adam at ``adamerging_lr``, clamped to [0, 1] inside
        the merge as in AdaMerging's reference) — the paper's "AdaMerging + PM". The base weights become
        θ_0 + Σ_k λ_{l,k} τ_{k,l} (the model passed in is then only used for its architecture and
        converted layers; at the end, and in every checkpoint, the learned base is baked into the
        model's weights). "before": λ first, by AdaMerging's plain entropy for ``adamerging_steps``
        steps (the tensor is 0 then), then frozen while the tensor trains; "joint": λ and the tensor
        together, every step; "off": the model's own base merge; "auto" (default): "before" in mode
        unlabeled when a pool is given (measured better than "joint", docs/design.md §6), else "off".
        ``True``/``False`` are read as "joint"/"off". The anchor's deltas are taken from the AdaMerging
        base ("before") or the initial base ("joint").
    adamerging_steps: steps of the "before" phase (AdaMerging's own; one batch per task per step).
    steps (2000, the paper's), lr, batch_size (per task, unlabeled mode), weight_decay: Adam's.
    recipe: "paper" (the defaults) or "cpu" (CPU-sized: attention + MLP at r = 8, 200 data-free / 60
        unlabeled steps, AdaMerging's λ in 30 steps at lr 1e-2; ``RECIPES``): fills in every field the
        caller leaves unset; ``TrainerConfig.preset("cpu", mode="unlabeled")`` is the same.
    Differences from the paper are listed in one place: docs/design.md, "Deviations from the paper".
    seed: seeds factor init, γ draws and batch order. checkpoint_every / checkpoint_dir: periodic
        atomic checkpoints (0 = none); the last step is always checkpointed when a dir is given.
    progress: tqdm bar showing the current objectives.
    impl: the Pareto layers' ``pmkernels.pareto_linear`` impl ("auto", "triton", "torch", "naive").
    objective_impl: the data-free objective's ``pmkernels.weight_distances`` impl
        ("auto", "triton", "cpp", "torch", "naive").
    """

    _prefix: ClassVar[str] = "trainer"

    recipe: Literal["paper", "cpu"] = "paper"
    mode: Literal["datafree", "unlabeled"] = "datafree"
    include: Literal["qkv", "qkv+mlp", "attention", "attention+mlp", "mlp", "all"] = "qkv"
    rank: PositiveInt = 16
    rank_mlp: Optional[PositiveInt] = None
    alpha: PositiveFloat = 1.0
    per_sample: bool = False
    scalarization: Literal["stch", "tch", "linear"] = "stch"
    structure: Literal["tensor", "lora_sum", "diag"] = "tensor"
    mu: PositiveFloat = 0.05
    ideal: Optional[list[float]] = None
    normalize: Literal["init", "none"] = "init"
    reg_frobenius: NonNegativeFloat = 0.0
    reg_orthogonal: NonNegativeFloat = 0.0
    entropy: Optional[NonNegativeFloat] = None
    diversity: NonNegativeFloat = 1.0
    anchor: NonNegativeFloat = 1.0
    adamerging: Literal["auto", "off", "before", "joint"] = "auto"
    adamerging_steps: PositiveInt = 100
    adamerging_lr: PositiveFloat = 1e-3
    adamerging_init: float = 0.3
    steps: PositiveInt = 2000
    lr: PositiveFloat = 1e-2
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 32
    seed: int = 0
    checkpoint_every: Annotated[int, Field(ge=0)] = 0
    checkpoint_dir: Optional[str] = None
    progress: bool = True
    impl: Literal[pmkernels.IMPLS] = "auto"  # pmkernels.pareto_linear's impls
    objective_impl: Literal[pmkernels.WEIGHT_DISTANCES_IMPLS] = "auto"  # pmkernels.weight_distances' impls

    @field_validator("ideal", mode="before")
    @classmethod
    def _ideal_as_list(cls, v: Any) -> Any:
        # Hydra/OmegaConf and numpy hand over sequences that are not lists
        return list(v) if v is not None and not isinstance(v, (list, str, Mapping)) and hasattr(v, "__iter__") else v

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        # a recipe's values for the fields the caller did not set (explicit fields win)
        if isinstance(data, Mapping) and data.get("recipe", "paper") in RECIPES:
            recipe = RECIPES[data.get("recipe", "paper")]
            mode = data.get("mode", "datafree")
            data = {**recipe.get("all", {}), **recipe.get(mode if isinstance(mode, str) else "", {}), **data}
        return data

    @classmethod
    def preset(cls, name: str, **fields: Any) -> "TrainerConfig":
        """``TrainerConfig(recipe=name, **fields)``: a named recipe ("paper", "cpu"), any field overridden."""
        if name not in RECIPES:
            raise ConfigError("recipe", f"must be one of {sorted(RECIPES)}, got {name!r}")
        return cls(recipe=name, **fields)

    @field_validator("adamerging", mode="before")
    @classmethod
    def _adamerging_bool(cls, v: Any) -> Any:
        # the field was a bool before "before"/"auto" existed: True meant the joint variant
        return {True: "joint", False: "off"}[v] if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainerConfig":
        if self.adamerging in ("before", "joint") and self.mode != "unlabeled":
            raise ConfigError("adamerging", "joint AdaMerging coefficients need mode 'unlabeled' "
                                            "(they are fit by entropy)")
        if self.mode == "unlabeled" and self.entropy == 0:  # explicit 0 (None = auto: resolved by the trainer)
            if self.anchor == 0:
                raise ConfigError("entropy", "entropy 0 and anchor 0: nothing would train the tensor (set "
                                             "entropy > 0, or anchor > 0 to train it data-free around the base)")
            if self.adamerging == "joint":
                raise ConfigError("entropy", "entropy 0 leaves the joint AdaMerging λ without a gradient: use "
                                             "adamerging 'before' (λ first, by AdaMerging's entropy) or 'off'")
        return self

    def validate(self) -> "TrainerConfig":  # type: ignore[override]
        """Check every field again (e.g. after in-place changes); return self."""
        type(self)(**self.model_dump())
        return self


class PoolConfig(_Strict):
    """Where the pretrained and fine-tuned weights are (``format``) and how to build the model."""

    _prefix: ClassVar[str] = "pool"

    format: Literal[POOL_FORMATS] = "files"
    architecture: Optional[Union["OpenClipVisionArch", "OpenClipArch", "HfArch"]] = Field(
        default=None, discriminator="kind")
    pretrained: Annotated[str, Field(min_length=1)]
    finetuned: Annotated[dict[str, Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    heads: Optional[dict[str, Annotated[str, Field(min_length=1)]]] = None
    trusted: bool = False
    # formats hf / peft (and compressed without architecture): the transformers class that builds the pretrained model from its directory (a PEFT
    # adapter's tensor names are those of the model it was trained on, e.g. AutoModelForCausalLM); None:
    # the class config.json's "architectures" names (AutoModel if it names none)
    auto_class: Optional[str] = None
    compress: Optional["CompressConfig"] = None  # replace the task vectors by truncated SVDs (pools.compress)

    @model_validator(mode="after")
    def _cross_field(self) -> "PoolConfig":
        if self.heads is not None and set(self.heads) != set(self.finetuned):
            raise ConfigError("heads", f"must name the same tasks as pool.finetuned ({sorted(self.finetuned)}), "
                                       f"got {sorted(self.heads)}")
        if self.format == "files" and self.architecture is None:
            raise ConfigError("architecture", "required for format 'files' (how to build the model)")
        if self.format not in ("files", "compressed") and self.architecture is not None:
            raise ConfigError("architecture", f"only used with formats 'files' and 'compressed', not {self.format!r}")
        if self.auto_class is not None and (self.format not in ("hf", "peft", "compressed")
                                            or self.architecture is not None):
            raise ConfigError("auto_class", "only used with formats 'hf', 'peft' and 'compressed' from a Hugging "
                                            f"Face directory, not {self.format!r}"
                                            + (" with pool.architecture" if self.architecture is not None else ""))
        return self


class CompressConfig(_Strict):
    """``pool.compress``: each weight matrix's task vector becomes a truncated SVD A Bᵀ, at a fixed ``rank`` or at
    the smallest rank keeping the fraction ``keep`` of its spectrum's energy (exactly one of them); ``method``
    "svd" (exact) or "lowrank" (randomised, seeded; fixed rank only); ``save``: also write the factors to this
    safetensors file (relative to the config)."""

    _prefix: ClassVar[str] = "pool.compress"

    rank: Optional[PositiveInt] = None
    keep: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    method: Literal[COMPRESS_METHODS] = "svd"
    save: Optional[str] = None

    @model_validator(mode="after")
    def _one_of(self) -> "CompressConfig":
        if (self.rank is None) == (self.keep is None):
            raise ConfigError("rank", "give exactly one of rank (a fixed R) and keep (a fraction of the energy)")
        if self.method == "lowrank" and self.rank is None:
            raise ConfigError("method", "'lowrank' needs a fixed rank (keep needs the full spectrum: use 'svd')")
        return self


class OpenClipVisionArch(_Strict):
    """An open_clip vision tower built from a ``CLIPVisionCfg`` (random init)."""

    kind: Literal["open_clip_vision"]
    embed_dim: PositiveInt
    vision_cfg: dict[str, Any]

    @field_validator("vision_cfg")
    @classmethod
    def _known_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        from open_clip.model import CLIPVisionCfg

        known = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
        bad = sorted(set(v) - known)
        if bad:
            raise ConfigError(bad[0], "unknown CLIPVisionCfg field")
        return v


class OpenClipArch(_Strict):
    """An open_clip model's visual tower by model name (no pretrained download)."""

    kind: Literal["open_clip"]
    model_name: str


class HfArch(_Strict):
    """A Hugging Face model built from a local directory's config.json (never the hub)."""

    kind: Literal["hf"]
    dir: str
    auto_class: str = "AutoModel"


PoolConfig.model_rebuild()


class BaseConfig(_Strict):
    """The base merge Pareto Merging starts from."""

    _prefix: ClassVar[str] = "base"

    method: Literal[BASE_METHODS] = "task_arithmetic"
    # task arithmetic's λ (default 0.3; a number, or one per task) / TIES' λ (default 1.0, a number)
    lam: Optional[Union[float, list[float]]] = None
    k: Annotated[float, Field(gt=0, le=1)] = 0.2  # TIES: fraction of each task vector kept
    scope: Literal[TIES_SCOPES] = "model"  # TIES: trim over the whole task vector or per tensor

    @model_validator(mode="after")
    def _lam_per_task(self) -> "BaseConfig":
        if isinstance(self.lam, list) and self.method != "task_arithmetic":
            raise ConfigError("lam", f"a per-task list of λ is only for task_arithmetic, not {self.method!r}")
        return self


class OutputConfig(_Strict):
    _prefix: ClassVar[str] = "output"

    dir: Annotated[str, Field(min_length=1)] = "paretomerge_out"


class MergeConfig(_Strict):
    """A whole ``paretomerge merge`` run. ``trainer.mode`` is set from the top-level ``mode``."""

    pool: PoolConfig
    base: BaseConfig = Field(default_factory=BaseConfig)
    mode: Literal[MODES] = "datafree"
    unlabeled: Optional[dict[str, Annotated[str, Field(min_length=1)]]] = None
    eval_data: Optional[dict[str, Annotated[str, Field(min_length=1)]]] = None
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    root: str = "."  # directory relative paths are resolved against (the config file's)

    @model_validator(mode="before")
    @classmethod
    def _mode_into_trainer(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        tr = data.get("trainer")
        if tr is None:
            tr = {}
        if not isinstance(tr, Mapping):
            return data  # the field's own validation names it
        if "mode" in tr:
            raise ConfigError("trainer.mode", "set the mode at the top level (mode: datafree|unlabeled)")
        return {**data, "trainer": {**tr, "mode": data.get("mode", "datafree")}}

    @model_validator(mode="after")
    def _cross_field(self) -> "MergeConfig":
        p = self.pool
        for name in ("unlabeled", "eval_data"):
            m = getattr(self, name)
            if m is not None and not m:
                raise ConfigError(name, "must be a non-empty mapping of task name -> path")
        if self.mode == "unlabeled":
            if self.unlabeled is None or set(self.unlabeled) != set(p.finetuned):
                raise ConfigError("unlabeled", f"must name every task of pool.finetuned ({sorted(p.finetuned)})")
            if p.heads is None and p.format != "open_clip":
                raise ConfigError("pool.heads", "required for mode 'unlabeled' (the entropy of each task's head)")
        return self

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.root) / q


def from_dict(data: Any, root: Union[str, Path] = ".") -> MergeConfig:
    """Build and validate a ``MergeConfig`` from plain data (as parsed from YAML)."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", f"the config must be a mapping, got {type(data).__name__}")
    if "root" in data:
        raise ConfigError("root", "unknown key (relative paths resolve against the config file's directory)")
    if "pool" not in data:
        raise ConfigError("pool", "required")
    try:
        return MergeConfig.model_validate(plain_data({**data, "root": str(root)}))
    except ValidationError as e:
        raise _config_error(e) from None


def load_config(path: Union[str, Path]) -> MergeConfig:
    """Read, build and validate a YAML config; relative paths resolve against its directory."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {str(path)!r}")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ConfigError("<yaml>", f"{path} is not valid YAML: {e}") from None
    return from_dict(data, root=path.resolve().parent)
