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
                                 ``trusted=True`` (unpickling runs arbitrary code; see ``legacy``)
  * ``from_hf_dirs``             local Hugging Face model directories (never the hub)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..io import PathLike
from .sources import LoaderSource, ModuleSource, Source, file_source, hf_safetensors_source

__all__ = ["ArchitectureMismatchError", "ModelPool", "check_same_architecture", "is_float"]


class ArchitectureMismatchError(ValueError):
    """A fine-tuned model's state dict does not match the pretrained model's keys or shapes."""


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


# ---------------------------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------------------------
class ModelPool:
    """A pretrained model, K fine-tuned copies (lazily), and optional per-task heads.

    ``pretrained`` is never modified by this library. ``task_names[k]`` names
    the k-th fine-tuned model; ``heads[task]`` is its classification head
    (task-vectors format) when known.
    """

    def __init__(self, pretrained: nn.Module, task_names: Sequence[str], sources: Sequence[Source],
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
        return cls(pretrained, list(finetuned), [ModuleSource(m) for m in finetuned.values()], heads)

    @classmethod
    def from_state_dict_files(cls, pretrained: nn.Module, files: Mapping[str, PathLike],
                              heads: Optional[Mapping[str, nn.Module]] = None) -> "ModelPool":
        """From one state-dict file per task: safetensors (read lazily) or a torch checkpoint
        loaded with ``torch.load(weights_only=True)`` (memory-mapped where possible)."""
        _check_mapping(files, "files")
        return cls(pretrained, list(files), [file_source(p) for p in files.values()], heads)

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
        from .legacy import load_pickled_module, pickled_state_loader

        pretrained = load_pickled_module(pretrained_path)
        sources = []
        for task, p in finetuned_paths.items():
            m = load_pickled_module(p)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            del m
            sources.append(LoaderSource(pickled_state_loader(Path(p)), shapes))
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
        ``auto_class``: the class whose ``from_pretrained`` builds the model; default: the class named by
        the pretrained directory's config.json ``architectures`` (e.g. ``LlamaForCausalLM``, so a causal LM
        keeps its head and its state-dict keys match the saved files, which are then read lazily), else
        ``transformers.AutoModel``. Fine-tuned models are loaded one at a time, when their weights are needed.
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
            auto_class = _hf_architecture_class(Path(pretrained_dir))

        def load(d):
            m = auto_class.from_pretrained(str(d), local_files_only=True)
            m.eval()
            return m

        pretrained = load(pretrained_dir)
        ref = {k: tuple(v.shape) for k, v in pretrained.state_dict().items()}
        sources = []
        for task, d in finetuned_dirs.items():
            lazy = hf_safetensors_source(Path(d), ref)
            if lazy is not None:  # the files hold exactly the model's state dict: read tensors on demand
                sources.append(lazy)
                continue
            m = load(d)
            shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            del m
            sources.append(LoaderSource((lambda d=d: {k: v.detach() for k, v in load(d).state_dict().items()}),
                                         shapes))
        return cls(pretrained, list(finetuned_dirs), sources)


def _hf_architecture_class(d: Path):
    """The transformers class config.json's ``architectures`` names (the one the model was saved from),
    else ``transformers.AutoModel``."""
    import json

    import transformers

    try:
        names = json.loads((d / "config.json").read_text()).get("architectures") or []
    except (ValueError, AttributeError):
        names = []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel


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
