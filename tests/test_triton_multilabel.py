"""The Triton kernels of the multi-label losses (Hill, SPLC) against the reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on
small inputs with the blocks shrunk (fixture ``small_blocks``) so that an (N, C) input
that is not a multiple of the tile crosses several tiles in both directions, and the
partial-sum and scaling kernels loop more than once. Tests marked ``gpu`` run the real
launch configuration at realistic sizes.

Tolerances, per logits dtype (``TOLERANCE``): the kernels and the reference both compute
in float32 and round the result once to the logits' dtype, whatever the upstream gradient
(``test_single_rounding`` checks the one rounding to within one unit). So float32
gets 1e-5 relative (a few float32 ulps of differently ordered arithmetic), float16 and
bfloat16 two units in the last place of their own format (2^-9, 2^-7 relative); an
absolute slack of 1e-5 of the largest expected magnitude covers elements that cancel to
near zero (Hill's 2λp - 3p²), and two subnormal steps the gradients of "mean" that fall
below float16's normal range.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

pytest.importorskip("triton")


import mpt_kernels  # noqa: E402
from mpt_kernels import reference as R  # noqa: E402
from mpt_kernels._validation import check_hill, check_splc, splc_flip_logit  # noqa: E402
from mpt_kernels.backends import triton_multilabel as TM  # noqa: E402
from mpt_kernels.backends import triton_sum  # noqa: E402
from allocations import large_allocations  # noqa: E402
from sm90_compile import run_sm90_compile  # noqa: E402
from multilabel_edges import (  # noqa: E402
    float_targets, infinite_logits, splc_negative_losses, splc_threshold_cases,
)
from spec_gradients import away_from_splc_threshold  # noqa: E402

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
ABSOLUTE_SLACK = 1e-5
LOSSES = ("hill", "splc")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Not a multiple of the small test tile (2 x 16) in either direction: 3 x 3 tiles.
N, C = 5, 37


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Tiny tiles and flat blocks under the interpreter (not for the GPU tests)."""
    if request.node.get_closest_marker("gpu") is None and "default_blocks" not in request.node.name:
        monkeypatch.setattr(TM, "tile_shape", lambda n_cols: (2, 16))
        monkeypatch.setattr(triton_sum, "BLOCK", 4)


