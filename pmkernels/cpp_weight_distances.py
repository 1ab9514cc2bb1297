"""Host side of the C++ CPU kernel of ``weight_distances`` (csrc/weight_distances.cpp).

The extension is compiled on first use with ``torch.utils.cpp_extension.load``
(ninja, OpenMP) into a cache directory (``$PMKERNELS_CACHE`` or
``~/.cache/pmkernels``) and registers the op
``torch.ops.pmkernels.weight_distances_pass`` for the CPU dispatch key. If it
was built ahead of time by ``setup.py`` (``PMKERNELS_BUILD_CPP=1``), that
build is used. If neither works, ``available()`` is False, a warning is given
once and ``weight_distances(impl="auto")`` uses the torch path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

_SOURCE_NAME = "weight_distances.cpp"
_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None}


def source_path() -> Optional[Path]:
    """csrc/weight_distances.cpp: in the repo (editable install) or shipped in the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc" / _SOURCE_NAME, here / "csrc" / _SOURCE_NAME):
        if cand.is_file():
            return cand
    return None


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    feats = sorted(w for w in flags.split() if w.startswith(("avx", "fma", "sse4")))
    return platform.machine() + "-" + "-".join(feats)


def cache_dir(src: Path) -> Path:
    root = Path(os.environ.get("PMKERNELS_CACHE") or Path.home() / ".cache" / "pmkernels")
    h = hashlib.sha256()
    h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_tag().encode())
    return root / f"wdist_cpp_{h.hexdigest()[:16]}"


def _op_registered() -> bool:
    try:
        torch.ops.pmkernels.weight_distances_pass  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class _DropNoCudaRuntime(logging.Filter):
    """Drops the one record torch.utils.cpp_extension logs at import on a machine with a CUDA toolkit but no
    GPU ("No CUDA runtime is found, using CUDA_HOME=..."): this extension is CPU-only, so it says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _cpp_extension_load():
    """``torch.utils.cpp_extension.load``, imported without its CPU-only CUDA_HOME warning (every other
    record of that logger passes)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropNoCudaRuntime()
    logger.addFilter(drop)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.removeFilter(drop)
    return load


def _build() -> None:
    # An ahead-of-time build (setup.py, PMKERNELS_BUILD_CPP=1) registers the op on import.
    if os.environ.get("PMKERNELS_NO_AOT") != "1":
        try:
            from . import _C_wdist  # noqa: F401
        except Exception:  # not built, or built against another torch
            pass
    if _op_registered():
        return
    src = source_path()
    if src is None:
        raise RuntimeError(f"cannot find {_SOURCE_NAME} next to the pmkernels package")
    load = _cpp_extension_load()
    build = cache_dir(src)
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("PMKERNELS_NO_NATIVE") != "1":
        flags.append("-march=native")
    load(
        name="pmkernels_wdist_cpp",
        sources=[str(src)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=os.environ.get("PMKERNELS_VERBOSE_BUILD") == "1",
    )
    if not _op_registered():
        raise RuntimeError("the extension built but torch.ops.pmkernels.weight_distances_pass is missing")


def available() -> bool:
    """Build (once) and load the extension; False, with a one-time warning, if that fails."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if not _state["tried"]:
            try:
                _build()
                _state["ok"] = True
            except Exception as e:  # no compiler, no ninja, build error, ...
                _state["error"] = e
                warnings.warn(
                    f"pmkernels: could not build the C++ weight_distances kernel ({type(e).__name__}: {e}); "
                    "impl='auto' falls back to the torch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["ok"]


def build_error() -> Optional[BaseException]:
    return _state["error"]


def cpp_pass(deltas: list[torch.Tensor], U: torch.Tensor, V: torch.Tensor):
    """One pass over the deltas: (‖D_k‖² (K,), Y (out, K, r), Z (in, K, r)), Y[:, k] = D_k V, Z[:, k] = D_kᵀ U.

    U, V must already be in the accumulation dtype (float32 or float64).
    """
    if not available():
        raise RuntimeError(f"the C++ weight_distances kernel is unavailable: {build_error()}")
    return torch.ops.pmkernels.weight_distances_pass(list(deltas), U.contiguous(), V.contiguous())
