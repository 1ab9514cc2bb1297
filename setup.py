"""setuptools shim: metadata lives in pyproject.toml.

Optional ahead-of-time build of the C++ CPU kernels: with PMKERNELS_BUILD_CPP=1
in the environment (and torch importable at build time, e.g.
``PMKERNELS_BUILD_CPP=1 pip install --no-build-isolation -e .``), the
extension ``pmkernels._C_wdist`` is compiled from csrc/weight_distances.cpp.
Without it nothing is compiled at install time; the kernel is JIT-built on
first use instead (see csrc/README.md).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_csrc(build_py):
    """Ship csrc/ (top level, per the layout) inside the package as pmkernels/csrc/ for the JIT build."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "pmkernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in Path(__file__).parent.joinpath("csrc").glob("*.cpp"):
            shutil.copy2(src, dest / src.name)


kwargs = {"cmdclass": {"build_py": build_py_with_csrc}}
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
    kwargs["cmdclass"]["build_ext"] = BuildExtension

setup(**kwargs)
