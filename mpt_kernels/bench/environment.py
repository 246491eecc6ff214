"""What a result file says about where it was measured: device, driver, versions, code."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPOSITORY_DIR = PACKAGE_DIR.parent
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".toml")


def distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list, cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    """The commit and whether the tree differs from it (results/ outputs not counted).

    ``MPT_KERNELS_GIT_COMMIT``, when set, wins: the GPU machine gets a copy of the working
    tree whose ``.git`` (if any) may be older than the code it holds (seen on the first
    H200 run: the copy's HEAD was the session's first commit). ``source_digest``
    identifies the code either way.
    """
    head = _run(["git", "rev-parse", "HEAD"], REPOSITORY_DIR)
    commit = os.environ.get("MPT_KERNELS_GIT_COMMIT")
    if commit:
        dirty = os.environ.get("MPT_KERNELS_GIT_DIRTY")
        return {"commit": commit, "dirty": None if dirty is None else dirty not in ("", "0"),
                "source": "MPT_KERNELS_GIT_COMMIT", "head_of_this_copy": head}
    if head is not None:
        status = _run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], REPOSITORY_DIR)
        return {"commit": head, "dirty": bool(status), "source": "git"}
    return {"commit": None, "dirty": None, "source": "unknown (no git repository here)"}


def source_digest() -> str:
    """sha256 over the package's source files (names and contents), to tell code apart
    where no commit is known."""
    digest = hashlib.sha256()
    roots = [PACKAGE_DIR] + [REPOSITORY_DIR / name for name in ("csrc",) if (REPOSITORY_DIR / name).is_dir()]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPOSITORY_DIR)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def driver_version() -> Optional[str]:
    """The NVIDIA driver's version (NVML, else nvidia-smi)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML: try the command line
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], Path.cwd())
    return out.splitlines()[0].strip() if out else None


def device_info(device: torch.device, clock) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_name(), "cpu_count": os.cpu_count(), "driver": None}
    props = torch.cuda.get_device_properties(device)
    try:
        cuda_driver_api = torch._C._cuda_getDriverVersion()
    except Exception:  # a private function: absent in some builds
        cuda_driver_api = None
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "total_memory_bytes": props.total_memory,
        "l2_bytes": clock.l2_bytes,
        "driver": driver_version(),
        "cuda_driver_api": None if not cuda_driver_api else f"{cuda_driver_api // 1000}.{cuda_driver_api % 1000 // 10}",
        "cuda_runtime": torch.version.cuda,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def versions() -> dict:
    import sys

    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "triton": distribution_version("triton"),
        "liger_kernel": distribution_version("liger-kernel") or distribution_version("liger_kernel"),
        "numpy": distribution_version("numpy"),
        "matplotlib": distribution_version("matplotlib"),
        "mpt_kernels": distribution_version("mpt-kernels"),
    }


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# The backends' launch knobs: module attributes that tests and profiles change and that
# measurements decide (a sweep runs with the defaults of the commit it measures).
LAUNCH_KNOBS = {
    "triton_softmax": ("MAX_REGISTERS", "chunk_classes"),
    "triton_multilabel": ("TILE_ELEMENTS", "TILE_WARPS"),
    "cuda": ("SHARED_ROW_BYTES",),
}


def launch_settings() -> dict:
    """LAUNCH_KNOBS as this run has them, of the backends installed here (the Triton
    ones need triton, which is not installed off Linux)."""
    settings = {}
    for module_name, names in LAUNCH_KNOBS.items():
        try:
            module = importlib.import_module(f"mpt_kernels.backends.{module_name}")
        except ImportError:
            continue
        settings.update({f"{module_name}.{name}": getattr(module, name) for name in names})
    return settings


def relevant_environment() -> dict:
    names = ("TRITON_INTERPRET", "MPT_KERNELS_SYNC_CHECKS", "CUDA_VISIBLE_DEVICES",
             "TORCHINDUCTOR_FX_GRAPH_CACHE", "PYTORCH_CUDA_ALLOC_CONF")
    return {name: os.environ[name] for name in names if name in os.environ}
