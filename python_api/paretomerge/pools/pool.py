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
  * ``from_hf_dirs``             local Hugging Face model directories (never the hub); single or sharded
                                 safetensors are read tensor by tensor
  * ``from_peft_adapters``       K PEFT LoRA adapter directories on the pretrained model: task vectors
                                 kept factored (``pools.peft``)
  * ``from_compressed``          a file written by ``CompressedTaskVectors.save`` (``pools.compress``)

Low-rank task vectors: ``pool.compress(rank=R | keep=f)`` replaces each weight matrix's task vector by a
truncated SVD A Bᵀ; ``task_factors(k)`` gives a task's factored keys, ``data_free_deltas(key, W_base)``
the data-free objective's input of one layer (dense or factored, whichever the pool holds).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..io import PathLike
from .compress import CompressedTaskVectors, LowRankDelta, check_rank_or_keep, truncated_svd
from .sources import (FactoredSource, LoaderSource, ModuleSource, SafetensorsSource, Source, file_source,
                      hf_safetensors_source, load_hf_model)

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
            try:
                check_same_architecture(self.pretrained_state(), src.shapes(), task=name)
            except ArchitectureMismatchError as e:
                if isinstance(src, SafetensorsSource):  # name the file too
                    key = str(e).split("key ", 1)[1].split("'")[1]
                    if key in src.shapes():
                        raise ArchitectureMismatchError(f"{e} (file {str(src.file_of(key))!r})") from None
                raise

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

    # -- low-rank task vectors ---------------------------------------------------------------------------------
    def task_factors(self, k: Union[int, str]) -> dict[str, LowRankDelta]:
        """Task k's factored task vectors {key: A Bᵀ} (LoRA adapters, compressed); {} for a dense source."""
        src = self._sources[self.index(k)]
        return dict(src.factors) if isinstance(src, FactoredSource) else {}

    def factored_keys(self) -> list[str]:
        """Keys whose task vector is factored in every task (in the pretrained state dict's order)."""
        per_task = [self.task_factors(k) for k in range(len(self))]
        return [n for n in self.pretrained_state() if all(n in f for f in per_task)]

    def compress(self, rank: Optional[int] = None, keep: Optional[float] = None, *,
                 keys: Optional[Iterable[str]] = None, method: str = "svd", seed: int = 0,
                 keep_rest: bool = True) -> CompressedTaskVectors:
        """Replace each weight matrix's task vector by a truncated SVD A Bᵀ, in place; return the factors.

        ``rank``: a fixed R, or ``keep``: per matrix, the smallest rank keeping that fraction of Σσ²
        (``pools.compress.truncated_svd``; ``method`` "svd" or seeded "lowrank"). ``keys``: the matrices to
        compress (default: the weights of every ``nn.Linear`` of the pretrained model). Tensors are read
        one at a time; tasks already factored (LoRA) are re-compressed from their factors' product. A rank
        larger than a matrix is a ValueError naming the tensor, raised before anything is replaced.
        ``keep_rest``: also keep (in memory, and in the saved file) the non-zero task vectors of the other
        floating tensors (biases, norms, embeddings), so the saved file alone rebuilds the pool.
        The result's ``layer_errors()`` / ``total_errors()`` are the relative Frobenius errors; it can be
        saved with ``.save(path)`` and reloaded with ``ModelPool.from_compressed``.
        """
        check_rank_or_keep(rank, keep)
        base = self.pretrained_state()
        if keys is None:
            keys = [f"{n}.weight" if n else "weight" for n, m in self.pretrained.named_modules()
                    if isinstance(m, nn.Linear)]
        keys = list(keys)
        for n in keys:
            if n not in base or base[n].dim() != 2 or not base[n].is_floating_point():
                raise ValueError(f"compress: {n!r} is not a 2-D floating tensor of the pretrained model")
            if rank is not None and rank > min(base[n].shape):
                raise ValueError(f"compress: rank {rank} is larger than tensor {n!r} allows (shape "
                                 f"{tuple(base[n].shape)}, at most {min(base[n].shape)})")
        ctv = CompressedTaskVectors(list(self.task_names), {}, {}, {}, {})
        new_sources = []
        for k, task in enumerate(self.task_names):
            factors, norms, errs = {}, {}, {}
            for n in keys:
                tau = self.task_vector(k, [n])[n]
                factors[n], rel = truncated_svd(tau, rank, keep, name=f"task {task!r}: {n}", method=method, seed=seed)
                norms[n] = float(tau.double().pow(2).sum())
                errs[n] = rel * rel * norms[n]
                del tau
            old = self._sources[k]
            rest = old.rest if isinstance(old, FactoredSource) else old
            # task vectors an adapter pool holds dense (modules_to_save) are kept either way
            dense = {n: v for n, v in old.dense.items() if n not in factors} if isinstance(old, FactoredSource) else {}
            if keep_rest:  # the other floating tensors' non-zero task vectors, so a saved file stands alone
                others = [n for n, v in base.items() if is_float(v) and n not in factors]
                dense.update({n: t for n, t in self.task_vector(k, others).items() if bool(t.any())})
            new_sources.append(FactoredSource(base, factors, dense, rest))
            ctv.factors[task], ctv.sq_norms[task], ctv.sq_errors[task] = factors, norms, errs
            ctv.dense[task] = dense
        self._sources = new_sources
        return ctv

    def data_free_deltas(self, key: str, base_weight: torch.Tensor
                         ) -> tuple[list[Union[torch.Tensor, LowRankDelta]], float]:
        """The K deltas D_k = W_k − W_base of one converted weight, and the relative error of their form.

        Dense (K (out, in) fp32 tensors, read one at a time) unless every task's task vector of ``key`` is
        factored; then D_k = τ_k − (W_base − W_0) as factors: τ_k's own, concatenated with a truncated SVD
        of the shared base offset W_base − W_0 at rank Σ_k R_k (exact when the base merge is task
        arithmetic of these task vectors: it lies in their span). The float returned is that SVD's
        relative error (0 for dense deltas or a pretrained base).
        """
        W = base_weight.detach()
        facs = [self.task_factors(k).get(key) for k in range(len(self))]
        if any(f is None for f in facs):
            out = []
            for k in range(len(self)):
                wk = self.finetuned_state(k, [key])[key]
                if wk.dim() == 4 and wk.shape[2:] == (1, 1) and wk.shape[:2] == W.shape:
                    wk = wk.flatten(1)  # a pointwise conv's (out, in, 1, 1) weight, factored as (out, in)
                if wk.shape != W.shape:
                    raise ValueError(f"task {self.task_names[k]!r}: {key} has shape {tuple(wk.shape)}, the base has "
                                     f"{tuple(W.shape)}")
                out.append(wk.detach().to(W.device, torch.float32) - W.float())
            return out, 0.0
        offset = W.float() - self.pretrained_state()[key].to(W.device).float()
        if not bool(offset.any()):
            return [f.to(W.device) for f in facs], 0.0
        rank = min(sum(f.rank for f in facs), min(offset.shape))
        c, rel = truncated_svd(offset, rank, name=f"{key} (base merge − pretrained)")
        return [LowRankDelta.combine([f.to(W.device), c], [1.0, -1.0]) for f in facs], rel

    @classmethod
    def from_compressed(cls, pretrained: nn.Module, compressed: Union[PathLike, CompressedTaskVectors],
                        heads: Optional[Mapping[str, nn.Module]] = None) -> "ModelPool":
        """A pool whose fine-tuned models are W_0 + the compressed task vectors (a file from
        ``CompressedTaskVectors.save`` or the object). Keys it does not hold equal the pretrained ones."""
        origin = "compressed task vectors"
        if not isinstance(compressed, CompressedTaskVectors):
            origin = str(compressed)
            compressed = CompressedTaskVectors.load(compressed)
        base = {k: v.detach() for k, v in pretrained.state_dict().items()}
        compressed.check_against({k: tuple(v.shape) for k, v in base.items()}, origin)
        sources = [FactoredSource(base, compressed.factors[t], compressed.dense.get(t, {})) for t in compressed.tasks]
        return cls(pretrained, compressed.tasks, sources, heads)

    @classmethod
    def from_peft_adapters(cls, pretrained: nn.Module, adapter_dirs: Mapping[str, PathLike],
                           heads: Optional[Mapping[str, nn.Module]] = None) -> "ModelPool":
        """From K PEFT LoRA adapter directories trained on ``pretrained`` (task vectors kept factored).

        Every adapter must target the same modules and name the same base model (when they name one);
        errors name the directory, file and tensor (see ``pools.peft.load_peft_adapter``).
        """
        from .peft import load_peft_adapter

        _check_mapping(adapter_dirs, "adapter_dirs")
        base = {k: v.detach() for k, v in pretrained.state_dict().items()}
        adapters = {t: load_peft_adapter(d, base) for t, d in adapter_dirs.items()}
        (t0, a0), *others = adapters.items()
        for t, a in others:
            if set(a.factors) != set(a0.factors):
                diff = sorted(set(a.factors) ^ set(a0.factors))
                raise ValueError(f"adapters {t0!r} ({a0.directory}) and {t!r} ({a.directory}) target different "
                                 f"modules, e.g. {diff[0]!r}; a LoRA pool needs the same target modules")
            if a.base_model and a0.base_model and a.base_model != a0.base_model:
                raise ValueError(f"adapters {t0!r} and {t!r} were trained on different base models: "
                                 f"{a0.base_model!r} ({a0.directory}) vs {a.base_model!r} ({a.directory})")
        sources = [FactoredSource(base, a.factors, a.dense) for a in adapters.values()]
        return cls(pretrained, list(adapters), sources, heads)

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
        ``auto_class``: the class (or its name) whose ``from_pretrained`` builds the model; default: the class
        named by the pretrained directory's config.json ``architectures`` (e.g. ``LlamaForCausalLM``, so a causal
        LM keeps its head and its state-dict keys match the saved files, which are then read lazily; see
        ``pools.architectures.hf_model_class``). Directories whose config.json differ in ``model_type`` or
        ``architectures`` are an ``ArchitectureMismatchError`` before any model is built. Fine-tuned models are
        loaded one at a time, when their weights are needed.
        """
        from .architectures import check_hf_configs, hf_model_class

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
        check_hf_configs(dirs)
        auto_class = hf_model_class(pretrained_dir, auto_class, field="auto_class")

        def load(d):
            return load_hf_model(auto_class, d)

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
