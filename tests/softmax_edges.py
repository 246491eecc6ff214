"""Softmax-family inputs masked the ways users mask them, shared by each backend's tests
(a plain helper module; it holds no tests).

``masked_with_finite_values(z, y, old, new, width)`` masks classes with
``torch.finfo(dtype).min`` (a common mask value: times log2(e)/τ it overflows float32,
and a kernel that took its exponentials against that -inf made them NaN) and with
``-1e4`` in a teacher where the student is ``-inf`` (each of the teacher's classes then
has probability 0, so the KL term adds 0; a kernel that summed p·(r - s) over a group
of classes against the group's own max got +inf there, then inf · 0 = NaN when the group
met the row's max). ``width`` classes at the start of a row cover at least one whole
group (a Triton block, a CUDA thread's slots) of every kernel.

Known limit (tested by ``rows_at_the_float32_minimum``): the kernels take each
exponential against a shift of max·log2(e)/τ rounded up, from the exact product, so in a
segment whose max·log2(e)/τ is beyond about 2^30 in magnitude every exponential
underflows. Where some class of the segment is a real logit (every case here), a mask
is as if absent, which is what the reference computes too (probability 0); a segment
with no such class (a whole row of finfo.min) is NaN or infinite, where the reference
gives a uniform softmax. ``width`` must therefore stay below K.
"""

from __future__ import annotations

import torch


def masked_with_finite_values(z, y, old, new, width: int):
    """(z, y, old, new) masked in rows 0-3 (at least 5 rows; old has K < C - width
    columns); the targets moved where a row's masked classes would hold them."""
    z, y, old, new = z.clone(), y.clone(), old.clone(), new.clone()
    lowest = torch.finfo(z.dtype).min
    k, c = old.shape[1], z.shape[1]
    # rows 0 and 1: the new classes masked with the dtype's minimum in the student and the
    # new teacher (a model that may not predict them yet), targets among the old classes
    z[:2, k:] = lowest
    new[:2, k:] = lowest
    y[:2] = y[:2] % k
    # row 2: a whole first group masked with the minimum in every input
    z[2, :width] = lowest
    old[2, :width] = lowest
    new[2, :width] = lowest
    # row 3: the student at -inf where both teachers are -1e4
    z[3, :width] = float("-inf")
    old[3, :width] = -1e4
    new[3, :width] = -1e4
    y[2:4] = width + (y[2:4] % (c - width))
    return z, y, old, new


def rows_at_the_float32_minimum(backend: str, fn, device) -> list:
    """The documented limit (README, "Decisions", Precision): in a softmax whose largest
    logit·log2(e)/τ is beyond about 2^30 in magnitude the fused kernels' exponentials all
    underflow, so it is NaN or infinite. ``fn(loss_name, backend, *inputs, **options)``
    computes (loss with reduction="none", gradient). In 3 rows, row 1 is masked: a whole
    student row of finfo.min in the cross-entropy, a whole teacher row of it at τ = 1 and
    at τ = 5. Rows 0 and 2 must match the reference (an AssertionError otherwise); returns
    the cases whose row 1 differs from it (non-finite, or off by more than 1e-3
    relative). Tests expect every case to differ until the limit is fixed."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 10, generator=g).to(device)
    y = torch.tensor([1, 2, 3], device=device)
    old = torch.randn(3, 5, generator=g).to(device)
    lowest = torch.finfo(torch.float32).min
    z_masked, old_masked = z.clone(), old.clone()
    z_masked[1] = lowest
    old_masked[1] = lowest
    cases = {
        "cross_entropy_row": ("margin_cross_entropy", (z_masked, y), {}),
        "teacher_row_tau_1": ("focal_distillation", (z, old_masked, y), {"tau": 1.0}),
        "teacher_row_tau_5": ("focal_distillation", (z, old_masked, y), {"tau": 5.0}),
    }
    differing = []
    for name, (loss_name, inputs, options) in cases.items():
        expected = fn(loss_name, "reference", *inputs, **options)
        got = fn(loss_name, backend, *inputs, **options)
        for want, have in zip(expected, got):  # loss (N,), gradient (N, C)
            torch.testing.assert_close(have[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}, the rows without the limit: {m}")
        if any(not (torch.isfinite(have[1]).all() and torch.allclose(have[1], want[1], rtol=1e-3, atol=1e-6))
               for want, have in zip(expected, got)):
            differing.append(name)
    return differing
