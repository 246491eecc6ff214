"""The fused Triton kernel of the softmax family (MPT loss, margin CE, focal distillation)
against the reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on a
few rows with the class block shrunk to ``SMALL_BLOCK`` (fixture ``small_blocks``), so
that C = 150 classes cross five blocks and the old/new boundary K = 70 falls inside
one. Tests marked ``gpu`` run the real launch configuration at realistic sizes.

Every comparison runs the public API with ``backend="triton"`` and the reference on
copies of the same fresh random inputs, then compares the loss and the gradient of the
logits for an upstream gradient other than 1 (a random (N,) one for ``"none"``).

Tolerances, per logits dtype (``TOLERANCE``, relative; absolute = relative x the
largest magnitude compared): both sides compute in float32 and round once to the
logits' dtype, and the kernel's one-sweep KL identity and online sums order the float32
arithmetic differently. So float32 gets 2e-5 (a few dozen float32 ulps: the KL identity
subtracts numbers of the logits' size to get a small divergence), float16 and bfloat16
three unit roundoffs of their own format (3·2^-11, 3·2^-8: values rounded once from
nearby float32 values are at most one ulp, two unit roundoffs, apart; the interpreter's
float32 -> bfloat16 cast truncates, which stays within that ulp). The absolute part
hides errors in the smallest entries, so the tests of a scaled backward (below) check
every element against the float32 reference rounded once, to within one ulp.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

import mpt_kernels  # noqa: E402
from mpt_kernels import reference as R  # noqa: E402
from mpt_kernels.backends import triton_softmax as TS  # noqa: E402
from mpt_kernels.backends import triton_sum  # noqa: E402
from allocations import large_allocations  # noqa: E402
from rounding import assert_single_rounding  # noqa: E402
from sm90_compile import run_sm90_compile  # noqa: E402
from softmax_edges import masked_with_finite_values, rows_at_the_float32_minimum  # noqa: E402
from mpt_kernels._validation import MAX_KERNEL_CLASSES, MAX_KERNEL_ROWS  # noqa: E402

# numpy (the interpreter) warns about lanes that are computed and then masked out
# (-inf - -inf, log 0 on ignored rows); the results are checked below.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3 * 2.0**-11, torch.bfloat16: 3 * 2.0**-8}
SMALL_BLOCK = 32
N, C, K = 6, 150, 70  # C and K not multiples of SMALL_BLOCK; K falls inside a block
FUNCTIONS = {"mpt_loss", "margin_cross_entropy", "focal_distillation"}


@pytest.fixture(autouse=True, params=["rows", "chunks"])
def small_blocks(request, monkeypatch):
    """A small class block (and a small step of the loss's row sum, so that a few rows
    cross several) under the interpreter (not for the GPU tests).

    Every test runs twice: with one program per row, and with chunked rows (``chunks``:
    chunks of two blocks, so C = 150 makes three and K = 70 falls inside the second, and
    a lag of 2 rows, so that the first programs only publish statistics and the last only
    write gradients). On a GPU the chunks are 8192 classes, with the lag the launcher
    chooses."""
    gpu = request.node.get_closest_marker("gpu") is not None
    if not gpu and "default_blocks" not in request.node.name:
        monkeypatch.setattr(TS, "block_size_override", SMALL_BLOCK)
        monkeypatch.setattr(triton_sum, "BLOCK", 4)
    if request.param == "chunks":
        monkeypatch.setattr(TS, "chunk_classes", 8192 if gpu else 2 * SMALL_BLOCK)
        monkeypatch.setattr(TS, "lag_override", None if gpu else 2)


# --------------------------------------------------------------------------- inputs
def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def make_inputs(seed, *, n=N, c=C, k=K, dtype=torch.float32, target_dtype=torch.int64,
                ignore_rows=(1,), ignore_index=-100):
    """Student (n, c), targets, old (n, k), new (n, c): random, with agreement planted.

    Some rows get a teacher whose argmax is the target, some a student whose argmax is
    the target, in a pattern that gives every focus mode both values of f; targets in
    the second half of the rows may lie beyond k (never predicted by the old model), and
    the first two of them are k and k - 1 (either side of where the bias b starts).
    """
    g = generator(seed)
    z = 2.0 * torch.randn(n, c, generator=g, device=DEVICE)
    old = 2.0 * torch.randn(n, k, generator=g, device=DEVICE)
    new = 2.0 * torch.randn(n, c, generator=g, device=DEVICE)
    y = torch.randint(0, k, (n,), generator=g, device=DEVICE)
    y[n // 2:] = torch.randint(0, c, (n - n // 2,), generator=g, device=DEVICE)
    rows = torch.arange(n, device=DEVICE)
    if k < c:  # the first new class (where the bias b starts) and the last old one
        boundary = rows[n // 2:n // 2 + 2]
        y[boundary] = torch.tensor([k, k - 1], device=DEVICE)[:boundary.numel()]
    # a fixed pattern: rows 0 and 2 meet a right teacher with a right and a wrong student
    plant_old = (rows % 2 == 0) & (y < k)
    plant_new = rows % 3 != 1
    plant_student = rows % 3 == 0
    old[rows[plant_old], y[plant_old]] = old.max() + 1.0
    new[rows[plant_new], y[plant_new]] = new.max() + 1.0
    z[rows[plant_student], y[plant_student]] = z.max() + 1.0
    for r in ignore_rows:
        y[r] = ignore_index
    return z.to(dtype), y.to(target_dtype), old.to(dtype), new.to(dtype)


def upstream_gradient(out: torch.Tensor, how: str, seed: int = 99) -> torch.Tensor:
    if how == "one":
        return torch.ones_like(out)
    if out.dim() == 0:
        return torch.full_like(out, -0.37 if how == "negative" else 1.7)
    return torch.rand(out.shape, generator=generator(seed), device=DEVICE).to(out.dtype) * 2 - 0.5


def run(fn_name: str, logits, *rest, backend: str, upstream="random", **kwargs):
    """Loss and logits' gradient of one public function, on a fresh leaf copy of ``logits``."""
    assert fn_name in FUNCTIONS
    leaf = logits.detach().clone().requires_grad_(True)
    if backend == "reference":
        out = getattr(R, fn_name)(leaf, *rest, **kwargs)
    else:
        out = getattr(mpt_kernels, fn_name)(leaf, *rest, backend=backend, **kwargs)
    g = upstream.to(out.dtype) if isinstance(upstream, torch.Tensor) else upstream_gradient(out, upstream)
    (grad,) = torch.autograd.grad(out, leaf, g)
    # the caller's logits are never written (NaN compares equal to NaN here)
    torch.testing.assert_close(leaf.detach(), logits, rtol=0, atol=0, equal_nan=True)
    return out.detach(), grad


