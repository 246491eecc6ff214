"""The spec's closed-form gradients (``spec_gradients``) against autograd of the reference.

In float64 on random inputs, across the options; "none" with a random upstream gradient,
the scalar reductions with a random scalar, "mean" with ignored rows (every case has
some) and with every row ignored. Half-precision inputs check that the formulas serve
kernel tests too (computed in float32, compared in the logits' dtype).
"""

import pytest
import torch

from mpt_kernels import reference as R
from mpt_kernels._validation import check_hill, check_splc
from spec_gradients import (
    focal_case,
    multilabel_case,
    multilabel_grad,
    multilabel_input_grad,
    row_upstream,
    softmax_family_grad,
    softmax_family_input_grad,
)

N, C, K = 14, 7, 4
FOCUS_MODES = ("ref_correct", "neg_flip", "student_wrong", "all")
REDUCTIONS = ("mean", "sum", "none")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def upstream(reduction: str, shape, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random upstream gradient: (N,)/(N, C) for "none", a scalar otherwise (never 1)."""
    if reduction == "none":
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    return torch.tensor(-0.37 + 2.1 * torch.rand((), generator=gen, dtype=torch.float64).item(),
                        dtype=dtype)


def autograd_softmax(args, grad_output):
    logits = args.logits.detach().clone().requires_grad_(True)
    args = type(args)(logits, *args.op_args()[1:])
    (grad,) = torch.autograd.grad(R.softmax_family_loss(args), logits, grad_output)
    return grad


def assert_softmax_grads_match(args, seed, *, atol=1e-12, rtol=1e-10):
    n = args.logits.shape[0]
    grad_output = upstream(args.reduction, (n,), generator(seed), args.logits.dtype)
    expected = softmax_family_input_grad(args, grad_output).to(args.logits.dtype)
    actual = autograd_softmax(args, grad_output)
    assert actual.dtype == args.logits.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    return actual


def mpt_args(z, y, old, new, **options):
    defaults = dict(new_class_bias=4.0, num_old_classes=None, class_bias=None, kind="kl",
                    tau=5.0, alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False,
                    ce_weight=1.0, old_weight=None, new_weight=None, label_smoothing=0.0,
                    ignore_index=-100, reduction="mean")
    defaults.update(options)
    return R.mpt_loss_args(z, y, old, new, **defaults)


# --------------------------------------------------------------------------- §1 cross-entropy
CE_OPTIONS = {
    "plain": {},
    "class_bias": {"class_bias": torch.linspace(-2, 3, C, dtype=torch.float64)},
    "new_class_bias": {"num_old_classes": K, "new_class_bias": 2.5},
    "label_smoothing": {"label_smoothing": 0.25},
    "everything": {"num_old_classes": 2, "new_class_bias": -1.0, "label_smoothing": 0.6,
                   "ignore_index": 3},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", CE_OPTIONS)
def test_cross_entropy_gradient(option, reduction):
    options = dict(dict(class_bias=None, num_old_classes=None, new_class_bias=0.0,
                        label_smoothing=0.0, ignore_index=-100), **CE_OPTIONS[option])
    z, y, _, _ = focal_case(N, C, K, generator(20), ignore_index=options["ignore_index"])
    args = R.margin_cross_entropy_args(z, y, reduction=reduction, **options)
    assert_softmax_grads_match(args, 21)


# --------------------------------------------------------------------------- §2 focal distillation
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focus", FOCUS_MODES)
@pytest.mark.parametrize("kind", ("kl", "lm"))
@pytest.mark.parametrize("width", ("K<C", "K=C"))
def test_focal_distillation_gradient(width, kind, focus, reduction):
    z, y, old, new = focal_case(N, C, K, generator(22))
    ref = old if width == "K<C" else new
    args = R.focal_distillation_args(
        z, ref, y, kind=kind, tau=2.5, alpha=0.7, beta=3.0, focus=focus,
        scale_by_tau_sq=(focus == "all"), ignore_index=-100, reduction=reduction)
    assert_softmax_grads_match(args, 23)


@pytest.mark.parametrize("scale_by_tau_sq", (False, True))
@pytest.mark.parametrize("tau", (0.5, 5.0))
def test_kl_gradient_scale(tau, scale_by_tau_sq):
    z, y, old, _ = focal_case(N, C, K, generator(24))
    args = R.focal_distillation_args(
        z, old, y, kind="kl", tau=tau, alpha=1.0, beta=5.0, focus="neg_flip",
        scale_by_tau_sq=scale_by_tau_sq, ignore_index=-100, reduction="none")
    assert_softmax_grads_match(args, 25)


# --------------------------------------------------------------------------- §3 MPT
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focus", FOCUS_MODES)
@pytest.mark.parametrize("kind", ("kl", "lm"))
@pytest.mark.parametrize("sources", ("both", "old", "new"))
def test_mpt_gradient(sources, kind, focus, reduction):
    z, y, old, new = focal_case(N, C, K, generator(26))
    args = mpt_args(z, y, old if sources != "new" else None, new if sources != "old" else None,
                    num_old_classes=K, new_class_bias=1.25, kind=kind, focus=focus,
                    reduction=reduction)
    assert_softmax_grads_match(args, 27)


MPT_OPTIONS = {
    "no_sources": {"old": False, "new": False},
    "class_bias": {"class_bias": torch.linspace(1, -2, C, dtype=torch.float32)},
    "label_smoothing": {"label_smoothing": 0.4},
    "scale_by_tau_sq": {"scale_by_tau_sq": True, "tau": 3.0},
    "weights": {"ce_weight": 0.3, "old_weight": 2.0, "new_weight": 0.5, "alpha": 0.2,
                "beta": 7.0},
    "no_ce": {"ce_weight": 0.0},
    "ignore_index": {"ignore_index": 2, "label_smoothing": 0.05},
    "full_width_old": {"full_width_old": True},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ("kl", "lm"))
@pytest.mark.parametrize("option", MPT_OPTIONS)
def test_mpt_gradient_options(option, kind, reduction):
    options = dict(MPT_OPTIONS[option])
    use_old, use_new = options.pop("old", True), options.pop("new", True)
    k = C if options.pop("full_width_old", False) else K
    z, y, old, new = focal_case(N, C, k, generator(28),
                                ignore_index=options.get("ignore_index", -100))
    args = mpt_args(z, y, old if use_old else None, new if use_new else None,
                    num_old_classes=k, kind=kind, focus="student_wrong", reduction=reduction,
                    **options)
    assert_softmax_grads_match(args, 29)


@pytest.mark.parametrize("kind", ("kl", "lm"))
def test_mean_over_no_counted_rows_has_zero_gradient(kind):
    z, _, old, new = focal_case(5, C, K, generator(30))
    y = torch.full((5,), -100)
    args = mpt_args(z, y, old, new, kind=kind, label_smoothing=0.1)
    grad = assert_softmax_grads_match(args, 31)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_row_upstream_of_each_reduction():
    # g_i of each reduction, worked by hand: 4 counted rows of 6
    z, y, _, _ = focal_case(6, C, K, generator(32))
    y = torch.tensor([0, -100, 2, 1, -100, 3])
    for reduction, grad_output, expected in [
        ("mean", torch.tensor(2.0, dtype=torch.float64), [0.5, 0, 0.5, 0.5, 0, 0.5]),
        ("sum", torch.tensor(-3.0, dtype=torch.float64), [-3, 0, -3, -3, 0, -3]),
        ("none", torch.arange(1.0, 7.0, dtype=torch.float64), [1, 0, 3, 4, 0, 6]),
    ]:
        args = R.margin_cross_entropy_args(
            z, y, class_bias=None, num_old_classes=None, new_class_bias=0.0,
            label_smoothing=0.0, ignore_index=-100, reduction=reduction)
        torch.testing.assert_close(row_upstream(args, grad_output),
                                   torch.tensor(expected, dtype=torch.float64))


def test_softmax_family_grad_is_linear_in_the_row_upstream():
    # the per-row entry point: scaling g_i scales row i only, ignored rows stay 0
    z, y, old, new = focal_case(N, C, K, generator(33))
    args = mpt_args(z, y, old, new, num_old_classes=K, reduction="none")
    g = torch.randn(N, generator=generator(34), dtype=torch.float64)
    unit = softmax_family_grad(args, torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(softmax_family_grad(args, g), g[:, None] * unit)
    ignored = y == -100
    assert ignored.any() and torch.equal(unit[ignored], torch.zeros_like(unit[ignored]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_softmax_formulas_in_low_precision(dtype, reduction):
    # the formulas are computed in float32; the reference's gradient comes back in dtype
    z, y, old, new = focal_case(N, C, K, generator(35), dtype=dtype)
    args = mpt_args(z, y, old, new, num_old_classes=K, label_smoothing=0.1,
                    reduction=reduction)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_softmax_grads_match(args, 36, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- §4-5 multi-label
def autograd_multilabel(args, grad_output):
    logits = args.logits.detach().clone().requires_grad_(True)
    args = type(args)(logits, *args.op_args()[1:])
    (grad,) = torch.autograd.grad(R.multilabel_loss(args), logits, grad_output)
    return grad


def assert_multilabel_grads_match(args, seed, *, atol=1e-12, rtol=1e-10):
    grad_output = upstream(args.reduction, args.logits.shape, generator(seed), args.logits.dtype)
    expected = multilabel_input_grad(args, grad_output).to(args.logits.dtype)
    actual = autograd_multilabel(args, grad_output)
    assert actual.dtype == args.logits.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


TARGET_DTYPES = (torch.bool, torch.uint8, torch.float32)
HILL_PARAMS = [
    dict(lamb=1.5, margin=1.0, gamma=2.0),
    dict(lamb=3.0, margin=-0.5, gamma=0.5),
    dict(lamb=0.5, margin=2.0, gamma=0.0),
]


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("params", range(len(HILL_PARAMS)))
def test_hill_gradient(params, reduction, target_dtype):
    x, positive = multilabel_case(9, 11, generator(40))
    args = check_hill(x, positive.to(target_dtype), reduction=reduction, **HILL_PARAMS[params])
    assert_multilabel_grads_match(args, 41)


SPLC_PARAMS = [
    dict(epoch=0, change_epoch=1, tau=0.6, margin=1.0, gamma=2.0),
    dict(epoch=1, change_epoch=1, tau=0.6, margin=1.0, gamma=2.0),
    dict(epoch=3, change_epoch=4, tau=0.3, margin=0.25, gamma=3.0),
    dict(epoch=9, change_epoch=4, tau=0.3, margin=0.25, gamma=3.0),
    dict(epoch=2, change_epoch=0, tau=0.8, margin=-1.0, gamma=0.0),
]


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("params", range(len(SPLC_PARAMS)))
def test_splc_gradient(params, reduction, target_dtype):
    options = SPLC_PARAMS[params]
    x, positive = multilabel_case(9, 11, generator(42), tau=options["tau"])
    args = check_splc(x, positive.to(target_dtype), reduction=reduction, **options)
    assert_multilabel_grads_match(args, 43)


def test_splc_correction_is_exercised():
    # the inputs above do put negatives on both sides of the threshold
    x, positive = multilabel_case(9, 11, generator(42), tau=0.6)
    above = torch.sigmoid(x) > 0.6
    assert (above & ~positive).any() and (~above & ~positive).any()
    after = multilabel_grad(check_splc(x, positive, epoch=1, tau=0.6, change_epoch=1,
                                       margin=1.0, gamma=2.0, reduction="none"))
    before = multilabel_grad(check_splc(x, positive, epoch=0, tau=0.6, change_epoch=1,
                                        margin=1.0, gamma=2.0, reduction="none"))
    flipped = above & ~positive
    assert torch.equal(after[~flipped], before[~flipped])
    assert (after[flipped] < 0).all() and (before[flipped] > 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("loss", ("hill", "splc"))
def test_multilabel_formulas_in_low_precision(loss, dtype):
    x, positive = multilabel_case(9, 11, generator(44), dtype=dtype)
    if loss == "hill":
        args = check_hill(x, positive, lamb=1.5, margin=1.0, gamma=2.0, reduction="none")
    else:
        args = check_splc(x, positive, epoch=1, tau=0.6, change_epoch=1, margin=1.0,
                          gamma=2.0, reduction="none")
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_multilabel_grads_match(args, 45, atol=tol, rtol=tol)


@pytest.mark.parametrize("loss", ("hill", "splc"))
def test_multilabel_formulas_at_large_logits(loss):
    # float32, |x| up to 1e4, both labels: the formulas stay finite and match autograd
    x = torch.tensor([[-1e4, -300.0, -30.0, 30.0, 300.0, 1e4]] * 2)
    positive = torch.tensor([[True] * 6, [False] * 6])
    if loss == "hill":
        args = check_hill(x, positive, lamb=1.5, margin=1.0, gamma=2.0, reduction="sum")
    else:
        args = check_splc(x, positive, epoch=1, tau=0.6, change_epoch=1, margin=1.0,
                          gamma=2.0, reduction="sum")
    grad = multilabel_grad(args)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(autograd_multilabel(args, torch.tensor(1.0)), grad,
                               atol=1e-6, rtol=1e-5)
