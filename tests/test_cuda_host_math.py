"""The CUDA kernels' shared math (csrc/loss_math.cuh, csrc/softmax_math.cuh), on the host.

``mpt_kernels._C`` compiles the same ``__host__ __device__`` functions the kernels call
into host entry points over CPU float32 buffers (csrc/host_math.cpp), checked against
the reference. A softmax row is walked as the kernels walk it (slots per segment, dealt
to lanes, folded a chunk at a time) by a few lanes merged in a tree, as a block's
threads split and merge it, so the chunked statistics, the argmax tests and the merges
are exercised too. The reference runs in float64.

The backward's path is run the same way: the forward's saved row statistics, the
inputs and an upstream gradient go through the kernels' decision (recompute only
counted rows, or elements, whose upstream gradient is not 1) and gradient function, and
the result is checked against the reference, and against the float32 reference cast
once into float16 / bfloat16 (single rounding, the GradScaler case).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
import subprocess
import zlib

import pytest
import torch

from mpt_kernels import reference
from mpt_kernels._custom_op import loss_shape
from mpt_kernels._validation import check_hill, check_splc
from rounding import assert_single_rounding, single_rounding_errors
from mpt_kernels.backends import cuda as cuda_backend

_C = cuda_backend._C
needs_extension = pytest.mark.skipif(_C is None, reason=f"{cuda_backend.EXTENSION_ERROR}")
INF, NAN = math.inf, math.nan


@pytest.mark.skipif(os.environ.get("MPT_KERNELS_CUDA") != "1", reason="the extension is optional here")
def test_extension_is_built_when_required():
    # CI installs with MPT_KERNELS_CUDA=1: then these tests must run, not skip.
    assert _C is not None, cuda_backend.EXTENSION_ERROR


@needs_extension
@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf to list the libraries _C needs")
def test_extension_does_not_link_against_torch():
    """_C takes pointers and sizes, not tensors, so it builds against a CPU-only torch and
    keeps working across torch versions: none of the libraries it needs is torch's."""
    dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if re.search(r"torch|c10|cudart", lib)], needed


# --------------------------------------------------------------------------- helpers
def _host_unary(function, x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    function(x=x.data_ptr(), out=out.data_ptr(), n=x.numel())
    return out


def _host_reduce(function, values, lanes: int, slot: int):
    x = torch.tensor(values, dtype=torch.float32)
    return function(values=x.data_ptr(), n=x.numel(), lanes=lanes, slot=slot)


def _assert_same_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)


# --------------------------------------------------------------------------- sigmoid forms
EXTREMES = [0.0, 1.0, -1.0, 0.5, -0.5, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4, 3e38, -3e38, INF, -INF]


@needs_extension
def test_log_sigmoid_and_sigmoid_are_finite_and_exact_at_extremes():
    x = torch.cat([torch.tensor(EXTREMES), torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10])
    x64 = x.double()
    log_sigmoid = _host_unary(_C.host_log_sigmoid, x)
    sigmoid = _host_unary(_C.host_sigmoid, x)
    # exp(-|x|) is exp2 of the float32 product -|x|·log2(e), whose rounding is a relative
    # error of up to |x|·log2(e)·2^-24 in exp(-|x|) (as in the Triton kernels); beyond that
    # a few ulps from the log1p series and the reciprocals
    bound = 4e-7 + x64.abs() * 1.4427 * 2.0**-24
    for actual, expected, tiny in ((log_sigmoid, torch.nn.functional.logsigmoid(x64), 1e-30),
                                   (sigmoid, torch.sigmoid(x64), 1e-38)):
        error = (actual.double() - expected).abs()
        within = (actual.double() == expected) | (error <= bound * expected.abs() + tiny)
        assert bool(within.all()), (x[~within], actual[~within], expected[~within])
    finite = torch.isfinite(x)
    assert torch.isfinite(log_sigmoid[finite]).all()  # never log(σ(x)) = log(0)
    assert log_sigmoid[x == -1e4].item() == -1e4
    nan = torch.tensor([NAN])
    assert torch.isnan(_host_unary(_C.host_log_sigmoid, nan)).all()
    assert torch.isnan(_host_unary(_C.host_sigmoid, nan)).all()


# --------------------------------------------------------------------------- multi-label elements
def _multilabel_inputs(seed: int, margin: float):
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(EXTREMES[:13] + [margin, margin + 1e-3, margin - 1e-3])
    x = torch.cat([torch.randn(3000, generator=g) * 4, torch.randn(500, generator=g) * 40, special, special])
    positive = torch.rand(x.shape, generator=g) < 0.4
    positive[-2 * special.numel() : -special.numel()] = True
    positive[-special.numel() :] = False
    return x.to(torch.float32), positive


def _host_multilabel(args, x32: torch.Tensor, positive: torch.Tensor, scale: float = 1.0):
    loss = torch.empty_like(x32)
    grad = torch.empty_like(x32)
    positive_bytes = positive.to(torch.uint8).contiguous()
    _C.host_multilabel(
        math=cuda_backend.multilabel_params(args), x=x32.data_ptr(), positive=positive_bytes.data_ptr(),
        n=x32.numel(), scale=scale, loss=loss.data_ptr(), grad=grad.data_ptr(),
    )
    return loss, grad


