"""Saving and loading weights: safetensors first, written atomically.

``save_state_dict`` writes a temporary file in the target's directory and
``os.replace``-s it over the target, so a reader never sees a half-written
file. Shared tensors (tied weights) and non-contiguous views are stored as
independent contiguous copies, which safetensors requires.
``load_state_dict`` reads safetensors, or a torch checkpoint with
``weights_only=True`` (no arbitrary unpickling).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_directory", "atomic_write", "is_safetensors", "load_state_dict", "remove_stale_temp_files",
           "save_model", "save_state_dict", "unwrap_state_dict"]

SAFETENSORS_SUFFIXES = (".safetensors",)


def is_safetensors(path: PathLike) -> bool:
    """True when ``path`` names a safetensors file (by suffix, else by its header)."""
    p = Path(path)
    if p.suffix in SAFETENSORS_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    d = path.parent if str(path.parent) else Path(".")
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temp_files(directory: PathLike, names: Callable[[str], bool]) -> list[Path]:
    """Delete the temp files ``atomic_write`` left in ``directory`` (after a kill) for targets whose name
    ``names(name)`` accepts; return what was removed. Only call it while no writer can be active there
    (e.g. holding the output directory's lock)."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        # ".{target}.{8 random chars}.tmp", as tempfile.mkstemp(prefix=f".{target}.", suffix=".tmp") makes
        n = f.name
        if not (n.startswith(".") and n.endswith(".tmp")) or not f.is_file():
            continue
        target, sep, rand = n[1:-4].rpartition(".")
        if sep and len(rand) == 8 and names(target):
            f.unlink()
            removed.append(f)
    return removed


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
                    ) -> None:
    """Save ``state`` as safetensors at ``path``, atomically.

    Every tensor is detached, moved to CPU and copied contiguous, so shared
    storage (tied weights) and strided views are fine.
    """
    from safetensors.torch import save_file

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of name -> Tensor, got {type(state).__name__}")
    out = {}
    seen: set[int] = set()
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"state keys must be str, got {type(k).__name__} ({k!r})")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state[{k!r}] must be a Tensor, got {type(v).__name__}")
        t = v.detach().to("cpu")
        storage = t.untyped_storage()
        # safetensors refuses tensors that share storage or are views into a larger buffer: copy those only
        if (not t.is_contiguous() or storage.data_ptr() in seen or t.storage_offset() != 0
                or storage.nbytes() != t.numel() * t.element_size()):
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} or None
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=meta))


def save_model(model: nn.Module, path: PathLike) -> None:
    """Save ``model.state_dict()`` as safetensors at ``path``, atomically."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    save_state_dict(model.state_dict(), path)


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a torch checkpoint (``weights_only=True``), on CPU.

    A torch checkpoint holding ``{"state_dict": {...}}`` is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {str(p)!r}")
    if is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # header or data corrupt / truncated
            raise ValueError(f"{str(p)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused: not a plain state dict
        raise ValueError(
            f"{str(p)!r} is not a plain state dict loadable with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); whole pickled models need "
            f"ModelPool.from_open_clip_checkpoints(..., trusted=True)") from e
    return unwrap_state_dict(obj, p)


def unwrap_state_dict(obj: Any, path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict in what ``torch.load`` returned (``{"state_dict": {...}}`` unwrapped), checked."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of name -> Tensor)")
    return dict(obj)


@contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False, name: str = "out") -> Iterator[Path]:
    """Write a directory atomically: yields a fresh temporary directory beside ``path``, renamed to
    ``path`` when the block ends without an exception (removed otherwise, so nothing is half written).

    An existing ``path`` is refused (FileExistsError naming ``name``) unless ``overwrite``; then it is
    replaced only after the new tree is complete.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{name}: {str(target)!r} already exists; pass overwrite=True (--overwrite) to "
                              f"replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
