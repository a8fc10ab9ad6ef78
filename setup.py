"""Build of ibmd_fast._C: the fused ops (csrc/) as a PyTorch C++/CUDA extension.

The C++ CPU kernels are always built. The CUDA kernels are added when a CUDA
toolkit (nvcc) and a CUDA build of torch are both present. Switches:

    IBMD_FAST_CUDA=auto|1|0   auto (default): build CUDA kernels when possible;
                              1: require them (fail if impossible); 0: CPU only
    TORCH_CUDA_ARCH_LIST      e.g. "9.0" or "8.0;9.0+PTX" (default "8.0;9.0+PTX")
    IBMD_FAST_OPENMP=1|0      build the CPU kernels with OpenMP (default 1)
    MAX_JOBS                  parallel compile jobs (ninja)

Install with `pip install --no-build-isolation .` after torch: build isolation
would pull a multi-GB CUDA torch into a throwaway build environment.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit("ibmd-fast: install torch first, then `pip install --no-build-isolation .`")

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("IBMD_FAST_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on", "force"):
        if not possible:
            sys.exit(
                "ibmd-fast: IBMD_FAST_CUDA=1 but the CUDA kernels cannot be built "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return possible


def _cuda_include_dirs() -> list[str]:
    # The pip CUDA wheels ship headers (cuBLAS, ...) that ATen's CUDA headers include;
    # a bare toolkit may lack them.
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


# The C++ standard is left to torch.utils.cpp_extension, which picks the one its
# torch was built with (an extension built with another can crash when it throws).
# -fopenmp: at::parallel_for is a header template that runs serially unless the
# extension itself is compiled with OpenMP (as libtorch is).
def _extension():
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    openmp = os.environ.get("IBMD_FAST_OPENMP", "1") not in ("0", "false", "no", "off")
    cxx_flags = ["-O3", "-DIBMD_PYTHON_MODULE", "-fno-math-errno", "-ffp-contract=off"] + (
        ["-fopenmp"] if openmp else []
    )
    link_flags = ["-fopenmp"] if openmp else []
    if not _want_cuda():
        return CppExtension(
            "ibmd_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DIBMD_PYTHON_MODULE"]
    return CUDAExtension(
        "ibmd_fast._C",
        cpu_sources + cuda_sources,
        include_dirs=_cuda_include_dirs(),
        define_macros=[("IBMD_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


class Build(BuildExtension):
    """BuildExtension that also leaves _C next to the sources, so a checkout imports it."""

    def run(self):
        super().run()
        if self.inplace:
            return
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            target = os.path.join(HERE, *ext.name.split(".")[:-1], os.path.basename(built))
            if os.path.exists(built) and os.access(os.path.dirname(target), os.W_OK):
                shutil.copyfile(built, target)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
