"""The float32 helpers of the Triton kernels: one hardware instruction each on a GPU.

``tl.exp``, ``tl.log`` and ``/`` on float32 compile to the approximate MUFU instructions
wrapped in code that handles subnormal inputs and outputs (or, for ``/``, to the IEEE
division's longer sequence); in our elementwise and row kernels that wrapping was most
of the instructions per element (Nsight Compute on an H200: compute bound at 87 % issue
while memory ran at 34 %). These helpers emit the bare ``ex2.approx.ftz``,
``lg2.approx.ftz`` and ``rcp.approx.ftz`` instead: relative error about 2^-22 for ex2
and rcp, but an *absolute* error of about 2^-22 for lg2 (so log(1 + e) for a small e
must not come from it: see triton_multilabel._log1p_of_unit), and subnormal results
flushed to zero (a value below 1.2e-38 that no loss or gradient of ours distinguishes
from 0 at the tolerances the reference is held to). The logarithm and the exponential in
base 2 let callers fold log2(e) into constants they already multiply by. ``mul_ru`` is a
multiply rounded up that the compiler may not fuse into an FMA, and ``fma`` one that it
must (see their docstrings).

Under the Triton interpreter (CPU tests) inline assembly cannot run: the same functions
are the exact ``tl.math`` ones there. ``HARDWARE`` is fixed when this module is imported,
which is why TRITON_INTERPRET must be set before mpt_kernels is imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_interpreter import interpreter_enabled

HARDWARE = tl.constexpr(not interpreter_enabled())
# Launch options of every kernel of ours. The kernels are written for contracted
# multiply-adds (mul_ru marks the products that must not be): Triton 3.9 warns that its
# default turns fusion off in 3.10, so it is asked for explicitly.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _ptx(x, INSTRUCTION: tl.constexpr):
    """One float32 PTX instruction ``INSTRUCTION $0, $1;`` on every element."""
    return tl.inline_asm_elementwise(INSTRUCTION, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _float64(x):
    """x as float32, then float64 (a constant too): the interpreter's exact products."""
    return tl.cast(tl.cast(x, tl.float32), tl.float64)


@triton.jit
def mul_ru(x, y):
    """x·y rounded up (toward +inf) to float32, never fused into an FMA with the operation
    that uses it.

    It makes the shifts of an online log-sum-exp: ``shift = mul_ru(m, scale)`` is at least
    m·scale, so exp2(fma(x, scale, -shift)) <= 1 for every x <= m, also where m·scale is
    so large (a mask of finfo.min at τ = 5: 1e38) that its rounding error is 1e31: rounded
    to nearest, the max's own exponential was exp2(+1e31) = inf half the time. And the
    rescale factor exp2(mul_ru(m, scale) - shift') of a running sum is exactly 1 while the
    max m stays (both products rounded alike; the compiler would contract a plain product
    into an FMA with the exact one, and the factor would drift).
    """
    if HARDWARE:
        return tl.inline_asm_elementwise("mul.rp.f32 $0, $1, $2;", "=f,f,f", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    exact = _float64(x) * _float64(y)
    nearest = exact.to(tl.float32)
    bits = nearest.to(tl.int32, bitcast=True)
    above = tl.where(nearest < 0, bits - 1, bits + 1).to(tl.float32, bitcast=True)  # the next float up
    return tl.where(nearest.to(tl.float64) < exact, above, nearest)


@triton.jit
def fma(x, y, z):
    """x·y + z from the exact product: one FMA on a GPU; in the interpreter (whose Triton
    3.6 rounds the product first) in float64, where a product of two float32 is exact."""
    if HARDWARE:
        return tl.fma(x, y, z)
    return (_float64(x) * _float64(y) + _float64(z)).to(tl.float32)


@triton.jit
def exp2(x):
    """2^x."""
    if HARDWARE:
        return _ptx(x, "ex2.approx.ftz.f32 $0, $1;")
    return tl.math.exp2(x)


@triton.jit
def log2(x):
    """log2(x)."""
    if HARDWARE:
        return _ptx(x, "lg2.approx.ftz.f32 $0, $1;")
    return tl.math.log2(x)


@triton.jit
def reciprocal(x):
    """1/x."""
    if HARDWARE:
        return _ptx(x, "rcp.approx.ftz.f32 $0, $1;")
    return 1.0 / x


@triton.jit
def exp(x):
    """e^x, as 2^(x log2 e)."""
    return exp2(x * LOG2E)


@triton.jit
def log(x):
    """ln(x), as log2(x) ln 2."""
    return log2(x) * LN2