def _host_multilabel_backward(args, x32, positive, scale: float, upstream: torch.Tensor, grad: torch.Tensor) -> None:
    """The backward kernel's per-element rewrite of ``grad`` (in place)."""
    positive_bytes = positive.to(torch.uint8).contiguous()
    upstream = upstream.to(torch.float32).expand(x32.shape).contiguous()
    _C.host_multilabel_backward(
        math=cuda_backend.multilabel_params(args), x=x32.data_ptr(), positive=positive_bytes.data_ptr(),
        n=x32.numel(), scale=scale, upstream=upstream.data_ptr(), grad=grad.data_ptr(),
    )


def _reference_elements(args_of, x32: torch.Tensor, targets: torch.Tensor):
    x64 = x32.double().reshape(1, -1).requires_grad_(True)
    elements = reference.multilabel_elements(args_of(x64, targets.reshape(1, -1)))
    (grad,) = torch.autograd.grad(elements.sum(), x64)
    return elements.detach().reshape(-1), grad.reshape(-1)


def _assert_elements_close(host, expected):
    loss, grad = host
    ref_loss, ref_grad = expected
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@needs_extension
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5, 4.3])
@pytest.mark.parametrize("lamb, margin", [(1.5, 1.0), (1.0, 0.0), (2.0, 0.7)])
def test_hill_elements_match_reference(gamma, lamb, margin):
    x, positive = _multilabel_inputs(1, margin)

    def args_of(logits, targets):
        return check_hill(logits, targets, lamb=lamb, margin=margin, gamma=gamma, reduction="none")

    host = _host_multilabel(args_of(x.reshape(1, -1), positive.reshape(1, -1)), x, positive)
    _assert_elements_close(host, _reference_elements(args_of, x, positive))


@needs_extension
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5, 4.3])
@pytest.mark.parametrize("epoch, change_epoch", [(0, 1), (1, 1), (5, 1), (3, 10)])
@pytest.mark.parametrize("tau, margin", [(0.6, 1.0), (0.3, 0.0), (0.9, 0.5)])
def test_splc_elements_match_reference(gamma, epoch, change_epoch, tau, margin):
    x, positive = _multilabel_inputs(2, margin)

    def args_of(logits, targets):
        return check_splc(
            logits, targets, epoch=epoch, tau=tau, change_epoch=change_epoch, margin=margin, gamma=gamma,
            reduction="none",
        )

    args = args_of(x.reshape(1, -1), positive.reshape(1, -1))
    assert (cuda_backend.multilabel_params(args).flip_logit < math.inf) == (epoch >= change_epoch)
    host = _host_multilabel(args, x, positive)
    expected = _reference_elements(args_of, x, positive)
    _assert_elements_close(host, expected)
    if epoch >= change_epoch:  # the correction happened somewhere: a negative scored as positive
        corrected = ~positive & (torch.sigmoid(x) > tau)
        assert corrected.any()


@needs_extension
def test_multilabel_nan_logit_gives_nan():
    x = torch.tensor([NAN, NAN, 1.0], dtype=torch.float32)
    positive = torch.tensor([True, False, True])
    for args in (
        check_hill(x.reshape(1, -1), positive.reshape(1, -1), lamb=1.5, margin=1.0, gamma=2.0, reduction="none"),
        check_splc(x.reshape(1, -1), positive.reshape(1, -1), epoch=3, tau=0.6, change_epoch=1, margin=1.0,
                   gamma=2.0, reduction="none"),
    ):
        loss, grad = _host_multilabel(args, x, positive)
        assert torch.isnan(loss[:2]).all() and torch.isnan(grad[:2]).all()
        assert torch.isfinite(loss[2]) and torch.isfinite(grad[2])


# --------------------------------------------------------------------------- online softmax merge
LANE_SPLITS = [(1, 1), (2, 1), (8, 4), (32, 4), (4, 8)]


@needs_extension
@pytest.mark.parametrize("lanes, slot", LANE_SPLITS)
@pytest.mark.parametrize(
    "values",
    [
        [0.3, -1.2, 2.5, 0.0, 7.0, -3.0, 1.0, 1.0, 2.0],
        [1e4, -1e4, 0.0, 9999.0, -3.0],
        [-INF, 1.0, -INF, 2.0, -INF, -INF, -INF, -INF, -INF, -INF, 0.5],
        [-INF] * 40 + [1.0, 2.0],  # whole lanes hold only masked classes
        [1.0, 2.0] + [-INF] * 40,
        [-INF] * 7,  # everything masked: -inf, not NaN
        [-1e4] * 33,
    ],
)
def test_logsumexp_merge(values, lanes, slot):
    expected = torch.logsumexp(torch.tensor(values, dtype=torch.float64), dim=0).item()
    actual = _host_reduce(_C.host_logsumexp, values, lanes, slot)
    assert not math.isnan(actual)
    assert actual == pytest.approx(expected, rel=1e-6, abs=1e-6)


