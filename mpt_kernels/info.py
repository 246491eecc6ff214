"""``mpt-kernels info``: versions, the CUDA device, and which backends can run here.

For every backend the package knows ("reference", "triton", "cuda") it says whether it
can compute each loss family on each device present (float32 logits), and if not, why:
its module failed to import (``backends.IMPORT_ERRORS``), it is not registered in this
build, or the registered backend's own reason (``Backend.unavailable_reason``). It also
names the backend ``backend="auto"`` picks on each device.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch

KNOWN_BACKENDS = ("reference", "triton", "cuda")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_devices() -> list:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        devices.append(
            {"index": index, "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
        )
    return devices


def _backend_report(name: str, registered: dict, devices: list) -> dict:
    """{"available", "description", "reason", "families": {device: {family: None | reason}}}."""
    from . import backends
    from ._registry import FAMILIES

    backend = registered.get(name)
    if backend is None:
        import_error = backends.IMPORT_ERRORS.get(name)
        if import_error is not None:
            reason = f"its module failed to import ({import_error})"
        else:
            reason = "not registered in this build"
        return {"available": False, "description": None, "reason": reason, "families": {}}
    families = {
        device: {
            family: backend.unavailable_reason(family, torch.device(device), torch.float32)
            for family in FAMILIES
        }
        for device in devices
    }
    available = any(reason is None for per_family in families.values() for reason in per_family.values())
    return {"available": available, "description": backend.description, "reason": None, "families": families}


def _auto_choice(device: str) -> dict:
    from ._registry import FAMILIES, select_backend

    logits = torch.empty(0, 1, device=device)
    choice = {}
    for family in FAMILIES:
        try:
            choice[family] = select_backend(family, "auto", logits).name
        except ValueError as error:
            choice[family] = f"none ({error})"
    return choice


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-able dict."""
    import mpt_kernels  # registers the backends
    from . import backends
    from ._registry import registered_backends

    cuda_devices = _cuda_devices()
    devices = ["cpu"] + (["cuda"] if cuda_devices else [])
    registered = {backend.name: backend for backend in registered_backends()}
    failed_modules = [module for module, error in backends.IMPORT_ERRORS.items() if error is not None]
    names = list(dict.fromkeys([*KNOWN_BACKENDS, *registered, *failed_modules]))
    return {
        "mpt_kernels": mpt_kernels.__version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _distribution_version("triton"),
        "cuda_devices": cuda_devices,
        "backends": {name: _backend_report(name, registered, devices) for name in names},
        "auto": {device: _auto_choice(device) for device in devices},
    }


def _format(report: dict) -> str:
    lines = [
        f"mpt-kernels {report['mpt_kernels']}",
        f"python      {report['python']}",
        f"torch       {report['torch']} (CUDA {report['torch_cuda'] or 'none: CPU-only build'})",
        f"triton      {report['triton']}",
    ]
    if report["cuda_devices"]:
        for device in report["cuda_devices"]:
            lines.append(
                f"device      cuda:{device['index']} {device['name']} (compute capability {device['capability']})"
            )
    else:
        lines.append("device      no CUDA device")
    lines.append("backends (float32 logits)")
    for name, backend in report["backends"].items():
        if backend["reason"] is not None:
            lines.append(f"  {name:<10} not available: {backend['reason']}")
            continue
        lines.append(f"  {name:<10} {backend['description']}")
        for device, per_family in backend["families"].items():
            runs = [family for family, reason in per_family.items() if reason is None]
            reasons = {reason for reason in per_family.values() if reason is not None}
            if runs:
                lines.append(f"    {device:<5} available for {', '.join(runs)}")
            for reason in sorted(reasons):
                families = [family for family, why in per_family.items() if why == reason]
                lines.append(f"    {device:<5} not available for {', '.join(families)}: {reason}")
    for device, choice in report["auto"].items():
        picks = ", ".join(f"{family} -> {name}" for family, name in choice.items())
        lines.append(f"auto on {device}: {picks}")
    return "\n".join(lines)


def run(args) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0
