"""Fused Triton kernels of the softmax family: margin-calibrated cross-entropy, focal
distillation and the MPT loss (spec §1-3), as one kernel.

``margin_cross_entropy`` and ``focal_distillation`` reach this module as the same
``SoftmaxLossArgs`` as ``mpt_loss`` (a source weight of 0 turns a term off), so one
kernel serves all three. One program handles one row ``i``:

1. Statistics sweep, in blocks of ``BLOCK_C`` classes, reading each input once:
   the online log-sum-exp of ``z̃ = z + Δ`` and the sum of ``z̃`` (label smoothing); for
   each distillation source the online log-sum-exp of the student ``s/τ`` over the
   source's columns and of the teacher ``r/τ``, the rescaled sum
   ``Σ_j exp(a_j - m_a)(a_j - c_j)`` of the one-sweep KL identity
   ``KL = Σ softmax(a)_j (a_j - c_j) - LSE(a) + LSE(c)`` (``kind="kl"``) or the sum of
   squares (``kind="lm"``), and for the focus mode's argmax tests the max over the
   classes before the target (see _is_argmax). Then the row's loss ``L_i`` and focal weights ``w = α + β f``.
   Every running statistic is kept per thread (each thread owns 16 bytes of each input
   per block) and the threads are combined once after the sweep: no cross-warp
   reduction inside the loop (the first version did ~20 per block, and Nsight Compute on
   an H200 found it latency-bound at 25 % occupancy and 18 % of DRAM bandwidth). The
   sweep runs in two loops split at ``K``: classes below it read the old source, those
   above add the new-class bias as one constant; exponentials are base 2 with log2(e)/τ
   folded into the operands.
2. Gradient sweep (only when autograd will want it, ``_gradient_sweep``):
   ``dL_i/dz_ij`` for an upstream gradient of 1 (``1/count`` folded in for ``"mean"``),
   computed in float32 and written once in the logits' dtype; the row's statistics that
   sweep needs (each softmax's shift and each term's coefficients, see RowGradient:
   float32, ``NUM_STATS`` per row) are saved too.

Where the gradient is made: in the forward, for an upstream gradient of 1. The inputs
are swept twice either way (no ``dL/dz_ij`` is known before the row's statistics are
complete); in the forward the second sweep follows the first in the same program and
is served by L2 while the rows in flight fit there (rows in flight x ``s·C·bytes`` for
``s`` input streams, against the H200's 60 MiB; with the 64-register cap up to 4 programs,
so rows, per SM: 528 rows). At C = 131072 the second sweep reads DRAM again, which caps
``mpt_loss`` with both sources near 58% of the copy bandwidth (the H200 run measured
54-56%). Chunked rows (``chunk_classes``, see RECORD) bound that distance by the chunk
instead of C: programs sweep chunks of rows and write the gradient of chunks of an
earlier row once its chunks' statistics are published. They are tested (CPU
interpreter, sm_90 compile) but off until a GPU has timed them against one program per
row. A plain ``loss.backward()`` costs nothing more (measured on the H200, N = 4096,
bf16, C = 8192 to 131072: the backward kernel for an upstream of 1 ran about 5 µs against
0.12-1.7 ms for the forward that wrote the gradient). The backward
kernel reads the upstream gradient on the device and returns at once where it is 1 (per
row for ``"none"``) or the row is ignored; elsewhere it reruns ``_gradient_sweep`` from
the inputs and the saved statistics with the upstream multiplied in in float32, and
overwrites the row (``backward_in_place=True``). A scaled loss (GradScaler, a weight)
thus costs one more read of the ``s`` streams and a gradient write, and is rounded once,
as the reference's: rescaling the stored gradient would round twice, and would lose a
float16 ``p/count`` below the normal range before GradScaler's 2^15 multiplies it. The
statistics are ``O(N)``; nothing synchronises with the host.

What is specialised (``tl.constexpr``): which terms are present (CE, old source, new
source), the kind, the two halves of the focus mode (reference argmax used, student
argmax used), the bias mode, "mean", whether to write the gradient, ``BLOCK_C``, and
``CHUNKS`` (0, or the power of two >= the chunks per row when ``chunk_classes`` is set).
Every float hyper-parameter is a runtime argument, and the batch size is not specialised
on (``do_not_specialize``).

Rows: an ignored row reads nothing and gets loss 0 and gradient 0 (also where its
logits hold NaN). A target outside ``[0, C)`` (on CPU ``check_target_values`` raises
first) reads nothing outside the row and gets a NaN loss and a NaN gradient row.

Layout: rows may have any stride (int64 offsets, so ``N·C >= 2^31`` works); a class
axis whose stride is not 1 is copied to a contiguous tensor first (an ``N x C`` copy,
kept for the backward, so pass row-strided views, not transposed ones).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._custom_op import define_loss_ops
from .._validation import SoftmaxLossArgs, check_kernel_shape, check_target_values
from . import triton_fastmath as fm
from .triton_sum import scaled_sum

# Tests under the interpreter set this to a small power of two so that a few hundred
# classes cross several blocks; None chooses by the class count (see _launch_config).
block_size_override: Optional[int] = None

BIAS_NONE, BIAS_VECTOR, BIAS_NEW_CLASSES = 0, 1, 2
# focus -> (uses the reference's argmax, uses the student's argmax) (spec §2)
FOCUS_PARTS = {
    "ref_correct": (True, False),
    "neg_flip": (True, True),
    "student_wrong": (False, True),
    "all": (False, False),
}


# --------------------------------------------------------------------------- building blocks
# A block of BLOCK_C classes is a [ROWS, VEC] tile: each thread holds VEC consecutive
# classes (16 bytes of the input: one vector load per stream) in each of its rows. Every
# running statistic is kept per row of the tile ([ROWS] vectors) and updated from that
# row's own VEC classes, so the sweeps reduce inside a thread and never across threads
# (no shuffles, no barriers in the loops); the rows are combined once, after the sweep.
# Exponentials are base 2 with log2(e) (and 1/τ) folded into one multiply-add.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


# A row's running statistics, per tile row ([ROWS] vectors): what the statistics sweep
# carries from block to block (_stats_block), returns (_statistics), and a chunk of a row
# publishes (_store_chunk_record).
class OnlineLse(NamedTuple):
    """An online log-sum-exp (_online_lse): the running max and the sum relative to it."""
    m: tl.tensor
    l: tl.tensor


class SourceStats(NamedTuple):
    """One distillation source: the teacher's online LSE of r/τ and the KL sum (KL), or
    the sum of squared differences (LM); the teacher's max before the target (argmax)."""
    teacher: OnlineLse
    kl: tl.tensor
    sq: tl.tensor
    prefix: tl.tensor


class RowStats(NamedTuple):
    ce: OnlineLse  # z̃ = z + Δ, base e
    sum_biased: tl.tensor  # Σ z̃ (label smoothing)
    student_old: OnlineLse  # s/τ over the old source's columns
    student: OnlineLse  # s/τ over the columns read
    prefix_z: tl.tensor  # the student's max before the target (argmax)
    old: SourceStats
    new: SourceStats