# --------------------------------------------------------------------------- helpers
def generator(seed: int, device=DEVICE) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def as_targets(positive: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Targets of ``dtype`` that are > 0.5 exactly where ``positive``: 0/1 for bool, 0/1/2
    for uint8, for floats soft values on both sides of 0.5 and -1 and NaN among the
    negatives (multilabel_edges.float_targets)."""
    if dtype == torch.bool:
        return positive
    if dtype == torch.uint8:
        pick = torch.randint(0, 3, positive.shape, generator=gen, device=positive.device)
        return (positive.to(torch.uint8) * (1 + (pick > 0).to(torch.uint8)))
    return float_targets(positive, dtype, gen)


def make_inputs(seed: int, dtype=torch.float32, target_dtype=torch.bool, *, n=N, c=C, tau=0.6):
    """Logits ~ 2·N(0, 1), never zero, kept 0.1 away from logit(τ) so that no rounding
    moves a negative across SPLC's threshold; about 40% positives."""
    gen = generator(seed)
    x = away_from_splc_threshold(torch.randn(n, c, generator=gen, device=DEVICE) * 2, tau)
    positive = torch.rand(n, c, generator=gen, device=DEVICE) < 0.4
    return x.to(dtype), as_targets(positive, target_dtype, gen)


def make_upstream(reduction: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    if reduction == "none":
        return (torch.randn(x.shape, generator=generator(seed, x.device), device=x.device) * 2).to(x.dtype)
    return torch.tensor(0.37, dtype=x.dtype, device=x.device)


def loss_and_grad(backend: str, name: str, x, t, upstream, **options):
    """The loss and dL/dx · upstream, through the public API (or the reference)."""
    x = x.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss = getattr(R, f"{name}_loss")(x, t, **options)
    else:
        loss = getattr(mpt_kernels, f"{name}_loss")(x, t, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().nan_to_num(posinf=0.0).max().item() if expected.numel() else 0.0
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # float16: 6e-8
    atol = max(ABSOLUTE_SLACK * scale, 2 * subnormal_step)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOLERANCE[dtype], atol=atol, equal_nan=True)


def check_against_reference(name, x, t, *, reduction, upstream, **options):
    """Runs both backends; asserts the loss and gradient agree; returns Triton's."""
    options = dict(options, reduction=reduction)
    loss, grad = loss_and_grad("triton", name, x, t, upstream, **options)
    ref_loss, ref_grad = loss_and_grad("reference", name, x, t, upstream, **options)
    assert_matches(loss, ref_loss, x.dtype)
    assert_matches(grad, ref_grad, x.dtype)
    return loss, grad


def default_options(name: str) -> dict:
    return {"epoch": 1} if name == "splc" else {}


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_matches_reference(name, dtype, reduction):
    # upstream gradient != 1: a scalar 0.37, or a random (N, C) tensor for "none"
    x, t = make_inputs(1, dtype)
    check_against_reference(
        name, x, t, reduction=reduction, upstream=make_upstream(reduction, x, 2), **default_options(name)
    )


@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("name", LOSSES)
def test_backward_of_one(name, reduction):
    # loss.backward(): the upstream scalar is 1, the backward kernel returns at once
    x, t = make_inputs(3)
    loss, grad = check_against_reference(
        name, x, t, reduction=reduction, upstream=torch.tensor(1.0, device=DEVICE), **default_options(name)
    )
    leaf = x.clone().requires_grad_(True)
    getattr(mpt_kernels, f"{name}_loss")(leaf, t, reduction=reduction, backend="triton", **default_options(name)).backward()
    assert torch.equal(leaf.grad, grad)


def units_in_last_place(value: torch.Tensor) -> torch.Tensor:
    """The spacing of ``value``'s dtype at each |value| (subnormal spacing near 0), in float32."""
    magnitude = value.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)).float() - magnitude.float())


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_single_rounding(name, dtype, reduction):
    # dℓ/dx · g (/ N·C) is computed in float32 and rounded once into the dtype, as the
    # reference does: within one unit of its result (float32 arithmetic in another order
    # may land on the other side of a rounding boundary), never the up-to-1.5 units of
    # rounding dℓ/dx first and the product again
    x, t = make_inputs(41, dtype, n=12)
    upstream = make_upstream(reduction, x, 42)
    _, grad = loss_and_grad("triton", name, x, t, upstream, reduction=reduction, **default_options(name))
    _, expected = loss_and_grad("reference", name, x, t, upstream, reduction=reduction, **default_options(name))
    assert grad.dtype == dtype and (expected != 0).float().mean() > 0.9  # not underflowed to 0
    error = (grad.float() - expected.float()).abs()
    assert bool((error <= units_in_last_place(expected)).all()), error.max()


