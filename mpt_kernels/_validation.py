"""Input validation shared by every backend.

Two kinds of checks live here:

* Metadata checks (shapes, dtypes, devices, parameter ranges) run in the public
  functions before any backend is chosen. They read only Python values and tensor
  metadata, so they cost no device work, add no host synchronisation and trace cleanly
  under ``torch.compile(fullgraph=True)`` (Dynamo turns them into guards).
* Value checks (targets inside ``[0, C)``) need the tensor's contents. They run inside
  each backend's operator, where the compiler does not look:
  ``check_target_values`` raises on CPU tensors (reading them costs nothing); on a GPU
  it does nothing unless ``MPT_KERNELS_SYNC_CHECKS=1``, because reading the targets
  back would stall the stream. There the kernels never read outside the row: a row
  whose target is out of range gets a NaN loss.

Every failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind,
wrong value) whose message names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)
LOGIT_DTYPES = HALF_AND_SINGLE + (torch.float64,)
CLASS_TARGET_DTYPES = (torch.int64, torch.int32)
MULTILABEL_TARGET_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)

KINDS = ("kl", "lm")
FOCUS_MODES = ("ref_correct", "neg_flip", "student_wrong", "all")
SOFTMAX_REDUCTIONS = ("mean", "sum", "none")
MULTILABEL_REDUCTIONS = ("sum", "mean", "none")

# Default distillation weight of each kind (spec §3: 1 for "kl", 0.4 for "lm").
DEFAULT_SOURCE_WEIGHT = {"kl": 1.0, "lm": 0.4}


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# --------------------------------------------------------------------------- scalars
def _is_symbolic(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat))


def check_float(name: str, value, *, low=None, high=None, low_open=False) -> float:
    """A finite real number within [low, high] (or (low, high] when low_open)."""
    if type(value) is not float:  # a plain float skips the slow abstract-class checks
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_symbolic(value)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    # a chained comparison, not math.isfinite: Dynamo traces it for a symbolic float too
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value, *, low=None, high=None) -> int:
    """An integer (not a bool, not a float) within [low, high]."""
    if type(value) is not int:  # a plain int skips the slow abstract-class checks
        if isinstance(value, bool) or not (
            isinstance(value, numbers.Integral) or isinstance(value, torch.SymInt)
        ):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not isinstance(value, torch.SymInt):
            value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- tensors
def check_tensor(name: str, value, *, ndim: int, dtypes) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D, got shape {tuple(value.shape)} ({value.dim()}-D)"
        )
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}")
    return value


def check_same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}"
        )


def sync_checks_enabled() -> bool:
    """``MPT_KERNELS_SYNC_CHECKS=1`` turns on value checks that synchronise a GPU."""
    return os.environ.get("MPT_KERNELS_SYNC_CHECKS", "0") not in ("", "0")


# The fused kernels index a row's classes in 32 bits, with room for one block (4096 in
# the CUDA forward's zero fill, a Triton block) past the end; they launch one program
# (Triton) or block (CUDA) per row, and a grid's x dimension holds at most 2^31 - 1.
MAX_KERNEL_CLASSES = 2**31 - 2**16
MAX_KERNEL_ROWS = 2**31 - 1


def check_kernel_shape(backend: str, logits: Tensor) -> None:
    """Softmax-family logits the fused kernels can index and launch (a row of 2^31
    classes is 4 GiB and more; 2^31 rows, 4 GiB of class-1 bf16 logits)."""
    num_rows, num_classes = logits.shape
    if num_classes > MAX_KERNEL_CLASSES:
        raise ValueError(f"the {backend} backend takes at most {MAX_KERNEL_CLASSES} classes per row, "
                         f"got {num_classes}")
    if num_rows > MAX_KERNEL_ROWS:
        raise ValueError(f"the {backend} backend takes at most {MAX_KERNEL_ROWS} rows (its kernels launch one "
                         f"program or block per row), got {num_rows}")


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target is ``ignore_index`` or a class in [0, num_classes).

    Called by each backend's operator (eagerly, outside any compiled graph). On CPU it
    always checks; on other devices only when ``MPT_KERNELS_SYNC_CHECKS=1``.
    """
    if target.numel() == 0 or (target.device.type != "cpu" and not sync_checks_enabled()):
        return
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(
            f"target must hold class indices in [0, {num_classes}) or ignore_index "
            f"({ignore_index}); found {first}"
        )