@needs_extension
@pytest.mark.parametrize("lanes, slot", LANE_SPLITS)
def test_logsumexp_merge_propagates_nan(lanes, slot):
    for position in (0, 5, 20):
        values = [0.5 * k for k in range(24)]
        values[position] = NAN
        assert math.isnan(_host_reduce(_C.host_logsumexp, values, lanes, slot))
    values = [-INF] * 24
    values[13] = NAN
    assert math.isnan(_host_reduce(_C.host_logsumexp, values, lanes, slot))


@needs_extension
def test_lanes_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        _host_reduce(_C.host_logsumexp, [1.0, 2.0], 3, 1)


# --------------------------------------------------------------------------- softmax family rows
N, C, K = 18, 37, 23


def _softmax_data(seed: int, *, scale: float = 3.0):
    """Student, teachers and targets with rows where the teachers and the student are
    right (so every focus mode has both outcomes) and argmax ties."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g) * scale
    old = torch.randn(N, K, generator=g) * scale
    new = torch.randn(N, C, generator=g) * scale
    y = torch.randint(0, K, (N,), generator=g)
    y[::5] = torch.randint(K, C, (y[::5].numel(),), generator=g)  # new classes: the old model is never right
    for i in range(0, N, 2):  # teachers right
        if y[i] < K:
            old[i, y[i]] += 4 * scale
        new[i, y[i]] += 4 * scale
    for i in range(0, N, 3):  # student right
        z[i, y[i]] += 4 * scale
    # ties: the lowest index wins the argmax
    old[1] = 0.0
    old[1, 2] = old[1, 7] = 3.0
    new[1] = 0.0
    new[1, 2] = new[1, 7] = 3.0
    y[1] = 2
    old[3] = 0.0
    old[3, 2] = old[3, 7] = 3.0
    y[3] = 7
    z[3] = 0.0
    z[3, 2] = z[3, 7] = 1.0
    return z, old, new, y


def _host_inputs(args) -> dict:
    """The host entry points' input arguments for ``args`` (float32 rows, int64 targets),
    and the buffers behind the addresses under "_keep"."""
    row = cuda_backend.softmax_row_params(args)
    z = args.logits.to(torch.float32).contiguous()
    old = args.old_logits.to(torch.float32).contiguous() if row.has_old else None
    new = args.new_logits.to(torch.float32).contiguous() if row.has_new else None
    bias = args.class_bias.to(torch.float32).contiguous() if (row.has_ce and args.class_bias is not None) else None
    target = args.target.to(torch.int64).contiguous()
    return dict(
        row=row, num_rows=z.shape[0], logits=_ptr(z), old_logits=_ptr(old), new_logits=_ptr(new),
        class_bias=_ptr(bias), target=_ptr(target), **cuda_backend.ignore_index_arguments(args.ignore_index),
        _keep=(z, old, new, bias, target),
    )


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _call(function, inputs: dict, **more):
    function(**{k: v for k, v in inputs.items() if k != "_keep"}, **more)


# (threads, slot width, slots per chunk) of the kernels' row walk: the kernels run slots
# of 4 (float32) or 8 (16-bit) columns in chunks of _C.SLOTS_PER_THREAD slots; smaller
# splits put C = 37 classes through many chunks, slots that straddle K = 23, and lanes
# with no slot at all.
ROW_SPLITS = [(1, 1, 1), (2, 1, 2), (8, 4, 1), (8, 4, 2), (32, 4, 2), (4, 8, 2), (2, 8, 1), (64, 8, 2)]


def _host_rows(args, *, lanes=8, slot=4, rounds=2, with_grad=True, mean=False):
    """The forward: per-row losses, the gradient for an upstream gradient of 1 (times
    1/count with ``mean``) and the rows' saved statistics."""
    inputs = _host_inputs(args)
    n, c = args.logits.shape
    loss = torch.empty(n, dtype=torch.float32)
    grad = torch.empty(n, c, dtype=torch.float32) if with_grad else None
    stats = torch.empty(n, _C.SOFTMAX_STAT_FLOATS, dtype=torch.float32) if with_grad else None
    _call(_C.host_softmax_rows, inputs, mean=mean, lanes=lanes, slot=slot, rounds=rounds, loss=_ptr(loss),
          grad=_ptr(grad), stats=_ptr(stats))
    return loss, grad, stats


def _host_rows_backward(args, stats: torch.Tensor, upstream: torch.Tensor, grad: torch.Tensor, *, lanes=8,
                        slot=4, rounds=2) -> None:
    """The backward kernel's rewrite of ``grad`` (in place); upstream: () or (N,)."""
    upstream = upstream.to(torch.float32)
    _call(_C.host_softmax_rows_backward, _host_inputs(args), stats=_ptr(stats), upstream=_ptr(upstream),
          upstream_stride=upstream.stride(0) if upstream.dim() == 1 else 0, lanes=lanes, slot=slot, rounds=rounds,
          grad=_ptr(grad))


def _reference_rows(make_args, z, old, new, y):
    """Per-row losses and d(Σ rows)/dz in float64 (rows are independent)."""
    z64 = z.double().requires_grad_(True)
    args = make_args(z64, None if old is None else old.double(), None if new is None else new.double(), y)
    rows, _ = reference.softmax_family_rows(args)
    (grad,) = torch.autograd.grad(rows.sum(), z64)
    return rows.detach(), grad


