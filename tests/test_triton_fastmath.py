"""The float32 helpers of the Triton kernels (mpt_kernels/backends/triton_fastmath.py) lower
to the instructions they promise on sm_90; under the interpreter they are the plain
operations (the kernels' CPU tests use them that way)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mpt_kernels.backends import triton_fastmath as fm
from sm90_compile import run_sm90_compile

BLOCK = tl.constexpr(128)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter


@triton.jit
def _shift_difference_kernel(x_ptr, y_ptr, out_ptr, scale, ROUNDED: tl.constexpr):
    """x·scale - y, the product rounded on its own (fm.mul_rn) or left to the compiler."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    y = tl.load(y_ptr + offsets)
    if ROUNDED:
        product = fm.mul_rn(x, scale)
    else:
        product = x * scale
    tl.store(out_ptr + offsets, product - y)


def test_mul_rn_is_the_rounded_product():
    x = torch.randn(BLOCK.value, device=DEVICE) * 30
    y = torch.randn(BLOCK.value, device=DEVICE) * 30
    out = torch.empty(BLOCK.value, device=DEVICE)
    _shift_difference_kernel[(1,)](x, y, out, 1.4426950408889634, ROUNDED=True)
    expected = (x * torch.tensor(1.4426950408889634, dtype=torch.float32, device=DEVICE)) - y
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


AOT_SCRIPT = r"""
import re, sys
sys.path.insert(0, {tests!r})
from test_triton_fastmath import _shift_difference_kernel

types = dict(x_ptr="*fp32", y_ptr="*fp32", out_ptr="*fp32", scale="fp32")
fused = compile_kernel(_shift_difference_kernel, types, dict(ROUNDED=False), 4)
rounded = compile_kernel(_shift_difference_kernel, types, dict(ROUNDED=True), 4)
# left alone, the compiler fuses the product into the subtraction (the exact product);
# fm.mul_rn keeps a rounded multiply and a separate add
assert "FFMA" in fused, "the compiler no longer fuses x * s - y: this test needs another probe"
assert "FFMA" not in rounded and "FMUL" in rounded and "FADD" in rounded, rounded
print("compiled")
"""


def test_mul_rn_is_never_fused_on_sm90():
    run_sm90_compile(AOT_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
