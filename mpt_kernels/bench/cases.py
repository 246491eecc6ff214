"""The benchmarked losses: their inputs, how each provider calls them, and their bytes.

A case is one loss with fixed options (the spec's defaults, ``K = C // 2`` old classes
wherever a loss has old classes). ``forward(lib, logits, inputs)`` calls it through
``lib``, which is either ``mpt_kernels.reference`` or a ``functools.partial`` of the
public API with a ``backend=``; ``liger`` is the same loss composed from Liger-Kernel's
cross-entropy and KL-divergence kernels, where that composition makes sense.

``min_bytes`` is the fewest bytes any implementation must move through device memory:
each input read once, the loss written once and, with a backward, the gradient of the
logits written once (the whole ``N x C`` gradient, also where it is zero).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# Options shared by the cases (the spec's defaults; MPT's bias b = 4 on the new classes).
NEW_CLASS_BIAS = 4.0
TAU = 5.0
ALPHA, BETA = 1.0, 5.0
SPLC_EPOCH = 1  # >= change_epoch: the loss correction is active
POSITIVE_RATE = 0.1  # fraction of positive labels in the multi-label targets
IGNORE_INDEX = -100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the logits' dtypes by name


def old_classes(num_classes: int) -> int:
    """K, the classes the old model (or the reference of focal distillation) knows."""
    return max(1, num_classes // 2)


@dataclass(frozen=True)
class LossCase:
    name: str
    family: str  # "softmax" | "multilabel"
    title: str
    make_inputs: Callable  # (n, c, dtype, device, generator) -> dict of tensors, with "logits"
    forward: Callable  # (lib, logits, inputs) -> loss
    min_bytes: Callable  # (n, c, k, logit_bytes, target_bytes, with_grad) -> int
    bytes_formula: str  # min_bytes in words, for the report
    liger: Optional[Callable]  # (logits, inputs) -> loss, or None
    liger_note: str  # what the Liger composition is made of, or why there is none


# --------------------------------------------------------------------------- inputs
def _randn(shape, dtype, device, generator, scale=2.0) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=generator).mul_(scale)


def _class_targets(n, c, device, generator, teacher: Optional[Tensor]) -> Tensor:
    """Random classes; half the rows take the teacher's prediction, so that the focal
    weights take both of their values."""
    target = torch.randint(0, c, (n,), device=device, generator=generator)
    if teacher is not None:
        target[::2] = teacher[::2].argmax(dim=1)
    return target


def _mpt_inputs(n, c, dtype, device, generator) -> dict:
    logits = _randn((n, c), dtype, device, generator)
    old = _randn((n, old_classes(c)), dtype, device, generator)
    new = _randn((n, c), dtype, device, generator)
    return {"logits": logits, "target": _class_targets(n, c, device, generator, new),
            "old_logits": old, "new_logits": new}


def _cross_entropy_inputs(n, c, dtype, device, generator) -> dict:
    return {"logits": _randn((n, c), dtype, device, generator),
            "target": _class_targets(n, c, device, generator, None)}


def _focal_inputs(n, c, dtype, device, generator) -> dict:
    ref = _randn((n, old_classes(c)), dtype, device, generator)
    return {"logits": _randn((n, c), dtype, device, generator), "ref_logits": ref,
            "target": _class_targets(n, c, device, generator, ref)}


def _multilabel_inputs(n, c, dtype, device, generator) -> dict:
    # bool targets (1 byte per label), the layout the multi-label issue's bandwidth target
    # names; float targets work as well and cost their own bytes
    positive = torch.rand((n, c), device=device, generator=generator) < POSITIVE_RATE
    return {"logits": _randn((n, c), dtype, device, generator), "targets": positive}


# --------------------------------------------------------------------------- calls
def _mpt_forward(kind: str) -> Callable:
    def forward(lib, logits, inputs):
        return lib.mpt_loss(logits, inputs["target"], inputs["old_logits"], inputs["new_logits"],
                            kind=kind, new_class_bias=NEW_CLASS_BIAS, tau=TAU, alpha=ALPHA, beta=BETA)
    return forward


def _cross_entropy_forward(lib, logits, inputs):
    return lib.margin_cross_entropy(logits, inputs["target"], num_old_classes=old_classes(logits.shape[1]),
                                    new_class_bias=NEW_CLASS_BIAS)


def _focal_forward(lib, logits, inputs):
    return lib.focal_distillation(logits, inputs["ref_logits"], inputs["target"], kind="kl",
                                  tau=TAU, alpha=ALPHA, beta=BETA)


def _hill_forward(lib, logits, inputs):
    return lib.hill_loss(logits, inputs["targets"])


def _splc_forward(lib, logits, inputs):
    return lib.splc_loss(logits, inputs["targets"], epoch=SPLC_EPOCH)


# --------------------------------------------------------------------------- Liger compositions
# Liger's kernels take the place of the terms they implement; the rest (the bias, the
# log-softmax the KL kernel expects, the focal weights, logit matching) stays in eager
# PyTorch, as a user composing the loss would write it.
def _liger_functions():
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_kl_div

    return liger_cross_entropy, liger_kl_div


def _liger_margin_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean CE of logits + Δ (Δ = b on the new classes) by Liger's CE kernel. Liger writes
    its gradient into its input, which is the fresh tensor logits + Δ here."""
    liger_cross_entropy, _ = _liger_functions()
    bias = _new_class_bias(logits.shape[1], logits.dtype, logits.device)
    return liger_cross_entropy(logits + bias, target, ignore_index=IGNORE_INDEX, reduction="mean")


