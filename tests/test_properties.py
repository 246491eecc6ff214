"""Property-based tests: every available backend equals the reference on random inputs.

Hypothesis draws the structure of a case (which public function, N including 0 and 1,
C including 1, C_old from 1 to C, the logits' dtype, every option and reduction,
ignored rows, class masks of -inf or of the dtype's most negative number, exact argmax
ties, ±1e4 logits, τ from 1e-3 to 1e3, the upstream gradient; multi-label targets of
every dtype, -1 and NaN among the float negatives) and a seed for the tensor values; each backend that can run on the
test device (``registered_backends()`` filtered by ``unavailable_reason``: on a CPU,
"reference" through its custom operator and "triton" in the interpreter) must give the
loss and the gradient of the pure reference (``mpt_kernels.reference``) within the
error model below. On CPU the kernels also get small blocks (drawn) so that a few dozen
classes cross several of them. The runs are reproducible (``derandomize=True``, no
example database); a CUDA machine runs larger examples (fewer of them: each new
specialisation compiles a kernel there).

Hard decisions. The focus indicator compares *stored* values (argmax of the teacher's
and the student's logits): every backend widens them to float32 exactly, so both sides
see the same numbers and decide the same way, exact ties included (broken toward the
lowest index; the cases plant such ties on purpose). The inputs come from
``spec_gradients.focal_case``, which plants every combination of "reference right" and
"student right", so both values of f occur. The only decision made on a computed value
is SPLC's ``σ(x) > τ``; ``spec_gradients.multilabel_case`` keeps every logit at least
0.1 away from logit(τ), far beyond any rounding of σ (the ±1e4 logits are far from it
too, and τ is drawn inside [0.05, 0.95]).

Error model (tolerances). Both sides compute in float32 (float64 for float64 logits)
and round once to the logits' dtype (the kernels round a gradient scaled by an upstream
gradient other than 1 twice), so each value gets the relative tolerance ``ROUNDING`` of
its dtype (float32: 2e-5, a few dozen ulps of differently ordered arithmetic; half
types: three units of their own rounding). On top of that, float32 arithmetic on large
intermediates loses absolute accuracy: a log-sum-exp of values of size M, or the
one-sweep KL identity ``Σ p (a - c) - LSE(a) + LSE(c)`` (the kernels' KL loss), is exact
to about ``eps · M`` only, and the reference's probabilities, from ``s/τ`` rounded to
float32, have a relative error of about ``eps · M`` (the kernels' do not: they take
their exponentials from exact products, against the max). So a row's loss gets an
absolute slack of ``16 · eps · T_i`` and its gradient ``G_i · (tol + 16 · eps · M_i)``,
where M_i is the size of the row's exponent arguments (|z̃|, |s|/τ, |r|/τ, plus
log C), T_i the loss terms' weights times M_i, and G_i the size of the row's
gradient (|g_i| times the terms' weights, S/τ for KL). For ordinary inputs (|z| ≲ 10,
τ ≳ 1) this is the plain dtype tolerance; at τ = 1e-3 with logits of 1e4 (M = 1e7)
float32 keeps no correct digit of a probability near a tie, and the slack says so.
Multi-label elements are compared relative to their own size, except Hill's negative
branch ``(λ - p) p²``, whose two terms may cancel: its slack is relative to the terms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
pytest.importorskip("triton")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mpt_kernels  # noqa: E402
from mpt_kernels import reference as R  # noqa: E402
from mpt_kernels._registry import registered_backends  # noqa: E402
from mpt_kernels.backends import triton_multilabel as TM  # noqa: E402
from mpt_kernels.backends import triton_sum  # noqa: E402
from mpt_kernels.backends import triton_softmax as TS  # noqa: E402
from cuda_emulation import installed_without_gpu  # noqa: E402
from multilabel_edges import float_targets  # noqa: E402
from spec_gradients import (  # noqa: E402
    class_offsets,
    focal_case,
    multilabel_case,
    multilabel_grad,
    row_upstream,
    separated_logits,
)

# numpy (the interpreter) warns about lanes computed and then masked out (-inf - -inf).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

settings.register_profile(
    "mpt-properties-cpu", max_examples=400, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "mpt-properties-gpu", max_examples=300, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("mpt-properties-gpu" if ON_GPU else "mpt-properties-cpu")

# Shapes: small on CPU (the interpreter runs one program at a time), realistic on a GPU.
MAX_ROWS = 64 if ON_GPU else 7
MAX_CLASSES = 3000 if ON_GPU else 40

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUNDING = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3 * 2.0**-11, torch.bfloat16: 3 * 2.0**-8}
SLACK_ULPS = 16  # multiples of the compute dtype's unit roundoff per unit of M (see above)
EXTREME = 1e4


def floats32(low, high):
    """Hyper-parameters as the kernels receive them: float32 values, normal or zero. (A
    Python float below float32's normal range, e.g. 1e-51, reaches a compiled kernel as
    float32, but the Triton interpreter keeps it as a float64 constant and mixes float64
    into the kernel's arithmetic, which no GPU run does.)"""
    low32, high32 = np.float32(low), np.float32(high)
    if low32 < low:  # the nearest float32 inside [low, high]
        low32 = np.nextafter(low32, np.float32(np.inf))
    if high32 > high:
        high32 = np.nextafter(high32, np.float32(-np.inf))
    return st.floats(float(low32), float(high32), width=32, allow_subnormal=False)
SOFTMAX_FUNCTIONS = ("mpt_loss", "margin_cross_entropy", "focal_distillation")


def available_backends(family: str, dtype: torch.dtype) -> list[str]:
    return [
        b.name for b in registered_backends() if b.unavailable_reason(family, DEVICE, dtype) is None
    ]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels_emulated():
    """Without a GPU, the cuda backend's kernels run on the CPU in the CUDA emulation
    (tests/cuda_emulation), so that they are fuzzed here as well."""
    with installed_without_gpu() as emulated:
        yield emulated


def test_triton_and_reference_are_checked(cuda_kernels_emulated):
    """The properties below mean something only if the kernels are among the backends."""
    for family in ("softmax", "multilabel"):
        names = available_backends(family, torch.float32)
        assert "reference" in names and "triton" in names, names
        assert "cuda" in names or not (ON_GPU or cuda_kernels_emulated), names
        if ON_GPU and "cuda" not in names:
            pytest.skip("the cuda backend is not built here")


def compute_eps(dtype: torch.dtype) -> float:
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def subnormal_floor(dtype: torch.dtype) -> float:
    """Two steps of the dtype's subnormal grid (gradients of "mean" fall there in fp16)."""
    info = torch.finfo(dtype)
    return 2 * info.smallest_normal * info.eps


# --------------------------------------------------------------------------- comparison
def assert_matches(actual, expected, atol, dtype, what):
    """|actual - expected| <= atol + rtol |expected| elementwise (atol a tensor or a
    float), the same NaN and ±inf pattern, in the expected dtype and shape. A value that
    overflowed the dtype on one side only (both were within rounding of its largest
    finite number) counts as equal."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = ROUNDING[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    atol = torch.as_tensor(atol, dtype=torch.float64).cpu().expand(e.shape)
    if dtype != torch.float64:  # (float64's largest number has no room above it in float64)
        saturate = torch.finfo(dtype).max * (1 + rtol / 2)
        a, e = a.clamp(-saturate, saturate), e.clamp(-saturate, saturate)
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN at {a.isnan()} vs {e.isnan()}\n{a}\n{e}"
    finite = ~e.isnan()
    err = torch.where(a == e, 0.0, (a - e).abs())[finite]  # inf == inf is no error
    bound = (atol + rtol * e.abs())[finite]
    bad = err > bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements differ beyond the tolerance; "
            f"first: {a[finite][i].item()!r} vs {e[finite][i].item()!r} (bound {bound[i].item():.3g})"
        )


def finite_abs_max(x: torch.Tensor) -> torch.Tensor:
    """Row-wise max of |x| over the finite entries that are not masks (-inf, or a finite
    mask value such as finfo(dtype).min: below -1e37; probability 0, no term's size);
    0 for an empty or all-masked row."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0])
    return torch.where(torch.isfinite(x) & (x > -1e37), x.abs(), 0.0).amax(dim=1)


def upstream_gradient(out: torch.Tensor, choice, generator: torch.Generator) -> torch.Tensor:
    """A scalar from ``choice`` for a reduced loss; a random tensor (some entries exactly
    1, some 0) for "none"."""
    if out.dim() == 0:
        return torch.tensor(choice, dtype=out.dtype, device=out.device)
    g = torch.randn(out.shape, generator=generator, dtype=torch.float64) * 1.5
    special = torch.rand(out.shape, generator=generator)
    g = torch.where(special < 0.15, 1.0, torch.where(special > 0.93, 0.0, g))
    return g.to(out.dtype).to(out.device)


def loss_and_grad(call, logits, grad_output_of):
    """(loss, dL/dlogits · upstream, upstream) for ``call(leaf)`` on a fresh leaf copy."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = call(leaf)
    upstream = grad_output_of(out)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    torch.testing.assert_close(leaf.detach(), logits, rtol=0, atol=0, equal_nan=True)  # never written
    return out.detach(), grad, upstream


class SmallBlocks:
    """Shrinks the Triton blocks (CPU only) so that a few dozen classes cross several,
    and cuts the softmax family's rows into chunks of two blocks (lag 1 row), so that the
    cases with small blocks run the chunked kernel and the others one program per row."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and not ON_GPU

    def __enter__(self):
        self.saved = (TS.block_size_override, TS.chunk_classes, TS.lag_override, TM.tile_shape, triton_sum.BLOCK)
        if self.enabled:
            TS.block_size_override = 16
            TS.chunk_classes, TS.lag_override = 32, 1
            TM.tile_shape = lambda n_cols: (2, 16)
            triton_sum.BLOCK = 4
        return self

    def __exit__(self, *exc):
        TS.block_size_override, TS.chunk_classes, TS.lag_override, TM.tile_shape, triton_sum.BLOCK = self.saved
        return False


# --------------------------------------------------------------------------- softmax family
# Two thirds of the cases have several rows and classes, one third the degenerate ends.
ROWS = st.one_of(st.integers(2, MAX_ROWS), st.integers(2, MAX_ROWS), st.sampled_from([0, 1]))
CLASSES = st.one_of(st.integers(3, MAX_CLASSES), st.integers(3, MAX_CLASSES), st.sampled_from([1, 2]))
EXTREME_FRACTIONS = st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.3])  # of the entries set to ±1e4
TAUS = st.one_of(
    st.sampled_from([1e-3, 1e3, 1.0, 5.0]),
    floats32(-3.0, 3.0).map(lambda e: float(10.0**e)),
)
# Nonzero weights stay >= 1e-3: a weight or ε that a float32 kernel argument rounds to 0
# is not a case worth a tolerance of its own.
WEIGHTS = st.one_of(st.sampled_from([0.0, 1.0]), floats32(1e-3, 2.0))


