"""Pure-PyTorch reference of every loss: the spec (``LOSSES.md``) in code.

Plain autograd PyTorch, written to read like the spec; every kernel is tested against
it, and it is validated in float64 with ``torch.autograd.gradcheck``. Half-precision
inputs are computed in float32, float64 stays float64, and the loss comes back in the
logits' dtype. Teachers' logits are constants (detached); so is ``class_bias``.

The five public functions validate their arguments exactly as the package's public
API does, then call ``softmax_family_loss`` / ``multilabel_loss``, which the
``reference`` backend's operators also call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    MultiLabelLossArgs,
    SoftmaxLossArgs,
    check_hill,
    check_softmax_family,
    check_splc,
    check_target_values,
    splc_logit,
)

__all__ = ["margin_cross_entropy", "focal_distillation", "mpt_loss", "hill_loss", "splc_loss"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- §1 cross-entropy
def margin_bias(args: SoftmaxLossArgs, dtype: torch.dtype) -> Optional[Tensor]:
    """The bias Δ added to the logits in the cross-entropy term, or None for Δ = 0."""
    if args.class_bias is not None:
        return args.class_bias.detach().to(dtype)
    if args.new_class_bias == 0.0:
        return None
    num_classes = args.logits.shape[1]
    is_new = torch.arange(num_classes, device=args.logits.device) >= args.num_old_classes
    # built in the compute dtype: a where() of two Python floats would round b to float32
    return torch.zeros(num_classes, dtype=dtype, device=args.logits.device).masked_fill(
        is_new, args.new_class_bias
    )


def cross_entropy_rows(z: Tensor, y: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    """ce_i = (1-ε)(LSE(z̃_i) - z̃_{i,y_i}) + (ε/C) Σ_j (LSE(z̃_i) - z̃_ij), z̃ = z + Δ."""
    z_biased = z if bias is None else z + bias
    log_probs = torch.log_softmax(z_biased, dim=1)
    nll = -log_probs.gather(1, y[:, None]).squeeze(1)
    if eps == 0.0:  # skip the smoothing sum: 0 · (-inf) would be NaN on masked classes
        return nll
    return (1.0 - eps) * nll - (eps / z.shape[1]) * log_probs.sum(dim=1)


# --------------------------------------------------------------------------- §2 focal distillation
def focus_indicator(s: Tensor, r: Tensor, y: Tensor, focus: str) -> Tensor:
    """f_i of spec §2 as a 0/1 tensor; argmax ties go to the lowest index."""
    if focus == "all":
        return torch.zeros_like(y, dtype=torch.bool)
    ref_right = r.argmax(dim=1) == y  # never true for y >= K: argmax r < K
    student_wrong = s.argmax(dim=1) != y
    if focus == "ref_correct":
        return ref_right
    if focus == "neg_flip":
        return ref_right & student_wrong
    return student_wrong  # "student_wrong"


def kl_rows(s: Tensor, r: Tensor, tau: float, scale_by_tau_sq: bool) -> Tensor:
    """d_i = S Σ_j p_j (log p_j - log q_j), p = softmax(r/τ), q = softmax(s/τ)."""
    log_p = torch.log_softmax(r / tau, dim=1)
    log_q = torch.log_softmax(s / tau, dim=1)
    p = log_p.exp()
    # A class with p_j = 0 (a masked teacher class) adds nothing, even where q_j = 0 too;
    # `p == 0` (not `p > 0`) keeps a NaN p as NaN.
    terms = torch.where(p == 0, 0.0, p * (log_p - log_q))
    scale = tau * tau if scale_by_tau_sq else 1.0
    return scale * terms.sum(dim=1)


def logit_matching_rows(s: Tensor, r: Tensor) -> Tensor:
    """d_i = (1/(2K)) Σ_j (s_ij - r_ij)²."""
    return (s - r).square().sum(dim=1) / (2 * s.shape[1])


def focal_distillation_rows(
    s: Tensor, r: Tensor, y: Tensor, args: SoftmaxLossArgs
) -> Tensor:
    """w_i · d_i with w_i = α + β f_i (the weight carries no gradient)."""
    f = focus_indicator(s.detach(), r, y, args.focus)
    w = args.alpha + args.beta * f.to(s.dtype)
    if args.kind == "kl":
        d = kl_rows(s, r, args.tau, args.scale_by_tau_sq)
    else:
        d = logit_matching_rows(s, r)
    return w * d


# --------------------------------------------------------------------------- §3 MPT
def softmax_family_rows(args: SoftmaxLossArgs) -> tuple[Tensor, Tensor]:
    """Per-row loss L_i (0 on ignored rows) and the mask of counted rows."""
    dtype = compute_dtype(args.logits.dtype)
    counted = args.target != args.ignore_index
    # Ignored rows contribute nothing, even NaN: their inputs are replaced by zeros, so
    # that no 0 · NaN reaches their gradient.
    keep = counted[:, None]
    z = torch.where(keep, args.logits.to(dtype), 0.0)
    num_classes = z.shape[1]
    in_range = (args.target >= 0) & (args.target < num_classes)
    # Ignored rows (and, on a GPU, rows whose target is out of range) read class 0;
    # their loss is replaced below, so nothing reads outside the row.
    y = torch.where(counted & in_range, args.target, 0).long()

    # zeros that depend on z, so that a loss with every term switched off still has a
    # (zero) gradient rather than none
    rows = z[:, :0].sum(dim=1)
    if args.ce_weight != 0.0:
        rows = rows + args.ce_weight * cross_entropy_rows(
            z, y, margin_bias(args, dtype), args.label_smoothing
        )
    if args.old_logits is not None and args.old_weight != 0.0:
        old = torch.where(keep, args.old_logits.detach().to(dtype), 0.0)
        rows = rows + args.old_weight * focal_distillation_rows(z[:, : old.shape[1]], old, y, args)
    if args.new_logits is not None and args.new_weight != 0.0:
        new = torch.where(keep, args.new_logits.detach().to(dtype), 0.0)
        rows = rows + args.new_weight * focal_distillation_rows(z, new, y, args)

    # An out-of-range target (only reachable on a GPU, see _validation) poisons its row.
    rows = torch.where(counted & ~in_range, float("nan"), rows)
    return torch.where(counted, rows, 0.0), counted


def reduce_rows(rows: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """"mean" averages over counted rows (0 when there are none), "sum", or "none"."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp(min=1)