def _check_rows(make_args, z, old, new, y, *, lanes=8, slot=4, rounds=2, rtol=1e-5, atol=1e-5):
    host_loss, host_grad, _ = _host_rows(make_args(z, old, new, y), lanes=lanes, slot=slot, rounds=rounds)
    ref_loss, ref_grad = _reference_rows(make_args, z, old, new, y)
    torch.testing.assert_close(host_loss.double(), ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(host_grad.double(), ref_grad, rtol=rtol, atol=atol, equal_nan=True)
    return host_loss, host_grad


def _mpt(**options):
    defaults = dict(
        new_class_bias=0.0, num_old_classes=None, class_bias=None, kind="kl", tau=5.0, alpha=1.0,
        beta=5.0, focus="ref_correct", scale_by_tau_sq=False, ce_weight=1.0, old_weight=None,
        new_weight=None, label_smoothing=0.0, ignore_index=-100, reduction="none",
    )
    defaults.update(options)
    return lambda z, old, new, y: reference.mpt_loss_args(z, y, old, new, **defaults)


SOURCES = {"old": (True, False), "new": (False, True), "both": (True, True)}
BIASES = ["none", "new_class", "vector"]


@needs_extension
@pytest.mark.parametrize("kind", ["kl", "lm"])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
@pytest.mark.parametrize("sources", list(SOURCES))
@pytest.mark.parametrize("bias", BIASES)
def test_mpt_rows_match_reference(kind, focus, sources, bias):
    seed = zlib.crc32(f"{kind}-{focus}-{sources}-{bias}".encode()) % 1000  # hash() of str varies per run
    z, old, new, y = _softmax_data(seed)
    use_old, use_new = SOURCES[sources]
    options = dict(kind=kind, focus=focus, tau=[5.0, 2.0, 0.7][seed % 3], alpha=0.5, beta=3.0,
                   scale_by_tau_sq=seed % 2 == 0, label_smoothing=[0.0, 0.1][seed % 2],
                   old_weight=0.7, new_weight=1.3, ce_weight=0.9)
    if bias == "new_class":
        options.update(new_class_bias=2.5, num_old_classes=K)
    if bias == "vector":
        options.update(class_bias=torch.linspace(-2.0, 3.0, C).to(torch.float16))  # any float dtype
    y[4] = y[9] = -100  # ignored rows
    # The float32 row math is conditioned by |z/τ| (up to ~50 here, τ = 0.7): exp() of it
    # carries a relative error near 50·2⁻²⁴ ≈ 3e-6, on distillation terms of up to
    # (α+β)·weight/τ ≈ 6.5 that cancel to gradients near 0.1. 4e-5 is 2.5 times the worst seen
    # over 143 seeds of every case (1.3e-5 on the gradient, 1.6e-5 on the loss).
    _check_rows(_mpt(**options), z, old if use_old else None, new if use_new else None, y, atol=4e-5)


@needs_extension
@pytest.mark.parametrize("lanes, slot, rounds", ROW_SPLITS)
@pytest.mark.parametrize("kind, focus", [("kl", "neg_flip"), ("lm", "ref_correct"), ("kl", "student_wrong")])
def test_rows_do_not_depend_on_the_split(lanes, slot, rounds, kind, focus):
    z, old, new, y = _softmax_data(7)
    for y_split in (0, K - 1, K, C - 1):  # targets at the segments' ends
        y[y_split % N] = y_split
    options = dict(label_smoothing=0.2, scale_by_tau_sq=True, kind=kind, focus=focus, new_class_bias=1.5,
                   num_old_classes=K)
    loss, grad = _check_rows(_mpt(**options), z, old, new, y, lanes=lanes, slot=slot, rounds=rounds)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@needs_extension
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 1.0])
def test_margin_cross_entropy_rows(epsilon):
    z, _, _, y = _softmax_data(11)
    for make_args in (
        lambda z_, o, n, y_: reference.margin_cross_entropy_args(
            z_, y_, class_bias=None, num_old_classes=K, new_class_bias=4.0, label_smoothing=epsilon,
            ignore_index=-100, reduction="none"),
        lambda z_, o, n, y_: reference.margin_cross_entropy_args(
            z_, y_, class_bias=torch.randn(C, generator=torch.Generator().manual_seed(3)).double(),
            num_old_classes=None, new_class_bias=0.0, label_smoothing=epsilon, ignore_index=5,
            reduction="none"),
    ):
        _check_rows(make_args, z, None, None, y)


@needs_extension
@pytest.mark.parametrize("kind", ["kl", "lm"])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
def test_focal_distillation_rows(kind, focus):
    z, old, _, y = _softmax_data(13)

    def make_args(z_, o, n, y_):
        return reference.focal_distillation_args(
            z_, o, y_, kind=kind, tau=3.0, alpha=1.0, beta=5.0, focus=focus, scale_by_tau_sq=True,
            ignore_index=-100, reduction="none")

    args = make_args(z, old, None, y)
    row = cuda_backend.softmax_row_params(args)
    assert not row.has_ce and row.has_old and not row.has_new and row.num_old_classes == K
    _check_rows(make_args, z, old, None, y)