@st.composite
def softmax_cases(draw):
    fn = draw(st.sampled_from(SOFTMAX_FUNCTIONS))
    n = draw(ROWS)
    c = draw(CLASSES)
    k = draw(st.one_of(st.just(c), st.integers(1, c)))  # C_old (the reference's width for fd)
    case = dict(
        fn=fn, n=n, c=c, k=k,
        dtype=draw(st.sampled_from(LOGIT_DTYPES)),
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        seed=draw(st.integers(0, 2**31 - 1)),
        ignore_index=draw(st.sampled_from([-100, -1, 0])),
        ignored_rows=draw(st.sampled_from(["some", "none", "some", "all"])),
        extreme_fraction=draw(EXTREME_FRACTIONS),
        ties=draw(st.booleans()),
        mask_fraction=draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])),
        mask_value=draw(st.sampled_from(["-inf", "-inf", "dtype_min"])),
        small_blocks=draw(st.booleans()),
        upstream=draw(st.sampled_from([1.0, 0.37, -2.5, 1e-3])),
    )
    options = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])), ignore_index=case["ignore_index"])
    sources = set()
    if fn != "margin_cross_entropy":
        options.update(
            kind=draw(st.sampled_from(["kl", "lm"])),
            tau=draw(TAUS),
            alpha=draw(WEIGHTS),
            beta=draw(st.one_of(st.sampled_from([0.0, 5.0]), floats32(1e-3, 10.0))),
            focus=draw(st.sampled_from(["ref_correct", "neg_flip", "student_wrong", "all"])),
            scale_by_tau_sq=draw(st.booleans()),
        )
    if fn == "focal_distillation":
        sources = {"old"}
    else:
        options["label_smoothing"] = draw(st.one_of(st.sampled_from([0.0, 1.0]), floats32(1e-3, 1.0)))
        if fn == "mpt_loss":
            sources = draw(st.sampled_from([{"old", "new"}, {"old"}, {"new"}, set()]))
            options.update(ce_weight=draw(WEIGHTS),
                           old_weight=draw(st.one_of(st.none(), WEIGHTS)),
                           new_weight=draw(st.one_of(st.none(), WEIGHTS)))
        choices = ["none", "new_classes", "vector"] + (["default"] if "old" in sources else [])
        bias = draw(st.sampled_from(choices))  # "default": mpt_loss's b = 4 on the classes >= C_old
        if bias == "new_classes":
            options.update(new_class_bias=draw(floats32(-5.0, 5.0)), num_old_classes=k)
        elif bias == "vector":
            case["bias_dtype"] = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
        elif bias == "none" and fn == "mpt_loss":
            options["new_class_bias"] = 0.0  # mpt_loss's default b = 4 needs to know the old classes
    case["sources"] = sources
    return case, options


