"""Who computes a case: the package's backends, the eager reference, torch.compile of the
reference, and Liger-Kernel's kernels composed into the same loss.

Each provider says, for the whole run, whether it can run here (``run_unavailable``)
and, for one cell, whether it applies (``cell_unavailable``); ``build`` returns the
function ``(logits, inputs) -> loss`` that the timer calls.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch

from .cases import LossCase

BACKEND_PROVIDERS = ("triton", "cuda")  # the package's fused backends
BASELINES = ("reference", "compile")  # what the speed-ups are measured against
PROVIDER_NAMES = ("triton", "cuda", "liger", "compile", "reference")

DESCRIPTIONS = {
    "triton": "mpt_kernels.<loss>(..., backend='triton')",
    "cuda": "mpt_kernels.<loss>(..., backend='cuda')",
    "liger": "Liger-Kernel's cross-entropy / KL-divergence kernels composed into the loss",
    "compile": "torch.compile(mpt_kernels.reference.<loss>)",
    "reference": "mpt_kernels.reference.<loss> (eager PyTorch)",
}


def interpreter_enabled() -> bool:
    """Whether Triton's kernels run in its interpreter (False without Triton)."""
    try:
        from ..backends.triton_interpreter import interpreter_enabled as enabled
    except ImportError:
        return False
    return enabled()


def run_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why ``name`` cannot run at all on ``device`` in this process, or None."""
    if name in BACKEND_PROVIDERS:
        from .. import backends
        from .._registry import registered_backends

        registered = {backend.name: backend for backend in registered_backends()}
        if name not in registered:
            error = backends.IMPORT_ERRORS.get(name)
            return f"backend {name!r} is not registered" + (f" ({error})" if error else " in this build")
        reason = registered[name].status()  # e.g. its extension failed to build
        return None if reason is None else f"backend {name!r} cannot run here: {reason}"
        # per (family, device, dtype): see cell_unavailable
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "the liger_kernel package is not installed"
        if device.type != "cuda":
            return "Liger-Kernel's kernels run on CUDA tensors only"
        return None
    if name == "compile":
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None
    if name == "reference":
        return None
    raise ValueError(f"unknown provider {name!r}")


def cell_unavailable(name: str, case: LossCase, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why ``name`` does not compute ``case`` for these tensors, or None."""
    if name in BACKEND_PROVIDERS:
        from .._registry import select_backend

        try:
            select_backend(case.family, name, torch.empty(0, 1, dtype=dtype, device=device))
        except ValueError as error:
            return str(error)
        return None
    if name == "liger" and case.liger is None:
        return case.liger_note
    return None


def configure_compile() -> None:
    """Room for every graph the sweep compiles: past the recompile limit, Dynamo would fall
    back to eager silently and the 'compile' figures would be eager ones."""
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 256))
    for limit in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 4096))


def reset_compile() -> None:
    """Forget the compiled graphs of the previous case (keeps the cache small)."""
    torch._dynamo.reset()


def build(name: str, case: LossCase, *, compile_dynamic: bool = True) -> Callable:
    """``(logits, inputs) -> loss`` for provider ``name``."""
    from .. import reference

    if name in BACKEND_PROVIDERS:
        return functools.partial(case.forward, BackendAPI(name))
    if name == "reference":
        return functools.partial(case.forward, reference)
    if name == "compile":
        def reference_loss(logits, inputs):
            return case.forward(reference, logits, inputs)

        return torch.compile(reference_loss, dynamic=compile_dynamic)
    if name == "liger":
        return case.liger
    raise ValueError(f"unknown provider {name!r}")


class BackendAPI:
    """The public functional API with ``backend=`` bound (what ``case.forward`` calls)."""

    def __init__(self, backend: str):
        from .. import functional

        self._functional, self._backend = functional, backend

    def __getattr__(self, loss_name: str):
        return functools.partial(getattr(self._functional, loss_name), backend=self._backend)
