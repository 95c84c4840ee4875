"""Build llmcore._C: the CPU kernels always, the CUDA kernels when possible.

Environment:
  LLMCORE_CUDA=0|1        force the CUDA kernels off / on (default: on when torch was built
                          with CUDA and nvcc is found)
  LLMCORE_CUDA_ARCHS      semicolon list of SM targets, default "80;90a"
  MAX_JOBS                parallel compile jobs (ninja), as for any torch extension

Install torch first, then `pip install --no-build-isolation -e .`: the extension must be
compiled against the very torch it will be loaded into (its C++ ABI and version), and
build isolation would fetch a second, different torch into a temporary environment.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    flag = os.environ.get("LLMCORE_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"LLMCORE_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and cpp_extension.CUDA_HOME is None:
            raise SystemExit("LLMCORE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if flag == "1" and torch.version.cuda is None:
            raise SystemExit("LLMCORE_CUDA=1 but this torch was built without CUDA")
        return flag == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _torch_uses_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info() and os.name == "posix" and \
        os.uname().sysname == "Linux"


def _sources(cuda: bool) -> list[str]:
    # By extension: a .cpp is host code that builds without CUDA; everything that needs nvcc
    # or the CUDA runtime, the CUDA torch bindings included, is a .cu file.
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    return cpp + cu if cuda else cpp


def _gencode(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _extension():
    cuda = _cuda_wanted()
    cxx = ["-O3", "-std=c++20", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    link_args = []
    if _torch_uses_openmp():
        # at::parallel_for is inline code over OpenMP: without -fopenmp it silently runs on
        # one thread. torch already links libgomp, so this adds no new runtime.
        cxx.append("-fopenmp")
        link_args.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda:
        archs = os.environ.get("LLMCORE_CUDA_ARCHS", "80;90a")
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                *_gencode(archs)]
        define_macros.append(("LLMCORE_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            "llmcore._C", _sources(True), include_dirs=include_dirs,
            define_macros=define_macros, py_limited_api=True, extra_link_args=link_args,
            extra_compile_args={"cxx": cxx, "nvcc": ["-Xcompiler", "-fopenmp", *nvcc]
                                if link_args else nvcc})
    return cpp_extension.CppExtension(
        "llmcore._C", _sources(False), include_dirs=include_dirs,
        define_macros=define_macros, py_limited_api=True, extra_link_args=link_args,
        extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