def assert_close(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * max(scale, 1e-3), equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check(fn_name, logits, *rest, upstream="random", **kwargs):
    """Triton == reference for the loss and the gradient; returns the Triton pair. In
    float16 and bfloat16 every gradient entry is also held to the float32 reference
    rounded once, within one ulp (the relative tolerance's absolute part scales with the
    largest entry and would let a wrong small entry through)."""
    loss_t, grad_t = run(fn_name, logits, *rest, backend="triton", upstream=upstream, **kwargs)
    loss_r, grad_r = run(fn_name, logits, *rest, backend="reference", upstream=upstream, **kwargs)
    assert_close(loss_t, loss_r, logits.dtype, "loss")
    assert_close(grad_t, grad_r, logits.dtype, "gradient")
    if logits.dtype in (torch.float16, torch.bfloat16):
        widen = [x.float() if isinstance(x, torch.Tensor) and x.dtype == logits.dtype else x for x in rest]
        _, grad_32 = run(fn_name, logits.float(), *widen, backend="reference",
                         upstream=upstream_gradient(loss_t, upstream), **kwargs)
        assert_single_rounding(grad_t, grad_32, "gradient against the float32 reference rounded once")
    return loss_t, grad_t


# --------------------------------------------------------------------------- every option
MPT_CASES = {
    # name: (sources, kwargs)
    "kl-ref_correct-default": ("both", dict()),
    "kl-neg_flip-tau_sq-smoothing-sum": ("both", dict(focus="neg_flip", scale_by_tau_sq=True, tau=2.0,
                                                      label_smoothing=0.1, reduction="sum")),
    "kl-student_wrong-class_bias-none": ("both", dict(focus="student_wrong", class_bias="float32",
                                                      reduction="none")),
    "kl-all-old_only-bias2": ("old", dict(focus="all", new_class_bias=2.0, alpha=0.5, beta=2.0)),
    "kl-ref_correct-new_only-ce0": ("new", dict(ce_weight=0.0, num_old_classes=K, tau=3.0)),
    "kl-neg_flip-no_sources": ("none", dict(focus="neg_flip", num_old_classes=K, label_smoothing=0.2)),
    "kl-ignore7-weights": ("both", dict(ignore_index=7, old_weight=0.3, new_weight=1.5, ce_weight=0.8,
                                        reduction="none")),
    "kl-old_weight0": ("both", dict(old_weight=0.0, focus="neg_flip", class_bias="float64")),
    "lm-ref_correct-default": ("both", dict(kind="lm", alpha=0.5, beta=3.0)),
    "lm-neg_flip-new_only-bias_f16-none": ("new", dict(kind="lm", focus="neg_flip", class_bias="float16",
                                                       label_smoothing=0.2, reduction="none",
                                                       num_old_classes=K)),
    "lm-student_wrong-tau_sq-sum": ("both", dict(kind="lm", focus="student_wrong", scale_by_tau_sq=True,
                                                 reduction="sum")),
    "lm-all-old_only-weights": ("old", dict(kind="lm", focus="all", ce_weight=0.5, old_weight=0.7)),
}


def _mpt_args(seed, sources, kwargs, *, dtype=torch.float32, target_dtype=torch.int64):
    kwargs = dict(kwargs)
    ignore_index = kwargs.get("ignore_index", -100)
    z, y, old, new = make_inputs(seed, dtype=dtype, target_dtype=target_dtype, ignore_index=ignore_index)
    if isinstance(kwargs.get("class_bias"), str):
        bias_dtype = getattr(torch, kwargs["class_bias"])
        kwargs["class_bias"] = torch.randn(C, generator=generator(seed + 1), device=DEVICE).to(bias_dtype)
    if ignore_index == 7:  # rows whose target is class 7 are the ignored ones
        y[2] = 7
    old = old if sources in ("both", "old") else None
    new = new if sources in ("both", "new") else None
    return (z, y, old, new), kwargs


@pytest.mark.parametrize("upstream", ["random", "one"])
@pytest.mark.parametrize("case", list(MPT_CASES))
def test_mpt_loss_options(case, upstream):
    sources, kwargs = MPT_CASES[case]
    args, kwargs = _mpt_args(10, sources, kwargs)
    check("mpt_loss", *args, upstream=upstream, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "case, target_dtype",
    [("kl-neg_flip-tau_sq-smoothing-sum", torch.int64), ("lm-ref_correct-default", torch.int32),
     ("kl-student_wrong-class_bias-none", torch.int32)],
)
def test_mpt_loss_dtypes(case, target_dtype, dtype, reduction):
    sources, kwargs = MPT_CASES[case]
    args, kwargs = _mpt_args(20, sources, dict(kwargs, reduction=reduction), dtype=dtype, target_dtype=target_dtype)
    check("mpt_loss", *args, **kwargs)


@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        (torch.float32, dict()),
        (torch.float16, dict(class_bias="float64", reduction="none")),
        (torch.bfloat16, dict(new_class_bias=1.5, num_old_classes=K, label_smoothing=0.3, reduction="sum")),
        (torch.float32, dict(new_class_bias=-2.0, num_old_classes=C - 1, ignore_index=3)),
    ],
    ids=["plain", "bias_vector-f16", "new_class_bias-smoothing-bf16", "last_class_new-ignore3"],
)
def test_margin_cross_entropy(dtype, kwargs):
    kwargs = dict(kwargs)
    z, y, _, _ = make_inputs(30, dtype=dtype, target_dtype=torch.int32,
                             ignore_index=kwargs.get("ignore_index", -100))
    if "class_bias" in kwargs:
        kwargs["class_bias"] = torch.randn(C, generator=generator(31), device=DEVICE).to(
            getattr(torch, kwargs["class_bias"]))
    check("margin_cross_entropy", z, y, **kwargs)


