"""A pretrained model and K fine-tuned copies of it: the input of every merge.

``ModelPool`` holds the pretrained module (never modified) and, per task, a
*source* of the fine-tuned weights. Sources are lazy where the format allows:
safetensors files are read tensor by tensor with ``safe_open``, torch
checkpoints are memory-mapped, pickled open_clip encoders and Hugging Face
directories are loaded one model at a time when asked for (the last one is
kept). So the pool never holds K full fine-tuned models at once; task
vectors τ_k = θ_k − θ_0 are computed on demand, optionally for a subset of
parameter names.

Loaders:
  * ``from_modules``             in-memory ``nn.Module`` s
  * ``from_state_dict_files``    safetensors (lazy) or ``torch.load(weights_only=True)``
  * ``from_open_clip_checkpoints``  task-vectors (Ilharco et al.) checkpoints: whole pickled
                                 ``ImageEncoder`` objects and ``head_<Task>.pt`` heads; needs
                                 ``trusted=True`` (unpickling runs arbitrary code)
  * ``from_hf_dirs``             local Hugging Face model directories (never the hub)
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

__all__ = [
    "ArchitectureMismatchError",
    "ClassificationHead",
    "ImageClassifier",
    "ImageEncoder",
    "ModelPool",
    "check_same_architecture",
    "load_pickled_module",
]


class ArchitectureMismatchError(ValueError):
    """A fine-tuned model's state dict does not match the pretrained model's keys or shapes."""


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


# ---------------------------------------------------------------------------------------------------------------
# Weight sources: name -> tensor, loaded on demand
# ---------------------------------------------------------------------------------------------------------------
class _Source:
    """Where one fine-tuned model's weights come from."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop anything cached."""


class _ModuleSource(_Source):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _sd(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict(keep_vars=False)

    def keys(self):
        return list(self._sd().keys())

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self._sd().items()}

    def get(self, names=None):
        sd = self._sd()
        if names is None:
            return {k: v.detach() for k, v in sd.items()}
        return {n: sd[n].detach() for n in names}


