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
base 2 let callers fold log2(e) into constants they already multiply by. ``mul_rn`` is a
multiply the compiler may not fuse into an FMA (see its docstring).

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
# multiply-adds (mul_rn marks the products that must not be): Triton 3.9 warns that its
# default turns fusion off in 3.10, so it is asked for explicitly.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _ptx(x, INSTRUCTION: tl.constexpr):
    """One float32 PTX instruction ``INSTRUCTION $0, $1;`` on every element."""
    return tl.inline_asm_elementwise(INSTRUCTION, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def mul_rn(x, y):
    """x·y rounded to float32 and never fused into an FMA with the operation that uses it.

    The compiler contracts ``a * b - c`` into fma(a, b, -c), which uses the exact product.
    Where two products must round alike, that breaks an identity: an online log-sum-exp
    keeps its sum relative to ``shift = round(m·scale)`` and rescales it by
    ``exp2(m·scale - shift')`` when the max m moves; fused, that factor is 2^(ε) rather
    than exactly 1 while m stays, ε being m·scale's rounding error, and it compounds over
    every block of the row (a float32 log-sum-exp 1e-5 to 1e-4 off at C = 131072 on the
    H200, reproduced by a NumPy emulation of the fused arithmetic).
    """
    if HARDWARE:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return x * y


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
