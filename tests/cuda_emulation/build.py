"""Builds the CUDA emulation of ``mpt_kernels._C``: the csrc/ sources, kernels included,
compiled by the host C++ compiler against cuda_emulation.h, as a pybind11 module with
the same interface as ``_C``. ``load()`` returns it; tests/test_cuda_emulated.py runs the
``cuda`` backend's Python code on it with CPU tensors.

Builds are cached by the hash of their sources and flags, under
``$MPT_KERNELS_EMULATION_CACHE`` (default: a folder in the temporary directory).
``python tests/cuda_emulation/build.py [--asan]`` builds and prints the module's path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
# every source of _C (setup.py's SOURCES: all of csrc/), and the emulation's threads
SOURCES = [*sorted(CSRC.glob("*.cpp")), *sorted(CSRC.glob("*.cu")), HERE / "emulation.cpp"]
HEADERS = [*sorted(CSRC.glob("*.h")), *sorted(CSRC.glob("*.cuh")), HERE / "cuda_emulation.h"]
# AddressSanitizer (out-of-bounds accesses, with the stacks of the fibers) and the
# alignment check of UBSan (a 16-byte vector access a GPU would refuse)
SANITIZE = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"]


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the emulation's fibers need Linux on x86-64, not {platform.system()} on {platform.machine()}"
    if compiler() is None:
        return "no C++ compiler (g++ or $CXX) was found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    return None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def flags(asan: bool) -> list[str]:
    import pybind11

    paths = sysconfig.get_paths()
    includes = sorted({paths["include"], paths["platinclude"]})
    return [
        "-std=c++17", "-O2", "-g0", "-fPIC", "-fvisibility=hidden", "-DMPT_CUDA_EMULATION", "-Wall",
        f"-I{CSRC}", f"-I{HERE}", f"-I{pybind11.get_include()}", *(f"-I{p}" for p in includes),
        *(SANITIZE if asan else []),
    ]


def build(asan: bool = False) -> Path:
    """The emulated ``_C``'s path, compiling it when the cache has no build of these sources."""
    return _build("_C", SOURCES, asan)


def build_selftest() -> Path:
    """The path of ``_emulation_selftest``: kernels that test the emulation (selftest.cpp)."""
    return _build("_emulation_selftest", [HERE / "selftest.cpp", HERE / "emulation.cpp"], asan=False)


def _build(name: str, sources: list[Path], asan: bool) -> Path:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the CUDA emulation: {reason}")
    cxx = compiler()
    compile_flags = flags(asan)
    digest = hashlib.sha256()
    for path in [*sources, *HEADERS]:
        digest.update(path.name.encode() + path.read_bytes())
    import pybind11

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest.update(" ".join([cxx, version, *compile_flags, sys.version, pybind11.__version__]).encode())
    root = Path(os.environ.get("MPT_KERNELS_EMULATION_CACHE", Path(tempfile.gettempdir()) / "mpt_kernels_emulation"))
    folder = root / digest.hexdigest()[:16]
    output = folder / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if output.exists():
        return output
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    objects = []
    processes = []
    for source in sources:
        obj = scratch / (source.name + ".o")
        command = [cxx, "-x", "c++", "-c", str(source), "-o", str(obj), *compile_flags]
        processes.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        objects.append(str(obj))
    failures = []
    for command, process in processes:
        out, _ = process.communicate()
        if process.returncode != 0:
            failures.append(" ".join(command) + "\n" + out.decode(errors="replace"))
    if failures:
        raise RuntimeError("the CUDA emulation does not compile:\n" + "\n".join(failures))
    linked = scratch / output.name
    link = [cxx, "-shared", *objects, "-o", str(linked), *(SANITIZE if asan else [])]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulation failed:\n{' '.join(link)}\n{result.stdout}{result.stderr}")
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(linked, output)  # atomic: a concurrent build leaves one complete file
    shutil.rmtree(scratch, ignore_errors=True)
    return output


def load(path: Path):
    """Imports the module built at ``path`` (its init function is named after the file)."""
    name = path.name.split(".")[0]
    spec = importlib.util.spec_from_file_location(f"mpt_kernels_emulation.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asan", action="store_true", help="with AddressSanitizer and UBSan's alignment check")
    print(build(asan=parser.parse_args().asan))