@pytest.mark.parametrize("name", LOSSES)
def test_float16_mean_with_loss_scale(name):
    # The float16 AMP recipe: "mean" over N·C elements, the loss scaled by 2^15
    # (GradScaler). dℓ/dx / (N·C) lies below float16's normal range for half the elements, so
    # a gradient stored for g = 1 and then multiplied by 2^15 would have lost most of its
    # bits to the subnormal spacing (6e-8 · 2^15 = 2e-3 absolute); recomputed with g it
    # equals the reference (float32 throughout, rounded once) to float16 tolerance.
    x, t = make_inputs(43, torch.float16, n=64)
    scale = torch.tensor(2.0**15, dtype=torch.float16, device=DEVICE)
    _, exact = loss_and_grad("reference", name, x.float(), t, torch.tensor(1.0, device=DEVICE),
                             reduction="mean", **default_options(name))
    below_normal = exact.abs() < torch.finfo(torch.float16).smallest_normal
    assert below_normal.float().mean() > 0.25  # the case this test is about
    _, grad = check_against_reference(name, x, t, reduction="mean", upstream=scale, **default_options(name))
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("name", LOSSES)
def test_backward_of_one_writes_nothing(name, reduction, dtype):
    # The forward's gradient (for g = 1), overwritten with NaN before the backward: the
    # backward kernel with g = 1 leaves it as it is, with any other g (NaN included) it
    # rewrites every element.
    x, t = make_inputs(44, dtype)
    if name == "hill":
        args = check_hill(x, t, lamb=1.5, margin=1.0, gamma=2.0, reduction=reduction)
    else:
        args = check_splc(x, t, epoch=1, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction=reduction)
    _, (forward_grad,) = TM._forward(args, True)
    _, expected = loss_and_grad("reference", name, x, t, torch.tensor(1.0, device=DEVICE),
                                reduction=reduction, **default_options(name))
    assert_matches(forward_grad, expected, dtype)

    forward_grad.fill_(float("nan"))
    assert TM._backward(torch.tensor(1.0, dtype=dtype, device=DEVICE), [forward_grad], args) is None
    assert bool(forward_grad.isnan().all())

    upstream = torch.tensor(0.37, dtype=dtype, device=DEVICE)
    TM._backward(upstream, [forward_grad], args)
    _, expected = loss_and_grad("reference", name, x, t, upstream, reduction=reduction, **default_options(name))
    assert_matches(forward_grad, expected, dtype)

    TM._backward(torch.tensor(float("nan"), dtype=dtype, device=DEVICE), [forward_grad], args)
    assert bool(forward_grad.isnan().all())


HILL_PARAMS = [
    {"lamb": 2.5, "margin": 0.5, "gamma": 1.5},
    {"lamb": 0.9, "margin": -0.3, "gamma": 0.0},
    {"lamb": 1.0, "margin": 2.0, "gamma": 3.7},
]
SPLC_PARAMS = [
    {"tau": 0.3, "margin": 0.5, "gamma": 1.5, "change_epoch": 0, "epoch": 0},
    {"tau": 0.9, "margin": 0.0, "gamma": 0.0, "change_epoch": 1, "epoch": 4},
    {"tau": 0.75, "margin": 2.0, "gamma": 3.7, "change_epoch": 5, "epoch": 9},
]


@pytest.mark.parametrize("reduction", ("sum", "none"))
@pytest.mark.parametrize(
    "name, options", [("hill", p) for p in HILL_PARAMS] + [("splc", p) for p in SPLC_PARAMS]
)
def test_parameters(name, options, reduction):
    x, t = make_inputs(4, tau=options.get("tau", 0.6))
    loss, _ = check_against_reference(name, x, t, reduction=reduction, upstream=make_upstream(reduction, x, 5), **options)
    # the parameters reach the kernel: the defaults give another loss
    default_loss = getattr(mpt_kernels, f"{name}_loss")(x, t, reduction=reduction, backend="triton", **default_options(name))
    assert not torch.equal(loss, default_loss)


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_target_dtypes(name, target_dtype):
    x, t = make_inputs(6, target_dtype=target_dtype)
    loss, _ = check_against_reference(name, x, t, reduction="none", upstream=make_upstream("none", x, 7), **default_options(name))
    # the same labels as bool targets give the same loss
    same = getattr(mpt_kernels, f"{name}_loss")(x, t > 0.5, reduction="none", backend="triton", **default_options(name))
    assert torch.equal(loss, same)


@pytest.mark.parametrize("reduction", ("sum", "none"))
def test_splc_change_epoch(reduction):
    options = {"tau": 0.6, "change_epoch": 3, "margin": 1.0, "gamma": 2.0}
    x, t = make_inputs(8)
    upstream = make_upstream(reduction, x, 9)
    losses = {
        epoch: check_against_reference("splc", x, t, reduction=reduction, upstream=upstream, epoch=epoch, **options)[0]
        for epoch in (0, 2, 3, 7)
    }
    # no correction before change_epoch, the same correction on every epoch from then on
    assert torch.equal(losses[0], losses[2]) and torch.equal(losses[3], losses[7])
    assert not torch.equal(losses[2], losses[3])