def plant_ties(x: torch.Tensor, cols: int, generator: torch.Generator) -> None:
    """In about half the rows, copy the row's maximum (over its first ``cols`` columns)
    to another column: an exact tie that argmax breaks toward the lower index."""
    n = x.shape[0]
    if cols < 2 or n == 0:
        return
    rows = (torch.rand(n, generator=generator) < 0.5).nonzero().flatten()
    for i in rows.tolist():
        j = int(torch.randint(0, cols, (1,), generator=generator))
        x[i, j] = x[i, :cols].max()


def build_softmax_inputs(case, options):
    """(logits, target, old (n, k) or None, new (n, c) or None, class_bias or None) on DEVICE."""
    n, c, k, dtype = case["n"], case["c"], case["k"], case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    ignore_index = case["ignore_index"]
    if k >= 2:
        z, y, old, new = focal_case(n, c, k, g, ignore_index=ignore_index, ignored=case["ignored_rows"] == "some")
    else:  # one reference class: nothing to plant, its argmax is always class 0
        z, old, new = separated_logits(n, c, g), separated_logits(n, k, g), separated_logits(n, c, g)
        y = torch.randint(0, c, (n,), generator=g)
        if case["ignored_rows"] == "some":
            y[4::5] = ignore_index
    if case["ignored_rows"] == "all":
        y[:] = ignore_index
    for x in (z, old, new):
        if case["extreme_fraction"] > 0:
            hit = torch.rand(x.shape, generator=g) < case["extreme_fraction"]
            sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
            x.copy_(torch.where(hit, EXTREME * sign, x))
    if case["ties"]:
        plant_ties(z, k, g)
        plant_ties(old, k, g)
        plant_ties(new, c, g)
    lm_terms = options.get("kind") == "lm" and case["sources"]
    if case["mask_fraction"] > 0 and not lm_terms:
        # -inf, or the dtype's most negative number (times log2(e)/τ it overflows float32),
        # on classes other than the target and class 0 (a row keeps a finite teacher
        # class), the same classes in every model: probability 0 everywhere, finite KL
        masked = torch.rand(n, c, generator=g) < case["mask_fraction"]
        masked[:, 0] = False
        valid = (y >= 0) & (y < c)
        masked[valid.nonzero().flatten(), y[valid]] = False
        value = torch.finfo(dtype).min if case.get("mask_value") == "dtype_min" else -math.inf
        z = z.masked_fill(masked, value)
        new = new.masked_fill(masked, value)
        old = old.masked_fill(masked[:, :k], value)
    bias = None
    if "bias_dtype" in case:
        bias = (torch.randn(c, generator=g, dtype=torch.float64) * 2).to(case["bias_dtype"]).to(DEVICE)
    to = lambda x: x.to(dtype).to(DEVICE)  # noqa: E731
    return (to(z), y.to(case["target_dtype"]).to(DEVICE),
            to(old) if "old" in case["sources"] else None,
            to(new) if "new" in case["sources"] else None, bias)