class _StateDictSource(_Source):
    """A state dict already in memory (or memory-mapped)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd = dict(sd)

    def keys(self):
        return list(self.sd.keys())

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.sd.items()}

    def get(self, names=None):
        if names is None:
            return dict(self.sd)
        return {n: self.sd[n] for n in names}


class _SafetensorsSource(_Source):
    """Safetensors file(s) read lazily with ``safe_open`` (only the requested tensors are read).
    Several files (a sharded checkpoint) act as one state dict."""

    def __init__(self, paths: Union[Path, Sequence[Path]]) -> None:
        from safetensors import safe_open

        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self._file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.paths:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    self._file[k] = path
                    self._shapes[k] = tuple(f.get_slice(k).get_shape())

    def keys(self):
        return list(self._shapes)

    def shapes(self):
        return dict(self._shapes)

    def get(self, names=None):
        from safetensors import safe_open

        names = list(self._shapes) if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        for path in self.paths:
            want = [n for n in names if self._file[n] == path]
            if want:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    out.update({n: f.get_tensor(n) for n in want})
        return {n: out[n] for n in names}


class _LoaderSource(_Source):
    """Weights obtained by calling ``load()`` (a whole model). Only the most recently loaded state
    dict of all loader sources is kept (one full fine-tuned model in memory at most)."""

    _last: list = [None, None]  # [source, state dict], shared by every loader source

    def __init__(self, load: Callable[[], Mapping[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
        self.load = load
        self._shapes = shapes

    def keys(self):
        return list(self._shapes)

    def shapes(self):
        return dict(self._shapes)

    def get(self, names=None):
        last = _LoaderSource._last
        if last[0] is self:
            sd = last[1]
        else:
            last[0] = last[1] = None  # free the previous model before loading the next
            sd = dict(self.load())
            last[0], last[1] = self, sd
        if names is None:
            return dict(sd)
        return {n: sd[n] for n in names}

    def release(self):
        if _LoaderSource._last[0] is self:
            _LoaderSource._last[0] = _LoaderSource._last[1] = None


def _file_source(path: PathLike) -> _Source:
    from .io import is_safetensors, load_state_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {str(p)!r}")
    if is_safetensors(p):
        return _SafetensorsSource(p)
    try:  # memory-mapped: tensors are paged in when used
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{str(p)!r} does not hold a state dict (a mapping of name -> Tensor)")
        return _StateDictSource(obj)
    except (RuntimeError, pickle.UnpicklingError):
        # legacy (non-zip) format cannot be memory-mapped (or not a plain state dict: load_state_dict says
        # why): load it when needed, one model at a time
        sd = load_state_dict(p)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        del sd
        return _LoaderSource(lambda: load_state_dict(p), shapes)


# ---------------------------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------------------------
class ModelPool:
    """A pretrained model, K fine-tuned copies (lazily), and optional per-task heads.

    ``pretrained`` is never modified by this library. ``task_names[k]`` names
    the k-th fine-tuned model; ``heads[task]`` is its classification head
    (task-vectors format) when known.
    """

    def __init__(self, pretrained: nn.Module, task_names: Sequence[str], sources: Sequence[_Source],
                 heads: Optional[Mapping[str, nn.Module]] = None) -> None:
        if not isinstance(pretrained, nn.Module):
            raise TypeError(f"pretrained must be an nn.Module, got {type(pretrained).__name__}")
        task_names = [str(t) for t in task_names]
        if len(task_names) == 0:
            raise ValueError("a ModelPool needs at least one fine-tuned model")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be unique, got {task_names}")
        if len(sources) != len(task_names):
            raise ValueError(f"{len(task_names)} task names but {len(sources)} fine-tuned models")
        self.pretrained = pretrained
        self.task_names = task_names
        self._sources = list(sources)
        self.heads = None if heads is None else _check_heads(dict(heads), task_names)
        for name, src in zip(task_names, self._sources):
            check_same_architecture(self.pretrained_state(), src.shapes(), task=name)

    # -- access ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.task_names)

    def __repr__(self) -> str:
        return (f"ModelPool(pretrained={type(self.pretrained).__name__}, tasks={self.task_names}, "
                f"heads={None if self.heads is None else sorted(self.heads)})")

    def index(self, task: Union[int, str]) -> int:
        """The index of ``task`` (a name or an index)."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
            return self.task_names.index(task)
        k = int(task)
        if not 0 <= k < len(self):
            raise IndexError(f"task index {k} out of range for {len(self)} tasks")
        return k

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """The pretrained state dict (detached references, not copies)."""
        return {k: v.detach() for k, v in self.pretrained.state_dict().items()}

    def float_keys(self) -> list[str]:
        """State-dict keys of floating tensors: the keys task vectors have."""
        return [k for k, v in self.pretrained_state().items() if is_float(v)]

    def finetuned_state(self, k: Union[int, str], names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """The k-th fine-tuned state dict (all keys, or ``names``), loaded now from its source."""
        src = self._sources[self.index(k)]
        if names is not None:
            names = list(names)
            known = set(src.keys())
            bad = [n for n in names if n not in known]
            if bad:
                raise KeyError(f"unknown parameter name(s) for task {self.task_names[self.index(k)]!r}: {bad[:5]}")
        return src.get(names)

    def finetuned_model(self, k: Union[int, str]) -> nn.Module:
        """A new module: a deep copy of the pretrained model with the k-th fine-tuned weights loaded."""
        model = copy.deepcopy(self.pretrained)
        sd = self.finetuned_state(k)
        with torch.no_grad():
            for n, t in model.state_dict().items():
                t.copy_(sd[n])
        return model

    def task_vector(self, k: Union[int, str], names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """τ_k = θ_k − θ_0 for floating parameters and buffers (integer buffers skipped).

        ``names`` restricts the keys (integer ones among them are skipped too).
        Computed in the pretrained tensor's dtype, on its device.
        """
        base = self.pretrained_state()
        if names is None:
            keys = [n for n, v in base.items() if is_float(v)]
        else:
            keys = []
            for n in names:
                if n not in base:
                    raise KeyError(f"unknown parameter name {n!r}: not in the pretrained state dict")
                if is_float(base[n]):
                    keys.append(n)
        ft = self.finetuned_state(k, keys)
        return {n: ft[n].to(device=base[n].device, dtype=base[n].dtype) - base[n] for n in keys}

    def release(self) -> None:
        """Drop cached fine-tuned weights (sources that load whole models keep the last one)."""
        for s in self._sources:
            s.release()

    # -- loaders -----------------------------------------------------------------------------------------------
    @classmethod
    def from_modules(cls, pretrained: nn.Module, finetuned: Mapping[str, nn.Module],
                     heads: Optional[Mapping[str, nn.Module]] = None) -> "ModelPool":
        """From in-memory modules (held by reference: the caller already has them in memory)."""
        _check_mapping(finetuned, "finetuned")
        for name, m in finetuned.items():
            if not isinstance(m, nn.Module):
                raise TypeError(f"finetuned[{name!r}] must be an nn.Module, got {type(m).__name__}")
        return cls(pretrained, list(finetuned), [_ModuleSource(m) for m in finetuned.values()], heads)

    @classmethod
    def from_state_dict_files(cls, pretrained: nn.Module, files: Mapping[str, PathLike],
                              heads: Optional[Mapping[str, nn.Module]] = None) -> "ModelPool":
        """From one state-dict file per task: safetensors (read lazily) or a torch checkpoint
        loaded with ``torch.load(weights_only=True)`` (memory-mapped where possible)."""
        _check_mapping(files, "files")
        return cls(pretrained, list(files), [_file_source(p) for p in files.values()], heads)

    @classmethod
    def from_open_clip_checkpoints(cls, pretrained_path: PathLike, finetuned_paths: Mapping[str, PathLike],
                                   head_paths: Optional[Mapping[str, PathLike]] = None, *,
                                   trusted: bool = False) -> "ModelPool":
        """From task-vectors checkpoints (Ilharco et al.): whole ``ImageEncoder`` objects saved with
        ``torch.save``, and ``head_<Task>.pt`` classification heads.

        These are pickles: loading one can run arbitrary code. Pass ``trusted=True`` only for
        files you trust. Renamed classes (``src.modeling``/``modeling`` ImageEncoder and
        ClassificationHead, old ``open_clip.model`` transformer classes) are mapped to current ones.
        The fine-tuned encoders are loaded one at a time, when their weights are needed.
        """
        if trusted is not True:
            raise ValueError(
                "from_open_clip_checkpoints loads whole pickled models (torch.save of an ImageEncoder): "
                "unpickling can execute arbitrary code from the file. Pass trusted=True only for "
                "checkpoints from a source you trust, or convert them to safetensors state dicts and use "
                "from_state_dict_files.")
        _check_mapping(finetuned_paths, "finetuned_paths")
        paths = {"pretrained": Path(pretrained_path), **{f"finetuned[{t!r}]": Path(p)
                                                          for t, p in finetuned_paths.items()}}
        for t, p in (head_paths or {}).items():
            paths[f"head_paths[{t!r}]"] = Path(p)
        for what, p in paths.items():
            if not p.is_file():
                raise FileNotFoundError(f"{what}: no such checkpoint file {str(p)!r}")
        pretrained = load_pickled_module(pretrained_path)
        sources = []
        for task, p in finetuned_paths.items():
            m = load_pickled_module(p)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            del m
            sources.append(_LoaderSource(_pickled_state_loader(Path(p)), shapes))
        heads = None
        if head_paths:
            unknown = [t for t in head_paths if t not in finetuned_paths]
            if unknown:
                raise ValueError(f"head_paths has tasks {unknown} that are not in finetuned_paths "
                                 f"{list(finetuned_paths)}")
            heads = {t: load_pickled_module(p) for t, p in head_paths.items()}
        pool = cls(pretrained, list(finetuned_paths), sources, heads)
        return pool

    @classmethod
    def from_hf_dirs(cls, pretrained_dir: PathLike, finetuned_dirs: Mapping[str, PathLike],
                     auto_class=None) -> "ModelPool":
        """From local Hugging Face model directories (``from_pretrained(dir, local_files_only=True)``).

        Only existing local directories are accepted: a hub name is rejected, nothing is downloaded.
        ``auto_class``: the class whose ``from_pretrained`` builds the model (default
        ``transformers.AutoModel``; e.g. ``AutoModelForSequenceClassification``). Fine-tuned models
        are loaded one at a time, when their weights are needed.
        """
        _check_mapping(finetuned_dirs, "finetuned_dirs")
        dirs = {"pretrained_dir": pretrained_dir, **{f"finetuned_dirs[{t!r}]": d for t, d in finetuned_dirs.items()}}
        for what, d in dirs.items():
            p = Path(d)
            if not p.is_dir():
                raise FileNotFoundError(
                    f"{what}: {str(d)!r} is not an existing local directory. from_hf_dirs never downloads: "
                    f"save the model locally (model.save_pretrained(dir) or huggingface-cli download) and "
                    f"pass the directory")
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{what}: {str(d)!r} has no config.json; not a Hugging Face model directory")
        if auto_class is None:
            import transformers

            auto_class = transformers.AutoModel

        def load(d):
            m = auto_class.from_pretrained(str(d), local_files_only=True)
            m.eval()
            return m

        pretrained = load(pretrained_dir)
        ref = {k: tuple(v.shape) for k, v in pretrained.state_dict().items()}
        sources = []
        for task, d in finetuned_dirs.items():
            lazy = _hf_safetensors_source(Path(d), ref)
            if lazy is not None:  # the files hold exactly the model's state dict: read tensors on demand
                sources.append(lazy)
                continue
            m = load(d)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            del m
            sources.append(_LoaderSource((lambda d=d: {k: v.detach() for k, v in load(d).state_dict().items()}),
                                         shapes))
        return cls(pretrained, list(finetuned_dirs), sources)


def _hf_safetensors_source(d: Path, ref_shapes: Mapping[str, tuple[int, ...]]) -> Optional[_Source]:
    """A lazy source over a HF directory's safetensors (single or sharded) when their keys and shapes are
    exactly those of the model's state dict; else None (renamed or tied keys: load through transformers)."""
    import json

    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return None
        paths = [d / f for f in files]
    elif (d / "model.safetensors").is_file():
        paths = [d / "model.safetensors"]
    else:
        return None
    if not all(p.is_file() for p in paths):
        return None
    try:
        src = _SafetensorsSource(paths)
    except Exception:  # unreadable: let transformers report it
        return None
    return src if src.shapes() == dict(ref_shapes) else None


def _check_mapping(m, name: str) -> None:
    if not isinstance(m, Mapping):
        raise TypeError(f"{name} must be a mapping of task name -> model, got {type(m).__name__}")
    if len(m) == 0:
        raise ValueError(f"{name} is empty: a ModelPool needs at least one fine-tuned model")


def _check_heads(heads: dict, task_names: list[str]) -> dict:
    for t, h in heads.items():
        if t not in task_names:
            raise ValueError(f"heads has task {t!r} that is not one of the tasks {task_names}")
        if not isinstance(h, nn.Module):
            raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h).__name__}")
    return heads


