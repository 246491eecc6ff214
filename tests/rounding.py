"""Rounded once: the test of a gradient that must be the float32 reference rounded once
into the logits' dtype (a scaled backward recomputes it; rescaling a stored, already
rounded gradient would round twice and lose float16 subnormals under GradScaler).
Shared by the CUDA host-math tests and the GPU tests of both backends."""

from __future__ import annotations

import math

import torch


def dtype_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at |x| (the subnormal spacing below its normal
    range), in float64."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs().clamp_min(info.tiny))  # |x| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.full_like(x, info.eps, dtype=torch.float64), exponent - 1)


# Both sides compute in float32, in different orders: where a gradient entry cancels to
# far less than its row's terms (p_j - ε/C, q_j - p_j), their float32 errors, relative to
# those terms, can exceed the entry's own ulp. That noise is allowed on top of the ulp:
# 2^-22 of the row's largest entry, or of ``term_scale`` where the caller knows the
# terms' size (the target column's p_y - 1 with p_y near 1 cancels terms of size 1 times
# the coefficient, while every entry of its row may be small: seen on the H200, 2.5 ulp).
# A rescaled float16 subnormal (the GradScaler failure) is off by far more.
FLOAT32_NOISE = 2.0**-22


def single_rounding_errors(actual: torch.Tensor, expected_float32: torch.Tensor,
                           term_scale: float = 0.0) -> torch.Tensor:
    """|actual - expected rounded once to actual's dtype| in ulps of that dtype, beyond the
    float32 noise allowance (0 where within it, or both NaN); rows are the last dimension."""
    dtype = actual.dtype
    expected = expected_float32.to(dtype).double()
    # equal values pass also where both overflowed to the same infinity (inf - inf is NaN)
    error = torch.where(actual.double() == expected, 0.0, (actual.double() - expected).abs())
    row_max = torch.nan_to_num(expected_float32.double().abs(), nan=0.0, posinf=0.0).amax(dim=-1, keepdim=True)
    excess = (error - FLOAT32_NOISE * row_max.clamp_min(term_scale)).clamp_min(0) / dtype_ulp(expected, dtype)
    both_nan = actual.isnan() & expected.isnan()
    return torch.where(both_nan, 0.0, torch.nan_to_num(excess, nan=math.inf))


def assert_single_rounding(actual, expected_float32, what: str, *, exact_fraction: float = 0.0,
                           term_scale: float = 0.0) -> None:
    """``actual`` is ``expected_float32`` (the float32 reference) rounded once to its
    dtype, or a neighbour of that; and bitwise that value in at least ``exact_fraction``
    of the entries (a double rounding misses it in about a quarter of them)."""
    errors = single_rounding_errors(actual, expected_float32, term_scale)
    bad = errors > 1
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} entries more than 1 ulp off, e.g. "
        f"{actual[bad][:4].tolist()} for {expected_float32[bad][:4].tolist()}"
    )
    expected = expected_float32.to(actual.dtype)
    exact = ((actual == expected) | (actual.isnan() & expected.isnan())).double().mean().item()
    assert exact >= exact_fraction, f"{what}: only {exact:.4f} of the entries are the reference rounded once"