@needs_extension
def test_focus_weights_follow_argmax_ties():
    # rows 1 and 3 of _softmax_data tie the teachers' maximum at classes 2 and 7
    z, old, new, y = _softmax_data(17)
    weights = {}
    for focus in ("ref_correct", "all"):
        make_args = _mpt(kind="lm", focus=focus, ce_weight=0.0, alpha=1.0, beta=5.0, old_weight=1.0, new_weight=0.0)
        loss, _ = _check_rows(make_args, z, old, None, y)
        weights[focus] = loss
    ratio = weights["ref_correct"] / weights["all"]
    assert ratio[1].item() == pytest.approx(6.0)  # y = 2: the tie goes to 2, the teacher is right
    assert ratio[3].item() == pytest.approx(1.0)  # y = 7: the tie goes to 2, the teacher is wrong


@needs_extension
def test_extreme_logits():
    z, old, new, y = _softmax_data(19, scale=1e4)
    z[0, :5] = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0])
    loss, grad = _check_rows(_mpt(new_class_bias=4.0, num_old_classes=K, label_smoothing=0.1), z, old, new, y,
                             rtol=1e-5, atol=2e-2)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@needs_extension
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_masked_classes(epsilon):
    z, old, new, y = _softmax_data(23)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(N, C, generator=g) < 0.3
    mask[torch.arange(N), y] = False  # the target itself is never masked
    z[mask] = -INF
    old[mask[:, :K]] = -INF  # the teachers mask those classes too
    new[mask] = -INF
    old[0, :5] = -INF  # a teacher class masked where the student is not
    z[0, :5] = 1.0
    old[2, :] = -INF
    old[2, 0] = 1.0  # a teacher sure of one class
    loss, grad = _check_rows(_mpt(label_smoothing=epsilon, focus="neg_flip"), z, old, new, y)
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    if epsilon == 0.0:
        assert torch.isfinite(loss).all()
    else:  # (ε/C) Σ_j (LSE - z̃_j) over a masked class: +inf, as in the reference
        assert torch.isinf(loss[mask.any(dim=1)]).all()
    # a student class masked where a teacher still gives it probability: KL = +inf, as in the reference
    new[mask] = 0.0
    loss, grad = _check_rows(_mpt(label_smoothing=epsilon), z, old, new, y)
    assert torch.isposinf(loss[mask.any(dim=1)]).all() and not torch.isnan(grad).any()


