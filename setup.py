"""Build script: the Python package, and the CUDA extension ``mpt_kernels._C`` (csrc/).

The extension is compiled by nvcc (its host code through nvcc's host compiler), bound
with pybind11 and linked by nvcc against the static CUDA runtime. It never includes or
links torch, so an isolated build needs only setuptools and pybind11 (pyproject.toml).

Environment:

* ``MPT_KERNELS_CUDA``: unset: build ``_C`` when nvcc is found, else install without it
  (the ``cuda`` backend then says why it is unavailable); ``0``: never build it; ``1``:
  build it or fail the install.
* ``MPT_KERNELS_CUDA_ARCHS``: compute capabilities to build machine code for, separated
  by ``;`` or ``,`` (default ``80;86;89;90``); PTX of the highest is embedded as well, for
  newer GPUs. One architecture (e.g. ``90``) builds in a fraction of the time.
* ``MPT_KERNELS_NVCC_THREADS``: nvcc's ``--threads`` (default: the CPU count, at most
  the number of targets).
* ``CUDA_HOME`` / ``CUDA_PATH``: where to find ``bin/nvcc`` when it is not on PATH.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION = "mpt_kernels._C"
SOURCES = ["bindings.cpp", "host_math.cpp", "common_kernels.cu", "softmax_loss.cu", "multilabel_loss.cu"]
HEADERS = ["loss_math.cuh", "softmax_math.cuh", "cuda_common.cuh", "launchers.h", "host_math.h"]
DEFAULT_ARCHS = "80;86;89;90"


def cuda_mode() -> str:
    mode = os.environ.get("MPT_KERNELS_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"MPT_KERNELS_CUDA must be unset, 0 or 1, got {mode!r}")
    return mode


def find_nvcc():
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_archs() -> list:
    raw = os.environ.get("MPT_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise RuntimeError(f"MPT_KERNELS_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}")
    return archs


def gencode_flags(archs: list) -> list:
    """Machine code for every arch; the highest also as PTX, which newer GPUs JIT-compile."""
    top = max(archs, key=int)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a != top]
    flags.append(f"-gencode=arch=compute_{top},code=[sm_{top},compute_{top}]")
    return flags


def is_stale(target: str, sources: list) -> bool:
    if not os.path.exists(target):
        return True
    built = os.path.getmtime(target)
    return any(os.path.getmtime(s) > built for s in sources)


class BuildExtension(build_ext):
    """Builds ``mpt_kernels._C`` with nvcc; a failure is fatal only with MPT_KERNELS_CUDA=1."""

    def build_extension(self, ext):
        if ext.name != EXTENSION:
            return super().build_extension(ext)
        try:
            self.build_cuda_extension(ext)
        except Exception as error:
            if cuda_mode() == "1":
                raise
            self.warn(
                f"mpt_kernels: the CUDA extension was not built ({error}); the 'cuda' backend "
                "will be unavailable. Set MPT_KERNELS_CUDA=1 to make this an error."
            )

    def build_cuda_extension(self, ext):
        import pybind11  # a build requirement (pyproject.toml)

        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc was not found")
        archs = cuda_archs()
        threads = os.environ.get("MPT_KERNELS_NVCC_THREADS") or str(min(os.cpu_count() or 1, len(archs) + 1))
        python_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        compile_flags = [
            "-std=c++17",
            "-O3",
            "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "-Icsrc",
            f"-I{pybind11.get_include()}",
            *(f"-I{path}" for path in sorted(python_includes)),
        ]
        cuda_flags = [*gencode_flags(archs), "--threads", threads]
        temp = os.path.join(self.build_temp, "mpt_kernels_C")
        os.makedirs(temp, exist_ok=True)
        objects = []
        for source in ext.sources:
            obj = os.path.join(temp, os.path.basename(source) + ".o")
            if self.force or is_stale(obj, [source, *ext.depends]):
                command = [nvcc, "-c", source, "-o", obj, *compile_flags]
                if source.endswith(".cu"):
                    command += cuda_flags
                self.run_command_line(command)
            objects.append(obj)
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        # nvcc links the static CUDA runtime (and its -lrt -lpthread -ldl) itself
        self.run_command_line([nvcc, "-shared", "--cudart", "static", *objects, "-o", output])

    def run_command_line(self, command):
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True)


def extensions() -> list:
    mode = cuda_mode()
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise RuntimeError(
                "MPT_KERNELS_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME"
            )
        print(
            "mpt_kernels: nvcc not found, installing without the CUDA extension "
            "(the 'cuda' backend will be unavailable)",
            file=sys.stderr,
        )
        return []
    return [
        Extension(
            EXTENSION,
            sources=[f"csrc/{name}" for name in SOURCES],
            depends=[f"csrc/{name}" for name in HEADERS],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
