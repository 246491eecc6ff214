"""The float32 helpers of the Triton kernels (mpt_kernels/backends/triton_fastmath.py) lower
to the instructions they promise on sm_90; under the interpreter they are the plain
operations, or for mul_ru and fma the same values computed in float64 (the kernels' CPU
tests use them that way)."""

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
    """x·scale - y, the product rounded up on its own (fm.mul_ru) or left to the compiler."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    y = tl.load(y_ptr + offsets)
    if ROUNDED:
        product = fm.mul_ru(x, scale)
    else:
        product = x * scale
    tl.store(out_ptr + offsets, product - y)


@triton.jit
def _product_error_kernel(x_ptr, out_ptr, scale):
    """fm.fma(x, scale, -round(x·scale)): the product's rounding error, exactly."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(out_ptr + offsets, fm.fma(x, scale, -(x * scale)))


# magnitudes up to a mask's: the shifts of a softmax whose max is finfo.min, at τ = 5
def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BLOCK.value, generator=g) * 30
    x[:16] *= 1e36
    x[16:20] = torch.tensor([torch.finfo(torch.float32).min, 0.0, -1e-30, 1e-30])
    return x.to(DEVICE)


def test_mul_ru_is_the_product_rounded_up():
    x = _operands()
    y = torch.randn(BLOCK.value, device=DEVICE) * 30
    out = torch.empty(BLOCK.value, device=DEVICE)
    scale = 1.4426950408889634 / 5
    _shift_difference_kernel[(1,)](x, y, out, scale, ROUNDED=True)
    exact = x.double() * torch.tensor(scale, dtype=torch.float32).double()
    nearest = exact.float()
    up = torch.where(nearest.double() < exact, torch.nextafter(nearest, torch.tensor(float("inf"))), nearest)
    assert (up.double() >= exact).all() and (up != nearest).any()  # the case the kernels need, and it occurs
    torch.testing.assert_close(out, up.to(DEVICE) - y, rtol=0, atol=0)


def test_fma_takes_the_exact_product():
    """The exponentials of the softmax kernels rely on it (triton_softmax._exp2_against)."""
    x = _operands()
    out = torch.empty(BLOCK.value, device=DEVICE)
    scale = 1.4426950408889634 / 5
    _product_error_kernel[(1,)](x, out, scale)
    exact = x.double() * torch.tensor(scale, dtype=torch.float32).double()
    error = exact - exact.float().double()  # exactly representable in float32
    assert (error != 0).any()
    torch.testing.assert_close(out.double().cpu(), error.cpu(), rtol=0, atol=0)


AOT_SCRIPT = r"""
import re, sys
sys.path.insert(0, {tests!r})
from test_triton_fastmath import _shift_difference_kernel

types = dict(x_ptr="*fp32", y_ptr="*fp32", out_ptr="*fp32", scale="fp32")
fused = compile_kernel(_shift_difference_kernel, types, dict(ROUNDED=False), 4)
rounded = compile_kernel(_shift_difference_kernel, types, dict(ROUNDED=True), 4)
# left alone, the compiler fuses the product into the subtraction (the exact product);
# fm.mul_ru keeps a multiply rounded up and a separate add
assert "FFMA" in fused, "the compiler no longer fuses x * s - y: this test needs another probe"
assert "FFMA" not in rounded and re.search(r"FMUL\.RP", rounded) and "FADD" in rounded, rounded
print("compiled")
"""


def test_mul_ru_is_never_fused_on_sm90():
    run_sm90_compile(AOT_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