# What the gradient sweep needs of a row, for an upstream gradient of 1. Each softmax
# enters as the shift its statistics sweep took exponentials against and its sum's
# reciprocal folded into a coefficient: softmax(v)_j times c is exp2(v_j·scale - shift)
# times c/Σ, with exp2(v_j·scale - shift) computed as in that sweep (one FMA from the exact
# product), so the gradient is as precise as the exponentials are. (Subtracting a rounded
# LSE = shift + log2 Σ instead lost float32 precision in proportion to |v|·scale: a
# relative error about 1e-4 at logits near 1e4, 5e-6 near 100.)
# - CE: ``ce_shift``, ``ce_exp`` = coef/Σ (the softmax's coefficient) and ``ce_coef`` (the
#   one-hot's and the smoothing's), coef = row scale · λ_ce;
# - each source: the student's and the teacher's shifts, and coef/Σ_student, coef/Σ_teacher
#   for KL (coef = row scale · λ · w · S/τ); for LM, ``*_student`` holds coef = row scale ·
#   λ · w / K of (s - r) and the rest is unused.
# The forward saves them (NUM_STATS floats); the backward loads them with its upstream
# gradient multiplied into the coefficients (_load_row_stats).
class RowGradient(NamedTuple):
    ce_shift: tl.tensor
    ce_exp: tl.tensor
    ce_coef: tl.tensor
    old_student_shift: tl.tensor
    old_teacher_shift: tl.tensor
    old_student: tl.tensor
    old_teacher: tl.tensor
    new_student_shift: tl.tensor
    new_teacher_shift: tl.tensor
    new_student: tl.tensor
    new_teacher: tl.tensor


@triton.jit
def _tile(start, VEC: tl.constexpr, ROWS: tl.constexpr):
    """The class indices of the block at ``start``, as a [ROWS, VEC] tile."""
    return start + tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _shift(m, scale):
    """m·scale rounded up (so that no exponential against it exceeds 1, fm.mul_ru), the
    exponent the exponentials of a running max m are taken against, at least -FLT_MAX:
    never -inf, so that exp2(x·scale - shift) is never exp2(-inf + inf) = NaN, neither
    while every class seen is -inf (masked) nor where a mask of finfo(dtype).min times
    log2(e)/τ overflows. Such classes then add exp2(-inf) = 0 (against the row's real
    max, as the reference's). A NaN logit that max() dropped still reaches l through
    exp2(NaN - shift), so NaN propagates either way."""
    return tl.maximum(fm.mul_ru(m, scale), -_FLT_MAX)


@triton.jit
def _rescaled(x, factor):
    """x * factor, where a factor that underflowed to 0 drops the term, also an infinite
    one (a KL sum of a student at -inf): its exponentials are all 0 against the new max."""
    return tl.where(factor == 0.0, 0.0, x * factor)


@triton.jit
def _exp2_against(x, scale, shift):
    """exp2(x·scale - shift) from the exact product (fm.fma): where x is near the max, the
    argument is small and exact to float32's relative precision whatever |x|·scale is,
    and at most 0 for x <= max (_shift rounds up). The statistics and the gradient sweeps
    both take it so, against the same shifts."""
    return tl.math.exp2(fm.fma(x, scale, -shift))


@triton.jit
def _online_lse(m, l, x, x_max, scale):
    """One block of a per-row online log-sum-exp of x at ``scale`` (base 2).

    ``m``: running max of x (unscaled), ``l = Σ exp2(x·scale - shift)`` with ``shift`` =
    m·scale rounded up (_shift); ``x_max`` is ``tl.max(x, 1)``. Returns the new (m, l), the
    factor that rescaled the old l, and exp2(x·scale - shift) per class.
    """
    m_new = tl.maximum(m, x_max)
    # Both shifts rounded alike (fm.mul_ru): the factor is exactly 1 while the max stays.
    shift = _shift(m_new, scale)
    rescale = tl.math.exp2(fm.mul_ru(m, scale) - shift)  # 0 while m = -inf (then l = 0 too)
    e = _exp2_against(x, scale, shift[:, None])
    return m_new, l * rescale + tl.sum(e, 1), rescale, e


@triton.jit
def _lse_total(m, l, scale):
    """Combines the rows of _online_lse: (the row's shift, its sum Σ_j exp2(v_j·scale -
    shift), and each tile row's factor onto that shift). LSE = shift + log2(sum) in base 2."""
    row_max = tl.max(m, 0)
    shift = _shift(row_max, scale)
    factor = tl.math.exp2(fm.mul_ru(m, scale) - shift)  # 0 for a tile row that saw only -inf (l = 0)
    total = tl.sum(l * factor, 0)
    return shift, total, factor


@triton.jit
def _prefix_max(prefix, running, start, y, BLOCK_C: tl.constexpr):
    """Per tile row, the max of x over the blocks seen so far that lie wholly before
    class y (for the argmax); ``running`` is the running max including this block. The
    part of y's own block before y is added once, after the sweep (see _statistics):
    a branch here, in every block, cost about 16 registers and made the loops' register
    allocation erratic (64 to 123 across equivalent loop bounds)."""
    return tl.where(start + BLOCK_C <= y, running, prefix)


