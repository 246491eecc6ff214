"""Evaluation metrics: accuracy, negative flips, and multi-label mean average precision.

Predictions are either scores/logits of shape ``(N, C)`` (the argmax over classes is
taken, ties to the lowest index as ``torch.argmax``) or predicted labels of shape
``(N,)`` with an integer dtype; targets are integer class labels ``(N,)``. Old and new
predictions may have different class counts (an old model that knows fewer classes).
Tensors may live on any device (all of one call on the same one); every metric returns
a Python float, so each call synchronises once: use them for evaluation, not inside a
loss.

Negative flips (MPT paper, PCT paper): a sample is a negative flip when the old model
classifies it correctly and the new model does not. The MPT paper reports them on the
test samples of the old classes; select those rows before calling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "negative_flip_rate",
    "relative_negative_flip_rate",
    "average_precision",
    "mean_average_precision",
]

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_tensor(name: str, value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _labels(name: str, value) -> Tensor:
    """Class labels from predictions: the argmax of (N, C) scores, or (N,) integer labels."""
    value = _as_tensor(name, value)
    if value.dim() == 2:
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} as scores (N, C) must be real numbers, got {value.dtype}")
        if value.shape[1] == 0:
            raise ValueError(f"{name} as scores (N, C) needs at least one class, got shape {tuple(value.shape)}")
        return value.argmax(dim=1)
    if value.dim() == 1:
        if value.dtype not in _INTEGER_DTYPES:
            raise TypeError(
                f"{name} as labels (N,) must have an integer dtype, got {value.dtype} "
                "(pass scores of shape (N, C) to take their argmax)"
            )
        return value
    raise ValueError(
        f"{name} must be scores of shape (N, C) or labels of shape (N,), got shape {tuple(value.shape)}"
    )


def _target(value) -> Tensor:
    value = _as_tensor("target", value)
    if value.dim() != 1:
        raise ValueError(f"target must be class labels of shape (N,), got shape {tuple(value.shape)}")
    if value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"target must have an integer dtype, got {value.dtype}")
    if value.shape[0] == 0:
        raise ValueError("target is empty: the metric is undefined over zero samples")
    return value


def _check_rows(name: str, labels: Tensor, target: Tensor) -> None:
    if labels.shape[0] != target.shape[0]:
        raise ValueError(
            f"{name} has {labels.shape[0]} samples but target has {target.shape[0]}"
        )
    if labels.device != target.device:
        raise ValueError(f"{name} must be on the same device as target ({target.device}), got {labels.device}")


def _correct(name: str, pred, target: Tensor) -> Tensor:
    labels = _labels(name, pred)
    _check_rows(name, labels, target)
    return labels == target


def accuracy(pred, target) -> float:
    """Fraction of samples whose predicted label equals ``target``."""
    target = _target(target)
    return _correct("pred", pred, target).double().mean().item()


def _flip_counts(old_pred, new_pred, target) -> tuple[float, float, float]:
    """(old accuracy, new error rate, negative flip rate) over the same samples."""
    target = _target(target)
    old_right = _correct("old_pred", old_pred, target)
    new_right = _correct("new_pred", new_pred, target)
    stats = torch.stack([old_right, ~new_right, old_right & ~new_right]).double().mean(dim=1)
    old_accuracy, new_error, flips = stats.tolist()  # one synchronisation for all three
    return old_accuracy, new_error, flips


def negative_flip_rate(old_pred, new_pred, target) -> float:
    """NFR: fraction of samples the old model gets right and the new model gets wrong."""
    return _flip_counts(old_pred, new_pred, target)[2]


def relative_negative_flip_rate(old_pred, new_pred, target) -> float:
    """NFR / ((1 - ER_old) · ER_new): the flips relative to those expected if the two
    models erred independently (ER: error rate over the same samples).

    1 means as many flips as independent errors would give, below 1 fewer. When the
    denominator is 0 (the old model is always wrong or the new one never is) there can
    be no flip, and the result is 0.
    """
    old_accuracy, new_error, flips = _flip_counts(old_pred, new_pred, target)
    expected = old_accuracy * new_error
    return 0.0 if expected == 0.0 else flips / expected


def _multilabel_inputs(scores, targets) -> tuple[Tensor, Tensor]:
    scores = _as_tensor("scores", scores)
    targets = _as_tensor("targets", targets)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (N, C), got shape {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores must be real numbers, got {scores.dtype}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must have the shape of scores {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    if targets.is_complex():
        raise TypeError(f"targets must be bool, integer or real, got {targets.dtype}")
    if targets.device != scores.device:
        raise ValueError(f"targets must be on the same device as scores ({scores.device}), got {targets.device}")
    if scores.shape[0] == 0:
        raise ValueError("scores is empty: average precision is undefined over zero samples")
    return scores, targets


def _average_precision(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(AP of each class, whether each class has a positive), both (C,)."""
    positive = (targets > 0.5).T  # (C, N): one ranking per class
    has_nan = scores.isnan().any(dim=0)
    # NaN would break the ranking below; its classes are set to NaN at the end
    ranked, order = torch.sort(torch.where(scores.isnan(), 0, scores).T, dim=1, descending=True)
    ranked_positive = positive.gather(1, order).double()
    true_positives = ranked_positive.cumsum(dim=1)
    # Each sample counts at the last rank of its tie group (the threshold it passes):
    # on the ascending sequence -ranked, that is searchsorted(..., right=True) - 1.
    ascending = -ranked.contiguous()
    threshold_rank = torch.searchsorted(ascending, ascending, right=True) - 1
    precision = true_positives.gather(1, threshold_rank) / (threshold_rank + 1).double()
    num_positive = ranked_positive.sum(dim=1)
    ap = (ranked_positive * precision).sum(dim=1) / num_positive  # 0/0 = NaN: no positives
    return torch.where(has_nan, torch.nan, ap), num_positive > 0


def average_precision(scores, targets) -> Tensor:
    """Average precision of each class: a float64 tensor ``(C,)`` on the scores' device.

    ``targets`` ``(N, C)`` is positive where > 0.5 (bool, uint8, integer or float, as
    the multi-label losses read it). Per class, with the samples ranked by decreasing
    score, AP = Σ_k (R_k - R_{k-1}) P_k over the distinct score thresholds (precision P
    and recall R at each threshold), the definition of
    ``sklearn.metrics.average_precision_score``; tied scores enter together. A class
    without positives has no recall, so its AP is NaN; a NaN score makes its class NaN.
    """
    return _average_precision(*_multilabel_inputs(scores, targets))[0]


def mean_average_precision(scores, targets) -> float:
    """mAP: the mean of ``average_precision`` over the classes with at least one positive.

    Classes without any positive in ``targets`` are left out of the mean: their AP is
    undefined (sklearn's ``average_precision_score`` would count them as 0 and warn).
    A NaN score gives a NaN result. Raises ValueError when no class has a positive.
    """
    ap, has_positive = _average_precision(*_multilabel_inputs(scores, targets))
    num_classes, total = torch.stack([has_positive.double().sum(), ap[has_positive].sum()]).tolist()
    if num_classes == 0:
        raise ValueError("no class has a positive target: mean average precision is undefined")
    return total / num_classes
