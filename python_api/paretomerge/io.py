"""Saving and loading weights: safetensors first, written atomically.

``save_state_dict`` writes a temporary file in the target's directory and
``os.replace``-s it over the target, so a reader never sees a half-written
file. Every write holds a lock on its target (``.<name>.lock`` beside it, removed
when the write ends) and, under it, first removes the temporary entries a killed
earlier write of the same target left (``remove_stale_temp_files``). Shared
tensors (tied weights) and non-contiguous views are stored as independent
contiguous copies, which safetensors requires.
``load_state_dict`` reads safetensors, or a torch checkpoint with
``weights_only=True`` (no arbitrary unpickling).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

__all__ = ["EXPORT_MARKER", "OutputLockedError", "atomic_directory", "atomic_write", "check_export_target",
           "is_safetensors",
           "load_state_dict", "remove_stale_temp_files", "save_model", "save_state_dict", "target_lock",
           "unwrap_state_dict"]

# The file every directory ``atomic_directory`` writes holds: ``overwrite`` replaces only a directory that has
# it (an earlier export), never a user's own directory or file.
EXPORT_MARKER = ".paretomerge-export.json"


class OutputLockedError(RuntimeError):
    """Another paretomerge process is writing the same output."""

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


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def target_lock(path: PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on writing ``path`` (a file or directory), then remove the temporary entries a
    killed earlier write of ``path`` left beside it; yields ``path`` as an absolute path (so "." has a name).

    The lock is ``.<name>.lock`` beside the target, taken with ``flock`` and unlinked when released, so it
    leaves nothing behind; a write killed by SIGKILL leaves an unlocked lock file the next write takes over.
    ``OutputLockedError`` at once when another process holds it.
    """
    target = Path(os.path.abspath(path))
    if not target.name:
        raise ValueError(f"cannot write the filesystem root {str(path)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(target)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: filelock's lock (its file stays)
        from filelock import FileLock, Timeout

        fl = FileLock(str(lock), timeout=0)
        try:
            fl.acquire()
        except Timeout:
            raise OutputLockedError(f"{str(target)!r} is being written by another process (it holds "
                                    f"{str(lock)!r})") from None
        try:
            remove_stale_temp_files(target.parent, lambda n: n == target.name)
            yield target
        finally:
            fl.release()
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(f"{str(target)!r} is being written by another process (it holds "
                                    f"{str(lock)!r})") from None
        except OSError:  # a filesystem without flock (ENOLCK): write unlocked and clean nothing (unsafe then)
            os.close(fd)
            yield target
            return
        # the holder before us may have unlinked the file after we opened it: lock the file the path names
        st = os.fstat(fd)
        try:
            now = os.stat(lock)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)
    try:
        remove_stale_temp_files(target.parent, lambda n: n == target.name)
        yield target
    finally:
        try:
            os.unlink(lock)  # while still holding it: a process that opened it retries on the new file
        except OSError:
            pass
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path`` (holding
    ``target_lock(path)``)."""
    with target_lock(path) as path:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


_RANDOM = 8  # characters tempfile adds to a name


def remove_stale_temp_files(directory: PathLike, names: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary entries a killed write left in ``directory`` for targets whose name ``names(name)``
    accepts; return what was removed: ``atomic_write``'s files ``.<target>.<8 chars>.tmp`` and
    ``atomic_directory``'s directories ``.<target>.tmp-<8 chars>`` / ``.<target>.old-<8 chars>``. Only call it
    while no writer of those targets can be active (holding their ``target_lock`` or the run's lock)."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        n = f.name
        if not n.startswith("."):
            continue
        if n.endswith(".tmp") and f.is_file() and not f.is_symlink():
            # ".{target}.{8 random chars}.tmp", as tempfile.mkstemp(prefix=f".{target}.", suffix=".tmp") makes
            target, sep, rand = n[1:-4].rpartition(".")
            if sep and len(rand) == _RANDOM and names(target):
                f.unlink()
                removed.append(f)
        elif f.is_dir() and not f.is_symlink():
            # ".{target}.tmp-{8}" / ".{target}.old-{8}", as tempfile.mkdtemp(prefix=f".{target}.tmp-") makes
            head, rand = n[1:-_RANDOM], n[-_RANDOM:]
            for kind in (".tmp-", ".old-"):
                if len(n) > _RANDOM + len(kind) + 1 and head.endswith(kind) and names(head[:-len(kind)]):
                    shutil.rmtree(f, ignore_errors=True)
                    removed.append(f)
                    break
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


def check_export_target(path: PathLike, overwrite: bool = False, name: str = "out") -> Path:
    """``path`` as ``atomic_directory`` may write it (FileExistsError naming ``name`` otherwise): new, or with
    ``overwrite`` an earlier export (a directory holding ``EXPORT_MARKER``). Exporters call it before any work;
    ``atomic_directory`` checks again under the target's lock."""
    target = Path(os.path.abspath(path))
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{name}: {str(target)!r} already exists; pass overwrite=True (--overwrite) "
                                  f"to replace it")
        if not (target.is_dir() and not target.is_symlink() and (target / EXPORT_MARKER).is_file()):
            what = ("a symbolic link, not a paretomerge export" if target.is_symlink() else
                    f"a directory that paretomerge did not write (no {EXPORT_MARKER} in it)" if target.is_dir()
                    else "a file, not a paretomerge export")
            raise FileExistsError(f"{name}: {str(target)!r} is {what}; overwrite replaces only an earlier "
                                  f"export: remove it yourself or choose another path")
    return target


@contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False, name: str = "out",
                     kind: str = "export") -> Iterator[Path]:
    """Write a directory atomically: yields a fresh temporary directory beside ``path``, renamed to
    ``path`` when the block ends without an exception (removed otherwise, so nothing is half written).

    The tree gets an ``EXPORT_MARKER`` file (``{"written_by": "paretomerge", "kind": kind}``). An existing
    ``path`` is refused (FileExistsError naming ``name``) unless ``overwrite``, and even then unless it is a
    directory holding that marker (an earlier export): a user's own directory or file is never replaced.
    It is replaced only after the new tree is complete. Holds ``target_lock(path)`` throughout.
    """
    with target_lock(path) as target:
        check_export_target(target, overwrite, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "paretomerge", "kind": kind}) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            with _signals_deferred():  # never stop between the two renames (the target would be missing)
                os.replace(target, old / "x")
                os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered when the block ends) where the OS allows it."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