@triton.jit
def _max_before(row, y, width, BLOCK_C: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr):
    """Per tile row, the max of x_j over the classes of y's block with j < y and j < width."""
    cols = _tile((y // BLOCK_C) * BLOCK_C, VEC, ROWS)
    x = tl.load(row + cols, mask=cols < width, other=_NEG_INF).to(tl.float32)  # 16-byte loads
    return tl.max(tl.where(cols < y, x, _NEG_INF), 1)


@triton.jit
def _is_argmax(x_at_y, row_max, prefix_max, y, width):
    """[argmax_{j<width} x_j = y], ties to the lowest index as torch.argmax: x_y is the
    maximum and no class before y reaches it (an all -inf row has argmax 0)."""
    return (y < width) & (x_at_y == row_max) & ((y == 0) | (prefix_max < row_max))


@triton.jit
def _bias_entries(bias_ptr, bias_stride, cols, mask):
    """The bias vector's entries Δ_cols in float32 (0 outside ``mask``)."""
    return tl.load(bias_ptr + cols * bias_stride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _class_bias(bias_ptr, bias_stride, cols, mask, num_old, new_class_bias, BIAS: tl.constexpr):
    """Δ_j of the CE term, in float32: a bias vector, or b on the classes j >= C_old."""
    if BIAS == 1:
        return _bias_entries(bias_ptr, bias_stride, cols, mask)
    elif BIAS == 2:
        return tl.where(cols >= num_old, new_class_bias, 0.0)
    else:
        return 0.0


@triton.jit
def _biased(z, bias_ptr, bias_stride, cols, mask, offset, BIAS: tl.constexpr):
    """z̃ = z + Δ over a block: the bias vector's entries (BIAS == 1), else ``offset`` (b in
    the new classes' blocks, 0 elsewhere)."""
    if BIAS == 1:
        return z + _bias_entries(bias_ptr, bias_stride, cols, mask)
    else:
        return z + offset


@triton.jit
def _empty_lse(ROWS: tl.constexpr):
    return OnlineLse(tl.full([ROWS], _NEG_INF, tl.float32), tl.zeros([ROWS], tl.float32))


@triton.jit
def _empty_source(ROWS: tl.constexpr):
    return SourceStats(_empty_lse(ROWS), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS], tl.float32),
                       tl.full([ROWS], _NEG_INF, tl.float32))


@triton.jit
def _teacher_stats_step(source, z, r, mask, start, y, kt, IS_KL: tl.constexpr, BLOCK_C: tl.constexpr):
    """One block of one distillation source (teacher r, student z; both -inf outside ``mask``)."""
    m_a, l_a = source.teacher
    kl_sum = source.kl
    sq_sum = source.sq
    r_max = tl.max(r, 1)
    if IS_KL:
        m_a, l_a, rescale, p = _online_lse(m_a, l_a, r, r_max, kt)
        # Σ exp2(a_j - shift)(r_j - s_j), rescaled with the teacher's running max (times 1/τ
        # later: a - c = (r - s)/τ); a class with p_j = 0 adds 0, also where the student
        # is -inf there too.
        kl_sum = _rescaled(kl_sum, rescale) + tl.sum(tl.where(p == 0.0, 0.0, p * (r - z)), 1)
    else:
        m_a = tl.maximum(m_a, r_max)
        diff = z - r
        sq_sum += tl.sum(tl.where(mask, diff * diff, 0.0), 1)
    return SourceStats(OnlineLse(m_a, l_a), kl_sum, sq_sum, _prefix_max(source.prefix, m_a, start, y, BLOCK_C))


@triton.jit
def _stats_block(
    stats, z_row, old_row, new_row, bias_ptr, bias_stride, start, lo, hi, y, offset, kt,
    HAS_CE: tl.constexpr, OLD_HERE: tl.constexpr, HAS_NEW: tl.constexpr, IS_KL: tl.constexpr,
    BIAS: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr,
):
    """``stats`` (a RowStats) updated with the classes [lo, hi) of the block at ``start``;
    the CE's bias is ``offset`` there (BIAS != 1), the old source is read where OLD_HERE.
    ``student_old`` is passed through (_statistics sets it)."""
    m_ce, l_ce = stats.ce
    sum_biased = stats.sum_biased
    old = stats.old
    new = stats.new
    cols = _tile(start, VEC, ROWS)
    mask = (cols >= lo) & (cols < hi)
    z = tl.load(z_row + cols, mask=mask, other=_NEG_INF).to(tl.float32)
    z_max = tl.max(z, 1)
    if HAS_CE:
        # z̃ = z + Δ rounded to float32 once, as the reference's, then exponentiated exactly
        z_biased = _biased(z, bias_ptr, bias_stride, cols, mask, offset, BIAS)
        m_ce, l_ce, unused_rescale, unused_e = _online_lse(m_ce, l_ce, z_biased, tl.max(z_biased, 1), _LOG2E)
        sum_biased += tl.sum(tl.where(mask, z_biased, 0.0), 1)
    # The student over the block's columns serves both sources (its statistics over the
    # old columns are the old source's; the compiler drops what no term uses).
    m_z, l_c, unused_rescale, unused_e = _online_lse(stats.student.m, stats.student.l, z, z_max, kt)
    prefix_z = _prefix_max(stats.prefix_z, m_z, start, y, BLOCK_C)
    if OLD_HERE:
        r_old = tl.load(old_row + cols, mask=mask, other=_NEG_INF).to(tl.float32)
        old = _teacher_stats_step(old, z, r_old, mask, start, y, kt, IS_KL, BLOCK_C)
    if HAS_NEW:
        r_new = tl.load(new_row + cols, mask=mask, other=_NEG_INF).to(tl.float32)
        new = _teacher_stats_step(new, z, r_new, mask, start, y, kt, IS_KL, BLOCK_C)
    return RowStats(OnlineLse(m_ce, l_ce), sum_biased, stats.student_old, OnlineLse(m_z, l_c), prefix_z, old, new)


@triton.jit
def _focal_weight(ref_is_y, student_is_y, alpha, beta, FOCUS_REF: tl.constexpr, FOCUS_STUDENT: tl.constexpr):
    """w = α + β f (spec §2); f = 0 for focus "all"."""
    f = 0.0
    if FOCUS_REF:
        f = ref_is_y.to(tl.float32)  # never true for y >= K
    if FOCUS_STUDENT:
        student_wrong = 1.0 - student_is_y.to(tl.float32)
        if FOCUS_REF:
            f = f * student_wrong
        else:
            f = student_wrong
    return alpha + beta * f


@triton.jit
def _distill_row(student, source, width, inv_tau, kt, kl_scale, IS_KL: tl.constexpr):
    """One source's d_i and what its gradient needs: (d, the student's shift, the
    teacher's shift, the factors of ∂d/∂s on the student's and the teacher's
    exponentials). ``student`` is the student's OnlineLse of s/τ over the source's
    columns; ``source`` its SourceStats."""
    if IS_KL:
        shift_c, total_c, unused_factor = _lse_total(student.m, student.l, kt)
        shift_a, total_a, factor = _lse_total(source.teacher.m, source.teacher.l, kt)
        kl_total = tl.sum(_rescaled(source.kl, factor), 0)
        # KL = Σ softmax(a)_j (a_j - c_j) - LSE(a) + LSE(c), the LSEs' difference taken
        # shifts first; ∂/∂s_j = (S/τ)(q_j - p_j), q and p with 1/Σ folded into the factors
        lse_difference = (shift_a - shift_c) + (tl.math.log2(total_a) - tl.math.log2(total_c))
        d = kl_scale * (inv_tau * kl_total / total_a - lse_difference * _LN2)
        return d, shift_c, shift_a, kl_scale * inv_tau / total_c, kl_scale * inv_tau / total_a
    else:
        # (1/(2K)) Σ (s_j - r_j)²; ∂/∂s_j = (s_j - r_j)/K (no shifts)
        return tl.sum(source.sq, 0) / (2 * width), 0.0, 0.0, 1.0 / width, 0.0


@triton.jit
def _source_terms(
    student, source, teacher_row, y, target_ok, width, student_is_y, weight, row_scale, alpha, beta, inv_tau, kt,
    kl_scale, IS_KL: tl.constexpr, FOCUS_REF: tl.constexpr, FOCUS_STUDENT: tl.constexpr,
):
    """One source's term of the row's loss, weight · w_i · d_i, with w_i its focal weight
    (is the teacher's argmax over its ``width`` classes the target?), and what _distill_row
    gives the gradient, the coefficients times row_scale · weight · w_i."""
    r_at_y = tl.load(teacher_row + y, mask=target_ok & (y < width), other=0.0).to(tl.float32)
    ref_is_y = _is_argmax(r_at_y, tl.max(source.teacher.m, 0), tl.max(source.prefix, 0), y, width)
    w = _focal_weight(ref_is_y, student_is_y, alpha, beta, FOCUS_REF, FOCUS_STUDENT)
    d, student_shift, teacher_shift, student_coef, teacher_coef = _distill_row(
        student, source, width, inv_tau, kt, kl_scale, IS_KL)
    coef = row_scale * weight * w
    return weight * w * d, student_shift, teacher_shift, student_coef * coef, teacher_coef * coef


@triton.jit
def _distill_grad(z, r, student_shift, teacher_shift, student, teacher, kt, IS_KL: tl.constexpr):
    """KL: student · exp2(s·kt - its shift) - teacher · exp2(r·kt - its shift), i.e.
    coef · (q - p); LM: student · (s - r) (see RowGradient)."""
    if IS_KL:
        return student * _exp2_against(z, kt, student_shift) - teacher * _exp2_against(r, kt, teacher_shift)
    else:
        return student * (z - r)


# A row's RowGradient as the forward saves it for a backward (float32, in field order).
NUM_STATS = tl.constexpr(11)
_CE_STATS = tl.constexpr(0)  # shift, exp, coef
_OLD_STATS = tl.constexpr(3)  # student shift, teacher shift, student, teacher
_NEW_STATS = tl.constexpr(7)


@triton.jit
def _store_row_stats(stats_row, gradient, HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr):
    if HAS_CE:
        tl.store(stats_row + _CE_STATS, gradient.ce_shift)
        tl.store(stats_row + _CE_STATS + 1, gradient.ce_exp)
        tl.store(stats_row + _CE_STATS + 2, gradient.ce_coef)
    if HAS_OLD:
        _store_source_stats(stats_row + _OLD_STATS, gradient.old_student_shift, gradient.old_teacher_shift,
                            gradient.old_student, gradient.old_teacher)
    if HAS_NEW:
        _store_source_stats(stats_row + _NEW_STATS, gradient.new_student_shift, gradient.new_teacher_shift,
                            gradient.new_student, gradient.new_teacher)


@triton.jit
def _store_source_stats(at, student_shift, teacher_shift, student, teacher):
    tl.store(at, student_shift)
    tl.store(at + 1, teacher_shift)
    tl.store(at + 2, student)
    tl.store(at + 3, teacher)


@triton.jit
def _load_source_stats(at, g):
    """(student shift, teacher shift, student · g, teacher · g) of a source."""
    return tl.load(at), tl.load(at + 1), g * tl.load(at + 2), g * tl.load(at + 3)


@triton.jit
def _load_row_stats(stats_row, g, HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr):
    """The RowGradient _store_row_stats wrote, its coefficients times the upstream
    gradient ``g`` (float32); 0 for an absent term."""
    ce_shift, ce_exp, ce_coef = 0.0, 0.0, 0.0
    old_student_shift, old_teacher_shift, old_student, old_teacher = 0.0, 0.0, 0.0, 0.0
    new_student_shift, new_teacher_shift, new_student, new_teacher = 0.0, 0.0, 0.0, 0.0
    if HAS_CE:
        ce_shift = tl.load(stats_row + _CE_STATS)
        ce_exp = g * tl.load(stats_row + _CE_STATS + 1)
        ce_coef = g * tl.load(stats_row + _CE_STATS + 2)
    if HAS_OLD:
        old_student_shift, old_teacher_shift, old_student, old_teacher = _load_source_stats(
            stats_row + _OLD_STATS, g)
    if HAS_NEW:
        new_student_shift, new_teacher_shift, new_student, new_teacher = _load_source_stats(
            stats_row + _NEW_STATS, g)
    return RowGradient(ce_shift, ce_exp, ce_coef, old_student_shift, old_teacher_shift, old_student, old_teacher,
                       new_student_shift, new_teacher_shift, new_student, new_teacher)


@triton.jit
def _gradient_block(
    z_row, old_row, new_row, bias_ptr, bias_stride, grad_row, start, lo, hi, y, offset,
    label_smoothing, inv_num_classes, kt, gradient,
    HAS_CE: tl.constexpr, OLD_HERE: tl.constexpr, HAS_NEW: tl.constexpr, IS_KL: tl.constexpr,
    BIAS: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr,
):
    """The gradient of the classes [lo, hi) of the block at ``start`` (see _stats_block),
    from the row's RowGradient."""
    cols = _tile(start, VEC, ROWS)
    mask = (cols >= lo) & (cols < hi)
    grad = tl.zeros([ROWS, VEC], dtype=tl.float32)
    if HAS_CE or OLD_HERE or HAS_NEW:
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CE:
            # coef · (softmax(z̃)_j - (1-ε)[j = y] - ε/C), the softmax's 1/Σ folded into ce_exp
            z_biased = _biased(z, bias_ptr, bias_stride, cols, mask, offset, BIAS)
            smoothing = gradient.ce_coef * (label_smoothing * inv_num_classes)
            target = gradient.ce_coef * (1.0 - label_smoothing) + smoothing
            grad = gradient.ce_exp * _exp2_against(z_biased, _LOG2E, gradient.ce_shift) - tl.where(
                cols == y, target, smoothing)
        if OLD_HERE and HAS_NEW and IS_KL:
            # both sources: the student's exponential against the old columns' shift serves
            # both, times 2^(shift_old - shift_all) <= 1 for the whole row's softmax
            r_old = tl.load(old_row + cols, mask=mask, other=0.0).to(tl.float32)
            r_new = tl.load(new_row + cols, mask=mask, other=0.0).to(tl.float32)
            q_old = _exp2_against(z, kt, gradient.old_student_shift)
            to_all = tl.math.exp2(gradient.old_student_shift - gradient.new_student_shift)
            grad += ((gradient.old_student + gradient.new_student * to_all) * q_old
                     - gradient.old_teacher * _exp2_against(r_old, kt, gradient.old_teacher_shift)
                     - gradient.new_teacher * _exp2_against(r_new, kt, gradient.new_teacher_shift))
        else:
            if OLD_HERE:
                r_old = tl.load(old_row + cols, mask=mask, other=0.0).to(tl.float32)
                grad += _distill_grad(z, r_old, gradient.old_student_shift, gradient.old_teacher_shift,
                                      gradient.old_student, gradient.old_teacher, kt, IS_KL)
            if HAS_NEW:
                r_new = tl.load(new_row + cols, mask=mask, other=0.0).to(tl.float32)
                grad += _distill_grad(z, r_new, gradient.new_student_shift, gradient.new_teacher_shift,
                                      gradient.new_student, gradient.new_teacher, kt, IS_KL)
    tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_sweep(
    z_row, old_row, new_row, bias_ptr, bias_stride, grad_row,
    y, split, lo, hi, num_classes, new_class_bias, label_smoothing, kt, gradient,
    HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr,
    IS_KL: tl.constexpr, BIAS: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    """Writes the classes [lo, hi) (lo a multiple of BLOCK_C) of row i of the gradient (a
    counted row): dL_i/dz_ij times whatever the coefficients of ``gradient`` (a
    RowGradient) hold (row scale, weights,
    focal weights, upstream gradient), rounded once to the gradient's dtype. Both kernels
    run this, on the whole row or on one chunk of it.

    The blocks go last to first: the statistics sweep read them first to last, so the
    most recently read, likeliest still in L2, come first. The classes >= split (the new
    classes: no old source, bias b) and < split (old source, no bias) are two loops."""
    ROWS: tl.constexpr = BLOCK_C // VEC
    inv_num_classes = 1.0 / num_classes
    if BIAS == 2:
        new_offset = new_class_bias
    else:
        new_offset = 0.0
    # loops over the chunk's blocks, masks at the segments' bounds (see _statistics)
    first_new = tl.maximum(lo, (split // BLOCK_C) * BLOCK_C)
    num_new_blocks = tl.cdiv(hi - first_new, BLOCK_C)
    last_new = first_new + (num_new_blocks - 1) * BLOCK_C
    for i in range(0, num_new_blocks):
        _gradient_block(
            z_row, old_row, new_row, bias_ptr, bias_stride, grad_row, last_new - i * BLOCK_C, split, num_classes,
            y, new_offset, label_smoothing, inv_num_classes, kt, gradient,
            HAS_CE, False, HAS_NEW, IS_KL, BIAS, VEC, ROWS)
    num_old_blocks = tl.cdiv(tl.minimum(hi, split) - lo, BLOCK_C)
    for i in range(0, num_old_blocks):
        _gradient_block(
            z_row, old_row, new_row, bias_ptr, bias_stride, grad_row, lo + (num_old_blocks - 1 - i) * BLOCK_C,
            0, split, y, 0.0, label_smoothing, inv_num_classes, kt, gradient,
            HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, VEC, ROWS)


@triton.jit
def _zero_gradient(grad_row, lo, hi, num_classes, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """An ignored row's gradient over the blocks [lo, hi) of a row of C classes: exactly
    0, whatever its logits hold."""
    ROWS: tl.constexpr = BLOCK_C // VEC
    for start in range(lo, hi, BLOCK_C):
        cols = _tile(start, VEC, ROWS)
        tl.store(grad_row + cols, tl.zeros([ROWS, VEC], dtype=grad_row.dtype.element_ty), mask=cols < num_classes)


# --------------------------------------------------------------------------- one row's pieces
@triton.jit
def _row_target(target_ptr, target_stride, row, ignore_index, num_classes):
    """(counted, in range, both, y as an int32 column in [0, C)). An ignored row reads
    nothing and gets 0; an out-of-range target (only possible on a GPU, see _validation)
    reads class 0 and gets NaN."""
    y = tl.load(target_ptr + row * target_stride).to(tl.int64)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < num_classes)
    target_ok = counted & in_range
    return counted, in_range, target_ok, tl.where(target_ok, y, 0).to(tl.int32)


@triton.jit
def _statistics(
    z_row, old_row, new_row, bias_ptr, bias_stride, lo, hi, split_limit, read_limit, y, new_offset, kt,
    HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr, IS_KL: tl.constexpr,
    BIAS: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    """The statistics sweep over the classes [lo, hi) (lo a multiple of BLOCK_C) that a row
    reads (< read_limit; 0 for an ignored row), per tile row: the classes < split (old
    source read; no bias b), then the rest. The student is also returned as it stood after
    the old classes (``student_old``: the old source's LSE(s/τ)). Returns a RowStats."""
    ROWS: tl.constexpr = BLOCK_C // VEC
    stats = RowStats(_empty_lse(ROWS), tl.zeros([ROWS], tl.float32), _empty_lse(ROWS), _empty_lse(ROWS),
                     tl.full([ROWS], _NEG_INF, tl.float32), _empty_source(ROWS), _empty_source(ROWS))
    # The loops run over the chunk's blocks; the masks are the segments' bounds, which the
    # chunk's never cut (its ends are multiples of the block, or C): bounds the compiler
    # knows to be multiples of 16 keep the loads 16 bytes wide (a masked chunk end did
    # not, and cost the statistics loop about 40 registers).
    for start in range(lo, tl.minimum(hi, split_limit), BLOCK_C):
        stats = _stats_block(stats, z_row, old_row, new_row, bias_ptr, bias_stride, start, 0, split_limit, y, 0.0,
                             kt, HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC, ROWS)
    student_old = stats.student
    for start in range(tl.maximum(lo, (split_limit // BLOCK_C) * BLOCK_C), tl.minimum(hi, read_limit), BLOCK_C):
        stats = _stats_block(stats, z_row, old_row, new_row, bias_ptr, bias_stride, start, split_limit, read_limit,
                             y, new_offset, kt, HAS_CE, False, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC, ROWS)
    # the argmax tests' prefix maxima: the classes of y's block before y, if the block is here
    prefix_z = stats.prefix_z
    old = stats.old
    new = stats.new
    y_block = (y // BLOCK_C) * BLOCK_C
    if (y_block >= lo) & (y_block < hi) & (y_block < y):
        prefix_z = tl.maximum(prefix_z, _max_before(z_row, y, read_limit, BLOCK_C, VEC, ROWS))
        if HAS_OLD:
            old = SourceStats(old.teacher, old.kl, old.sq,
                              tl.maximum(old.prefix, _max_before(old_row, y, split_limit, BLOCK_C, VEC, ROWS)))
        if HAS_NEW:
            new = SourceStats(new.teacher, new.kl, new.sq,
                              tl.maximum(new.prefix, _max_before(new_row, y, read_limit, BLOCK_C, VEC, ROWS)))
    return RowStats(stats.ce, stats.sum_biased, student_old, stats.student, prefix_z, old, new)


@triton.jit
def _row_terms(
    stats, z_row, old_row, new_row, bias_ptr, bias_stride, y, target_ok, in_range, row_scale,
    num_classes, num_old, new_class_bias, label_smoothing, inv_tau, kt, kl_scale, alpha, beta,
    ce_weight, old_weight, new_weight,
    HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr, IS_KL: tl.constexpr,
    FOCUS_REF: tl.constexpr, FOCUS_STUDENT: tl.constexpr, BIAS: tl.constexpr,
):
    """The row's loss, in the order of spec §3, and each term's gradient coefficient for an
    upstream gradient of 1 (``row_scale``: 1/count for "mean"; NaN for a target out of
    range), as (loss, RowGradient), from the row's RowStats as vectors of parts: a
    program's tile rows (_statistics) or the chunks of the row (_load_chunk_records)."""
    row_scale = tl.where(in_range, row_scale, float("nan"))
    z_at_y = tl.load(z_row + y, mask=target_ok, other=0.0).to(tl.float32)
    prefix_z = tl.max(stats.prefix_z, 0)
    student_is_y_old = _is_argmax(z_at_y, tl.max(stats.student_old.m, 0), prefix_z, y, num_old)
    student_is_y_new = _is_argmax(z_at_y, tl.max(stats.student.m, 0), prefix_z, y, num_classes)
    ce_shift, ce_exp, ce_coef = 0.0, 0.0, 0.0
    old_student_shift, old_teacher_shift, old_student, old_teacher = 0.0, 0.0, 0.0, 0.0
    new_student_shift, new_teacher_shift, new_student, new_teacher = 0.0, 0.0, 0.0, 0.0
    row_loss = 0.0
    if HAS_CE:
        ce_shift, total_ce, unused_factor = _lse_total(stats.ce.m, stats.ce.l, _LOG2E)
        # LSE - z̃_y = (max - z̃_y) + ln Σ exp(z̃ - max), in that order: the parts of size |z̃|
        # cancel first. Σ exp(z̃ - max) is the sum against the shift over the max's own term
        # there, exp2(max·log2(e) - shift), taken as the sweep took it: a row of one class
        # gives exactly 1, so loss 0 (also ln 0 = -inf for a row of -inf, where max is 0).
        row_max_ce = tl.max(stats.ce.m, 0)
        finite_max = tl.where(row_max_ce == _NEG_INF, 0.0, row_max_ce)
        log_sum = tl.math.log2(total_ce / _exp2_against(finite_max, _LOG2E, ce_shift)) * _LN2
        z_target = z_at_y + _class_bias(bias_ptr, bias_stride, y, target_ok, num_old, new_class_bias, BIAS)
        nll = (finite_max - z_target) + log_sum
        # (ε/C) Σ_j (LSE - z̃_j); skipped at ε = 0, where 0 · inf would be NaN on masked classes
        smoothing = tl.where(label_smoothing == 0.0, 0.0,
                             label_smoothing * ((finite_max - tl.sum(stats.sum_biased, 0) / num_classes) + log_sum))
        row_loss += ce_weight * ((1.0 - label_smoothing) * nll + smoothing)
        ce_coef = row_scale * ce_weight
        ce_exp = ce_coef / total_ce
    if HAS_OLD:
        old_loss, old_student_shift, old_teacher_shift, old_student, old_teacher = _source_terms(
            stats.student_old, stats.old, old_row, y, target_ok, num_old, student_is_y_old, old_weight, row_scale,
            alpha, beta, inv_tau, kt, kl_scale, IS_KL, FOCUS_REF, FOCUS_STUDENT)
        row_loss += old_loss
    if HAS_NEW:
        new_loss, new_student_shift, new_teacher_shift, new_student, new_teacher = _source_terms(
            stats.student, stats.new, new_row, y, target_ok, num_classes, student_is_y_new, new_weight, row_scale,
            alpha, beta, inv_tau, kt, kl_scale, IS_KL, FOCUS_REF, FOCUS_STUDENT)
        row_loss += new_loss
    row_loss = tl.where(in_range, row_loss, float("nan"))
    return row_loss, RowGradient(ce_shift, ce_exp, ce_coef, old_student_shift, old_teacher_shift, old_student,
                                 old_teacher, new_student_shift, new_teacher_shift, new_student, new_teacher)


# --------------------------------------------------------------------------- chunked rows
# A long row's two sweeps are far apart in time: the inputs of every row in flight pass
# through L2 between a block's statistics read and its gradient read, so at large C the
# second read comes from DRAM again. Chunked, a row is cut into chunks of ``chunk_blocks``
# blocks handled by different programs: a program takes a ticket t (an atomic counter, so that
# tickets follow the order in which programs really started), sweeps the statistics of
# chunk t % S of row t // S and publishes them as a record; then it writes the gradient of
# the same chunk of the row ``lag`` rows earlier, once all S records of that row are
# published (by programs with smaller tickets: started, so the wait cannot deadlock). The
# data read between a chunk's two reads is then about lag·S chunks, set by the chunk size
# and not by C. Each record is one 128-byte line of float32 (RECORD), its fields at:
RECORD = tl.constexpr(32)
_CE_FIELD = tl.constexpr(0)  # max, sum (_store_lse_part)
_SUM_BIASED_FIELD = tl.constexpr(2)
_STUDENT_OLD_FIELD = tl.constexpr(3)  # max, sum
_STUDENT_FIELD = tl.constexpr(5)  # max, sum
_PREFIX_Z_FIELD = tl.constexpr(7)
_TEACHER_OLD_FIELD = tl.constexpr(8)  # max, sum, KL sum, squares, prefix (_store_teacher_part)
_TEACHER_NEW_FIELD = tl.constexpr(13)


@triton.jit
def _store_lse_part(record, FIELD: tl.constexpr, lse, scale):
    """One OnlineLse of a chunk, its tile rows combined, at FIELD and FIELD + 1: the max
    and the sum relative to the max's shift. Returns the tile rows' factors onto that
    shift."""
    unused_shift, total, factor = _lse_total(lse.m, lse.l, scale)
    tl.store(record + FIELD, tl.max(lse.m, 0))
    tl.store(record + FIELD + 1, total)
    return factor


@triton.jit
def _store_teacher_part(record, FIELD: tl.constexpr, source, kt):
    """One distillation source (SourceStats) of a chunk at FIELD .. FIELD + 4."""
    factor = _store_lse_part(record, FIELD, source.teacher, kt)
    tl.store(record + FIELD + 2, tl.sum(_rescaled(source.kl, factor), 0))  # onto the teacher's shift, as l
    tl.store(record + FIELD + 3, tl.sum(source.sq, 0))
    tl.store(record + FIELD + 4, tl.max(source.prefix, 0))


@triton.jit
def _store_chunk_record(record, stats, kt):
    """A chunk's RowStats (from _statistics) as one record (fields: see RECORD)."""
    _store_lse_part(record, _CE_FIELD, stats.ce, _LOG2E)
    tl.store(record + _SUM_BIASED_FIELD, tl.sum(stats.sum_biased, 0))
    _store_lse_part(record, _STUDENT_OLD_FIELD, stats.student_old, kt)
    _store_lse_part(record, _STUDENT_FIELD, stats.student, kt)
    tl.store(record + _PREFIX_Z_FIELD, tl.max(stats.prefix_z, 0))
    _store_teacher_part(record, _TEACHER_OLD_FIELD, stats.old, kt)
    _store_teacher_part(record, _TEACHER_NEW_FIELD, stats.new, kt)


@triton.jit
def _record_field(records, valid, FIELD: tl.constexpr, EMPTY: tl.constexpr):
    # .cg: from L2, where other SMs' records land (never a stale L1 line)
    return tl.load(records + FIELD, mask=valid, other=EMPTY, cache_modifier=".cg")


@triton.jit
def _load_lse_part(records, valid, FIELD: tl.constexpr):
    return OnlineLse(_record_field(records, valid, FIELD, _NEG_INF), _record_field(records, valid, FIELD + 1, 0.0))


@triton.jit
def _load_teacher_part(records, valid, FIELD: tl.constexpr):
    return SourceStats(_load_lse_part(records, valid, FIELD), _record_field(records, valid, FIELD + 2, 0.0),
                       _record_field(records, valid, FIELD + 3, 0.0), _record_field(records, valid, FIELD + 4, _NEG_INF))


@triton.jit
def _load_chunk_records(row_records, num_chunks, CHUNKS: tl.constexpr):
    """A row's chunk records as a RowStats of [CHUNKS] vectors (absent chunks empty: max
    -inf, sums 0)."""
    chunk = tl.arange(0, CHUNKS)
    valid = chunk < num_chunks
    records = row_records + chunk * RECORD
    return RowStats(
        _load_lse_part(records, valid, _CE_FIELD),
        _record_field(records, valid, _SUM_BIASED_FIELD, 0.0),
        _load_lse_part(records, valid, _STUDENT_OLD_FIELD),
        _load_lse_part(records, valid, _STUDENT_FIELD),
        _record_field(records, valid, _PREFIX_Z_FIELD, _NEG_INF),
        _load_teacher_part(records, valid, _TEACHER_OLD_FIELD),
        _load_teacher_part(records, valid, _TEACHER_NEW_FIELD),
    )


@triton.jit
def _publish(flag):
    """Counts one more published record of a row, after every thread's stores."""
    tl.debug_barrier()
    tl.atomic_add(flag, 1, sem="release", scope="gpu")


@triton.jit
def _wait_for(flag, count):
    """Spins until ``count`` records of a row are published."""
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    while seen < count:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")


# --------------------------------------------------------------------------- the kernels
# A value the batch size sets (N, the number of partial sums) is not specialised on
# (divisible by 16, equal to 1): a last batch of another size runs the kernels already
# compiled. Class counts and strides are, since they make the 16-byte loads.
@triton.jit(do_not_specialize=["num_rows"])
def _mpt_loss_kernel(
    z_ptr, z_row_stride,
    target_ptr, target_stride,
    old_ptr, old_row_stride,
    new_ptr, new_row_stride,
    bias_ptr, bias_stride,
    rows_ptr, grad_ptr, stats_ptr, inv_count_ptr, sync_ptr, records_ptr,
    num_rows, num_classes, num_old, num_read, split, ignore_index, chunk_blocks, num_chunks, lag,
    new_class_bias, label_smoothing, inv_tau, kl_scale, alpha, beta,
    ce_weight, old_weight, new_weight,
    HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr,
    IS_KL: tl.constexpr, FOCUS_REF: tl.constexpr, FOCUS_STUDENT: tl.constexpr,
    BIAS: tl.constexpr, MEAN: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr,
):
    """CHUNKS = 0: one program per row (grid N). CHUNKS > 0 (a power of two >= num_chunks,
    WRITE_GRAD only): chunked rows, grid (N + lag) · num_chunks (see RECORD)."""
    VEC: tl.constexpr = 128 // z_ptr.dtype.element_ty.primitive_bitwidth  # 16 bytes per load
    kt = inv_tau * _LOG2E  # s/τ in base 2
    if MEAN:
        row_scale = tl.load(inv_count_ptr)
    else:
        row_scale = 1.0
    if BIAS == 2:
        new_offset = new_class_bias
    else:
        new_offset = 0.0

    if CHUNKS == 0:
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
        lo = 0
        hi = num_classes
        write_row = True
    else:
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")  # only the count matters
        chunk = ticket % num_chunks
        lo = chunk * chunk_blocks * BLOCK_C  # a visible multiple of the block: 16-byte loads
        hi = tl.minimum(lo + chunk_blocks * BLOCK_C, num_classes)
        write_row = chunk == 0
        # ---- statistics of chunk `chunk` of row `ticket // num_chunks`, published
        stats_row = (ticket // num_chunks).to(tl.int64)
        if stats_row < num_rows:
            counted, in_range, target_ok, y = _row_target(target_ptr, target_stride, stats_row, ignore_index,
                                                          num_classes)
            stats = _statistics(
                z_ptr + stats_row * z_row_stride, old_ptr + stats_row * old_row_stride,
                new_ptr + stats_row * new_row_stride, bias_ptr, bias_stride, lo, hi,
                tl.where(counted, split, 0), tl.where(counted, num_read, 0), y, new_offset, kt,
                HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC)
            _store_chunk_record(records_ptr + (stats_row * num_chunks + chunk) * RECORD, stats, kt)
            _publish(sync_ptr + 1 + stats_row)
        # ---- then the same chunk of the row `lag` rows earlier, once its records are all in
        row = stats_row - lag
    if row >= 0:
        z_row = z_ptr + row * z_row_stride
        old_row = old_ptr + row * old_row_stride
        new_row = new_ptr + row * new_row_stride
        counted, in_range, target_ok, y = _row_target(target_ptr, target_stride, row, ignore_index, num_classes)
        if CHUNKS == 0:
            stats = _statistics(
                z_row, old_row, new_row, bias_ptr, bias_stride, 0, num_classes,
                tl.where(counted, split, 0), tl.where(counted, num_read, 0), y, new_offset, kt,
                HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC)
        else:
            _wait_for(sync_ptr + 1 + row, num_chunks)
            stats = _load_chunk_records(records_ptr + row * num_chunks * RECORD, num_chunks, CHUNKS)
        row_loss, gradient = _row_terms(
            stats, z_row, old_row, new_row, bias_ptr, bias_stride, y, target_ok, in_range, row_scale,
            num_classes, num_old, new_class_bias, label_smoothing, inv_tau, kt, kl_scale, alpha, beta,
            ce_weight, old_weight, new_weight,
            HAS_CE, HAS_OLD, HAS_NEW, IS_KL, FOCUS_REF, FOCUS_STUDENT, BIAS)
        if write_row:
            tl.store(rows_ptr + row, tl.where(counted, row_loss, 0.0))
            if WRITE_GRAD:  # what a backward needs to redo the gradient sweep
                _store_row_stats(stats_ptr + row * NUM_STATS, gradient, HAS_CE, HAS_OLD, HAS_NEW)

        # ---- gradient sweep over [lo, hi) for an upstream gradient of 1
        if WRITE_GRAD:
            grad_row = grad_ptr + row * num_classes
            if counted:
                _gradient_sweep(
                    z_row, old_row, new_row, bias_ptr, bias_stride, grad_row,
                    y, split, lo, hi, num_classes, new_class_bias, label_smoothing, kt, gradient,
                    HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC)
            else:
                _zero_gradient(grad_row, lo, hi, num_classes, BLOCK_C, VEC)


@triton.jit
def _mpt_loss_backward_kernel(
    z_ptr, z_row_stride,
    target_ptr, target_stride,
    old_ptr, old_row_stride,
    new_ptr, new_row_stride,
    bias_ptr, bias_stride,
    stats_ptr, upstream_ptr, upstream_stride, grad_ptr,
    num_classes, num_old, num_read, split, ignore_index,
    new_class_bias, label_smoothing, inv_tau,
    HAS_CE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_NEW: tl.constexpr,
    IS_KL: tl.constexpr, BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row i of the gradient for an upstream gradient g_i != 1, in place of the forward's.

    g_i == 1 (plain loss.backward()) keeps the forward's gradient, already exact; ignored
    rows keep their zeros whatever g_i is (NaN included), as the reference masks them.
    Elsewhere the row is recomputed from the inputs and the saved statistics with g_i
    multiplied into the coefficients in float32, so it is rounded once, never rescaled.
    """
    VEC: tl.constexpr = 128 // z_ptr.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(upstream_ptr + row * upstream_stride).to(tl.float32)
    counted, in_range, target_ok, y = _row_target(target_ptr, target_stride, row, ignore_index, num_classes)
    if (g != 1.0) & counted:  # (a target out of range has NaN coefficients already)
        gradient = _load_row_stats(stats_ptr + row * NUM_STATS, g, HAS_CE, HAS_OLD, HAS_NEW)
        _gradient_sweep(
            z_ptr + row * z_row_stride, old_ptr + row * old_row_stride, new_ptr + row * new_row_stride,
            bias_ptr, bias_stride, grad_ptr + row * num_classes,
            y, split, 0, num_classes, num_classes, new_class_bias, label_smoothing, inv_tau * _LOG2E, gradient,
            HAS_CE, HAS_OLD, HAS_NEW, IS_KL, BIAS, BLOCK_C, VEC)


@triton.jit(do_not_specialize=["num_rows"])
def _inverse_count_kernel(target_ptr, target_stride, num_rows, ignore_index, out_ptr, BLOCK: tl.constexpr):
    """1 / max(#rows whose target is not ignore_index, 1), on the device (one program)."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        in_batch = rows < num_rows
        y = tl.load(target_ptr + rows.to(tl.int64) * target_stride, mask=in_batch, other=0)
        count += (in_batch & (y != ignore_index)).to(tl.int32)
    total = tl.sum(count, 0)
    tl.store(out_ptr, 1.0 / tl.maximum(total, 1).to(tl.float32))


# --------------------------------------------------------------------------- launchers
# Registers per thread: 64 lets four programs of 8 warps share an SM (50% occupancy).
# Unbounded, sm_90 ptxas gives the fully specialised forward 48 (58 chunked), so 48 (five
# programs) is the next setting to time (benchmarks/profile_kernels.py --triton-maxnreg).
MAX_REGISTERS = 64


def _launch_config(num_classes: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps): one 16-byte vector per thread and stream per block, up to 8
    warps (2048 classes in 16-bit, 1024 in float32); a smaller block for a smaller row.
    The number of input streams does not change it: the running statistics are per
    thread, so the registers do not grow with the block."""
    return _block_and_warps(num_classes, element_size, block_size_override)


@functools.lru_cache(maxsize=1024)  # on the host path of every call
def _block_and_warps(num_classes: int, element_size: int, block: Optional[int]) -> tuple[int, int]:
    vec = 16 // element_size
    if block is None:
        block = max(vec * 32, min(triton.next_power_of_2(num_classes), vec * 32 * 8))
    num_warps = max(1, min(8, block // (vec * 32)))
    return block, num_warps


# Chunked rows (see RECORD) in the forward that writes the gradient: the classes per chunk
# (rounded down to a multiple of the block), or None for one program per row. Off until
# timed on a GPU against one program per row; tests set it small, and lag_override too.
chunk_classes: Optional[int] = None
lag_override: Optional[int] = None


def _chunking(num_rows: int, num_classes: int, plan: _Plan, device: torch.device) -> tuple[int, int, int]:
    """(classes per chunk, chunks per row, lag in rows) for a forward that writes the
    gradient; (0, 1, 0): one program per row. The lag covers the programs an SM holds at
    once (by threads and by registers), over all SMs: the chunks a program waits for then
    started about one wave earlier, so a wait is rare, and the data read between a
    chunk's two reads is about one wave's chunks."""
    rows = 0, 1, 0
    if chunk_classes is None:
        return rows
    chunk = max(plan.block, chunk_classes // plan.block * plan.block)
    num_chunks = -(-num_classes // chunk)
    if num_chunks < 2:
        return rows
    if lag_override is not None:
        lag = lag_override
    else:
        threads = 32 * plan.num_warps
        per_sm = min(2048 // threads, 65536 // ((plan.max_registers or 64) * threads), 32)
        lag = -(-_multiprocessors(device) * per_sm // num_chunks)
    lag = max(1, min(lag, num_rows))
    if (num_rows + lag) * num_chunks >= 2**31:  # tickets are int32
        return rows
    return chunk, num_chunks, lag


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _needs_class_copy(x: torch.Tensor) -> bool:
    """Exactly when x.contiguous() copies x (an empty tensor counts as contiguous)."""
    return x.stride(1) != 1 and x.shape[1] > 1 and x.numel() > 0


def _class_axis_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the classes; rows may have any stride."""
    return x.contiguous() if _needs_class_copy(x) else x


def _empty(shape, device: torch.device) -> torch.Tensor:
    """The float32 buffers the kernels write besides the gradient (per-row losses and
    statistics, the inverse count): every element written (tests fill them with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _new_gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    """The only N x C allocation: every element is written by the kernel."""
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _inverse_count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    out = _empty((), target.device)
    _inverse_count_kernel[(1,)](target, target.stride(0), target.shape[0], ignore_index, out, BLOCK=1024,
                                **fm.LAUNCH_OPTIONS)
    return out


def _streams(args: SoftmaxLossArgs) -> list:
    """The inputs the kernels read: student, old and new teacher (None where a source is
    absent or has weight 0, so that its term is not computed)."""
    has_old = args.old_logits is not None and args.old_weight != 0.0
    has_new = args.new_logits is not None and args.new_weight != 0.0
    return [args.logits, args.old_logits if has_old else None, args.new_logits if has_new else None]


class _Plan(NamedTuple):
    """What the forward and the backward kernel share: the terms present, the columns
    read, the bias mode and the launch configuration. (A NamedTuple: both directions
    build one on every call, and a frozen dataclass of ten fields takes about 1 µs to
    construct, a NamedTuple 0.25 µs.)"""

    has_ce: bool
    has_old: bool
    has_new: bool
    is_kl: bool
    num_read: int
    split: int
    bias_mode: int
    block: int
    num_warps: int
    max_registers: Optional[int]

    @staticmethod
    def of(args: SoftmaxLossArgs) -> _Plan:
        logits = args.logits
        num_classes = logits.shape[1]
        has_ce = args.ce_weight != 0.0
        z, old, new = _streams(args)
        has_old, has_new = old is not None, new is not None
        if args.class_bias is not None:
            bias_mode = BIAS_VECTOR
        elif args.new_class_bias != 0.0 and args.num_old_classes < num_classes:
            bias_mode = BIAS_NEW_CLASSES
        else:
            bias_mode = BIAS_NONE
        # Focal distillation alone needs only the student's first K columns.
        num_read = num_classes if (has_ce or has_new) else (args.num_old_classes if has_old else 0)
        # The kernels sweep the classes < split (the old source's, without the bias b) and
        # the rest in two loops; without an old source or b one loop does (split = 0).
        split = args.num_old_classes if (has_old or bias_mode == BIAS_NEW_CLASSES) else 0
        block, num_warps = _launch_config(num_classes, logits.element_size())
        # The register cap where the JIT sees 16-byte-aligned rows (every row stride and
        # split a multiple of 16 elements). Elsewhere the loads are narrow, each with its
        # own address: at C = 1000 the forward then needs 96 registers, and under the cap
        # it spilled 120 bytes (sm_90 ptxas).
        aligned = num_classes % 16 == 0 and args.num_old_classes % 16 == 0 and z.stride(0) % 16 == 0 and \
            (old is None or old.stride(0) % 16 == 0) and (new is None or new.stride(0) % 16 == 0)
        return _Plan(has_ce, has_old, has_new, args.kind == "kl", num_read, split, bias_mode, block, num_warps,
                     MAX_REGISTERS if aligned else None)

    def constexprs(self) -> dict:
        """The specialisation both kernels take, and their launch configuration."""
        return dict(HAS_CE=self.has_ce, HAS_OLD=self.has_old, HAS_NEW=self.has_new, IS_KL=self.is_kl,
                    BIAS=self.bias_mode, BLOCK_C=self.block, num_warps=self.num_warps,
                    **({} if self.max_registers is None else dict(maxnreg=self.max_registers)),
                    **fm.LAUNCH_OPTIONS)


def _kernel_inputs(args: SoftmaxLossArgs, plan: _Plan, class_contiguous) -> tuple:
    """(z, old, new, bias) as both kernels take them: each input read, with unit stride
    along the classes by ``class_contiguous``; the student stands in for what is not read."""
    z, old, new = (None if x is None else class_contiguous(x) for x in _streams(args))
    old = z if old is None else old
    new = z if new is None else new
    bias = args.class_bias if plan.bias_mode == BIAS_VECTOR else z
    return z, old, new, bias


def _forward(args: SoftmaxLossArgs, needs_grad: bool):
    logits = args.logits
    num_rows, num_classes = logits.shape
    check_kernel_shape("triton", logits)
    check_target_values(args.target, num_classes, args.ignore_index)
    plan = _Plan.of(args)
    copies = []  # of class-strided inputs: kept for a recomputing backward

    def class_contiguous(x):
        read = _class_axis_contiguous(x)
        if read is not x:
            copies.append(read)
        return read

    z, old, new, bias = _kernel_inputs(args, plan, class_contiguous)
    target = args.target
    mean = args.reduction == "mean"
    focus_ref, focus_student = FOCUS_PARTS[args.focus]

    rows = _empty(num_rows, logits.device)
    if needs_grad:
        grad = _new_gradient_buffer(logits)
        stats = _empty((num_rows, NUM_STATS.value), logits.device)
    else:
        grad = stats = rows
    inv_count = _inverse_count(target, args.ignore_index) if mean else rows
    chunk, num_chunks, lag = _chunking(num_rows, num_classes, plan, logits.device) if needs_grad else (0, 1, 0)
    if chunk:
        grid = ((num_rows + lag) * num_chunks,)
        sync = torch.zeros(1 + num_rows, dtype=torch.int32, device=logits.device)  # ticket, then per row
        records = _empty(num_rows * num_chunks * RECORD.value, logits.device)
    else:
        grid, sync, records = (num_rows,), rows, rows
    if num_rows > 0:
        _mpt_loss_kernel[grid](
            z, z.stride(0),
            target, target.stride(0),
            old, old.stride(0),
            new, new.stride(0),
            bias, bias.stride(0),
            rows, grad, stats, inv_count, sync, records,
            num_rows, num_classes, args.num_old_classes, plan.num_read, plan.split, args.ignore_index,
            chunk // plan.block, num_chunks, lag, args.new_class_bias, args.label_smoothing, 1.0 / args.tau,
            args.tau * args.tau if args.scale_by_tau_sq else 1.0, args.alpha, args.beta,
            args.ce_weight, args.old_weight, args.new_weight,
            FOCUS_REF=focus_ref, FOCUS_STUDENT=focus_student, MEAN=mean, WRITE_GRAD=needs_grad,
            CHUNKS=triton.next_power_of_2(num_chunks) if chunk else 0, **plan.constexprs(),
        )

    if args.reduction == "none":
        loss = rows.to(logits.dtype)
    else:  # one launch: the sum in a fixed order, times 1/count for "mean", in the dtype
        loss = scaled_sum(rows, logits.dtype, device_scale=inv_count if mean else None)
    return loss, ([grad, stats, *copies] if needs_grad else [])


def _saved_fake(args: SoftmaxLossArgs, needs_grad: bool):
    logits = args.logits
    if not needs_grad:
        return []
    stats = logits.new_empty((logits.shape[0], NUM_STATS.value), dtype=torch.float32)
    copies = [torch.empty(x.shape, dtype=x.dtype, device=x.device)
              for x in _streams(args) if x is not None and _needs_class_copy(x)]
    return [torch.empty(logits.shape, dtype=logits.dtype, device=logits.device), stats, *copies]


def _backward(grad_loss: torch.Tensor, saved: list, args: SoftmaxLossArgs) -> None:
    """Writes the gradient into the forward's buffer ``saved[0]`` where the upstream
    gradient is not 1 (see _mpt_loss_backward_kernel); no host synchronisation."""
    grad, stats, copies = saved[0], saved[1], iter(saved[2:])
    num_rows, num_classes = grad.shape
    if num_rows == 0 or num_classes == 0:
        return
    plan = _Plan.of(args)
    z, old, new, bias = _kernel_inputs(args, plan, lambda x: next(copies) if _needs_class_copy(x) else x)
    upstream_stride = grad_loss.stride(0) if grad_loss.dim() == 1 else 0
    _mpt_loss_backward_kernel[(num_rows,)](
        z, z.stride(0),
        args.target, args.target.stride(0),
        old, old.stride(0),
        new, new.stride(0),
        bias, bias.stride(0),
        stats, grad_loss, upstream_stride, grad,
        num_classes, args.num_old_classes, plan.num_read, plan.split, args.ignore_index,
        args.new_class_bias, args.label_smoothing, 1.0 / args.tau,
        **plan.constexprs(),
    )


loss = define_loss_ops(
    "triton", "softmax", forward=_forward, saved_fake=_saved_fake, backward=_backward,
    backward_in_place=True,
)
