"""Fused Triton kernels for the multi-label losses: Hill (spec §4) and SPLC (spec §5).

One elementwise kernel computes, in one pass over the logits and the targets, the loss
of every element and its derivative; the two losses share the sigmoid / log-sigmoid
and focal-factor pieces (the ``@triton.jit`` helpers below) and differ only in the
negative branch (a ``tl.constexpr`` picks Hill or SPLC, and ``FOCAL`` whether γ != 0:
four specialisations). Every hyper-parameter value is a runtime argument: a new epoch,
λ, margin, τ or non-zero γ never recompiles (γ = 0 and γ != 0 are two variants), and
neither does a new batch size (the tile does not depend on N).

Layout: the kernel works on 2-D tiles ``[BLOCK_ROWS, BLOCK_COLS]`` of the (N, C) inputs
and honours both strides of the logits, of the targets and of the upstream gradient (a
slice, a transposed or an expanded tensor is read in place, never copied; Triton
specialises a stride of 1, so the contiguous case loses nothing). Offsets are int64, so
N·C beyond 2^31 works. Targets of every allowed dtype are read as they are (a bool
tensor through a free ``uint8`` view) and compared with 0.5 in the kernel. The loss and
its gradient are computed in float32; the gradient is stored in the logits' dtype.

Where the gradient comes from (``define_loss_ops(..., backward_in_place=True)``):

* ``"sum"`` / ``"mean"``: when autograd will want it, the forward also writes dℓ/dx for
  an upstream gradient of 1 (the 1/(N·C) of "mean" folded in), rounded once to the
  logits' dtype: one read of x and t, one write of the gradient. The backward launches
  the same kernel, which reads the upstream scalar g on the device: when g == 1
  (``loss.backward()``) every program returns at once (no N·C traffic, no host
  synchronisation); otherwise it recomputes dℓ/dx from x and t and writes dℓ/dx · g
  (/ (N·C) for "mean"), computed in float32 and rounded once. Rescaling the stored,
  already rounded gradient instead would round twice, and in float16 "mean" would lose
  to underflow what a loss scale (GradScaler) is there to keep.
* ``"none"``: the upstream gradient is an (N, C) tensor that is almost never all ones,
  so the forward writes only the loss and reserves the gradient buffer (an allocation,
  no traffic); the backward runs the kernel on x, t and the upstream gradient and writes
  dℓ/dx · g once.
* Without ``needs_grad`` (inference, ``torch.no_grad()``) no gradient is written and
  nothing of size N·C is allocated besides the "none" loss.

Scalar reductions are deterministic: each program writes the sum of its tile to a small
float32 buffer (one value per tile) and one program adds those up in a fixed order. No
atomics. Nothing here reads a device value back to the host.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._custom_op import define_loss_ops
from .._validation import splc_flip_logit
from . import triton_fastmath as fm
from .triton_sum import scaled_sum

# --------------------------------------------------------------------------- launch shapes
# Kept as module-level knobs so that tests under the interpreter can shrink the blocks
# and make small inputs cross many of them.
TILE_ELEMENTS = 4096  # elements per program of the elementwise kernel
TILE_WARPS = None  # warps per program; None: one per 512 elements, at most 8


# Plain integer arithmetic on the host path of every call: triton.cdiv and
# triton.next_power_of_2 are JIT-callable objects that take about 1.5 µs a call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The least power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def tile_shape(n_cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): a power-of-two tile of about TILE_ELEMENTS elements,
    as wide as the rows allow (contiguous columns make coalesced accesses). It does not
    depend on the number of rows (a small batch masks the rows it lacks), so that a batch
    of another size compiles nothing new."""
    block_cols = min(_next_power_of_2(max(n_cols, 1)), TILE_ELEMENTS)
    return max(TILE_ELEMENTS // block_cols, 1), block_cols


def _num_warps(block_elements: int) -> int:
    if TILE_WARPS is not None:
        return TILE_WARPS
    return max(1, min(8, block_elements // 512))


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer this module writes is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)



# --------------------------------------------------------------------------- shared math
ATANH_SERIES_3 = tl.constexpr(1 / 3)
ATANH_SERIES_5 = tl.constexpr(1 / 5)
ATANH_SERIES_7 = tl.constexpr(1 / 7)
ATANH_SERIES_9 = tl.constexpr(1 / 9)
ATANH_SERIES_11 = tl.constexpr(1 / 11)
ATANH_SERIES_13 = tl.constexpr(1 / 13)


@triton.jit
def _log1p_of_unit(e):
    """log(1 + e) for e in [0, 1], to a few float32 ulps relative, also for tiny e.

    log1p(e) = 2 atanh(u) with u = e / (2 + e) in [0, 1/3], and the odd series of atanh to
    u^13 (its remainder is under 2^-24 of the sum over that range). One reciprocal, no
    logarithm: the hardware lg2's error is absolute (about 2^-22), which for a small e is a
    large relative error in log1p(e), hence in log σ of a large |s| and in every focal
    factor built from it (an H200 run found a float32 SPLC gradient 6e-5 off).
    """
    u = e * fm.reciprocal(2.0 + e)
    u2 = u * u
    series = ATANH_SERIES_13 * u2 + ATANH_SERIES_11
    series = series * u2 + ATANH_SERIES_9
    series = series * u2 + ATANH_SERIES_7
    series = series * u2 + ATANH_SERIES_5
    series = series * u2 + ATANH_SERIES_3
    series = series * u2 + 1.0
    return 2.0 * u * series


@triton.jit
def _sigmoid_and_log_sigmoids(s):
    """p = σ(s), 1 - p, log p and log(1 - p), from one exp and two reciprocals.

    log σ(|s|) = -log1p(exp(-|s|)) and log σ(-|s|) = log σ(|s|) - |s|: finite for any
    finite s (never log(σ(s)), which is -inf once σ(s) underflows); 1 - p is computed as
    σ(-s), not 1 - σ(s). The sign of s picks which of the pair is p's and which 1 - p's.
    """
    e = fm.exp2(tl.abs(s) * -fm.LOG2E)  # exp(-|s|), in [0, 1]
    sigmoid_of_abs = fm.reciprocal(1.0 + e)  # σ(|s|)
    sigmoid_of_minus_abs = e * sigmoid_of_abs  # σ(-|s|)
    log_sigmoid_of_abs = -_log1p_of_unit(e)  # log σ(|s|)
    log_sigmoid_of_minus_abs = log_sigmoid_of_abs - tl.abs(s)  # log σ(-|s|)
    nonnegative = s >= 0.0
    p = tl.where(nonnegative, sigmoid_of_abs, sigmoid_of_minus_abs)
    one_minus_p = tl.where(nonnegative, sigmoid_of_minus_abs, sigmoid_of_abs)
    log_p = tl.where(nonnegative, log_sigmoid_of_abs, log_sigmoid_of_minus_abs)
    log_one_minus_p = tl.where(nonnegative, log_sigmoid_of_minus_abs, log_sigmoid_of_abs)
    return p, one_minus_p, log_p, log_one_minus_p


@triton.jit
def _focal_positive(p, one_minus_p, log_p, log_one_minus_p, gamma, gamma_log2e, FOCAL: tl.constexpr):
    """ℓ = -(1 - p)^γ log p and dℓ/ds = (1 - p)^γ (γ p log p - (1 - p)), p = σ(s).

    The focal factor is differentiated (spec §4) and computed as exp(γ log(1 - p)),
    smooth also where 1 - p underflows. FOCAL = (γ != 0): for γ = 0 the factor is 1 (as
    torch.pow(0., 0.)), also at s = +inf, where 0 · log(1 - p) would be NaN. Mirrored
    (s -> -s swaps p and 1 - p, and negates the derivative) it is SPLC's negative branch.
    """
    if not FOCAL:
        return -log_p, -one_minus_p
    focal = fm.exp2(gamma_log2e * log_one_minus_p)  # gamma_log2e = γ·log2(e), from the host
    loss = -focal * log_p
    grad = focal * (gamma * p * log_p - one_minus_p)
    return loss, grad


@triton.jit
def _hill_negative(p, one_minus_p, lamb):
    """ℓ = (λ - p) p² and dℓ/dx = (2λ - 3p) p² (1 - p), p = σ(x)."""
    p_squared = p * p
    loss = (lamb - p) * p_squared
    grad = (2.0 * lamb - 3.0 * p) * p_squared * one_minus_p
    return loss, grad


@triton.jit
def _element_loss_and_grad(x, positive, lamb, margin, gamma, gamma_log2e, flip_logit, IS_SPLC: tl.constexpr,
                           FOCAL: tl.constexpr):
    """Each element's loss and dℓ/dx (float32), Hill or SPLC."""
    # the margin follows the original label
    shifted = tl.where(positive, x - margin, x)
    if IS_SPLC:
        # SPLC (§5): from change_epoch on, a negative with σ(x) > τ, that is x > logit(τ),
        # counts as positive (flip_logit = +inf before then: never). A hard decision: no
        # gradient through it. t' = 0 is the positive case at -x: the focal term of
        # σ(-x) = 1 - p, with the derivative negated.
        as_positive = positive | (shifted > flip_logit)
        signed = tl.where(as_positive, shifted, -shifted)
        p, one_minus_p, log_p, log_one_minus_p = _sigmoid_and_log_sigmoids(signed)
        loss, grad = _focal_positive(p, one_minus_p, log_p, log_one_minus_p, gamma, gamma_log2e, FOCAL)
        grad = tl.where(as_positive, grad, -grad)
    else:
        # Hill (§4): focal positive at q = σ(x - m), Hill's quadratic negative at p = σ(x)
        p, one_minus_p, log_p, log_one_minus_p = _sigmoid_and_log_sigmoids(shifted)
        positive_loss, positive_grad = _focal_positive(p, one_minus_p, log_p, log_one_minus_p, gamma, gamma_log2e,
                                                       FOCAL)
        negative_loss, negative_grad = _hill_negative(p, one_minus_p, lamb)
        loss = tl.where(positive, positive_loss, negative_loss)
        grad = tl.where(positive, positive_grad, negative_grad)
    return loss, grad


@triton.jit
def _is_positive(t):
    """t > 0.5 (spec §4), for a target in its own dtype: a half-precision one compared in
    float32 (the interpreter compares bfloat16 by its raw bits, which makes -1 and NaN
    positive), a float64 one in float64, an integer one as t > 0."""
    if t.dtype.is_floating():
        if t.dtype == tl.float64:
            return t > 0.5
        return t.to(tl.float32) > 0.5
    return t > 0


# --------------------------------------------------------------------------- kernels
@triton.jit
def _elements(
    logits_ptr, targets_ptr, upstream_ptr, loss_ptr, grad_ptr,
    logits_offsets, targets_offsets, upstream_offsets, out_offsets, mask, tile_index,
    lamb, margin, gamma, gamma_log2e, flip_logit, grad_scale,
    IS_SPLC: tl.constexpr, FOCAL: tl.constexpr, MASKED: tl.constexpr,
    WRITE_ELEMENT_LOSS: tl.constexpr, WRITE_TILE_SUMS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    UPSTREAM_PER_ELEMENT: tl.constexpr,
):
    """Loads one tile, computes its losses and gradient, stores what is asked for."""
    # ---- load: logits in float32, targets in their own dtype (positive iff > 0.5)
    if MASKED:
        x = tl.load(logits_ptr + logits_offsets, mask=mask, other=0.0)
        t = tl.load(targets_ptr + targets_offsets, mask=mask, other=0)
    else:
        x = tl.load(logits_ptr + logits_offsets)
        t = tl.load(targets_ptr + targets_offsets)
    loss, grad = _element_loss_and_grad(x.to(tl.float32), _is_positive(t), lamb, margin, gamma, gamma_log2e, flip_logit,
                                        IS_SPLC, FOCAL)

    # ---- store
    if WRITE_ELEMENT_LOSS:
        tl.store(loss_ptr + out_offsets, loss.to(loss_ptr.dtype.element_ty), mask=mask if MASKED else None)
    if WRITE_TILE_SUMS:
        if MASKED:
            loss = tl.where(mask, loss, 0.0)
        tl.store(loss_ptr + tile_index, tl.sum(loss))
    if WRITE_GRAD:
        grad = grad * grad_scale
        if UPSTREAM_PER_ELEMENT:
            if MASKED:
                upstream = tl.load(upstream_ptr + upstream_offsets, mask=mask, other=0.0)
            else:
                upstream = tl.load(upstream_ptr + upstream_offsets)
            grad = grad * upstream.to(tl.float32)
        tl.store(grad_ptr + out_offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask if MASKED else None)


# n_rows and numel follow the batch size: not specialised on, so that a last batch of
# another size compiles nothing (full flat tiles are unmasked, so numel's divisibility
# would buy nothing); nor is a column stride's divisibility (a transposed tensor's is N),
# only whether it is 1. n_cols and the row strides are: they make the strided tiles'
# 16-byte loads.
@triton.jit(do_not_specialize=["n_rows", "numel"],
            do_not_specialize_on_alignment=["stride_logits_col", "stride_targets_col", "stride_upstream_col"])
def _multilabel_kernel(
    logits_ptr, targets_ptr, upstream_ptr, loss_ptr, grad_ptr,
    n_rows, n_cols, numel,
    stride_logits_row, stride_logits_col,
    stride_targets_row, stride_targets_col,
    stride_upstream_row, stride_upstream_col,
    lamb, margin, gamma, gamma_log2e, flip_logit, grad_scale,
    IS_SPLC: tl.constexpr,
    FOCAL: tl.constexpr,  # γ != 0 (see _focal_positive): at most two variants, never one per γ
    WRITE_ELEMENT_LOSS: tl.constexpr,  # reduction "none": the (N, C) loss
    WRITE_TILE_SUMS: tl.constexpr,  # "sum"/"mean": one partial sum per program
    WRITE_GRAD: tl.constexpr,
    UPSTREAM_SCALAR: tl.constexpr,  # backward of "sum"/"mean": the gradient times a scalar g
    UPSTREAM_PER_ELEMENT: tl.constexpr,  # backward of "none": times an (N, C) upstream gradient
    FLAT: tl.constexpr,  # every tensor read is contiguous: one vector of N·C elements
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # ---- backward of "sum"/"mean": the forward wrote the exact gradient for g == 1
    if UPSTREAM_SCALAR:
        g = tl.load(upstream_ptr).to(tl.float32)
        if g == 1.0:  # NaN != 1: a NaN upstream gradient is recomputed, and propagates
            return
        grad_scale = grad_scale * g

    pid = tl.program_id(0)
    if FLAT:
        # Tile pid is elements [start, start + BLOCK) of the flattened tensors: the int64
        # start moves the base pointers once, the lanes add int32 offsets (contiguous, so
        # loads and stores are 16 bytes wide). Full tiles need no mask.
        BLOCK: tl.constexpr = BLOCK_ROWS * BLOCK_COLS
        start = pid.to(tl.int64) * BLOCK
        offsets = tl.arange(0, BLOCK)
        logits_ptr += start
        targets_ptr += start
        grad_ptr += start
        if UPSTREAM_PER_ELEMENT:
            upstream_ptr += start
        if WRITE_ELEMENT_LOSS:
            loss_ptr += start
        if start + BLOCK <= numel:
            _elements(logits_ptr, targets_ptr, upstream_ptr, loss_ptr, grad_ptr,
                      offsets, offsets, offsets, offsets, None, pid,
                      lamb, margin, gamma, gamma_log2e, flip_logit, grad_scale,
                      IS_SPLC, FOCAL, False, WRITE_ELEMENT_LOSS, WRITE_TILE_SUMS, WRITE_GRAD, UPSTREAM_PER_ELEMENT)
        else:
            _elements(logits_ptr, targets_ptr, upstream_ptr, loss_ptr, grad_ptr,
                      offsets, offsets, offsets, offsets, offsets < numel - start, pid,
                      lamb, margin, gamma, gamma_log2e, flip_logit, grad_scale,
                      IS_SPLC, FOCAL, True, WRITE_ELEMENT_LOSS, WRITE_TILE_SUMS, WRITE_GRAD, UPSTREAM_PER_ELEMENT)
    else:
        # Strided inputs: a [BLOCK_ROWS, BLOCK_COLS] tile, both strides of each tensor
        # honoured, int64 offsets (N·C may exceed 2^31).
        col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
        rows = (pid // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        rows = rows.to(tl.int64)[:, None]
        cols = cols.to(tl.int64)[None, :]
        _elements(logits_ptr, targets_ptr, upstream_ptr, loss_ptr, grad_ptr,
                  rows * stride_logits_row + cols * stride_logits_col,
                  rows * stride_targets_row + cols * stride_targets_col,
                  rows * stride_upstream_row + cols * stride_upstream_col,
                  rows * n_cols + cols,  # the loss and gradient buffers are contiguous
                  mask, pid,
                  lamb, margin, gamma, gamma_log2e, flip_logit, grad_scale,
                  IS_SPLC, FOCAL, True, WRITE_ELEMENT_LOSS, WRITE_TILE_SUMS, WRITE_GRAD, UPSTREAM_PER_ELEMENT)


# --------------------------------------------------------------------------- launchers
def _targets_for_kernel(targets: torch.Tensor) -> torch.Tensor:
    # Triton cannot load bool tensors; the same bytes as uint8 (0/1), no copy.
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def _tiling(logits: torch.Tensor, targets: torch.Tensor, upstream=None) -> tuple[bool, int, int, int]:
    """(flat, BLOCK_ROWS, BLOCK_COLS, number of tiles). Contiguous inputs (the usual case)
    are one vector of N·C elements cut into tiles of tile_shape's size; others are walked
    in 2-D tiles through their strides. Depends only on shapes and layouts, so the
    per-tile partial sums (and the reduced loss) are the same on every run."""
    n_rows, n_cols = logits.shape
    block_rows, block_cols = tile_shape(n_cols)
    flat = logits.is_contiguous() and targets.is_contiguous() and (
        upstream is None or upstream.dim() == 0 or upstream.is_contiguous())
    if flat:
        block_rows, block_cols = 1, block_rows * block_cols
        return True, block_rows, block_cols, _cdiv(logits.numel(), block_cols)
    return False, block_rows, block_cols, _cdiv(n_rows, block_rows) * _cdiv(n_cols, block_cols)


def _launch_elementwise(args, *, element_loss=None, tile_sums=None, grad=None, upstream=None, grad_scale=1.0):
    """One pass of ``_multilabel_kernel``: writes whichever of the (N, C) loss, the
    per-tile sums and the gradient it is given a buffer for. The gradient is dℓ/dx times
    ``grad_scale`` and ``upstream``: an (N, C) tensor, or a 0-d one (a scalar g, read on
    the device: the kernel writes nothing when g == 1)."""
    logits, targets = args.logits, _targets_for_kernel(args.targets)
    n_rows, n_cols = logits.shape
    flat, block_rows, block_cols, num_tiles = _tiling(logits, targets, upstream)
    if num_tiles == 0:
        return
    loss_buffer = element_loss if element_loss is not None else tile_sums
    # A pointer that a mode never dereferences gets the logits as a placeholder.
    _multilabel_kernel[(num_tiles,)](
        logits, targets,
        upstream if upstream is not None else logits,
        loss_buffer if loss_buffer is not None else logits,
        grad if grad is not None else logits,
        n_rows, n_cols, logits.numel(),
        *logits.stride(), *targets.stride(),
        *(upstream.stride() if upstream is not None and upstream.dim() == 2 else (0, 0)),
        args.lamb, args.margin, args.gamma, args.gamma * fm.LOG2E.value, splc_flip_logit(args), grad_scale,
        IS_SPLC=args.loss == "splc",
        FOCAL=args.gamma != 0.0,
        WRITE_ELEMENT_LOSS=element_loss is not None,
        WRITE_TILE_SUMS=tile_sums is not None,
        WRITE_GRAD=grad is not None,
        UPSTREAM_SCALAR=upstream is not None and upstream.dim() == 0,
        UPSTREAM_PER_ELEMENT=upstream is not None and upstream.dim() == 2,
        FLAT=flat,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=_num_warps(block_rows * block_cols),
        **fm.LAUNCH_OPTIONS,
    )


def _mean_scale(args) -> float:
    """1/(N·C) for "mean" (a mean over nothing is 0, as the reference's sum), else 1."""
    numel = args.logits.numel()
    return 1.0 / numel if args.reduction == "mean" and numel else 1.0


def _forward(args, needs_grad):
    logits = args.logits
    n_rows, n_cols = logits.shape
    device, dtype = logits.device, logits.dtype
    if args.reduction == "none":
        loss = _empty((n_rows, n_cols), dtype, device)
        _launch_elementwise(args, element_loss=loss)
        # reserved for the backward, which writes dℓ/dx · g into it (module docstring)
        return loss, ([_empty((n_rows, n_cols), dtype, device)] if needs_grad else [])

    scale = _mean_scale(args)
    grad = _empty((n_rows, n_cols), dtype, device) if needs_grad else None
    n_partials = _tiling(logits, _targets_for_kernel(args.targets))[3]
    partials = _empty((n_partials,), torch.float32, device)
    _launch_elementwise(args, tile_sums=partials, grad=grad, grad_scale=scale)
    return scaled_sum(partials, dtype, scale), ([grad] if needs_grad else [])


def _saved_fake(args, needs_grad):
    logits = args.logits
    return [logits.new_empty(tuple(logits.shape))] if needs_grad else []


def _backward(grad_loss, saved, args):
    # "none": dℓ/dx · g for the (N, C) g; "sum"/"mean": dℓ/dx · g (/ (N·C) for "mean") for
    # the 0-d g, recomputed only when g != 1 (the forward wrote the gradient for g == 1)
    (grad,) = saved
    _launch_elementwise(args, grad=grad, upstream=grad_loss, grad_scale=_mean_scale(args))


loss = define_loss_ops(
    "triton",
    "multilabel",
    forward=_forward,
    saved_fake=_saved_fake,
    backward=_backward,
    backward_in_place=True,
)
