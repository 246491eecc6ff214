"""The public functional API: validate, choose a backend, compute.

Every function takes the spec's keyword-only options and ``backend`` (``"auto"``,
``"reference"``, ``"triton"``, ``"cuda"``). Validation (shapes, dtypes, devices,
parameter ranges) happens here, once, for every backend; see ``_validation``.
"""

from __future__ import annotations

from torch import Tensor

from . import reference as _ref
from ._registry import select_backend
from ._validation import MultiLabelLossArgs, SoftmaxLossArgs, check_hill, check_splc

__all__ = ["margin_cross_entropy", "focal_distillation", "mpt_loss", "hill_loss", "splc_loss"]


def _softmax_family(args: SoftmaxLossArgs, backend: str) -> Tensor:
    return select_backend("softmax", backend, args.logits).families["softmax"](args)


def _multilabel(args: MultiLabelLossArgs, backend: str) -> Tensor:
    return select_backend("multilabel", backend, args.logits).families["multilabel"](args)


def margin_cross_entropy(
    logits: Tensor, target: Tensor, *, class_bias=None, num_old_classes=None,
    new_class_bias=0.0, label_smoothing=0.0, ignore_index=-100, reduction="mean",
    backend="auto",
) -> Tensor:
    """Cross-entropy of ``logits + Δ`` (spec §1).

    Δ is ``class_bias`` (length C) when given, else ``new_class_bias`` on the classes
    ``j >= num_old_classes``. ``reduction`` is ``"mean"`` over rows whose target is not
    ``ignore_index``, ``"sum"`` or ``"none"`` (shape (N,), ignored rows 0).
    """
    args = _ref.margin_cross_entropy_args(
        logits, target, class_bias=class_bias, num_old_classes=num_old_classes,
        new_class_bias=new_class_bias, label_smoothing=label_smoothing,
        ignore_index=ignore_index, reduction=reduction,
    )
    return _softmax_family(args, backend)


def focal_distillation(
    student_logits: Tensor, ref_logits: Tensor, target: Tensor, *, kind="kl", tau=5.0,
    alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False, ignore_index=-100,
    reduction="mean", backend="auto",
) -> Tensor:
    """Focal distillation of the student's first K columns toward ``ref_logits`` (N, K) (spec §2).

    ``kind`` is ``"kl"`` (temperature ``tau``) or ``"lm"`` (logit matching); each row is
    weighted by ``alpha + beta * f_i`` with ``f_i`` chosen by ``focus``.
    """
    args = _ref.focal_distillation_args(
        student_logits, ref_logits, target, kind=kind, tau=tau, alpha=alpha, beta=beta,
        focus=focus, scale_by_tau_sq=scale_by_tau_sq, ignore_index=ignore_index,
        reduction=reduction,
    )
    return _softmax_family(args, backend)


def mpt_loss(
    logits: Tensor, target: Tensor, old_logits=None, new_logits=None, *, new_class_bias=4.0,
    num_old_classes=None, class_bias=None, kind="kl", tau=5.0, alpha=1.0, beta=5.0,
    focus="ref_correct", scale_by_tau_sq=False, ce_weight=1.0, old_weight=None,
    new_weight=None, label_smoothing=0.0, ignore_index=-100, reduction="mean",
    backend="auto",
) -> Tensor:
    """Margin Preserving Training loss (spec §3).

    ``ce_weight`` × margin-calibrated CE + ``old_weight`` × focal distillation toward
    ``old_logits`` (N, C_old) on the old classes + ``new_weight`` × focal distillation
    toward ``new_logits`` (N, C). Either source may be None. ``num_old_classes``
    defaults to ``old_logits.shape[1]``; the weights of None default to 1 for
    ``kind="kl"`` and 0.4 for ``kind="lm"``.
    """
    args = _ref.mpt_loss_args(
        logits, target, old_logits, new_logits, new_class_bias=new_class_bias,
        num_old_classes=num_old_classes, class_bias=class_bias, kind=kind, tau=tau,
        alpha=alpha, beta=beta, focus=focus, scale_by_tau_sq=scale_by_tau_sq,
        ce_weight=ce_weight, old_weight=old_weight, new_weight=new_weight,
        label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
    )
    return _softmax_family(args, backend)


def hill_loss(
    logits: Tensor, targets: Tensor, *, lamb=1.5, margin=1.0, gamma=2.0, reduction="sum",
    backend="auto",
) -> Tensor:
    """Hill loss (spec §4); ``targets`` (N, C) is positive where > 0.5 (bool, uint8 or float)."""
    args = check_hill(logits, targets, lamb=lamb, margin=margin, gamma=gamma, reduction=reduction)
    return _multilabel(args, backend)


def splc_loss(
    logits: Tensor, targets: Tensor, *, epoch, tau=0.6, change_epoch=1, margin=1.0,
    gamma=2.0, reduction="sum", backend="auto",
) -> Tensor:
    """Self-paced loss correction (spec §5); from ``epoch >= change_epoch`` on, negatives
    with σ(x) > ``tau`` count as positives."""
    args = check_splc(
        logits, targets, epoch=epoch, tau=tau, change_epoch=change_epoch, margin=margin,
        gamma=gamma, reduction=reduction,
    )
    return _multilabel(args, backend)
