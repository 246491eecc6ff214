"""float64 ``torch.autograd.gradcheck`` of every reference loss across its options.

Inputs come from ``spec_gradients``' builders: every argmax has a gap of at least 0.375
and every SPLC negative sits at least 0.1 from the threshold, so the finite-difference
step (1e-6) never flips a hard decision. The student logits are the only input checked:
teachers are constants.
"""

import pytest
import torch
from torch.autograd import gradcheck

from mpt_kernels import reference as R
from spec_gradients import focal_case, multilabel_case

N, C, K = 12, 5, 3  # K < C: the old reference knows the first 3 classes
FOCUS_MODES = ("ref_correct", "neg_flip", "student_wrong", "all")
REDUCTIONS = ("mean", "sum", "none")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(fn, logits: torch.Tensor) -> None:
    logits = logits.detach().clone().requires_grad_(True)
    assert gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- §1 cross-entropy
CE_VARIANTS = {
    "plain": {},
    "class_bias": {"class_bias": torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7], dtype=torch.float64)},
    "class_bias_float32": {"class_bias": torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7])},
    "new_class_bias": {"num_old_classes": K, "new_class_bias": 1.7},
    "label_smoothing": {"label_smoothing": 0.15},
    "smoothing_bias_ignore": {
        "label_smoothing": 0.3, "num_old_classes": 2, "new_class_bias": -0.8, "ignore_index": 4,
    },
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", CE_VARIANTS)
def test_margin_cross_entropy(variant, reduction):
    options = CE_VARIANTS[variant]
    z, y, _, _ = focal_case(N, C, K, generator(1), ignore_index=options.get("ignore_index", -100))
    check(lambda x: R.margin_cross_entropy(x, y, reduction=reduction, **options), z)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_margin_cross_entropy_int32_target_and_masked_class(reduction):
    z, y, _, _ = focal_case(N, C, K, generator(2), target_dtype=torch.int32)
    masked = (torch.arange(N) + 2) % C  # a -inf class in every row, never the target
    masked = torch.where(masked == y.long(), (masked + 1) % C, masked)
    z[torch.arange(N), masked] = float("-inf")
    check(lambda x: R.margin_cross_entropy(x, y, new_class_bias=0.5, num_old_classes=K,
                                           reduction=reduction), z)


def test_margin_cross_entropy_all_rows_ignored():
    z, _, _, _ = focal_case(4, C, K, generator(3))
    y = torch.full((4,), -100)
    check(lambda x: R.margin_cross_entropy(x, y, label_smoothing=0.1), z)


# --------------------------------------------------------------------------- §2 focal distillation
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focus", FOCUS_MODES)
@pytest.mark.parametrize("kind", ("kl", "lm"))
def test_focal_distillation(kind, focus, reduction):
    z, y, old, _ = focal_case(N, C, K, generator(4), ignore_index=-1)
    check(lambda x: R.focal_distillation(x, old, y, kind=kind, focus=focus, ignore_index=-1,
                                         reduction=reduction), z)


@pytest.mark.parametrize("scale_by_tau_sq", (False, True))
@pytest.mark.parametrize("kind", ("kl", "lm"))
def test_focal_distillation_full_width_and_options(kind, scale_by_tau_sq):
    # K = C, non-default τ, α, β
    z, y, _, new = focal_case(N, C, C, generator(5))
    check(lambda x: R.focal_distillation(x, new, y, kind=kind, tau=1.7, alpha=0.5, beta=2.5,
                                         focus="neg_flip", scale_by_tau_sq=scale_by_tau_sq,
                                         reduction="none"), z)


def test_focal_distillation_masked_teacher_class():
    # a class masked (-inf) in both teacher and student adds nothing and stays finite
    z, y, old, _ = focal_case(N, C, K, generator(6))
    z[:, 2] = float("-inf")
    old[:, 2] = float("-inf")
    check(lambda x: R.focal_distillation(x, old, y, focus="student_wrong", reduction="sum"), z)


# --------------------------------------------------------------------------- §3 MPT
SOURCES = ("both", "old", "new", "none")


def mpt_inputs(seed: int, sources: str, **case_options):
    z, y, old, new = focal_case(N, C, K, generator(seed), **case_options)
    old = old if sources in ("both", "old") else None
    new = new if sources in ("both", "new") else None
    return z, y, old, new