@pytest.mark.parametrize("kind", ["kl", "lm"])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
def test_focal_distillation_fewer_reference_classes(focus, kind, monkeypatch):
    """K < C: the student's columns j >= K get exactly zero gradient (buffer poisoned)."""
    poison_gradient_buffer(monkeypatch)
    z, y, old, _ = make_inputs(40)
    reduction = "none" if focus in ("neg_flip", "all") else "mean"
    _, grad = check("focal_distillation", z, old, y, kind=kind, focus=focus, tau=3.0, alpha=0.5,
                    beta=4.0, scale_by_tau_sq=kind == "kl" and focus == "all", reduction=reduction)
    assert torch.equal(grad[:, K:], torch.zeros_like(grad[:, K:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_focal_distillation_full_width(dtype):
    z, y, _, new = make_inputs(41, dtype=dtype)
    check("focal_distillation", z, new, y, focus="neg_flip")


def test_focus_modes_matter():
    """The planted agreement makes the focus modes give different losses (so the tests above can fail)."""
    z, y, old, new = make_inputs(10)
    values = {
        focus: run("mpt_loss", z, y, old, new, backend="triton", focus=focus)[0].item()
        for focus in ("ref_correct", "neg_flip", "student_wrong", "all")
    }
    assert len(set(values.values())) == 4, values


# --------------------------------------------------------------------------- ignored rows, reductions
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    z, y, old, new = make_inputs(50, ignore_rows=range(N))
    for fn, args in (("mpt_loss", (z, y, old, new)), ("margin_cross_entropy", (z, y))):
        loss, grad = check(fn, *args, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(grad, torch.zeros_like(grad))


def test_ignored_rows_with_nan_upstream_gradient():
    """Ignored rows keep a zero gradient even for a NaN upstream gradient (as the reference)."""
    z, y, old, new = make_inputs(51, ignore_rows=(0, 3))
    leaf = z.clone().requires_grad_(True)
    out = mpt_kernels.mpt_loss(leaf, y, old, new, reduction="none", backend="triton")
    g = torch.full_like(out, float("nan"))
    (grad,) = torch.autograd.grad(out, leaf, g)
    assert torch.equal(grad[[0, 3]], torch.zeros_like(grad[[0, 3]]))
    assert torch.isnan(grad[[1, 2, 4, 5]]).all()


def test_empty_batch():
    z = torch.randn(0, C, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("mean", "sum"):
        out = mpt_kernels.margin_cross_entropy(z, y, reduction=reduction, backend="triton")
        assert out.shape == () and out.item() == 0.0
        (grad,) = torch.autograd.grad(out, z)
        assert grad.shape == (0, C)
    out = mpt_kernels.margin_cross_entropy(z, y, reduction="none", backend="triton")
    assert out.shape == (0,)


# --------------------------------------------------------------------------- memory and layout
def poison_gradient_buffer(monkeypatch):
    """The kernels must write every element of the gradient, and of the per-row losses,
    statistics and inverse count: start from NaN."""
    def nan_filled(logits):
        return torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    monkeypatch.setattr(TS, "_new_gradient_buffer", nan_filled)
    monkeypatch.setattr(TS, "_empty", lambda shape, device: torch.full(
        shape if isinstance(shape, tuple) else (shape,), float("nan"), device=device))


@pytest.mark.parametrize("upstream", ["one", "random"])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_poisoned_gradient_buffer(dtype, upstream, monkeypatch):
    poison_gradient_buffer(monkeypatch)
    z, y, old, new = make_inputs(60, dtype=dtype, ignore_rows=(0, 4))
    _, grad = check("mpt_loss", z, y, old, new, focus="neg_flip", upstream=upstream, reduction="none")
    assert torch.isfinite(grad).all()
    _, grad = check("margin_cross_entropy", z, y, upstream=upstream, label_smoothing=0.1)
    assert torch.isfinite(grad).all()


def test_non_contiguous_inputs(monkeypatch):
    """Row-strided views are read in place (no copy); a class axis with stride != 1 is
    copied, once: the recomputing backward (random upstream) reuses the forward's copy."""
    seen = []
    real = TS._class_axis_contiguous

    def spy(x):
        out = real(x)
        seen.append((tuple(x.stride()), out is x))
        return out

    monkeypatch.setattr(TS, "_class_axis_contiguous", spy)
    z, y, old, new = make_inputs(70)
    g = generator(71)
    wide = torch.randn(N, C + 13, generator=g, device=DEVICE)
    wide[:, 5:5 + C] = z
    old_wide = torch.randn(N, K + 9, generator=g, device=DEVICE)
    old_wide[:, 3:3 + K] = old
    old_view = old_wide[:, 3:3 + K]
    new_t = new.t().contiguous().t()  # column-major: stride (1, N)
    y_view = torch.stack([y, torch.zeros_like(y)], dim=1)[:, 0]
    bias_view = torch.randn(2 * C, generator=g, device=DEVICE)[::2]
    kwargs = dict(class_bias=bias_view, focus="neg_flip", reduction="none")

    wide_leaf = wide.clone().requires_grad_(True)
    z_view = wide_leaf[:, 5:5 + C]
    assert z_view.stride() == (C + 13, 1) and old_view.stride() == (K + 9, 1) and new_t.stride() == (1, N)
    loss = mpt_kernels.mpt_loss(z_view, y_view, old_view, new_t, backend="triton", **kwargs)
    upstream = upstream_gradient(loss, "random")
    (grad_wide,) = torch.autograd.grad(loss, wide_leaf, upstream)
    assert seen == [((C + 13, 1), True), ((K + 9, 1), True), ((1, N), False)]
    assert torch.equal(wide_leaf.detach(), wide)

    expected, expected_grad = run("mpt_loss", z, y, old, new, backend="reference", **kwargs)
    assert_close(loss.detach(), expected, z.dtype, "loss")
    assert_close(grad_wide[:, 5:5 + C], expected_grad, z.dtype, "gradient")
    assert torch.equal(grad_wide[:, :5], torch.zeros_like(grad_wide[:, :5]))
    assert torch.equal(grad_wide[:, 5 + C:], torch.zeros_like(grad_wide[:, 5 + C:]))
    check("margin_cross_entropy", z.t().contiguous().t(), y)


# --------------------------------------------------------------------------- a scaled backward rounds once
# The forward writes the gradient for an upstream gradient of 1; the backward keeps it
# where the upstream is 1 and elsewhere recomputes it with the upstream multiplied in in
# float32, so it is rounded once, like the reference's. (Rescaling the stored gradient
# rounds twice, and in float16 a p/count below the normal range loses its digits before
# GradScaler's 2^15 multiplies it.) Here the reference is autograd in float32, cast once,
# and the gradient must be that value or an adjacent number of its dtype. On smaller
# inputs than above (C = 100 still crosses four blocks), to keep the interpreter quick.
SMALL = dict(n=4, c=100, k=45)


def reference_gradient_float32(fn_name, logits, *rest, upstream, **kwargs):
    """Autograd of the reference on float32 copies of the inputs and of ``upstream``."""
    def to_float32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    leaf = logits.float().requires_grad_(True)
    out = getattr(R, fn_name)(leaf, *map(to_float32, rest), **kwargs)
    (grad,) = torch.autograd.grad(out, leaf, upstream.float())
    return grad


def triton_gradient(fn_name, logits, *rest, upstream, **kwargs):
    """The Triton backend's logits' gradient for the upstream gradient ``upstream(loss)``."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = getattr(mpt_kernels, fn_name)(leaf, *rest, backend="triton", **kwargs)
    grad_out = upstream(out)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return grad, grad_out


def large_upstream(out: torch.Tensor) -> torch.Tensor:
    """|g| in [2, 4): large enough that a gradient stored in float16 below its normal range
    and then rescaled ends up more than 1 ulp off."""
    if out.dim() == 0:
        return torch.full_like(out, 3.9)
    magnitude = 2 + 2 * torch.rand(out.shape, generator=generator(7), device=DEVICE)
    sign = 1 - 2 * (torch.arange(out.shape[0], device=DEVICE) % 2)
    return (magnitude * sign).to(out.dtype)


def test_fp16_grad_scaler_subnormal_gradient():
    """float16, "mean", upstream 2^15 (GradScaler's default scale): gradient entries whose
    value for an upstream of 1 is a float16 subnormal come out as the float32 reference
    rounded once (a rescaled stored gradient loses their digits, many of them to 0)."""
    z, y, old, new = make_inputs(150, **SMALL)
    z[:, ::3] -= 9.0      # a third of the classes gets p ~ 1e-8..1e-4
    new[:, ::3] -= 9.0    # and so does the teacher's softmax at τ = 1
    z, old, new = z.half(), old.half(), new.half()

    def scale(out):
        return torch.full_like(out, 2.0**15)

    for fn_name, rest, kwargs in [("margin_cross_entropy", (y,), {}),
                                  ("mpt_loss", (y, old, new), dict(tau=1.0, new_class_bias=0.0))]:
        grad, upstream = triton_gradient(fn_name, z, *rest, upstream=scale, **kwargs)
        expected = reference_gradient_float32(fn_name, z, *rest, upstream=upstream, **kwargs)
        # the premise: many entries of the gradient for an upstream of 1 are float16 subnormals
        unscaled = expected / 2.0**15
        assert ((unscaled != 0) & (unscaled.abs() < torch.finfo(torch.float16).tiny)).sum() > 40, fn_name
        assert_single_rounding(grad, expected, fn_name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scaled_backward_rounds_once(dtype, reduction):
    z, y, old, new = make_inputs(160, dtype=dtype, **SMALL)
    kwargs = dict(focus="neg_flip", label_smoothing=0.1, num_old_classes=SMALL["k"], reduction=reduction)
    grad, upstream = triton_gradient("mpt_loss", z, y, old, new, upstream=large_upstream, **kwargs)
    expected = reference_gradient_float32("mpt_loss", z, y, old, new, upstream=upstream, **kwargs)
    assert_single_rounding(grad, expected, f"{dtype} {reduction}")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_backward_skips_rows_whose_upstream_is_one(reduction):
    """The backward kernel writes no row whose upstream gradient is 1 (the forward's
    gradient is exact there) and no ignored row; it rewrites every element of the others."""
    z, y, old, new = make_inputs(170, dtype=torch.bfloat16, ignore_rows=(1,), **SMALL)
    kwargs = dict(focus="neg_flip", reduction=reduction)
    defaults = {name: p.default for name, p in inspect.signature(mpt_kernels.mpt_loss).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "backend"}
    args = R.mpt_loss_args(z, y, old, new, **dict(defaults, **kwargs))  # what mpt_loss hands the backend
    if reduction == "none":
        cases = [([1.0, 3.0, 0.5, -2.0], [2, 3])]  # (upstream, rows rewritten): row 1 is ignored
    else:
        cases = [(1.0, []), (-0.25, [0, 2, 3])]
    _, saved = TS._forward(args, True)
    sentinel = 1234.0
    for values, rewritten in cases:
        upstream = torch.tensor(values, dtype=z.dtype, device=DEVICE)
        saved[0].fill_(sentinel)  # poison the forward's gradient: only rewritten rows lose it
        TS._backward(upstream, saved, args)
        grad = saved[0]
        kept = [i for i in range(len(y)) if i not in rewritten]
        assert torch.equal(grad[kept], torch.full_like(grad[kept], sentinel)), values
        if rewritten:
            expected = reference_gradient_float32("mpt_loss", z, y, old, new, upstream=upstream, **kwargs)
            assert_single_rounding(grad[rewritten], expected[rewritten], f"{reduction} {values}")


def test_deterministic():
    z, y, old, new = make_inputs(80)
    first = run("mpt_loss", z, y, old, new, backend="triton", reduction="mean")
    second = run("mpt_loss", z, y, old, new, backend="triton", reduction="mean")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_no_grad_forward_matches():
    """Without autograd the kernel makes one sweep and writes no gradient."""
    z, y, old, new = make_inputs(81)
    with torch.no_grad():
        loss = mpt_kernels.mpt_loss(z, y, old, new, focus="neg_flip", backend="triton")
    expected = R.mpt_loss(z, y, old, new, focus="neg_flip")
    assert_close(loss, expected, z.dtype, "loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nothing_of_size_n_by_c_but_the_gradient(reduction):
    """The memory rule: a forward that needs the gradient allocates one N x C tensor (the
    gradient); one that does not (no_grad, or logits that need none) allocates none; the
    backward writes into the forward's buffer, also for an upstream gradient that is not 1."""
    z, y, old, new = make_inputs(83)
    options = dict(focus="neg_flip", class_bias=torch.randn(C, device=DEVICE), reduction=reduction)
    leaf = z.clone().requires_grad_(True)
    with large_allocations(z.numel()) as found:
        with torch.no_grad():
            mpt_kernels.mpt_loss(leaf, y, old, new, backend="triton", **options)
        mpt_kernels.mpt_loss(z, y, old, new, backend="triton", **options)
    assert found == []
    with large_allocations(z.numel()) as found:
        loss = mpt_kernels.mpt_loss(leaf, y, old, new, backend="triton", **options)
    assert found == [("empty", (N, C))]
    upstream = upstream_gradient(loss, "random")
    with large_allocations(z.numel()) as found:
        loss.backward(upstream)
    assert found == []


@pytest.mark.parametrize("num_classes", [150, 3000])
def test_default_blocks(num_classes):
    """The launch configuration chosen from C (one block for 150, several for 3000)."""
    assert TS.block_size_override is None
    z, y, old, new = make_inputs(82, n=3, c=num_classes, k=num_classes // 2 + 1)
    check("mpt_loss", z, y, old, new, focus="neg_flip")


# --------------------------------------------------------------------------- edge values
def test_bf16_argmax_ties():
    """Ties of the maximum go to the lowest index (torch.argmax), within and across blocks."""
    z, y, old, new = make_inputs(90, dtype=torch.bfloat16, ignore_rows=())
    top = 20.0
    # row 0: teacher tie at 5 and 40 (different blocks), target 40 -> f = 0
    # row 1: teacher tie at 5 and 40, target 5 -> f = 1
    # row 2: teacher tie at 33 and 36 (same block), target 36 -> f = 0
    # row 3: student tie at 10 and 45, target 45: student argmax 10 != y -> student wrong
    # row 4: student tie at 10 and 45, target 10 -> student right
    # row 5: teacher tie at 65 and 69 (last old block), target 65 -> f = 1
    for row, cols, target in [(0, (5, 40), 40), (1, (5, 40), 5), (2, (33, 36), 36), (5, (65, 69), 65)]:
        old[row, list(cols)] = top
        new[row, list(cols)] = top
        y[row] = target
    for row, cols, target in [(3, (10, 45), 45), (4, (10, 45), 10)]:
        z[row, list(cols)] = top
        y[row] = target
    assert (old == top).sum() == 8 and (z == top).sum() == 4
    for focus in ("ref_correct", "neg_flip", "student_wrong"):
        check("mpt_loss", z, y, old, new, focus=focus, beta=10.0, reduction="none")


def test_argmax_ties_across_old_new_split():
    """The kernel sweeps the classes < K and >= K in two loops (K = 70 inside a block):
    argmax ties that straddle K, or sit in the boundary block's new part, still go to the
    lowest index; also with one block holding the whole row (block >= C)."""
    z, y, old, new = make_inputs(91, dtype=torch.bfloat16, ignore_rows=())
    top = 20.0
    # new teacher: (60, 75) target 75 -> f = 0; (72, 100) target 72 -> f = 1;
    # (71, 74) target 74 -> f = 0 (both in the boundary block's new part)
    for row, cols, target in [(0, (60, 75), 75), (1, (72, 100), 72), (2, (71, 74), 74)]:
        new[row, list(cols)] = top
        y[row] = target
    # student: (65, 80) target 80 -> wrong for the new source; (69, 70) target 69 -> right
    for row, cols, target in [(3, (65, 80), 80), (4, (69, 70), 69), (5, (0, 149), 149)]:
        z[row, list(cols)] = top
        new[row, target] = top
        y[row] = target
    for block in (SMALL_BLOCK, 256):
        TS.block_size_override = block
        for focus in ("ref_correct", "neg_flip", "student_wrong"):
            check("mpt_loss", z, y, old, new, focus=focus, beta=10.0, reduction="none")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_masked_classes(label_smoothing):
    """-inf logits: probability 0 and a finite loss (CE without smoothing), even where a
    whole block (the row's first) is masked, and where teacher and student are both -inf."""
    z, y, old, new = make_inputs(100, ignore_rows=())
    masked = torch.zeros(N, C, dtype=torch.bool, device=DEVICE)
    masked[0, :SMALL_BLOCK] = True          # a whole first block
    masked[1, 3::7] = True                  # scattered
    masked[2, K - 5:] = True                # across the old/new boundary, to the end
    masked[:, C - 1] = True                 # the last class of every row
    y = torch.where(masked.gather(1, y[:, None]).squeeze(1), torch.full_like(y, 40), y)
    y[2] = 2
    masked[0, 40] = masked[1, 40] = False
    z = z.masked_fill(masked, float("-inf"))
    new = new.masked_fill(masked, float("-inf"))
    old = old.masked_fill(masked[:, :K], float("-inf"))
    old[3, :10] = float("-inf")             # masked in the teacher only: p = 0 there
    new[4, 50:60] = float("-inf")
    loss, grad = check("mpt_loss", z, y, old, new, label_smoothing=label_smoothing, focus="neg_flip",
                       reduction="none")
    if label_smoothing == 0.0:
        assert torch.isfinite(loss).all()
    else:  # ε/C Σ_j -log softmax_j is +inf where a class is masked: the reference agrees
        assert torch.isinf(loss).all()
    assert torch.isfinite(grad).all()
    if label_smoothing == 0.0:  # with smoothing a masked class still gets -ε/C
        assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))


def test_rows_too_long_for_32_bit_columns_are_refused():
    # an expanded row (no memory behind it) past the kernels' 32-bit column range: a clear
    # error before anything is copied or launched
    too_long = MAX_KERNEL_CLASSES + 1
    z = torch.zeros(2, 1, device=DEVICE).expand(2, too_long)
    y = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=f"triton backend takes at most {MAX_KERNEL_CLASSES} classes per row"):
        mpt_kernels.margin_cross_entropy(z, y, backend="triton")


def test_more_rows_than_a_grid_holds_are_refused():
    # one program per row: 2^31 expanded rows (no memory behind them) are a clear error,
    # not a failed launch
    z = torch.zeros(1, 1, device=DEVICE).expand(MAX_KERNEL_ROWS + 1, 1)
    y = torch.zeros(1, dtype=torch.int64, device=DEVICE).expand(MAX_KERNEL_ROWS + 1)
    with pytest.raises(ValueError, match=f"triton backend takes at most {MAX_KERNEL_ROWS} rows"):
        mpt_kernels.margin_cross_entropy(z, y, backend="triton")


def test_rows_at_the_float32_minimum_are_the_documented_limit():
    """Every case of the README's limit still differs from the reference; when a fix makes
    one agree, this fails: update the README's limit then."""
    def fn(loss_name, backend, *inputs, **options):
        return run(loss_name, *inputs, backend=backend, reduction="none", **options)

    assert rows_at_the_float32_minimum("triton", fn, DEVICE) == [
        "cross_entropy_row", "teacher_row_tau_1", "teacher_row_tau_5"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_with_finite_values(dtype):
    """Classes masked with finfo(dtype).min, and a student at -inf where the teachers are
    -1e4 (tests/softmax_edges.py): a finite loss and gradient, as the reference's."""
    z, y, old, new = masked_with_finite_values(*make_inputs(101, dtype=dtype, ignore_rows=()), width=2 * SMALL_BLOCK)
    for tau in (1.0, 5.0):
        loss, grad = check("mpt_loss", z, y, old, new, tau=tau, num_old_classes=K, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        loss, _ = check("focal_distillation", z, old, y, tau=tau, reduction="none")
        assert torch.isfinite(loss).all()
    loss, _ = check("margin_cross_entropy", z, y, reduction="none")
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_logits_keep_float32_precision(offset):
    """Logits near 1e3 or 1e4 (one offset on the student and both teachers, which no
    softmax sees) at τ = 1: loss and gradient at the usual float32 tolerance. Exponentials
    taken against a rounded LSE lost precision in proportion to |z|·log2(e)/τ (a gradient
    2.5e-4 off, relative to its largest entry, at 1e4)."""
    z, y, old, new = make_inputs(121)
    check("mpt_loss", z + offset, y, old + offset, new + offset, tau=1.0, new_class_bias=4.0, label_smoothing=0.1,
          reduction="none")
    # the cross-entropy alone, whose loss subtracted z̃_y from an LSE near 1e4 (4e-5 off)
    check("margin_cross_entropy", z + offset, y, reduction="none")


@pytest.mark.parametrize("focus", ["neg_flip", "student_wrong"])
def test_negative_logits(focus):
    """Every logit far below 0: no statistic may treat 0 as "nothing seen yet" (a max or
    a prefix max starts at -inf, in every part of a row)."""
    z, y, old, new = make_inputs(104)
    check("mpt_loss", z - 40.0, y, old - 60.0, new - 50.0, focus=focus, reduction="none")


def test_nan_propagates():
    z, y, old, new = make_inputs(110, ignore_rows=(5,))
    z[0, 100] = float("nan")        # student, in a late block
    old[2, 1] = float("nan")        # old teacher, first block
    new[3, C - 1] = float("nan")    # new teacher, last element
    loss, _ = check("mpt_loss", z, y, old, new, reduction="none")
    assert torch.isnan(loss[[0, 2, 3]]).all() and torch.isfinite(loss[[1, 4, 5]]).all()
    assert loss[5] == 0
    loss, _ = check("mpt_loss", z, y, old, new, reduction="mean")
    assert torch.isnan(loss)
    loss, _ = check("margin_cross_entropy", z, y, reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    # A NaN the loss does not read (student column >= K in focal distillation) changes nothing.
    loss, _ = check("focal_distillation", z, old, y, reduction="none")
    assert torch.isfinite(loss[[0, 1, 3, 4, 5]]).all() and torch.isnan(loss[2])
    # A NaN in an ignored row (student and both teachers) changes nothing: loss 0,
    # gradient exactly 0, as the reference's (which replaces such rows' inputs by zeros).
    z_ignored, old_ignored, new_ignored = z.clone(), old.clone(), new.clone()
    z_ignored[5, 3] = old_ignored[5, 1] = new_ignored[5, C - 1] = float("nan")
    loss, grad = check("mpt_loss", z_ignored, y, old_ignored, new_ignored, reduction="none")
    expected, _ = run("mpt_loss", z, y, old, new, backend="triton", reduction="none")
    assert loss[5] == 0 and torch.equal(grad[5], torch.zeros_like(grad[5]))
    assert torch.equal(loss.isnan(), expected.isnan())
    # A NaN at the row's very first element (the running max starts on it).
    z2 = z.clone()
    z2[1, 0] = float("nan")
    loss, _ = check("margin_cross_entropy", z2, y, reduction="none")
    assert torch.isnan(loss[1])


def test_out_of_range_target(monkeypatch):
    """The host check raises (on CPU always, on a GPU with MPT_KERNELS_SYNC_CHECKS=1);
    without it (a GPU's default) the row's loss and gradient are NaN, nothing is read
    out of bounds (2^40 would fault), and the other rows are unaffected."""
    z, y, old, new = make_inputs(120, ignore_rows=())
    bad = y.clone()
    bad[1], bad[3], bad[4] = C, 2**40, -5
    with monkeypatch.context() as mp:
        mp.setenv("MPT_KERNELS_SYNC_CHECKS", "1")
        with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, {C}\) or ignore_index "
                                             r"\(-100\); found 150"):
            mpt_kernels.mpt_loss(z, bad, old, new, backend="triton")
    with monkeypatch.context() as mp:
        mp.setattr(TS, "check_target_values", lambda *a, **k: None)
        loss, grad = run("mpt_loss", z, bad, old, new, backend="triton", reduction="none")
    assert torch.isnan(loss[[1, 3, 4]]).all() and torch.isnan(grad[[1, 3, 4]]).all()
    good = [0, 2, 5]
    expected, expected_grad = run("mpt_loss", z, y, old, new, backend="reference", reduction="none")
    assert_close(loss[good], expected[good], z.dtype, "loss")
    assert_close(grad[good], expected_grad[good], z.dtype, "gradient")


# --------------------------------------------------------------------------- compiled, not interpreted
# The interpreter accepts code that the compiler rejects: the kernels are also lowered to
# sm_90 machine code (tests/sm90_compile.py), with no spill allowed.
AOT_SCRIPT = r"""
import re
from mpt_kernels.backends import triton_softmax as TS

FLOATS = ["new_class_bias", "label_smoothing", "inv_tau", "kl_scale", "alpha", "beta",
          "ce_weight", "old_weight", "new_weight"]
ALL_ON = dict(HAS_CE=True, HAS_OLD=True, HAS_NEW=True, IS_KL=True, FOCUS_REF=True, FOCUS_STUDENT=True,
              BIAS=TS.BIAS_VECTOR, MEAN=True, WRITE_GRAD=True, CHUNKS=0)
BACKWARD_CONSTEXPRS = ("HAS_CE", "HAS_OLD", "HAS_NEW", "IS_KL", "BIAS", "BLOCK_C")
for dtype, target, changes, classes in [
    ("fp16", "i64", {}, 131072),
    ("bf16", "i64", dict(BIAS=TS.BIAS_NEW_CLASSES, CHUNKS=16), 131072),  # chunked rows
    ("bf16", "i32", dict(IS_KL=False, FOCUS_REF=False, BIAS=TS.BIAS_NEW_CLASSES, MEAN=False), 32768),
    ("fp32", "i64", dict(HAS_OLD=False, HAS_NEW=False), 131072),
    ("bf16", "i64", dict(HAS_CE=False, HAS_NEW=False, BIAS=TS.BIAS_NONE, WRITE_GRAD=False), 1000),
]:
    block, num_warps = TS._launch_config(classes, 4 if dtype == "fp32" else 2)
    # as the launcher does: the register cap only where rows are 16-byte aligned
    cap = {} if TS.MAX_REGISTERS is None or classes % 16 else {"maxnreg": TS.MAX_REGISTERS}
    types = dict(z_ptr="*" + dtype, old_ptr="*" + dtype, new_ptr="*" + dtype, grad_ptr="*" + dtype,
                 upstream_ptr="*" + dtype, target_ptr="*" + target, bias_ptr="*fp64", rows_ptr="*fp32",
                 stats_ptr="*fp32", inv_count_ptr="*fp32", sync_ptr="*i32", records_ptr="*fp32",
                 z_row_stride="i64", ignore_index="i64",
                 **{name: "fp32" for name in FLOATS})
    constexprs = dict(ALL_ON, **changes, BLOCK_C=block)
    # what the JIT specialises: fresh tensors are 16-byte aligned; a class count that is a
    # multiple of 16 makes the row strides and the split points multiples of 16 too
    aligned = [name for name in TS._mpt_loss_kernel.arg_names if name.endswith("_ptr")]
    if classes % 16 == 0:
        aligned += ["z_row_stride", "old_row_stride", "new_row_stride", "num_classes", "num_old", "num_read", "split"]
    sass = compile_kernel(TS._mpt_loss_kernel, types, constexprs, num_warps, aligned=aligned, **cap)
    if classes % 16 == 0:
        # each thread reads 16 bytes of each stream per block; only the few reads of the
        # target's logits are narrower
        narrow = re.findall(r"LDG\.E\.U16", sass)
        assert "LDG.E.128" in sass and len(narrow) <= 4, (len(narrow), sorted(set(re.findall(r"LDG\.E[.A-Z0-9]*", sass))))
    if constexprs["WRITE_GRAD"]:
        compile_kernel(TS._mpt_loss_backward_kernel, types,
                       {name: constexprs[name] for name in BACKWARD_CONSTEXPRS}, num_warps, aligned=aligned, **cap)
compile_kernel(TS._inverse_count_kernel, dict(target_ptr="*i32", out_ptr="*fp32", ignore_index="i64"),
               dict(BLOCK=1024), 4)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    run_sm90_compile(AOT_SCRIPT)


# --------------------------------------------------------------------------- GPU, realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [1000, 32768, 131072])
def test_gpu_realistic_shapes(num_classes, dtype):
    n, k = 4096, num_classes // 2 + 3
    z, y, old, new = make_inputs(130, n=n, c=num_classes, k=k, dtype=dtype, ignore_rows=(0, 7, 99))
    check("mpt_loss", z, y, old, new, focus="neg_flip", label_smoothing=0.1)
    check("mpt_loss", z, y, old, new, kind="lm", class_bias=torch.randn(num_classes, device=DEVICE),
          reduction="none")
    check("margin_cross_entropy", z, y, new_class_bias=4.0, num_old_classes=k)
    check("focal_distillation", z, old, y, focus="student_wrong", reduction="sum")


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * C > 2^31: rows beyond the int32 range are read and written where they belong."""
    n, c = 16400, 131072  # n * c = 2.15e9 > 2^31
    g = generator(140)
    z = torch.randn(n, c, generator=g, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randint(0, c, (n,), generator=g, device=DEVICE)
    leaf = z.requires_grad_(True)
    rows = mpt_kernels.margin_cross_entropy(leaf, y, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(rows.sum(), leaf)
    tail = slice(n - 8, n)
    expected, expected_grad = run("margin_cross_entropy", z[tail].detach(), y[tail], backend="reference",
                                  upstream="one", reduction="sum")
    assert_close(rows[tail].sum(), expected, torch.bfloat16, "loss")
    assert_close(grad[tail], expected_grad, torch.bfloat16, "gradient")