def softmax_family_loss(args: SoftmaxLossArgs) -> Tensor:
    """The loss of spec §1-3 for validated arguments, in the logits' dtype."""
    if not torch.compiler.is_compiling():
        check_target_values(args.target, args.logits.shape[1], args.ignore_index)
    rows, counted = softmax_family_rows(args)
    return reduce_rows(rows, counted, args.reduction).to(args.logits.dtype)


# --------------------------------------------------------------------------- §4-5 multi-label
def _focal_factor(log_base: Tensor, gamma: float) -> Tensor:
    """base^γ from log(base): smooth everywhere, also where base underflows to 0; 1 for
    γ = 0, also at base 0 (as torch.pow(0., 0.)), where exp(0 · -inf) would be NaN."""
    if gamma == 0.0:
        return torch.ones_like(log_base)
    return torch.exp(gamma * log_base)


def _branches(take_first: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """x where ``take_first``, and x elsewhere, each 0 in the other's elements. A branch
    of torch.where gets a zero gradient where it is not taken, and a zero times an
    infinite partial (a branch's loss at an infinite logit) is NaN: each branch is
    evaluated on its own elements only, so that a masked class (x = -inf) with a
    finite loss also gets a finite gradient."""
    return torch.where(take_first, x, 0.0), torch.where(take_first, 0.0, x)


def hill_elements(x: Tensor, positive: Tensor, lamb: float, margin: float, gamma: float) -> Tensor:
    """Hill loss per element (spec §4)."""
    x_positive, x_negative = _branches(positive, x)
    # positive: -(1 - q)^γ log q, q = σ(x - m); log q and log(1 - q) as log-sigmoids
    shifted = x_positive - margin
    log_q = F.logsigmoid(shifted)
    positive_loss = -_focal_factor(F.logsigmoid(-shifted), gamma) * log_q
    # negative: (λ - p) p², p = σ(x)
    p = torch.sigmoid(x_negative)
    negative_loss = (lamb - p) * p * p
    return torch.where(positive, positive_loss, negative_loss)


def splc_elements(
    x: Tensor, positive: Tensor, epoch: int, tau: float, change_epoch: int, margin: float, gamma: float
) -> Tensor:
    """SPLC loss per element (spec §5)."""
    shifted = torch.where(positive, x - margin, x)  # the margin follows the original label
    # The correction is a hard decision, with no gradient: it flips confident negatives,
    # σ(x) > τ, decided as x > logit(τ) in float64 (σ is increasing). σ rounded in float32
    # would move the boundary by a few ulps, and lose it where σ(x) rounds to 0 or 1
    # (τ = 0 flips every negative: σ(x) > 0 for every finite x).
    corrected = positive | ((epoch >= change_epoch) & (shifted.detach().double() > splc_logit(tau)))
    as_positive, as_negative = _branches(corrected, shifted)
    positive_loss = -_focal_factor(F.logsigmoid(-as_positive), gamma) * F.logsigmoid(as_positive)
    negative_loss = -_focal_factor(F.logsigmoid(as_negative), gamma) * F.logsigmoid(-as_negative)
    return torch.where(corrected, positive_loss, negative_loss)


def multilabel_elements(args: MultiLabelLossArgs) -> Tensor:
    """Per-element loss of Hill or SPLC, in the compute dtype."""
    x = args.logits.to(compute_dtype(args.logits.dtype))
    positive = args.targets > 0.5
    if args.loss == "hill":
        return hill_elements(x, positive, args.lamb, args.margin, args.gamma)
    return splc_elements(x, positive, args.epoch, args.tau, args.change_epoch, args.margin, args.gamma)


def multilabel_loss(args: MultiLabelLossArgs) -> Tensor:
    """The loss of spec §4-5 for validated arguments, in the logits' dtype."""
    elements = multilabel_elements(args)
    if args.reduction == "sum":
        loss = elements.sum()
    elif args.reduction == "mean":
        loss = elements.mean() if elements.numel() else elements.sum()
    else:
        loss = elements
    return loss.to(args.logits.dtype)


# --------------------------------------------------------------------------- public functions
def margin_cross_entropy(
    logits, target, *, class_bias=None, num_old_classes=None, new_class_bias=0.0,
    label_smoothing=0.0, ignore_index=-100, reduction="mean",
) -> Tensor:
    """Margin-calibrated cross-entropy L_Δ (spec §1)."""
    return softmax_family_loss(
        margin_cross_entropy_args(
            logits, target, class_bias=class_bias, num_old_classes=num_old_classes,
            new_class_bias=new_class_bias, label_smoothing=label_smoothing,
            ignore_index=ignore_index, reduction=reduction,
        )
    )


def focal_distillation(
    student_logits, ref_logits, target, *, kind="kl", tau=5.0, alpha=1.0, beta=5.0,
    focus="ref_correct", scale_by_tau_sq=False, ignore_index=-100, reduction="mean",
) -> Tensor:
    """Focal distillation against one reference with K <= C classes (spec §2)."""
    return softmax_family_loss(
        focal_distillation_args(
            student_logits, ref_logits, target, kind=kind, tau=tau, alpha=alpha, beta=beta,
            focus=focus, scale_by_tau_sq=scale_by_tau_sq, ignore_index=ignore_index,
            reduction=reduction,
        )
    )


def mpt_loss(
    logits, target, old_logits=None, new_logits=None, *, new_class_bias=4.0,
    num_old_classes=None, class_bias=None, kind="kl", tau=5.0, alpha=1.0, beta=5.0,
    focus="ref_correct", scale_by_tau_sq=False, ce_weight=1.0, old_weight=None,
    new_weight=None, label_smoothing=0.0, ignore_index=-100, reduction="mean",
) -> Tensor:
    """MPT: margin-calibrated CE plus double-source focal distillation (spec §3)."""
    return softmax_family_loss(
        mpt_loss_args(
            logits, target, old_logits, new_logits, new_class_bias=new_class_bias,
            num_old_classes=num_old_classes, class_bias=class_bias, kind=kind, tau=tau,
            alpha=alpha, beta=beta, focus=focus, scale_by_tau_sq=scale_by_tau_sq,
            ce_weight=ce_weight, old_weight=old_weight, new_weight=new_weight,
            label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
        )
    )


def hill_loss(logits, targets, *, lamb=1.5, margin=1.0, gamma=2.0, reduction="sum") -> Tensor:
    """Hill loss for multi-label learning with missing labels (spec §4)."""
    return multilabel_loss(check_hill(logits, targets, lamb=lamb, margin=margin, gamma=gamma, reduction=reduction))


def splc_loss(
    logits, targets, *, epoch, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction="sum"
) -> Tensor:
    """Self-paced loss correction (spec §5)."""
    return multilabel_loss(
        check_splc(
            logits, targets, epoch=epoch, tau=tau, change_epoch=change_epoch,
            margin=margin, gamma=gamma, reduction=reduction,
        )
    )


# --------------------------------------------------------------------------- argument mapping
# The three softmax-family losses are one operator with different arguments; these map
# each public signature onto it (the public API in functional.py uses them too).
def margin_cross_entropy_args(
    logits, target, *, class_bias, num_old_classes, new_class_bias, label_smoothing,
    ignore_index, reduction,
) -> SoftmaxLossArgs:
    return check_softmax_family(
        logits, target, None, None, class_bias=class_bias, num_old_classes=num_old_classes,
        new_class_bias=new_class_bias, label_smoothing=label_smoothing,
        ignore_index=ignore_index, kind="kl", tau=1.0, alpha=1.0, beta=0.0,
        focus="all", scale_by_tau_sq=False, ce_weight=1.0, old_weight=0.0, new_weight=0.0,
        reduction=reduction, old_name=None,
    )


def focal_distillation_args(
    student_logits, ref_logits, target, *, kind, tau, alpha, beta, focus, scale_by_tau_sq,
    ignore_index, reduction,
) -> SoftmaxLossArgs:
    # The reference takes the place of the "old" source: K = ref_logits.shape[1] <= C.
    return check_softmax_family(
        student_logits, target, ref_logits, None, class_bias=None, num_old_classes=None,
        new_class_bias=0.0, label_smoothing=0.0, ignore_index=ignore_index, kind=kind,
        tau=tau, alpha=alpha, beta=beta, focus=focus, scale_by_tau_sq=scale_by_tau_sq,
        ce_weight=0.0, old_weight=1.0, new_weight=0.0, reduction=reduction,
        logits_name="student_logits", old_name="ref_logits",
    )


def mpt_loss_args(
    logits, target, old_logits, new_logits, *, new_class_bias, num_old_classes, class_bias,
    kind, tau, alpha, beta, focus, scale_by_tau_sq, ce_weight, old_weight, new_weight,
    label_smoothing, ignore_index, reduction,
) -> SoftmaxLossArgs:
    return check_softmax_family(
        logits, target, old_logits, new_logits, class_bias=class_bias,
        num_old_classes=num_old_classes, new_class_bias=new_class_bias,
        label_smoothing=label_smoothing, ignore_index=ignore_index, kind=kind, tau=tau,
        alpha=alpha, beta=beta, focus=focus, scale_by_tau_sq=scale_by_tau_sq,
        ce_weight=ce_weight, old_weight=old_weight, new_weight=new_weight,
        reduction=reduction,
    )