def softmax_call(fn, target, old, new, bias, options, backend):
    """call(leaf) -> loss, through the public function (or the pure reference: backend None)."""
    namespace = R if backend is None else mpt_kernels
    kwargs = dict(options)
    if bias is not None:
        kwargs["class_bias"] = bias
    if backend is not None:
        kwargs["backend"] = backend
    if fn == "mpt_loss":
        return lambda z: namespace.mpt_loss(z, target, old, new, **kwargs)
    if fn == "margin_cross_entropy":
        return lambda z: namespace.margin_cross_entropy(z, target, **kwargs)
    return lambda z: namespace.focal_distillation(z, old, target, **kwargs)


def softmax_args(fn, z, target, old, new, bias, options):
    """The normalised arguments record (weights, bias, C_old) of the call."""
    kwargs = dict(options)
    if bias is not None:
        kwargs["class_bias"] = bias
    if fn == "mpt_loss":
        defaults = dict(new_class_bias=4.0, num_old_classes=None, class_bias=None, kind="kl", tau=5.0,
                        alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False, ce_weight=1.0,
                        old_weight=None, new_weight=None, label_smoothing=0.0, ignore_index=-100,
                        reduction="mean")
        return R.mpt_loss_args(z, target, old, new, **{**defaults, **kwargs})
    if fn == "margin_cross_entropy":
        defaults = dict(class_bias=None, num_old_classes=None, new_class_bias=0.0, label_smoothing=0.0,
                        ignore_index=-100, reduction="mean")
        return R.margin_cross_entropy_args(z, target, **{**defaults, **kwargs})
    defaults = dict(kind="kl", tau=5.0, alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False,
                    ignore_index=-100, reduction="mean")
    return R.focal_distillation_args(z, old, target, **{**defaults, **kwargs})


