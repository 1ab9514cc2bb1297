"""Where a fine-tuned model's weights come from: name -> tensor, loaded on demand.

Sources are lazy where the format allows: safetensors files (single or
sharded) are read tensor by tensor with ``safe_open``, torch checkpoints are
memory-mapped, whole-model loaders (pickled open_clip encoders, Hugging Face
directories with renamed keys) load one model at a time and keep only the
last one.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..io import PathLike

if TYPE_CHECKING:
    from .compress import LowRankDelta

# ---------------------------------------------------------------------------------------------------------------
# Weight sources: name -> tensor, loaded on demand
# ---------------------------------------------------------------------------------------------------------------
class Source:
    """Where one fine-tuned model's weights come from."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop anything cached."""


class ModuleSource(Source):
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


class StateDictSource(Source):
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


class SafetensorsSource(Source):
    """Safetensors file(s) read lazily with ``safe_open`` (only the requested tensors are read).
    Several files (a sharded checkpoint) act as one state dict."""

    def __init__(self, paths: Union[Path, Sequence[Path]]) -> None:
        from safetensors import safe_open

        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self._file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in self.paths:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for k in f.keys():
                        self._file[k] = path
                        self._shapes[k] = tuple(f.get_slice(k).get_shape())
            except Exception as e:  # missing, truncated or corrupt header
                if isinstance(e, FileNotFoundError):
                    raise
                raise ValueError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})"
                                 ) from e

    def keys(self):
        return list(self._shapes)

    def shapes(self):
        return dict(self._shapes)

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._file[name]

    def get(self, names=None):
        from safetensors import safe_open

        names = list(self._shapes) if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        for path in self.paths:
            want = [n for n in names if self._file[n] == path]
            if want:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    out.update({n: read_tensor(f, n) for n in want})
        return {n: out[n] for n in names}


def read_tensor(f, name: str) -> torch.Tensor:
    """One tensor from an open ``safe_open`` handle: the single place lazy sources read (tests count calls)."""
    return f.get_tensor(name)


class LoaderSource(Source):
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
        last = LoaderSource._last
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
        if LoaderSource._last[0] is self:
            LoaderSource._last[0] = LoaderSource._last[1] = None


def file_source(path: PathLike) -> Source:
    from ..io import is_safetensors, load_state_dict, unwrap_state_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {str(p)!r}")
    if is_safetensors(p):
        return SafetensorsSource(p)
    try:  # memory-mapped: tensors are paged in when used
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        return StateDictSource(unwrap_state_dict(obj, p))
    except (RuntimeError, pickle.UnpicklingError):
        # legacy (non-zip) format cannot be memory-mapped (or not a plain state dict: load_state_dict says
        # why): load it when needed, one model at a time
        sd = load_state_dict(p)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        del sd
        return LoaderSource(lambda: load_state_dict(p), shapes)


@contextlib.contextmanager
def hub_kernels_off():
    """Load Hugging Face models with transformers' hub kernels off (``USE_HUB_KERNELS=NO``), restoring the
    caller's setting on exit.

    Since transformers 5.x, ``from_pretrained`` swaps layers for kernels fetched from the Hugging Face hub
    whenever the ``kernels`` package is installed (transformers >= 5.25 depends on it). paretomerge never
    downloads at run time, and a model built on the ``meta`` device (FusionBench's lazy ``CausalLMPool``)
    is rejected by ``kernelize`` (``Unsupported device type 'meta'``). Older transformers ignore the variable.
    """
    old = os.environ.get("USE_HUB_KERNELS")
    os.environ["USE_HUB_KERNELS"] = "NO"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("USE_HUB_KERNELS", None)
        else:
            os.environ["USE_HUB_KERNELS"] = old


def load_hf_model(model_class, d: PathLike) -> nn.Module:
    """``model_class.from_pretrained(d)`` from the local directory only, hub kernels off, in eval mode."""
    with hub_kernels_off():
        return model_class.from_pretrained(str(d), local_files_only=True).eval()


def hf_safetensors_source(d: Path, ref_shapes: Mapping[str, tuple[int, ...]]) -> Optional[Source]:
    """A lazy source over a HF directory's safetensors (single or sharded) when their keys and shapes are
    exactly those of the model's state dict; else None (renamed or tied keys: load through transformers)."""
    import json

    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        paths = [d / f for f in files]
        for f, p in zip(files, paths):
            if not p.is_file():  # a broken download: say which shard and what it should hold
                held = sorted(k for k, v in weight_map.items() if v == f)
                raise FileNotFoundError(f"{index}: shard {f!r} is missing from {str(d)!r} (it holds "
                                        f"{len(held)} tensor(s), e.g. {held[0]!r})")
    elif (d / "model.safetensors").is_file():
        paths, weight_map = [d / "model.safetensors"], None
    else:
        return None
    try:
        src = SafetensorsSource(paths)
    except Exception as e:  # a corrupt shard: name it rather than fail later inside transformers
        raise ValueError(f"{str(d)!r}: unreadable safetensors file(s) {[p.name for p in paths]}: {e}") from None
    if weight_map is not None:
        for k, f in weight_map.items():
            if k not in src.shapes() or src.file_of(k).name != f:
                raise ValueError(f"{index}: tensor {k!r} is mapped to shard {f!r}, which does not hold it")
    return src if src.shapes() == dict(ref_shapes) else None


class FactoredSource(Source):
    """Fine-tuned weights held as the pretrained ones plus task vectors, low-rank where factored.

    ``base``: the pretrained state dict (references); ``factors[key]``: τ ≈ A Bᵀ of a weight matrix
    (a LoRA adapter or a compressed task vector); ``dense[key]``: the task vector of another tensor;
    ``rest``: where any other key's fine-tuned value comes from (the original source of a compressed
    pool), else it equals the pretrained one (τ = 0, e.g. the untouched layers of a LoRA fine-tune).
    ``get`` densifies one key at a time: W_k = W_0 + A Bᵀ, in the pretrained dtype.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], factors: Mapping[str, "LowRankDelta"],
                 dense: Optional[Mapping[str, torch.Tensor]] = None, rest: Optional[Source] = None) -> None:
        self.base = base
        self.factors = dict(factors)
        self.dense = dict(dense or {})
        self.rest = rest

    def keys(self):
        return list(self.base)

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.base.items()}

    def get(self, names=None):
        names = list(self.base) if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        from_rest = [n for n in names if n not in self.factors and n not in self.dense and self.rest is not None]
        if from_rest:
            out.update(self.rest.get(from_rest))
        for n in names:
            if n in out:
                continue
            w0 = self.base[n]
            if n in self.factors:
                out[n] = (w0.float() + self.factors[n].dense().to(w0.device)).to(w0.dtype)
            elif n in self.dense:
                out[n] = (w0.float() + self.dense[n].to(w0.device).float()).to(w0.dtype)
            else:
                out[n] = w0
        return {n: out[n] for n in names}

    def release(self):
        if self.rest is not None:
            self.rest.release()
