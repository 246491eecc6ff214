"""The ``triton`` backend: fused Triton kernels for both loss families.

The kernels live one family per module (``triton_softmax``, ``triton_multilabel``);
this module registers them as one backend. On CUDA tensors ``auto`` picks it, except
for multi-label tensors of up to 2^25 elements (``cuda``, see backends/cuda.py). CPU
tensors run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before the
package is imported), which is how CI tests the kernels; ``auto`` never picks it there.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here means: no triton, backend not registered)

from .._registry import Backend, register_backend
from .._validation import HALF_AND_SINGLE
from . import triton_multilabel, triton_softmax
from .triton_interpreter import interpreter_enabled


def _why_not(family: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in HALF_AND_SINGLE:
        return f"its kernels take float32, float16 or bfloat16 logits, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return (
        f"Triton kernels run on CUDA tensors, got a {device.type} tensor (CPU tensors run "
        "only in the interpreter: set TRITON_INTERPRET=1 before importing mpt_kernels)"
    )


def _status() -> Optional[str]:
    if not torch.cuda.is_available() and not interpreter_enabled():
        return "no CUDA device is visible to torch (and TRITON_INTERPRET is not set)"
    return None


def _auto_rank(family: str, logits: torch.Tensor) -> float:
    # On CPU the interpreter is far slower than the reference: auto never picks it there.
    return 10.0 if logits.device.type == "cuda" else 10_000.0


register_backend(
    Backend(
        name="triton",
        description="fused Triton kernels (CUDA; CPU through the Triton interpreter)",
        families={"softmax": triton_softmax.loss, "multilabel": triton_multilabel.loss},
        why_not=_why_not,
        auto_rank=_auto_rank,
        status=_status,
    )
)