class _OperatorArgs:
    FIELD_NAMES: tuple = ()  # set below each dataclass (dataclasses.fields is slow per call)

    def op_args(self) -> tuple:
        """The fields in declaration order: the positional arguments of the operators."""
        return tuple([getattr(self, name) for name in self.FIELD_NAMES])


# --------------------------------------------------------------------------- softmax family
@dataclass(frozen=True)
class SoftmaxLossArgs(_OperatorArgs):
    """Validated arguments of the softmax family (spec §1-3), in operator order.

    ``margin_cross_entropy`` and ``focal_distillation`` are special cases of
    ``mpt_loss``, so all three reduce to this one record and one operator per backend.
    The bias is either ``class_bias`` (a length-C vector) or ``new_class_bias`` added to
    the classes ``j >= num_old_classes``; a bias of 0 means none. A source weight of 0
    (or an absent source) means the term is not computed at all.
    """

    logits: Tensor
    target: Tensor
    old_logits: Optional[Tensor]
    new_logits: Optional[Tensor]
    class_bias: Optional[Tensor]
    num_old_classes: int
    new_class_bias: float
    label_smoothing: float
    ignore_index: int
    kind: str
    tau: float
    alpha: float
    beta: float
    focus: str
    scale_by_tau_sq: bool
    ce_weight: float
    old_weight: float
    new_weight: float
    reduction: str


SoftmaxLossArgs.FIELD_NAMES = tuple(f.name for f in fields(SoftmaxLossArgs))


def _check_logits(name: str, logits) -> Tensor:
    return check_tensor(name, logits, ndim=2, dtypes=LOGIT_DTYPES)


def _check_teacher(name: str, teacher, logits: Tensor, logits_name: str, num_cols) -> Tensor:
    teacher = check_tensor(name, teacher, ndim=2, dtypes=LOGIT_DTYPES)
    check_same_device(name, teacher, logits_name, logits)
    if teacher.dtype != logits.dtype:
        raise TypeError(
            f"{name} must have the same dtype as {logits_name} ({logits.dtype}), got "
            f"{teacher.dtype}; convert it yourself if you mean to (an N x C copy)"
        )
    if teacher.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name} must have {logits.shape[0]} rows like {logits_name}, got shape "
            f"{tuple(teacher.shape)}"
        )
    if num_cols is not None and teacher.shape[1] != num_cols:
        raise ValueError(f"{name} must have {num_cols} columns, got shape {tuple(teacher.shape)}")
    if teacher.shape[1] < 1 or teacher.shape[1] > logits.shape[1]:
        raise ValueError(
            f"{name} must have between 1 and {logits.shape[1]} columns (the student's), got "
            f"shape {tuple(teacher.shape)}"
        )
    return teacher


def _check_target(target, logits: Tensor, logits_name: str) -> Tensor:
    target = check_tensor("target", target, ndim=1, dtypes=CLASS_TARGET_DTYPES)
    check_same_device("target", target, logits_name, logits)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},) to match {logits_name}, got "
            f"{tuple(target.shape)}"
        )
    return target


def _check_class_bias(class_bias, logits: Tensor) -> Tensor:
    class_bias = check_tensor(
        "class_bias", class_bias, ndim=1, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)
    )
    check_same_device("class_bias", class_bias, "logits", logits)
    if class_bias.shape[0] != logits.shape[1]:
        raise ValueError(
            f"class_bias must have shape ({logits.shape[1]},) (one per class), got "
            f"{tuple(class_bias.shape)}"
        )
    return class_bias


