"""The data-free objective's C++ path imports torch.utils.cpp_extension on first use; on a CPU-only machine with a
CUDA toolkit that import logs "No CUDA runtime is found, using CUDA_HOME=..." — which pmkernels must not emit."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_first_use_does_not_log_the_no_cuda_runtime_warning(tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "python_api")])}
    code = ("from pmkernels.cpp_weight_distances import _cpp_extension_load; _cpp_extension_load(); "
            "import logging; logging.getLogger('torch.utils.cpp_extension').warning('still logging')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No CUDA runtime" not in out.stderr + out.stdout
    assert "still logging" in out.stderr  # the filter is removed after the import: nothing else is hidden


def test_the_filter_drops_that_record_only():
    from pmkernels.cpp_weight_distances import _DropNoCudaRuntime

    f = _DropNoCudaRuntime()
    rec = lambda msg, *a: logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, __file__, 1, msg, a, None)  # noqa: E731
    assert not f.filter(rec("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda"))
    assert f.filter(rec("Error building extension"))