def softmax_error_scales(args):
    """Per row (float64, on CPU): T (loss slack per unit roundoff), G (gradient size per
    unit upstream gradient) and M (size of the exponent arguments); see the module doc."""
    z = args.logits.detach().double().cpu()
    n, c = z.shape
    T, G, M = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    if args.ce_weight != 0.0:
        m = finite_abs_max(z + class_offsets(args, torch.float64).cpu()) + math.log(c) + 1
        T += args.ce_weight * m
        G += args.ce_weight
        M = torch.maximum(M, m)
    for teacher, weight in ((args.old_logits, args.old_weight), (args.new_logits, args.new_weight)):
        if teacher is None or weight == 0.0:
            continue
        r = teacher.detach().double().cpu()
        k = r.shape[1]
        s = z[:, :k]
        focal = weight * (args.alpha + args.beta)
        if args.kind == "kl":
            scale = args.tau**2 if args.scale_by_tau_sq else 1.0
            m = (finite_abs_max(s) + finite_abs_max(r)) / args.tau + math.log(k) + 1
            T += focal * scale * m
            G += focal * scale / args.tau
            M = torch.maximum(M, m)
        else:  # a sum of squares: no cancellation in the loss; ∂ = (s - r)/K
            G += focal * finite_abs_max(s - r) / k
    return T, G, M


