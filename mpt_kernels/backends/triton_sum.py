"""The last step of a scalar reduction, shared by both Triton loss families: the sum of a
float32 vector of partial losses (one per row, or one per tile), in a fixed order, times
a scale, stored as the 0-d loss in its dtype.

One program adds the partials in a fixed order (each lane a strided sum, then one tree
over the lanes), so the loss is bitwise the same on every run: no atomics. The scale is a
float (1, or 1/(N·C) for a multi-label "mean") and, for a softmax "mean", also a float32
on the device (1/count of the rows not ignored, which only the device knows). One launch
replaces the sum, the multiply and the cast that torch would run as three kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_fastmath as fm

BLOCK = 4096  # partials per loop step (tests under the interpreter shrink it)


@triton.jit(do_not_specialize=["num_partials"])  # set by the batch size: one compile for all
def _scaled_sum_kernel(partials_ptr, out_ptr, num_partials, scale, scale_ptr,
                       HAS_DEVICE_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """out = Σ partials · scale (· *scale_ptr), summed in a fixed order (one program)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offsets, mask=offsets < num_partials, other=0.0)
    total = tl.sum(acc) * scale
    if HAS_DEVICE_SCALE:
        total = total * tl.load(scale_ptr)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


def scaled_sum(partials: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
               device_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The 0-d ``Σ partials · scale · device_scale`` in ``dtype`` (partials: float32, 1-D,
    contiguous; device_scale: a float32 scalar on the same device, or None)."""
    out = torch.empty((), dtype=dtype, device=partials.device)
    num_warps = max(1, min(8, BLOCK // 512))
    _scaled_sum_kernel[(1,)](
        partials, out, partials.numel(), scale, device_scale if device_scale is not None else partials,
        HAS_DEVICE_SCALE=device_scale is not None, BLOCK=BLOCK, num_warps=num_warps, **fm.LAUNCH_OPTIONS,
    )
    return out