# Without a teacher, kind and focus do not matter: one combination covers it.
MPT_COMBINATIONS = [
    (sources, kind, focus)
    for sources in SOURCES
    for kind in ("kl", "lm")
    for focus in FOCUS_MODES
    if sources != "none" or (kind, focus) == ("kl", "ref_correct")
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sources, kind, focus", MPT_COMBINATIONS)
def test_mpt_loss(sources, kind, focus, reduction):
    z, y, old, new = mpt_inputs(7, sources)
    # C_old = K < C from the old logits, or given explicitly when the old source is absent
    check(lambda x: R.mpt_loss(x, y, old, new, num_old_classes=K, new_class_bias=1.5,
                               kind=kind, focus=focus, reduction=reduction), z)


MPT_OPTIONS = {
    "class_bias": {"class_bias": torch.tensor([-0.5, 0.25, 1.0, 2.0, -1.5], dtype=torch.float64)},
    "no_bias": {"new_class_bias": 0.0},
    "label_smoothing": {"label_smoothing": 0.2, "new_class_bias": 4.0},
    "scale_by_tau_sq": {"scale_by_tau_sq": True, "tau": 2.0, "alpha": 0.3, "beta": 1.1},
    "weights": {"ce_weight": 0.7, "old_weight": 1.9, "new_weight": 0.35, "new_class_bias": 2.0},
    "no_ce": {"ce_weight": 0.0, "new_class_bias": 2.0},
    "ignore_index": {"ignore_index": 1, "label_smoothing": 0.1},
}


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("kind", ("kl", "lm"))
@pytest.mark.parametrize("option", MPT_OPTIONS)
def test_mpt_loss_options(option, kind, reduction):
    options = dict(MPT_OPTIONS[option])
    case_options = {}
    if "ignore_index" in options:
        case_options["ignore_index"] = options["ignore_index"]
    z, y, old, new = mpt_inputs(8, "both", **case_options)
    check(lambda x: R.mpt_loss(x, y, old, new, kind=kind, focus="neg_flip", reduction=reduction,
                               **options), z)


def test_mpt_loss_full_width_old_source():
    # C_old = C: the old source covers every class, the bias has nothing to act on
    z, y, old, new = focal_case(N, C, C, generator(9))
    check(lambda x: R.mpt_loss(x, y, old, new, new_class_bias=3.0, reduction="sum"), z)


# --------------------------------------------------------------------------- §4-5 multi-label
def as_targets(positive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.bool, torch.uint8):
        return positive.to(dtype)
    return (positive.to(dtype) * 0.6 + 0.2)  # soft 0.8 / 0.2: positive iff t > 0.5


TARGET_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float64)
HILL_PARAMS = {
    "default": {},
    "fractional_gamma": {"lamb": 2.0, "margin": 0.5, "gamma": 1.5},
    "no_focus": {"lamb": 1.0, "margin": 0.0, "gamma": 0.0},
}


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("params", HILL_PARAMS)
def test_hill_loss(params, reduction, target_dtype):
    x, positive = multilabel_case(6, 7, generator(10))
    t = as_targets(positive, target_dtype)
    check(lambda v: R.hill_loss(v, t, reduction=reduction, **HILL_PARAMS[params]), x)


SPLC_PARAMS = {
    "default_before": {"epoch": 0},
    "default_after": {"epoch": 1},
    "custom_before": {"epoch": 2, "change_epoch": 3, "tau": 0.7, "margin": 0.5, "gamma": 1.5},
    "custom_after": {"epoch": 5, "change_epoch": 3, "tau": 0.7, "margin": 0.5, "gamma": 1.5},
    "gamma0_after": {"epoch": 1, "tau": 0.4, "margin": 2.0, "gamma": 0.0},
}


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("params", SPLC_PARAMS)
def test_splc_loss(params, reduction, target_dtype):
    options = SPLC_PARAMS[params]
    x, positive = multilabel_case(6, 7, generator(11), tau=options.get("tau", 0.6))
    t = as_targets(positive, target_dtype)
    check(lambda v: R.splc_loss(v, t, reduction=reduction, **options), x)
