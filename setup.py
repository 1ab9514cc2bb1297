"""setuptools shim: metadata lives in pyproject.toml.

Optional ahead-of-time build of the C++ CPU kernels: with PMKERNELS_BUILD_CPP=1
in the environment (and torch importable at build time, e.g.
``PMKERNELS_BUILD_CPP=1 pip install --no-build-isolation -e .``), the
extension ``pmkernels._C_wdist`` is compiled from csrc/weight_distances.cpp.
Without it nothing is compiled at install time; the kernel is JIT-built on
first use instead (see csrc/README.md).
"""
import os

from setuptools import setup

kwargs = {}
if os.environ.get("PMKERNELS_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    kwargs["ext_modules"] = [
        CppExtension(
            "pmkernels._C_wdist",
            ["csrc/weight_distances.cpp"],
            define_macros=[("PMK_WD_PYMODULE", "1")],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    kwargs["cmdclass"] = {"build_ext": BuildExtension}

setup(**kwargs)
