"""The ``cuda`` backend on the CPU: its Python code (mpt_kernels/backends/cuda.py) calling
the CUDA emulation of ``_C`` (build.py) with CPU tensors.

``installed()`` builds (or finds) the emulated module and, until it exits, makes the
backend named ``"cuda"`` of the registry this one, so that ``backend="cuda"`` in the
public API runs the real kernels' code on CPU tensors. Every buffer the kernels write
(gradient, statistics, losses, partial sums, the row count) is filled first (NaN; -12345
for integers), so an element the kernels fail to write shows up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from mpt_kernels import _registry
from mpt_kernels._custom_op import define_loss_ops
from mpt_kernels.backends import cuda as cuda_backend

from . import build

_FAMILIES: dict = {}  # the operators can be defined once per process


def _poisoned(allocate):
    def saved(args, needs_grad):
        buffers = allocate(args, needs_grad)
        for buffer in buffers:
            buffer.fill_(float("nan"))
        return buffers

    return saved


def _poisoned_empty(shape, dtype, device):
    """cuda._empty filled first (NaN, or for integers a count no batch has), so that an
    element the kernels do not write shows."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return buffer.fill_(float("nan") if dtype.is_floating_point else -12345)


def _families() -> dict:
    # the backend's own functions: they read _C, _launch and the allocators patched below
    if not _FAMILIES:
        _FAMILIES["softmax"] = define_loss_ops(
            "cuda_emulated", "softmax", dispatch_key="CPU", backward_in_place=True,
            forward=cuda_backend._softmax_forward, saved_fake=cuda_backend._softmax_saved,
            backward=cuda_backend._softmax_backward,
        )
        _FAMILIES["multilabel"] = define_loss_ops(
            "cuda_emulated", "multilabel", dispatch_key="CPU", backward_in_place=True,
            forward=cuda_backend._multilabel_forward, saved_fake=cuda_backend._multilabel_saved,
            backward=cuda_backend._multilabel_backward,
        )
    return _FAMILIES


def _why_not(family: str, device: torch.device, dtype: torch.dtype):
    if device.type != "cpu":
        return f"the CUDA emulation runs on CPU tensors, got a {device.type} tensor"
    return cuda_backend._why_not(family, torch.device("cuda"), dtype)  # the same dtypes


@contextlib.contextmanager
def installed(asan: bool | None = None):
    """Yields the emulated ``_C`` module while ``backend="cuda"`` runs on it; the build
    with AddressSanitizer when ``asan`` (default: ``$MPT_KERNELS_EMULATION_ASAN`` is 1),
    which needs the sanitizer's runtime preloaded (tests/test_cuda_emulated_asan.py)."""
    if asan is None:
        asan = os.environ.get("MPT_KERNELS_EMULATION_ASAN") == "1"
    module = build.load(build.build(asan=asan))
    backend = dataclasses.replace(
        _registry._BACKENDS["cuda"], families=_families(), why_not=_why_not, status=lambda: None,
        description="the cuda backend's kernels, emulated on the CPU (tests/cuda_emulation)",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_backend, "_C", module)
        patch.setattr(cuda_backend, "_launch", lambda device: {"device": 0, "stream": 0})
        patch.setattr(cuda_backend, "_softmax_saved", _poisoned(cuda_backend._softmax_saved))
        patch.setattr(cuda_backend, "_multilabel_saved", _poisoned(cuda_backend._multilabel_saved))
        patch.setattr(cuda_backend, "_empty", _poisoned_empty)
        patch.setitem(_registry._BACKENDS, "cuda", backend)
        yield module


@contextlib.contextmanager
def installed_without_gpu():
    """installed() on a machine without a GPU where the emulation builds (yields True);
    elsewhere nothing changes (yields False): a GPU runs the real backend."""
    if torch.cuda.is_available() or build.unavailable_reason() is not None:
        yield False
        return
    with installed():
        yield True