def test_splc_threshold_is_strict():
    # σ(0) = 0.5 exactly: with τ = 0.5 a negative at x = 0 is not corrected (σ(x') > τ)
    x = torch.tensor([[0.0, 1e-3, -1e-3, 0.0]], device=DEVICE).repeat(3, 1)
    t = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    t[:, 3] = True
    loss, _ = check_against_reference(
        "splc", x, t, reduction="none", upstream=make_upstream("none", x, 40), epoch=1, tau=0.5
    )
    corrected = -torch.nn.functional.logsigmoid(torch.tensor(1e-3)) * torch.sigmoid(torch.tensor(-1e-3)) ** 2
    uncorrected = -(0.5**2) * math.log(0.5)
    torch.testing.assert_close(loss[0, :2].cpu(), torch.tensor([uncorrected, corrected.item()]))


@pytest.mark.parametrize("tau, x", splc_threshold_cases(), ids=lambda v: f"{v}" if isinstance(v, float) else "")
def test_splc_decision_at_the_threshold(tau, x):
    # σ(x) > τ decided exactly (x > logit(τ)): next to logit(0.6), at τ = 0 and at τ ~ 1
    x = x.to(DEVICE)
    t = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    loss, _ = check_against_reference("splc", x, t, reduction="none", upstream=make_upstream("none", x, 44),
                                      epoch=1, tau=tau)
    torch.testing.assert_close(loss.double().cpu(), splc_negative_losses(x, tau, gamma=2.0).cpu(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("gamma", (0.0, 2.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_infinite_logits(name, dtype, gamma):
    # a negative at -inf and a positive at +inf: loss 0 and gradient 0, also for γ = 0
    x, t = infinite_logits(DEVICE)
    x = x.to(dtype)
    loss, grad = check_against_reference(name, x, t, reduction="none", upstream=make_upstream("none", x, 45),
                                         **dict(default_options(name), gamma=gamma))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[:, :2] == 0).all() and (grad[:, :2] == 0).all()


def extreme_logits(dtype, margin: float) -> torch.Tensor:
    values = [-1e4, -100.0, -30.0, -1e-3, 0.0, 1e-3, margin - 1e-3, margin, margin + 1e-3, 30.0, 100.0, 1e4]
    row = torch.tensor(values)
    return torch.stack([row, -row.flip(0), row * 0.5]).to(dtype).to(DEVICE)


@pytest.mark.parametrize("reduction", ("sum", "none"))
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_extreme_logits(name, dtype, reduction):
    x = extreme_logits(dtype, margin=1.0)
    t = (torch.arange(x.numel()).reshape(x.shape) % 2 == 0).to(DEVICE)
    loss, grad = check_against_reference(
        name, x, t, reduction=reduction, upstream=make_upstream(reduction, x, 10), **default_options(name)
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_nan_propagates(name):
    x, t = make_inputs(11)
    x[1, 7] = float("nan")
    loss = getattr(mpt_kernels, f"{name}_loss")(x, t, reduction="none", backend="triton", **default_options(name))
    assert loss[1, 7].isnan() and loss.isnan().sum() == 1
    total = getattr(mpt_kernels, f"{name}_loss")(x, t, backend="triton", **default_options(name))
    assert total.isnan()


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
def test_empty_input(reduction):
    for shape in ((0, C), (N, 0)):
        x = torch.randn(shape, device=DEVICE)
        t = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
        loss, grad = check_against_reference("hill", x, t, reduction=reduction, upstream=make_upstream(reduction, x, 12))
        assert grad.shape == shape


@pytest.mark.parametrize("layout", ("column_slice", "transposed", "row_slice_expanded_targets"))
@pytest.mark.parametrize("name", LOSSES)
def test_non_contiguous(name, layout):
    # both strides are honoured: nothing is copied, whatever the layout
    x, t = make_inputs(13, c=2 * C)
    if layout == "column_slice":
        x, t = x[:, ::2], t[:, 1::2]
    elif layout == "transposed":
        x, t = make_inputs(13, n=C, c=N)
        x, t = x.t(), t.t()
    else:
        x, t = x[:, 3 : 3 + C], t[2:3, :C].expand(N, C)
    assert not x.is_contiguous()
    for reduction in ("sum", "none"):
        upstream = make_upstream(reduction, x, 14)
        if reduction == "none":
            upstream = upstream.t().contiguous().t()  # a column-major upstream gradient too
        check_against_reference(name, x, t, reduction=reduction, upstream=upstream, **default_options(name))


def test_second_backward_is_an_error():
    # the backward overwrites the gradient the forward saved: one backward per forward
    x, t = make_inputs(39, torch.float32)
    loss = mpt_kernels.hill_loss(x.requires_grad_(True), t, backend="triton")
    loss.backward(torch.tensor(0.5), retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward(torch.tensor(0.5))


def test_expanded_upstream_of_none():
    # loss.sum().backward() hands "none" an expanded (stride 0) upstream gradient
    x, t = make_inputs(15)
    leaf = x.clone().requires_grad_(True)
    mpt_kernels.hill_loss(leaf, t, reduction="none", backend="triton").sum().backward()
    _, expected = loss_and_grad("reference", "hill", x, t, torch.tensor(1.0), reduction="sum")
    assert_matches(leaf.grad, expected, x.dtype)


def test_default_blocks():
    # the launch configuration of the GPU (one 4096-wide tile per row here), in the interpreter
    x, t = make_inputs(16, n=3, c=5000)
    for reduction in ("sum", "mean", "none"):
        check_against_reference("splc", x, t, reduction=reduction, upstream=make_upstream(reduction, x, 17), epoch=2)


# --------------------------------------------------------------------------- buffers, determinism
@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the launcher allocates starts as NaN: an element left unwritten shows."""
    allocated = []

    def nan_filled(shape, dtype, device):
        buffer = torch.full(shape, float("nan"), dtype=dtype, device=device)
        allocated.append(buffer)
        return buffer

    monkeypatch.setattr(TM, "_empty", nan_filled)
    return allocated


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("name", LOSSES)
def test_every_element_written(name, reduction, poisoned_buffers):
    x, t = make_inputs(18)
    for upstream in (make_upstream(reduction, x, 19), torch.ones_like(make_upstream(reduction, x, 19))):
        loss, grad = check_against_reference(name, x, t, reduction=reduction, upstream=upstream, **default_options(name))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert any(b.shape == x.shape for b in poisoned_buffers)  # the gradient came from _empty


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("name", LOSSES)
def test_deterministic(name, reduction):
    x, t = make_inputs(20, n=33, c=70)  # 17 x 5 tiles: 85 partial sums
    upstream = make_upstream(reduction, x, 21)
    first = loss_and_grad("triton", name, x, t, upstream, reduction=reduction, **default_options(name))
    second = loss_and_grad("triton", name, x, t, upstream, reduction=reduction, **default_options(name))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("name", LOSSES)
def test_inference_writes_no_gradient(name, reduction, poisoned_buffers):
    x, t = make_inputs(22)
    expected = getattr(R, f"{name}_loss")(x, t, reduction=reduction, **default_options(name))
    for grad_mode in (torch.no_grad, torch.enable_grad):
        poisoned_buffers.clear()
        with grad_mode():
            # logits that need no gradient, and (under no_grad) logits that do
            for logits in (x, x.clone().requires_grad_(True)):
                loss = getattr(mpt_kernels, f"{name}_loss")(
                    logits, t, reduction=reduction, backend="triton", **default_options(name)
                )
                assert_matches(loss.detach(), expected, x.dtype)
        full_size = [b for b in poisoned_buffers if b.numel() == x.numel()]
        per_call = 1 if reduction == "none" else 0  # the "none" loss itself
        if grad_mode is torch.no_grad:
            assert len(full_size) == 2 * per_call
        else:  # the second call needs the gradient: one more N x C buffer
            assert len(full_size) == 2 * per_call + 1


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_targets_are_read_in_place(target_dtype, reduction):
    """No copy of the targets in any dtype (issue: "without converting them to a float
    copy first") and nothing N x C but the gradient and the "none" loss."""
    x, t = make_inputs(23)
    t = (t > 0.5).to(target_dtype)
    leaf = x.clone().requires_grad_(True)
    with large_allocations(x.numel()) as found:
        loss = mpt_kernels.hill_loss(leaf, t, reduction=reduction, backend="triton")
    assert sorted(found) == [("empty", tuple(x.shape))] * (2 if reduction == "none" else 1)
    upstream = torch.full_like(loss, 0.5)
    with large_allocations(x.numel()) as found:
        loss.backward(upstream)
    assert found == []


# --------------------------------------------------------------------------- compilation
def test_hyper_parameters_are_runtime_arguments():
    # A new epoch, λ, margin, γ or τ must not recompile: the epoch never reaches the
    # kernel (it is folded into the float flip threshold on the host) and no float is a
    # constexpr (FOCAL is whether γ != 0: two variants at most). Triton specialises ints on
    # their value (1, multiples of 16), floats never. The GPU test below counts the
    # compiled variants.
    params = inspect.signature(getattr(TM._multilabel_kernel, "fn", TM._multilabel_kernel)).parameters
    assert not {"epoch", "change_epoch", "tau"} & set(params)
    for name in ("lamb", "margin", "gamma", "gamma_log2e", "flip_logit", "grad_scale"):
        assert "constexpr" not in str(params[name].annotation)
    constexprs = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexprs == {
        "IS_SPLC", "FOCAL", "WRITE_ELEMENT_LOSS", "WRITE_TILE_SUMS", "WRITE_GRAD", "UPSTREAM_SCALAR",
        "UPSTREAM_PER_ELEMENT", "FLAT", "BLOCK_ROWS", "BLOCK_COLS",
    }
    before, after = (check_splc(
        torch.zeros(1, 1), torch.zeros(1, 1), epoch=e, tau=0.6, change_epoch=3, margin=1.0, gamma=2.0,
        reduction="sum") for e in (2, 3))
    assert splc_flip_logit(before) == math.inf and isinstance(splc_flip_logit(after), float)


def test_torch_compile_fullgraph():
    # the fake forward matches the real one: one opaque node, autograd through it
    x, t = make_inputs(23)

    def step(logits, targets, epoch):
        return mpt_kernels.splc_loss(logits, targets, epoch=epoch, reduction="mean", backend="triton")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for epoch in (0, 1):
        leaf = x.clone().requires_grad_(True)
        compiled(leaf, t, epoch).backward()
        _, expected = loss_and_grad("reference", "splc", x, t, torch.tensor(1.0), epoch=epoch, reduction="mean")
        assert_matches(leaf.grad, expected, x.dtype)


def test_tile_knobs_change_the_launch_not_the_result_default_blocks(monkeypatch):
    # TILE_ELEMENTS and TILE_WARPS (what benchmarks/profile_kernels.py --multilabel-tile
    # sets when timing launch shapes): any tile gives the reference's loss and gradient
    monkeypatch.setattr(TM, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(TM, "TILE_WARPS", 1)
    assert TM._num_warps(64) == 1 and TM._tiling(torch.empty(7, 100), torch.empty(7, 100))[2] == 64
    x, t = make_inputs(41, torch.float32, n=7, c=100)
    for name in LOSSES:
        check_against_reference(name, x, t, reduction="sum", upstream=make_upstream("sum", x, 42),
                                **default_options(name))


# --------------------------------------------------------------------------- compiled, not interpreted
# The interpreter never runs the special functions' inline assembly (triton_fastmath):
# the kernel is also lowered to sm_90 machine code, in each layout and mode, with no
# spill, and each special function must be one MUFU instruction there.
AOT_SCRIPT = r"""
import re
from mpt_kernels.backends import triton_multilabel as TM

FLOATS = ["lamb", "margin", "gamma", "gamma_log2e", "flip_logit", "grad_scale"]
MODES = [  # (flat, splc, element loss, tile sums, grad, scalar upstream, upstream per element, γ != 0)
    (True, False, False, True, True, False, False, True),  # forward of "sum" with the gradient
    (True, True, True, False, False, False, False, True),  # forward of "none"
    (True, True, False, False, True, False, True, True),  # backward of "none"
    (False, False, False, False, True, True, False, True),  # backward of "sum", strided
    (True, True, False, True, True, False, False, False),  # forward of "sum" with the gradient, γ = 0
]
for flat, splc, element_loss, tile_sums, grad, scalar, per_element, focal in MODES:
    block_rows, block_cols = (1, 4096) if flat else TM.tile_shape(1000)
    types = dict(logits_ptr="*bf16", targets_ptr="*u8", upstream_ptr="*bf16", loss_ptr="*fp32", grad_ptr="*bf16",
                 numel="i64", **{name: "fp32" for name in FLOATS})
    # freshly allocated tensors are 16-byte aligned, and N·C is a multiple of 16 here
    aligned = ["logits_ptr", "targets_ptr", "upstream_ptr", "loss_ptr", "grad_ptr", "numel"]
    sass = compile_kernel(TM._multilabel_kernel, types, dict(
        IS_SPLC=splc, FOCAL=focal, WRITE_ELEMENT_LOSS=element_loss, WRITE_TILE_SUMS=tile_sums, WRITE_GRAD=grad,
        UPSTREAM_SCALAR=scalar, UPSTREAM_PER_ELEMENT=per_element, FLAT=flat,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols), TM._num_warps(block_rows * block_cols), aligned=aligned)
    if flat:
        # the flat path reads and writes 16 bytes per instruction, in its full and tail tiles
        memory = set(re.findall(r"\b(LDG\.E[.A-Z0-9]*|STG\.E[.A-Z0-9]*)", sass))
        assert memory <= {"LDG.E.128", "STG.E.128", "STG.E"}, memory  # STG.E: the tile's partial sum
    # per element two exponentials (σ's and the focal factor's; one for γ = 0), each a single MUFU (a
    # precise exp would add range reduction around it), log1p's reciprocal and, where the
    # gradient is computed, σ's (SPLC's loss alone needs no σ; the compiler may add one
    # more of its own, and Triton 3.6 duplicates one exponential of SPLC's loss), and no
    # logarithm (log1p is a series)
    elements = block_rows * block_cols // (32 * TM._num_warps(block_rows * block_cols))
    elements *= 2 if flat else 1  # the flat kernel holds a full-tile and a tail copy
    ex2, lg2, rcp = (len(re.findall(rf"MUFU\.{op}", sass)) for op in ("EX2", "LG2", "RCP"))
    exponentials = (2 if focal else 1) * elements
    assert exponentials <= ex2 <= exponentials + 2, (ex2, lg2, rcp)
    assert lg2 == 0 and rcp >= (2 if grad else 1) * elements, (ex2, lg2, rcp)
from mpt_kernels.backends import triton_sum
for device_scale in (False, True):
    compile_kernel(triton_sum._scaled_sum_kernel, dict(partials_ptr="*fp32", out_ptr="*bf16", scale="fp32",
                   scale_ptr="*fp32"), dict(HAS_DEVICE_SCALE=device_scale, BLOCK=triton_sum.BLOCK), 8)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    run_sm90_compile(AOT_SCRIPT)


# --------------------------------------------------------------------------- GPU, realistic sizes
def compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("num_classes", (80, 9605, 131072))
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_gpu_realistic(name, dtype, num_classes, reduction):
    x, t = make_inputs(30, dtype, n=4096, c=num_classes)
    check_against_reference(
        name, x, t, reduction=reduction, upstream=make_upstream(reduction, x, 31), **default_options(name)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_gpu_target_dtypes(dtype, target_dtype):
    x, t = make_inputs(32, dtype, target_dtype, n=4096, c=9605)
    for name in LOSSES:
        check_against_reference(name, x, t, reduction="sum", upstream=make_upstream("sum", x, 33), **default_options(name))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_gpu_extreme_and_deterministic(dtype):
    x, t = make_inputs(34, dtype, n=4096, c=20000)
    x[::7] *= 1e3  # many logits far out in both tails
    x[1::7] = 1.0  # exactly at the margin
    for name in LOSSES:
        for reduction in ("sum", "none"):
            upstream = make_upstream(reduction, x, 35)
            first = check_against_reference(name, x, t, reduction=reduction, upstream=upstream, **default_options(name))
            second = loss_and_grad("triton", name, x, t, upstream, reduction=reduction, **default_options(name))
            # a float16 "sum" of ~1e3-sized terms over 8e7 elements overflows, the
            # reference's too (compared above); the gradient must stay finite
            if not (dtype == torch.float16 and reduction == "sum"):
                assert torch.isfinite(first[0]).all()
            assert torch.isfinite(first[1]).all()
            assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
def test_gpu_no_recompile_on_new_epoch_or_parameters():
    x, t = make_inputs(36, n=512, c=1000)
    kernels = (TM._multilabel_kernel, triton_sum._scaled_sum_kernel)

    def step(name, **options):
        leaf = x.clone().requires_grad_(True)
        loss = getattr(mpt_kernels, f"{name}_loss")(leaf, t, backend="triton", **options)
        (loss * 0.5).backward()
        leaf.grad.sum().item()

    step("splc", epoch=0)
    step("hill")
    step("hill", gamma=0.0)  # FOCAL = (γ != 0): the second and last variant γ can make
    before = [compiled_variants(k) for k in kernels]
    for epoch in (1, 2, 3, 16, 17, 100):
        step("splc", epoch=epoch, tau=0.5 + epoch / 1000, margin=epoch / 10, gamma=epoch % 3 + 0.5)
    for gamma in (0.0, 1.0, 2.5):
        step("hill", lamb=gamma + 1.0, margin=-gamma, gamma=gamma)
    step("splc", epoch=5, change_epoch=16)
    assert [compiled_variants(k) for k in kernels] == before


@pytest.mark.gpu
def test_gpu_beyond_int32_offsets():
    # N·C > 2^31: the last rows sit past every int32 offset
    num_classes = 65539
    n = 2**31 // num_classes + 2
    assert n * num_classes > 2**31
    gen = torch.Generator(device="cuda").manual_seed(37)
    x = torch.randn(n, num_classes, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    t = torch.rand(n, num_classes, device="cuda", generator=gen) < 0.3
    tail, head = slice(n - 64, n), slice(0, 64)

    loss = mpt_kernels.hill_loss(x, t, reduction="none", backend="triton")
    for rows in (head, tail):
        assert_matches(loss[rows], R.hill_loss(x[rows], t[rows], reduction="none"), x.dtype)
    del loss

    leaf = x.requires_grad_(True)
    total = mpt_kernels.hill_loss(leaf, t, reduction="sum", backend="triton")
    total.backward()
    expected = sum(
        R.hill_loss(x[i : i + 4096].detach().float(), t[i : i + 4096], reduction="sum").double()
        for i in range(0, n, 4096)
    )
    assert math.isclose(total.item(), expected.item(), rel_tol=TOLERANCE[x.dtype])
    for rows in (head, tail):
        _, expected_grad = loss_and_grad("reference", "hill", x[rows], t[rows], torch.tensor(1.0, device="cuda"), reduction="sum")
        assert_matches(leaf.grad[rows], expected_grad, x.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device():
    x, t = make_inputs(38)
    x, t = x.to("cuda:1"), t.to("cuda:1")
    check_against_reference("hill", x, t, reduction="sum", upstream=torch.tensor(0.37, device="cuda:1"))
