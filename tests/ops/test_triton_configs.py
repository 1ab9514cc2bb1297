"""pmkernels/triton_configs.py: the kernels' launch configs and pruners import without the kernel modules."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not importable here")


def test_configs_import_without_the_kernels():
    code = ("import sys, pmkernels.triton_configs as c; "
            "assert c.gemm_configs('bf16', c.gemm_bucket(16, 4096), has_lora=True, add_c=False, block_r=16, "
            "capability=90); assert c.wd_configs('fp32', 16, 80); "
            "print(sorted(m for m in sys.modules if m.startswith('pmkernels.triton_') and m != 'pmkernels.triton_configs'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kernel_modules_use_these_configs():
    import pmkernels.triton_configs as tcfg
    import pmkernels.triton_pareto_linear as tpl
    import pmkernels.triton_weight_distances as twd

    assert tpl.gemm_configs is tcfg.gemm_configs and tpl.shrink_configs is tcfg.shrink_configs
    assert twd.wd_configs is tcfg.wd_configs