def _resolve_bias(class_bias, num_old_classes, new_class_bias, logits, *, old_name):
    """Returns (class_bias, num_old_classes, new_class_bias) in the normalised form."""
    num_classes = logits.shape[1]
    new_class_bias = check_float("new_class_bias", new_class_bias)
    if class_bias is not None:
        # A bias vector replaces the new-class convention (spec, Public API).
        return _check_class_bias(class_bias, logits), num_old_classes, 0.0
    if num_old_classes is None:
        if new_class_bias != 0.0:
            raise ValueError(
                f"new_class_bias={new_class_bias} needs to know which classes are new: pass "
                f"num_old_classes{f' or {old_name}' if old_name else ''} (or class_bias)"
            )
        return None, num_classes, 0.0
    return None, num_old_classes, new_class_bias


def check_softmax_family(
    logits,
    target,
    old_logits,
    new_logits,
    *,
    class_bias,
    num_old_classes,
    new_class_bias,
    label_smoothing,
    ignore_index,
    kind,
    tau,
    alpha,
    beta,
    focus,
    scale_by_tau_sq,
    ce_weight,
    old_weight,
    new_weight,
    reduction,
    logits_name="logits",
    old_name="old_logits",
) -> SoftmaxLossArgs:
    """Validates and normalises; ``old_name`` is what the caller calls the old source
    (None where its signature has none)."""
    logits = _check_logits(logits_name, logits)
    num_classes = logits.shape[1]
    if num_classes < 1:
        raise ValueError(f"{logits_name} must have at least one class, got shape {tuple(logits.shape)}")
    target = _check_target(target, logits, logits_name)
    kind = check_choice("kind", kind, KINDS)
    focus = check_choice("focus", focus, FOCUS_MODES)
    reduction = check_choice("reduction", reduction, SOFTMAX_REDUCTIONS)
    scale_by_tau_sq = check_bool("scale_by_tau_sq", scale_by_tau_sq)
    # in the targets' range: torch compares an int32 target with ignore_index modulo 2^32
    # (so 2^32 - 100 would ignore -100), the kernels exactly
    ignore_index = check_int("ignore_index", ignore_index)
    target_range = torch.iinfo(target.dtype)
    if not target_range.min <= ignore_index <= target_range.max:
        raise ValueError(f"ignore_index must fit the target's dtype {target.dtype} "
                         f"([{target_range.min}, {target_range.max}]), got {ignore_index}")
    tau = check_float("tau", tau, low=0.0, low_open=True)
    alpha = check_float("alpha", alpha, low=0.0)
    beta = check_float("beta", beta, low=0.0)
    label_smoothing = check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    ce_weight = check_float("ce_weight", ce_weight, low=0.0)
    default_weight = DEFAULT_SOURCE_WEIGHT[kind]
    old_weight = check_float("old_weight", default_weight if old_weight is None else old_weight, low=0.0)
    new_weight = check_float("new_weight", default_weight if new_weight is None else new_weight, low=0.0)

    if num_old_classes is not None:
        num_old_classes = check_int("num_old_classes", num_old_classes, low=1, high=num_classes)
    if old_logits is not None:
        old_logits = _check_teacher(old_name, old_logits, logits, logits_name, num_old_classes)
        num_old_classes = old_logits.shape[1]
    if new_logits is not None:
        new_logits = _check_teacher("new_logits", new_logits, logits, logits_name, num_classes)

    class_bias, num_old_classes, new_class_bias = _resolve_bias(
        class_bias, num_old_classes, new_class_bias, logits, old_name=old_name
    )
    if num_old_classes is None:
        num_old_classes = num_classes
    return SoftmaxLossArgs(
        logits, target, old_logits, new_logits, class_bias, num_old_classes, new_class_bias,
        label_smoothing, ignore_index, kind, tau, alpha, beta, focus, scale_by_tau_sq,
        ce_weight, old_weight if old_logits is not None else 0.0,
        new_weight if new_logits is not None else 0.0, reduction,
    )