@needs_extension
def test_nan_propagates_to_its_row_only():
    z, old, new, y = _softmax_data(29)
    z[2, 5] = NAN
    old[4, 1] = NAN
    new[6, 30] = NAN
    y[8] = -100
    z[8, 3] = NAN  # an ignored row stays 0, its gradient too
    loss, grad, _ = _host_rows(_mpt()(z, old, new, y))
    ref_loss, ref_grad = _reference_rows(_mpt(), z, old, new, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(loss[[2, 4, 6]]).all()
    assert loss[8].item() == 0.0 and (grad[8] == 0).all()
    # (the reference's autograd leaks 0 * NaN = NaN into the ignored row's gradient)
    rows = [i for i in range(N) if i != 8]
    torch.testing.assert_close(grad[rows].double(), ref_grad[rows], rtol=1e-5, atol=1e-5, equal_nan=True)
    others = [i for i in range(N) if i not in (2, 4, 6, 8)]
    assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()


@needs_extension
def test_out_of_range_target_gives_nan_row_and_no_gradient():
    z, old, new, y = _softmax_data(31)
    y[3], y[5], y[7] = C, -1, -100
    loss, grad, _ = _host_rows(_mpt()(z, old, new, y))
    assert torch.isnan(loss[[3, 5]]).all() and loss[7].item() == 0.0
    assert (grad[[3, 5, 7]] == 0).all()
    ref_loss, ref_grad = _reference_rows(_mpt(), z, old, new, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@needs_extension
def test_ignore_index_outside_int64_matches_nothing():
    z, old, new, y = _softmax_data(37)
    arguments = cuda_backend.ignore_index_arguments(2**70)
    assert arguments == {"has_ignore_index": False, "ignore_index": 0}
    assert cuda_backend.ignore_index_arguments(-100) == {"has_ignore_index": True, "ignore_index": -100}
    # validation now keeps ignore_index inside int64; the backend's guard still holds for
    # a record that bypasses it
    with pytest.raises(ValueError, match="ignore_index"):
        _mpt(ignore_index=2**70)(z, old, new, y)
    loss, grad, _ = _host_rows(dataclasses.replace(_mpt()(z, old, new, y), ignore_index=2**70))
    # the reference cannot compare int64 targets with 2**70; -12345 matches no target either
    ref_loss, ref_grad = _reference_rows(_mpt(ignore_index=-12345), z, old, new, y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@needs_extension
def test_single_class_and_k_equal_c():
    g = torch.Generator().manual_seed(41)
    z = torch.randn(5, 1, generator=g)
    y = torch.zeros(5, dtype=torch.int64)
    _check_rows(_mpt(), z, z.clone() + 0.5, z.clone() - 0.5, y)
    z = torch.randn(6, 9, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    for kind, focus in itertools.product(("kl", "lm"), ("neg_flip", "all")):
        _check_rows(_mpt(kind=kind, focus=focus), z, torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g), y)


# --------------------------------------------------------------------------- backward: rows and elements
# The backward kernels leave the forward's gradient where the upstream gradient is 1 and
# rewrite the rest: recomputed from the inputs (and the saved row statistics) with the
# upstream gradient multiplied in in float32. UNTOUCHED marks what they must not write.
UNTOUCHED = 12345.0


def _reference_gradient(make_args, z, old, new, y, upstream, dtype=torch.float64):
    """The logits' gradient of the reference for ``upstream``, by autograd in ``dtype``.
    (Through softmax_family_rows and reduce_rows, so that out-of-range targets are
    allowed: their rows get no gradient.)"""
    leaf = z.to(dtype).requires_grad_(True)
    args = make_args(leaf, None if old is None else old.to(dtype), None if new is None else new.to(dtype), y)
    rows, counted = reference.softmax_family_rows(args)
    loss = reference.reduce_rows(rows, counted, args.reduction)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.to(dtype))
    return grad


@needs_extension
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind, sources", [("kl", "both"), ("lm", "both"), ("kl", "old"), ("kl", "none")])
def test_backward_rewrites_the_rows_whose_upstream_is_not_one(reduction, kind, sources):
    z, old, new, y = _softmax_data(43)
    y[4], y[9], y[12] = -100, -100, C  # ignored, ignored, out of range
    use_old, use_new = SOURCES.get(sources, (False, False))
    old, new = (old if use_old else None), (new if use_new else None)
    make_args = _mpt(kind=kind, focus="neg_flip", label_smoothing=0.1, new_class_bias=2.0, num_old_classes=K,
                     tau=2.0, old_weight=0.7, new_weight=1.3, reduction=reduction)
    args = make_args(z, old, new, y)
    _, forward_grad, stats = _host_rows(args, mean=reduction == "mean")
    counted = (y != -100) & (y < C)
    g = torch.Generator().manual_seed(44)
    if reduction == "none":
        per_row = torch.rand(N, generator=g) * 3 - 1
        per_row[[1, 6, 9]] = 1.0  # left as the forward wrote them (9 is ignored anyway)
        per_row[4] = NAN  # an ignored row keeps its zero gradient
        per_row[12] = NAN  # so does an out-of-range one
        upstreams = [per_row, torch.tensor(0.3).expand(N), torch.tensor(1.0).expand(N)]  # expanded: stride 0
    else:
        upstreams = [torch.tensor(2.0**15), torch.tensor(-0.37), torch.tensor(1.0), torch.tensor(NAN)]
    for upstream in upstreams:
        rewritten = counted & (upstream.expand(N) != 1)
        assert rewritten.any() == (upstream.ne(1).any().item())
        # only the rewritten rows are written
        poisoned = torch.full_like(forward_grad, UNTOUCHED)
        _host_rows_backward(args, stats, upstream, poisoned)
        assert (poisoned[~rewritten] == UNTOUCHED).all()
        assert not (poisoned[rewritten] == UNTOUCHED).any()
        # and the forward's gradient, rewritten, is the reference's for this upstream gradient
        grad = forward_grad.clone()
        _host_rows_backward(args, stats, upstream, grad)
        torch.testing.assert_close(grad[rewritten], poisoned[rewritten], rtol=0, atol=0, equal_nan=True)
        assert (grad[~counted] == 0).all()
        expected = _reference_gradient(make_args, z, old, new, y, upstream)
        if upstream.isnan().any() and reduction != "none":  # a NaN scalar: every counted row is NaN
            assert torch.isnan(grad[counted]).all() and torch.isnan(expected[counted]).all()
            continue
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6 * scale)


# --------------------------------------------------------------------------- backward: rounded once


def _float32_reference(make_args, z, old, new, y, upstream):
    """Autograd of the reference in float32 (the half-precision inputs' values), the
    reference of a single rounding."""
    return _reference_gradient(make_args, z.float(), None if old is None else old.float(),
                               None if new is None else new.float(), y, upstream.float(), dtype=torch.float32)


def _host_gradient(args, mean: bool, upstream: torch.Tensor):
    """The forward's float32 gradient for an upstream of 1, and the backward's for ``upstream``."""
    _, forward_grad, stats = _host_rows(args, mean=mean)
    grad = forward_grad.clone()
    _host_rows_backward(args, stats, upstream, grad)
    return forward_grad, grad


def _rescaled(forward_grad: torch.Tensor, upstream: torch.Tensor, dtype) -> torch.Tensor:
    """The old design: the forward's gradient stored in ``dtype``, then times the upstream gradient."""
    factor = upstream.float() if upstream.dim() == 0 else upstream.float().reshape(-1, *[1] * (forward_grad.dim() - 1))
    return (forward_grad.to(dtype).float() * factor).to(dtype)


@needs_extension
def test_fp16_grad_scaler_gradient_is_rounded_once():
    """float16 logits, "mean" over 256 rows, upstream 2^15 (GradScaler's scale): entries of
    the gradient for an upstream of 1 fall below float16's normal range; recomputed with
    the upstream multiplied in, they are the float32 reference rounded once, where the
    old design (store, then rescale) is off by up to thousands of ulps."""
    g = torch.Generator().manual_seed(45)
    n, c, k = 256, 60, 40
    z = torch.randn(n, c, generator=g) * 3
    z[:, ::3] -= 9.0  # p ~ 1e-8..1e-4: p/256 is a float16 subnormal
    old = torch.randn(n, k, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::10] = -100
    z, old = z.half(), old.half()
    upstream = torch.tensor(2.0**15, dtype=torch.float16)
    for name, make_args, teacher in (
        ("margin CE", _mpt(ce_weight=1.0, reduction="mean"), None),
        ("focal distillation + CE", _mpt(tau=1.0, reduction="mean"), old),
    ):
        args = make_args(z, teacher, None, y)
        forward_grad, grad = _host_gradient(args, True, upstream)
        expected = _float32_reference(make_args, z, teacher, None, y, upstream)
        unscaled = expected / 2.0**15  # the premise: many of them are float16 subnormals
        assert ((unscaled != 0) & (unscaled.abs() < torch.finfo(torch.float16).tiny)).sum() > 1000, name
        assert_single_rounding(grad.half(), expected, name)
        old_design = single_rounding_errors(_rescaled(forward_grad, upstream, torch.float16), expected)
        assert old_design.max() > 100, name  # the check catches the old design

    # the multi-label "mean" over N·C elements: 1/(N·C) pushes every entry below float16's normal range
    x = (torch.randn(n, c, generator=g) * 3).half()
    positive = torch.rand(n, c, generator=g) < 0.3
    args = check_hill(x, positive, lamb=1.5, margin=1.0, gamma=2.0, reduction="mean")
    x32 = x.float().reshape(-1)
    _, forward_grad = _host_multilabel(args, x32, positive.reshape(-1), scale=1.0 / x.numel())
    grad = forward_grad.clone()
    _host_multilabel_backward(args, x32, positive.reshape(-1), 1.0 / x.numel(), upstream, grad)
    leaf = x.float().requires_grad_(True)
    loss = reference.multilabel_loss(check_hill(leaf, positive, lamb=1.5, margin=1.0, gamma=2.0, reduction="mean"))
    (expected,) = torch.autograd.grad(loss, leaf, upstream.float())
    assert_single_rounding(grad.reshape(n, c).half(), expected, "hill mean")
    old_design = single_rounding_errors(_rescaled(forward_grad, upstream, torch.float16).reshape(n, c), expected)
    assert old_design.max() > 100


@needs_extension
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scaled_backward_rounds_once(dtype, reduction):
    g = torch.Generator().manual_seed(46)
    n, c, k = 128, 150, 100
    z = (torch.randn(n, c, generator=g) * 3).to(dtype)
    old = (torch.randn(n, k, generator=g) * 3).to(dtype)
    new = (torch.randn(n, c, generator=g) * 3).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[::7] = -100
    if reduction == "none":
        upstream = ((torch.rand(n, generator=g) * 2 + 2) * torch.where(torch.arange(n) % 2 == 0, 1, -1)).to(dtype)
    else:
        upstream = torch.tensor(3.9, dtype=dtype)  # not a power of 2: a double rounding shows
    make_args = _mpt(focus="neg_flip", label_smoothing=0.1, new_class_bias=2.0, num_old_classes=k, tau=2.0,
                     reduction=reduction)
    forward_grad, grad = _host_gradient(make_args(z, old, new, y), reduction == "mean", upstream)
    expected = _float32_reference(make_args, z, old, new, y, upstream)
    assert_single_rounding(grad.to(dtype), expected, f"{dtype} {reduction}", exact_fraction=0.99)
    with pytest.raises(AssertionError, match="rounded once|ulp off"):  # the old design fails it
        assert_single_rounding(_rescaled(forward_grad, upstream, dtype), expected, "rescaled", exact_fraction=0.99)


@needs_extension
@pytest.mark.parametrize("loss", ["hill", "splc"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_multilabel_backward_rewrites_the_elements_whose_upstream_is_not_one(loss, reduction):
    g = torch.Generator().manual_seed(47)
    n, c = 12, 37
    x = torch.randn(n, c, generator=g) * 4
    positive = torch.rand(n, c, generator=g) < 0.4

    def args_of(logits):
        if loss == "hill":
            return check_hill(logits, positive, lamb=1.5, margin=1.0, gamma=2.0, reduction=reduction)
        return check_splc(logits, positive, epoch=3, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0,
                          reduction=reduction)

    args = args_of(x)
    scale = 1.0 / x.numel() if reduction == "mean" else 1.0
    x32, flags = x.reshape(-1), positive.reshape(-1)
    _, forward_grad = _host_multilabel(args, x32, flags, scale=scale)
    if reduction == "none":
        per_element = torch.rand(n, c, generator=g) * 3 - 1
        per_element[torch.rand(n, c, generator=g) < 0.3] = 1.0
        per_element[2] = 1.0  # a whole row
        per_element[3, 5] = NAN
        upstreams = [per_element, torch.tensor(1.0).expand(n, c)]
    else:
        upstreams = [torch.tensor(2.0**15), torch.tensor(-0.37), torch.tensor(1.0)]
    for upstream in upstreams:
        rewritten = (upstream.expand(n, c) != 1).reshape(-1)
        flat_upstream = upstream.reshape(-1) if upstream.dim() else upstream
        poisoned = torch.full_like(forward_grad, UNTOUCHED)
        _host_multilabel_backward(args, x32, flags, scale, flat_upstream, poisoned)
        assert (poisoned[~rewritten] == UNTOUCHED).all() and not (poisoned[rewritten] == UNTOUCHED).any()
        grad = forward_grad.clone()
        _host_multilabel_backward(args, x32, flags, scale, flat_upstream, grad)
        leaf = x.double().requires_grad_(True)
        (expected,) = torch.autograd.grad(reference.multilabel_loss(args_of(leaf)), leaf, upstream.double())
        torch.testing.assert_close(grad.reshape(n, c).double(), expected, rtol=1e-5,
                                   atol=1e-6 * expected.nan_to_num().abs().max().item(), equal_nan=True)


# --------------------------------------------------------------------------- host-side glue
@needs_extension
def test_kernel_input_records_and_saved_state():
    # what backends/cuda.py hands the kernels (built here from CPU tensors: no launch)
    z, old, new, y = _softmax_data(53)
    y32 = y.to(torch.int32)
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float16)
    args = _mpt(class_bias=bias, reduction="mean")(z.t().contiguous().t(), old, new, y32)  # columns not adjacent
    inputs, keep_alive = cuda_backend.softmax_inputs(args)
    logits, old_copy, new_copy, bias32 = keep_alive
    assert logits.stride(1) == 1 and torch.equal(logits, z) and inputs.logits == logits.data_ptr()
    assert inputs.logits_row_stride == C and inputs.num_rows == N and inputs.dtype == _C.DTYPES["float32"]
    assert inputs.old_logits == old.data_ptr() and inputs.old_row_stride == K  # adjacent columns: not copied
    assert inputs.new_logits == new.data_ptr() and inputs.new_row_stride == C
    assert bias32.dtype == torch.float32 and inputs.class_bias == bias32.data_ptr()
    assert inputs.target == y32.data_ptr() and not inputs.target_is_int64 and inputs.target_stride == 1
    assert inputs.has_ignore_index and inputs.ignore_index == -100 and inputs.row.num_classes == C
    saved = cuda_backend._softmax_saved(args, True)
    assert loss_shape(args) == () and [t.shape for t in saved] == [(N, C), (N, _C.SOFTMAX_STAT_FLOATS)]
    assert saved[0].dtype == z.dtype and saved[1].dtype == torch.float32
    assert cuda_backend._softmax_saved(args, False) == []

    x = torch.randn(6, 10)
    targets = torch.rand(6, 10) > 0.5
    ml_args = check_splc(x, targets, epoch=3, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction="mean")
    ml_inputs, _ = cuda_backend.multilabel_inputs(ml_args)
    assert ml_inputs.grad_scale == pytest.approx(1 / 60) and ml_inputs.target_dtype == _C.DTYPES["bool"]
    assert ml_inputs.math.splc and ml_inputs.math.flip_logit < math.inf and ml_inputs.num_cols == 10


@needs_extension
def test_backward_entry_points_reject_missing_buffers():
    # checked before any CUDA call, so they run without a GPU
    z, old, new, y = _softmax_data(59)
    inputs, _ = cuda_backend.softmax_inputs(_mpt()(z, old, new, y))
    with pytest.raises(ValueError, match="stats, upstream and grad are required"):
        _C.softmax_backward(inputs=inputs, stats=0, upstream=0, upstream_stride=0, grad=0, device=0, stream=0)
    inputs.num_rows = 0  # nothing to do: returns before touching the device
    _C.softmax_backward(inputs=inputs, stats=0, upstream=0, upstream_stride=0, grad=0, device=0, stream=0)
    ml_inputs, _ = cuda_backend.multilabel_inputs(
        check_hill(z, z > 0, lamb=1.5, margin=1.0, gamma=2.0, reduction="none"))
    with pytest.raises(ValueError, match="upstream and grad are required"):
        _C.multilabel_backward(inputs=ml_inputs, upstream=0, upstream_stride0=0, upstream_stride1=0, grad=0,
                               device=0, stream=0)
    with pytest.raises(ValueError, match="stats is required with grad"):
        _C.softmax_forward(inputs=cuda_backend.softmax_inputs(_mpt()(z, old, new, y))[0], reduction=0,
                           row_loss=1, counted_rows=0, loss=0, grad=1, stats=0, device=0, stream=0)


def test_driver_too_old_for_the_static_runtime():
    # _C links the CUDA runtime statically: it runs on a driver of the same major version
    # or newer, and the backend's status says so instead of failing at the first launch
    assert cuda_backend.driver_too_old(13000, 13000) is None
    assert cuda_backend.driver_too_old(13000, 13020) is None
    assert cuda_backend.driver_too_old(12080, 13000) is None
    reason = cuda_backend.driver_too_old(13000, 12080)
    assert "CUDA 13.0 runtime" in reason and "CUDA 12.8 only" in reason
    assert "no NVIDIA driver" in cuda_backend.driver_too_old(13000, 0)