def check_same_architecture(reference: Mapping[str, torch.Tensor], other: Mapping[str, object],
                            task: str = "finetuned") -> None:
    """Raise ``ArchitectureMismatchError`` naming the first key where ``other`` differs from
    ``reference``: a missing key, then a shape mismatch (in the reference's order), then an extra key.

    ``other`` maps names to tensors or shapes.
    """
    for k, v in reference.items():
        if k not in other:
            raise ArchitectureMismatchError(
                f"task {task!r}: key {k!r} of the pretrained model is missing from the fine-tuned model")
        o = other[k]
        shape = tuple(o.shape) if isinstance(o, torch.Tensor) else tuple(o)
        if shape != tuple(v.shape):
            raise ArchitectureMismatchError(
                f"task {task!r}: key {k!r} has shape {shape} in the fine-tuned model but {tuple(v.shape)} "
                f"in the pretrained model")
    for k in other:
        if k not in reference:
            raise ArchitectureMismatchError(
                f"task {task!r}: key {k!r} of the fine-tuned model is not in the pretrained model (extra key)")


# ---------------------------------------------------------------------------------------------------------------
# task-vectors (Ilharco et al.) pickles
# ---------------------------------------------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """Stand-in for task-vectors' ``src.modeling.ImageEncoder``: an open_clip model in ``self.model``.

    Unpickling restores the saved attributes (``model``, preprocess transforms, ``cache_dir``).
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m is None:
            raise RuntimeError("ImageEncoder has no model")
        return m.encode_image(images) if hasattr(m, "encode_image") else m(images)