def softmax_tolerances(args, upstream):
    """(absolute slack of the loss, of the gradient) for the call's upstream gradient."""
    dtype = args.logits.dtype
    eps, tol = compute_eps(dtype), ROUNDING[dtype]
    T, G, M = softmax_error_scales(args)
    counted = (args.target != args.ignore_index).cpu()
    row_slack = torch.where(counted, SLACK_ULPS * eps * T, 0.0)
    if args.reduction == "none":
        loss_slack = row_slack
    else:
        loss_slack = row_slack.sum() / (max(int(counted.sum()), 1) if args.reduction == "mean" else 1)
    g = row_upstream(args, upstream).double().abs().cpu()
    grad_slack = (g * G * (tol + SLACK_ULPS * eps * M))[:, None] + subnormal_floor(dtype)
    return loss_slack + subnormal_floor(dtype), grad_slack


@PROFILE
@given(softmax_cases())
@example(  # N = 0: a mean over nothing is 0 with an empty gradient
    (dict(fn="mpt_loss", n=0, c=5, k=3, dtype=torch.float32, target_dtype=torch.int64, seed=0,
          ignore_index=-100, ignored_rows="none", extreme_fraction=0.0, ties=False, mask_fraction=0.0,
          small_blocks=False, upstream=0.37, sources={"old", "new"}),
     dict(reduction="mean", ignore_index=-100, kind="kl", tau=5.0, alpha=1.0, beta=5.0, focus="neg_flip",
          scale_by_tau_sq=False, label_smoothing=0.1, ce_weight=1.0, old_weight=None, new_weight=None))
)
@example(  # C = 1 = C_old: the CE and the KL of one class are 0, LM is not
    (dict(fn="mpt_loss", n=3, c=1, k=1, dtype=torch.bfloat16, target_dtype=torch.int32, seed=1,
          ignore_index=-100, ignored_rows="some", extreme_fraction=0.0, ties=False, mask_fraction=0.0,
          small_blocks=True, upstream=-2.5, sources={"old", "new"}),
     dict(reduction="none", ignore_index=-100, kind="lm", tau=2.0, alpha=0.5, beta=2.0, focus="all",
          scale_by_tau_sq=True, label_smoothing=0.3, ce_weight=1.0, old_weight=None, new_weight=1.0,
          new_class_bias=0.0))
)
@example(  # tiny τ with extreme logits and masks, every focus decision planted
    (dict(fn="focal_distillation", n=6, c=37, k=20, dtype=torch.float32, target_dtype=torch.int64, seed=2,
          ignore_index=-1, ignored_rows="some", extreme_fraction=0.3, ties=True, mask_fraction=0.2,
          small_blocks=True, upstream=0.37, sources={"old"}),
     dict(reduction="sum", ignore_index=-1, kind="kl", tau=1e-3, alpha=1.0, beta=5.0, focus="neg_flip",
          scale_by_tau_sq=False))
)
@example(  # masks of the dtype's most negative number at τ = 1, both sources
    (dict(fn="mpt_loss", n=5, c=40, k=25, dtype=torch.bfloat16, target_dtype=torch.int64, seed=3,
          ignore_index=-100, ignored_rows="some", extreme_fraction=0.0, ties=False, mask_fraction=0.6,
          mask_value="dtype_min", small_blocks=True, upstream=0.37, sources={"old", "new"}),
     dict(reduction="none", ignore_index=-100, kind="kl", tau=1.0, alpha=1.0, beta=5.0, focus="neg_flip",
          scale_by_tau_sq=False, label_smoothing=0.0, ce_weight=1.0, old_weight=None, new_weight=None))
)
def test_softmax_family_matches_reference(case_and_options):
    case, options = case_and_options
    z, target, old, new, bias = build_softmax_inputs(case, options)
    args = softmax_args(case["fn"], z, target, old, new, bias, options)
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    upstreams = {}

    def grad_output_of(out):  # the same upstream gradient for every backend
        if "g" not in upstreams:
            upstreams["g"] = upstream_gradient(out, case["upstream"], gen)
        return upstreams["g"]

    expected, expected_grad, upstream = loss_and_grad(
        softmax_call(case["fn"], target, old, new, bias, options, None), z, grad_output_of)
    assert not expected.isnan().any(), "the inputs were built to give no NaN"
    loss_slack, grad_slack = softmax_tolerances(args, upstream)
    backends = available_backends("softmax", dtype)
    assert "reference" in backends
    for backend in backends:
        with SmallBlocks(case["small_blocks"]):
            loss, grad, _ = loss_and_grad(
                softmax_call(case["fn"], target, old, new, bias, options, backend), z, grad_output_of)
        assert_matches(loss, expected, loss_slack, dtype, f"{backend} loss")
        assert_matches(grad, expected_grad, grad_slack, dtype, f"{backend} gradient")
        # ignored rows: exactly zero loss and gradient
        ignored = (target == case["ignore_index"])
        if case["n"] and ignored.any():
            assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored])), backend
            if options["reduction"] == "none":
                assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored])), backend


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("sources", ["both", "none"])
@pytest.mark.parametrize(
    "backend", [pytest.param(None, id="pure_reference"), "reference", "triton", "cuda", "auto"])