@functools.lru_cache(maxsize=16)
def _new_class_bias(num_classes: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Δ = b on the classes >= K, made once per shape (a user builds it once, not per step)."""
    bias = torch.zeros(num_classes, dtype=dtype, device=device)
    bias[old_classes(num_classes):] = NEW_CLASS_BIAS
    return bias


def _liger_distillation_sum(student: Tensor, ref: Tensor, target: Tensor, kind: str) -> Tensor:
    """Σ_i w_i d_i over counted rows; the KL by Liger's kernel, logit matching eager."""
    _, liger_kl_div = _liger_functions()
    weight = ALPHA + BETA * (ref.argmax(dim=1) == target).float()
    weight = weight * (target != IGNORE_INDEX).float()
    if kind == "kl":
        log_q = torch.log_softmax(student.float() / TAU, dim=1)
        log_p = torch.log_softmax(ref.float() / TAU, dim=1)
        d = liger_kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    else:
        d = (student.float() - ref.float()).square().sum(dim=1) / (2 * student.shape[1])
    return (weight * d).sum()


def _counted_rows(target: Tensor) -> Tensor:
    return (target != IGNORE_INDEX).sum().clamp(min=1)


def _liger_mpt(kind: str) -> Callable:
    source_weight = 1.0 if kind == "kl" else 0.4  # the spec's default weight of each kind

    def forward(logits, inputs):
        target, old = inputs["target"], inputs["old_logits"]
        distill = _liger_distillation_sum(logits[:, : old.shape[1]], old, target, kind)
        distill = distill + _liger_distillation_sum(logits, inputs["new_logits"], target, kind)
        return _liger_margin_ce(logits, target) + source_weight * distill / _counted_rows(target)

    return forward


def _liger_cross_entropy(logits, inputs):
    return _liger_margin_ce(logits, inputs["target"])


def _liger_focal(logits, inputs):
    ref, target = inputs["ref_logits"], inputs["target"]
    return _liger_distillation_sum(logits[:, : ref.shape[1]], ref, target, "kl") / _counted_rows(target)


# --------------------------------------------------------------------------- bytes
# n rows, c classes, k = old classes, e = bytes per logit, t = bytes per target element.
def _mpt_bytes(n, c, k, e, t, with_grad):
    # logits + old teacher (n x k) + new teacher (n x c) + class targets + loss [+ gradient]
    return n * c * e + n * k * e + n * c * e + n * t + e + (n * c * e if with_grad else 0)


def _cross_entropy_bytes(n, c, k, e, t, with_grad):
    # logits + class targets + loss [+ gradient]  (Δ is a scalar b: nothing to read)
    return n * c * e + n * t + e + (n * c * e if with_grad else 0)


def _focal_bytes(n, c, k, e, t, with_grad):
    # the student's first k columns + reference (n x k) + class targets + loss
    # [+ the whole n x c gradient: zero beyond column k, but written]
    return n * k * e + n * k * e + n * t + e + (n * c * e if with_grad else 0)


def _multilabel_bytes(n, c, k, e, t, with_grad):
    # logits + targets (n x c) + loss [+ gradient]
    return n * c * e + n * c * t + e + (n * c * e if with_grad else 0)


_NO_MULTILABEL_KERNEL = "skipped: Liger has no kernel for sigmoid multi-label losses"

CASES = {
    case.name: case
    for case in (
        LossCase(
            "mpt_kl", "softmax", "mpt_loss, kind='kl', old (K=C/2) and new sources, b=4",
            _mpt_inputs, _mpt_forward("kl"), _mpt_bytes,
            "N·C·e (logits) + N·K·e (old) + N·C·e (new) + N·t (targets) + e (loss) [+ N·C·e (grad)]",
            _liger_mpt("kl"),
            "Liger cross-entropy on logits + Δ, Liger KL-divergence on eager log-softmaxes; "
            "focal weights eager",
        ),
        LossCase(
            "mpt_lm", "softmax", "mpt_loss, kind='lm', old (K=C/2) and new sources, b=4",
            _mpt_inputs, _mpt_forward("lm"), _mpt_bytes,
            "N·C·e (logits) + N·K·e (old) + N·C·e (new) + N·t (targets) + e (loss) [+ N·C·e (grad)]",
            _liger_mpt("lm"),
            "Liger cross-entropy on logits + Δ; logit matching and focal weights eager "
            "(Liger has no logit-matching kernel)",
        ),
        LossCase(
            "margin_cross_entropy", "softmax", "margin_cross_entropy, b=4 on classes >= C/2",
            _cross_entropy_inputs, _cross_entropy_forward, _cross_entropy_bytes,
            "N·C·e (logits) + N·t (targets) + e (loss) [+ N·C·e (grad)]",
            _liger_cross_entropy, "Liger cross-entropy on logits + Δ",
        ),
        LossCase(
            "focal_distillation", "softmax", "focal_distillation, kind='kl', reference K=C/2",
            _focal_inputs, _focal_forward, _focal_bytes,
            "N·K·e (student's first K columns) + N·K·e (reference) + N·t (targets) + e (loss) "
            "[+ N·C·e (grad)]",
            _liger_focal, "Liger KL-divergence on eager log-softmaxes; focal weights eager",
        ),
        LossCase(
            "hill_loss", "multilabel", "hill_loss, bool targets",
            _multilabel_inputs, _hill_forward, _multilabel_bytes,
            "N·C·e (logits) + N·C·t (targets) + e (loss) [+ N·C·e (grad)]",
            None, _NO_MULTILABEL_KERNEL,
        ),
        LossCase(
            "splc_loss", "multilabel", "splc_loss, epoch=1 (correction on), bool targets",
            _multilabel_inputs, _splc_forward, _multilabel_bytes,
            "N·C·e (logits) + N·C·t (targets) + e (loss) [+ N·C·e (grad)]",
            None, _NO_MULTILABEL_KERNEL,
        ),
    )
}

CASE_NAMES = tuple(CASES)


def target_bytes(case: LossCase, inputs: dict) -> int:
    """t: bytes per target element of these inputs."""
    key = "targets" if case.family == "multilabel" else "target"
    return inputs[key].element_size()


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def planned_target_bytes(case: LossCase, dtype: torch.dtype) -> int:
    """t of the inputs this case will make (on the meta device: nothing is allocated)."""
    return target_bytes(case, case.make_inputs(1, 2, dtype, torch.device("meta"), None))


def planned_input_bytes(case: LossCase, n: int, c: int, dtype: torch.dtype) -> int:
    """The inputs' size before they exist (made on the meta device), to skip a shape that
    cannot fit."""
    return input_bytes(case.make_inputs(n, c, dtype, torch.device("meta"), None))