# --------------------------------------------------------------------------- multi-label family
@dataclass(frozen=True)
class MultiLabelLossArgs(_OperatorArgs):
    """Validated arguments of the multi-label family (spec §4-5), in operator order.

    Hill reads ``lamb``, ``margin``, ``gamma``; SPLC reads ``tau``, ``epoch``,
    ``change_epoch``, ``margin``, ``gamma``. The unused ones hold their defaults.
    """

    logits: Tensor
    targets: Tensor
    loss: str
    lamb: float
    margin: float
    gamma: float
    tau: float
    epoch: int
    change_epoch: int
    reduction: str


MultiLabelLossArgs.FIELD_NAMES = tuple(f.name for f in fields(MultiLabelLossArgs))


def _check_multilabel_tensors(logits, targets):
    logits = _check_logits("logits", logits)
    targets = check_tensor("targets", targets, ndim=2, dtypes=MULTILABEL_TARGET_DTYPES)
    check_same_device("targets", targets, "logits", logits)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must have the same shape as logits {tuple(logits.shape)}, got "
            f"{tuple(targets.shape)}"
        )
    return logits, targets


def check_hill(logits, targets, *, lamb, margin, gamma, reduction) -> MultiLabelLossArgs:
    logits, targets = _check_multilabel_tensors(logits, targets)
    return MultiLabelLossArgs(
        logits, targets, "hill",
        lamb=check_float("lamb", lamb),
        margin=check_float("margin", margin),
        gamma=check_float("gamma", gamma, low=0.0),
        tau=0.6, epoch=0, change_epoch=1,
        reduction=check_choice("reduction", reduction, MULTILABEL_REDUCTIONS),
    )


def check_splc(logits, targets, *, epoch, tau, change_epoch, margin, gamma, reduction) -> MultiLabelLossArgs:
    logits, targets = _check_multilabel_tensors(logits, targets)
    return MultiLabelLossArgs(
        logits, targets, "splc",
        lamb=1.5,
        margin=check_float("margin", margin),
        gamma=check_float("gamma", gamma, low=0.0),
        tau=check_float("tau", tau, low=0.0, high=1.0),
        epoch=check_int("epoch", epoch),
        change_epoch=check_int("change_epoch", change_epoch),
        reduction=check_choice("reduction", reduction, MULTILABEL_REDUCTIONS),
    )


def splc_logit(tau: float) -> float:
    """logit(τ) = log(τ / (1 - τ)) in float64, where SPLC's correction σ(x) > τ becomes
    x > logit(τ); -inf at τ = 0 (every finite x), +inf at τ = 1 (none)."""
    if tau <= 0.0:
        return -math.inf
    if tau >= 1.0:
        return math.inf
    return math.log(tau) - math.log1p(-tau)


def splc_flip_logit(args: MultiLabelLossArgs) -> float:
    """SPLC's correction (spec §5) as a threshold on the logit, for the kernels: a negative
    counts as positive where x > flip_logit, which is σ(x) > τ (σ is increasing) decided
    without rounding σ, so the decision does not depend on how a kernel approximates σ.
    It is the largest float32 at most logit(τ) (a float32 x exceeds it exactly when x
    exceeds logit(τ)); +inf, never, before ``change_epoch``, for Hill and for τ = 1.
    The epoch reaches the kernels only through this float: a new epoch compiles nothing."""
    if args.loss != "splc" or args.epoch < args.change_epoch:
        return math.inf
    exact = splc_logit(args.tau)
    if math.isinf(exact):
        return exact
    nearest = struct.unpack("<f", struct.pack("<f", exact))[0]
    if nearest <= exact:
        return nearest
    bits = struct.unpack("<I", struct.pack("<f", nearest))[0]  # the next float32 towards -inf
    below = bits - 1 if nearest > 0.0 else (bits + 1 if nearest < 0.0 else 0x80000001)
    return struct.unpack("<f", struct.pack("<I", below))[0]

