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

Known limit, not tested here: the kernels take exponentials in base 2 with log2(e)/τ
folded into one multiply-add, so values below -FLT_MAX·τ/log2(e) (finfo.min at
τ < 1.44, or in the cross-entropy) are as if absent. Where some class of the segment is
above that (every case here) that is what the reference computes too (probability 0);
a segment with no such class (a whole old-teacher row of finfo.min at τ = 1) comes out
as empty, NaN, where the reference gives a uniform softmax. ``width`` must therefore
stay below K.
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