class ClassificationHead(nn.Linear):
    """Stand-in for task-vectors' ``ClassificationHead``: ``nn.Linear`` with optional input L2 normalisation."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: Optional[torch.Tensor] = None) -> None:
        out_f, in_f = weights.shape
        super().__init__(in_f, out_f)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weights)
            if biases is not None:
                self.bias.copy_(biases)
            else:
                self.bias.zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if getattr(self, "normalize", False):
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


class ImageClassifier(nn.Module):
    """Stand-in for task-vectors' ``ImageClassifier`` (encoder + head)."""

    def __init__(self, image_encoder: nn.Module, classification_head: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.image_encoder(inputs))


class _Opaque:
    """Placeholder for pickled objects of unavailable non-model classes (e.g. torchvision transforms)."""

    def __init__(self, *args, **kwargs) -> None:
        self._args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: a placeholder for a class that was not importable when "
                           f"the checkpoint was loaded")


_LOCAL = {"ImageEncoder": ImageEncoder, "ClassificationHead": ClassificationHead, "ImageClassifier": ImageClassifier}
_TASK_VECTOR_MODULES = ("src.modeling", "modeling", "src.heads", "heads", "task_vectors.src.modeling")
# open_clip classes that moved from open_clip.model to open_clip.transformer (renamed in some versions).
_OPEN_CLIP_RENAMES = {
    ("open_clip.model", "VisualTransformer"): ("open_clip.transformer", "VisionTransformer"),
    ("open_clip.model", "VisionTransformer"): ("open_clip.transformer", "VisionTransformer"),
    ("open_clip.model", "Transformer"): ("open_clip.transformer", "Transformer"),
    ("open_clip.model", "ResidualAttentionBlock"): ("open_clip.transformer", "ResidualAttentionBlock"),
    ("open_clip.model", "LayerNorm"): ("open_clip.transformer", "LayerNorm"),
    ("open_clip.model", "LayerNormFp32"): ("open_clip.transformer", "LayerNormFp32"),
    ("open_clip.model", "QuickGELU"): ("open_clip.transformer", "QuickGELU"),
    ("open_clip.model", "Attention"): ("open_clip.transformer", "Attention"),
    ("open_clip.model", "AttentionalPooler"): ("open_clip.transformer", "AttentionalPooler"),
    ("open_clip.model", "LayerScale"): ("open_clip.transformer", "LayerScale"),
    ("open_clip.model", "PatchDropout"): ("open_clip.transformer", "PatchDropout"),
    ("open_clip.model", "TextTransformer"): ("open_clip.transformer", "TextTransformer"),
    ("open_clip.transformer", "VisualTransformer"): ("open_clip.transformer", "VisionTransformer"),
}
_OPAQUE_PREFIXES = ("torchvision.", "PIL.", "src.", "args", "argparse")