def test_all_terms_switched_off(backend, sources, n):
    """mpt_loss with every weight 0 is a loss of 0 whose gradient is 0, on every backend."""
    if backend is not None and backend != "auto" and backend not in available_backends("softmax", torch.float32):
        pytest.skip(f"{backend} cannot run here")
    g = torch.Generator().manual_seed(5)
    z = torch.randn(n, 6, generator=g).to(DEVICE)
    y = torch.randint(0, 6, (n,), generator=g).to(DEVICE)
    old, new = (z[:, :4] + 1, z - 1) if sources == "both" else (None, None)
    namespace = R if backend is None else mpt_kernels
    kwargs = {} if backend is None else {"backend": backend}
    leaf = z.clone().requires_grad_(True)
    loss = namespace.mpt_loss(leaf, y, old, new, ce_weight=0.0, old_weight=0.0, new_weight=0.0,
                              new_class_bias=0.0, **kwargs)
    loss.backward(torch.tensor(0.5, device=DEVICE))
    assert loss.item() == 0.0
    assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(z))


# --------------------------------------------------------------------------- multi-label
@st.composite
def multilabel_cases(draw):
    loss = draw(st.sampled_from(["hill", "splc"]))
    case = dict(
        loss=loss,
        n=draw(ROWS),
        c=draw(CLASSES),
        dtype=draw(st.sampled_from(LOGIT_DTYPES)),
        target_dtype=draw(st.sampled_from([torch.bool, torch.uint8, torch.float16, torch.bfloat16,
                                           torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
        extreme_fraction=draw(EXTREME_FRACTIONS),
        small_blocks=draw(st.booleans()),
        upstream=draw(st.sampled_from([1.0, 0.37, -2.5, 1e-3])),
    )
    options = dict(reduction=draw(st.sampled_from(["sum", "mean", "none"])),
                   margin=draw(st.one_of(st.just(1.0), floats32(-2.0, 2.0))),
                   gamma=draw(st.one_of(st.sampled_from([0.0, 2.0]), floats32(0.0, 4.0))))
    if loss == "hill":
        options["lamb"] = draw(st.one_of(st.just(1.5), floats32(0.0, 3.0)))
    else:
        options.update(tau=draw(st.one_of(st.sampled_from([0.5, 0.6]), floats32(0.05, 0.95))),
                       change_epoch=draw(st.integers(0, 3)), epoch=draw(st.integers(-1, 5)))
    return case, options


def build_multilabel_inputs(case, options):
    g = torch.Generator().manual_seed(case["seed"])
    x, positive = multilabel_case(case["n"], case["c"], g, tau=options.get("tau", 0.6))
    if case["extreme_fraction"] > 0:
        hit = torch.rand(x.shape, generator=g) < case["extreme_fraction"]
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
        x = torch.where(hit, EXTREME * sign, x)
    # targets of every accepted dtype, > 0.5 exactly where positive (0.5, -1 and NaN are negatives)
    t = case["target_dtype"]
    if t == torch.bool:
        targets = positive
    elif t == torch.uint8:
        targets = positive.to(torch.uint8) * torch.randint(1, 3, positive.shape, generator=g, dtype=torch.uint8)
    else:
        targets = float_targets(positive, t, g)
    return x.to(case["dtype"]).to(DEVICE), targets.to(DEVICE)


def multilabel_scales(x, targets, loss, options):
    """Per element (float64, CPU): the size of the loss and of its derivative (the values
    themselves; for Hill's negatives the size of the terms that may cancel), and an
    absolute slack for the derivative. The latter covers the reference: autograd of
    ``σ(x)`` forms ``1 - σ(x)`` in float32, so its Hill-negative derivative
    ``(2λp - 3p²) p (1 - p)`` is exact to ``eps · (2λp + 3p²) p`` absolutely, not
    relatively (the kernels use σ(-x) and are better there)."""
    from mpt_kernels._validation import check_hill, check_splc

    x64 = x.detach().double().cpu()
    t = targets.cpu()
    opts = {k: v for k, v in options.items() if k != "reduction"}
    check = check_hill if loss == "hill" else check_splc
    args = check(x64, t, reduction="none", **opts)
    value = R.multilabel_elements(args).abs()
    slope = multilabel_grad(args).abs()
    slope_slack = torch.zeros_like(slope)
    if loss == "hill":
        negative = ~(t > 0.5)
        p = torch.sigmoid(x64)
        lamb = abs(options["lamb"])
        terms = (2 * lamb * p + 3 * p * p) * p
        value = torch.where(negative, (lamb + p) * p * p, value)
        slope = torch.where(negative, terms * torch.sigmoid(-x64), slope)
        slope_slack = torch.where(negative, SLACK_ULPS * compute_eps(x.dtype) * terms, 0.0)
    return value, slope, slope_slack


@PROFILE
@given(multilabel_cases())
@example(  # N = 0
    (dict(loss="hill", n=0, c=5, dtype=torch.float32, target_dtype=torch.bool, seed=0, extreme_fraction=0.0,
          small_blocks=True, upstream=0.37), dict(reduction="mean", margin=1.0, gamma=2.0, lamb=1.5)))
@example(  # C = 1, extreme logits, SPLC correcting from epoch 0
    (dict(loss="splc", n=5, c=1, dtype=torch.float16, target_dtype=torch.float32, seed=3, extreme_fraction=0.3,
          small_blocks=True, upstream=-2.5),
     dict(reduction="none", margin=0.5, gamma=3.0, tau=0.3, change_epoch=0, epoch=0)))
def test_multilabel_matches_reference(case_and_options):
    case, options = case_and_options
    x, targets = build_multilabel_inputs(case, options)
    dtype, loss = case["dtype"], case["loss"]
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    upstreams = {}

    def grad_output_of(out):
        if "g" not in upstreams:
            upstreams["g"] = upstream_gradient(out, case["upstream"], gen)
        return upstreams["g"]

    def call(backend):
        fn = getattr(R if backend is None else mpt_kernels, f"{loss}_loss")
        kwargs = dict(options) if backend is None else dict(options, backend=backend)
        return lambda leaf: fn(leaf, targets, **kwargs)

    expected, expected_grad, upstream = loss_and_grad(call(None), x, grad_output_of)
    assert not expected.isnan().any()
    tol, floor = ROUNDING[dtype], subnormal_floor(dtype)
    value, slope, slope_slack = multilabel_scales(x, targets, loss, options)
    numel = max(x.numel(), 1)
    reduction = options["reduction"]
    if reduction == "none":
        loss_slack = tol * value + floor
        grad_slack = (tol * slope + slope_slack) * upstream.double().abs().cpu() + floor
    else:
        per_unit = 1.0 / numel if reduction == "mean" else 1.0
        loss_slack = tol * value.sum() * per_unit + floor
        grad_slack = (tol * slope + slope_slack) * abs(float(upstream)) * per_unit + floor
    backends = available_backends("multilabel", dtype)
    assert "reference" in backends
    for backend in backends:
        with SmallBlocks(case["small_blocks"]):
            out, grad, _ = loss_and_grad(call(backend), x, grad_output_of)
        assert_matches(out, expected, loss_slack, dtype, f"{backend} loss")
        assert_matches(grad, expected_grad, grad_slack, dtype, f"{backend} gradient")
