"""No host synchronisation in a loss's hot path, checked on the CPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches a synchronising call
(``test_cuda_backend.test_no_host_synchronisation``, both fused backends). On the CPU
there is nothing to synchronise with, so this checks the calls themselves: while each
fused backend (Triton in its interpreter, CUDA in its emulation) runs every loss forward
and backward, for an upstream gradient of 1 and of 0.37, the Tensor methods that read a
value back to the host (``item``, ``tolist``, ``cpu``, ``numpy``, and ``bool``, ``int``,
``float`` or an index of a tensor) fail when the package's own code calls them (Triton's
interpreter and torch may). The target value check, which runs only on CPU tensors (a
GPU skips it), is switched off.
"""

from __future__ import annotations

import sys

import pytest
import torch

import mpt_kernels
from cuda_emulation import installed_without_gpu
from mpt_kernels.backends import cuda as cuda_backend

if torch.cuda.is_available():
    pytest.skip("a GPU runs test_cuda_backend.test_no_host_synchronisation instead", allow_module_level=True)

pytest.importorskip("triton")
from mpt_kernels.backends import triton_interpreter, triton_softmax  # noqa: E402

# numpy (the interpreter) warns about lanes computed and then masked out (log2 of 0)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def no_read_backs(monkeypatch):
    """The read-back methods raise when a frame of mpt_kernels calls them; returns the
    list of (method, caller) they refused."""
    refused = []

    def guarded(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("mpt_kernels"):
                refused.append((name, caller))
                raise AssertionError(f"Tensor.{name} called from {caller}: a host synchronisation on a GPU")
            return original(self, *args, **kwargs)
        return method

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    for module in (triton_softmax, cuda_backend):
        monkeypatch.setattr(module, "check_target_values", lambda *args: None)
    return refused


def _softmax_calls(z, y, old, new, backend, reduction):
    yield mpt_kernels.mpt_loss(z, y, old, new, focus="neg_flip", label_smoothing=0.1, reduction=reduction,
                               backend=backend)
    yield mpt_kernels.mpt_loss(z, y, old, new, kind="lm", class_bias=torch.linspace(-1.0, 1.0, z.shape[1]),
                               reduction=reduction, backend=backend)
    yield mpt_kernels.margin_cross_entropy(z, y, num_old_classes=old.shape[1], new_class_bias=3.0,
                                           reduction=reduction, backend=backend)
    yield mpt_kernels.focal_distillation(z, old, y, reduction=reduction, backend=backend)


def _multilabel_calls(x, t, backend, reduction):
    yield mpt_kernels.hill_loss(x, t, reduction=reduction, backend=backend)
    yield mpt_kernels.splc_loss(x, t, epoch=3, reduction=reduction, backend=backend)


def _every_loss(backend: str) -> int:
    """Every loss forward and backward; returns the number of calls made."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 40, generator=g, requires_grad=True)
    old, new = torch.randn(5, 17, generator=g), torch.randn(5, 40, generator=g)
    y = torch.tensor([3, -100, 20, 39, 0])
    targets = torch.rand(5, 40, generator=g) > 0.6
    calls = 0
    for reduction in ("mean", "none"):
        for value in (1.0, 0.37):  # 0.37: the backward kernels that recompute
            for loss in [*_softmax_calls(z, y, old, new, backend, reduction),
                         *_multilabel_calls(z, targets, backend, reduction)]:
                loss.backward(torch.full_like(loss, value))
                calls += 1
    return calls


@pytest.mark.skipif(not triton_interpreter.interpreter_enabled(), reason="CPU tensors need Triton's interpreter")
def test_the_triton_backend_reads_nothing_back(no_read_backs):
    assert _every_loss("triton") == 24
    assert no_read_backs == []


def test_the_cuda_backend_reads_nothing_back(no_read_backs):
    with installed_without_gpu() as emulated:
        if not emulated:
            pytest.skip("no CUDA emulation here")
        assert _every_loss("cuda") == 24
    assert no_read_backs == []