def _map_class(module: str, name: str):
    """Map a pickled (module, name) to a local stand-in class, or to its current (module, name)."""
    if name in _LOCAL and (module in _TASK_VECTOR_MODULES or module.endswith(".modeling")
                           or module.endswith(".heads")):
        return _LOCAL[name]
    return _OPEN_CLIP_RENAMES.get((module, name), (module, name))


class _ShimUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        mapped = _map_class(module, name)
        if not isinstance(mapped, tuple):
            return mapped
        module, name = mapped
        if module.startswith("open_clip"):
            import open_clip  # noqa: F401  (imports its submodules)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.startswith(_OPAQUE_PREFIXES) or module == "__main__":
                return type(name, (_Opaque,), {"__module__": "paretomerge.pool._opaque"})
            raise


class _ShimPickleModule:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` using the shim unpickler."""

    Unpickler = _ShimUnpickler
    __name__ = "paretomerge_pickle_shim"

    @staticmethod
    def load(f, **kw):
        return _ShimUnpickler(f, **kw).load()

    def __getattr__(self, name):  # anything else (e.g. constants) from the real pickle module
        return getattr(pickle, name)


_SHIM = _ShimPickleModule()


def _upgrade_open_clip(root: nn.Module) -> int:
    """Give open_clip modules unpickled from older versions (e.g. the 2.0.x of the task-vectors
    checkpoints) the attributes the current classes' ``forward`` reads, with the values that
    reproduce the old behaviour. Only missing attributes are set; returns how many were."""
    try:
        from open_clip import transformer as oct
    except ImportError:
        return 0
    defaults: list[tuple[type, dict]] = [
        (oct.VisionTransformer, {"patch_dropout": nn.Identity, "attn_pool": None, "attn_pool_contrastive": None,
                                 "attn_pool_type": "", "final_ln_after_pool": False, "pool_type": "tok",
                                 "output_tokens": False}),
        (oct.Transformer, {"batch_first": False, "grad_checkpointing": False}),  # old ones ran (L, N, D)
        (oct.ResidualAttentionBlock, {"ls_1": nn.Identity, "ls_2": nn.Identity}),
    ]
    n = 0
    for m in root.modules():
        for cls, attrs in defaults:
            if isinstance(m, cls):
                for name, value in attrs.items():
                    if not hasattr(m, name):
                        setattr(m, name, value() if isinstance(value, type) else value)
                        n += 1
    return n


def load_pickled_module(path: PathLike) -> nn.Module:
    """Unpickle a whole ``nn.Module`` saved with ``torch.save`` (TRUSTED files only), mapping renamed
    task-vectors/open_clip classes to current ones."""
    obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_SHIM)
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds a state dict, not a pickled module; use "
                         f"ModelPool.from_state_dict_files with a pretrained module")
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{str(path)!r} does not hold an nn.Module (got {type(obj).__name__})")
    _upgrade_open_clip(obj)
    obj.eval()
    return obj


def _pickled_state_loader(path: Path) -> Callable[[], dict[str, torch.Tensor]]:
    def load():
        m = load_pickled_module(path)
        return {k: v.detach() for k, v in m.state_dict().items()}

    return load

