"""The ``cuda`` backend against the reference, on a GPU, at realistic shapes.

Every loss and option, in float32, float16 and bfloat16, with an upstream gradient
other than 1, reduction "none" with a random upstream gradient, row counts and class
counts that are not multiples of a block (small rows, rows kept in registers, rows
streamed in chunks), poisoned memory under the gradient buffer, non-contiguous and
misaligned rows, and bitwise determinism. The reference runs on the same device, in
float64, rounded once to the logits' dtype (``float64_reference``).

Most of these tests also run without a GPU, in CI: tests/test_cuda_emulated.py imports
them and runs them on the CPU in the CUDA emulation (``DEVICE`` "cpu", at most
``MAX_ROWS`` rows per case).

A scaled backward (GradScaler's 2^15, a loss weight, a random upstream of "none") must
round the gradient once: it is compared with autograd of the reference in float32 cast
once into the logits' dtype (1 ulp, see rounding.assert_single_rounding), and
the backward kernels must write nothing where the upstream gradient is 1.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import inspect

import mpt_kernels as mk
from mpt_kernels import reference
from mpt_kernels._registry import select_backend
from mpt_kernels._validation import MAX_KERNEL_CLASSES, MAX_KERNEL_ROWS, check_splc
from mpt_kernels.backends import cuda as cuda_backend
from rounding import assert_single_rounding, single_rounding_errors
from multilabel_edges import (
    float_targets, infinite_logits, splc_negative_losses, splc_threshold_cases,
)
from softmax_edges import masked_with_finite_values, rows_at_the_float32_minimum
from spec_gradients import away_from_splc_threshold

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
BACKEND = "cuda"
# Rows per case at most (None: as written). tests/test_cuda_emulated.py runs the tests
# shared with it on the CPU, in the CUDA emulation, with DEVICE "cpu" and a few rows.
MAX_ROWS = None
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of each dtype's rounding; absolute ones scale with the tensor
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _backend_ready():
    reason = cuda_backend._status()
    if reason is not None:
        pytest.fail(f"the cuda backend cannot run on this GPU machine: {reason}")


# --------------------------------------------------------------------------- helpers
def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 floor: float = 1e-30) -> None:
    """Relative to the largest finite magnitude compared, at least ``floor``."""
    assert actual.dtype == expected.dtype == dtype, what
    assert actual.shape == expected.shape, what
    rtol = TOLERANCE[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = max(floor, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def loss_and_grad(function, logits, *args, upstream=None, backend, **options):
    """The loss and the logits' gradient for an upstream gradient (default: 1.7)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = function(x, *args, backend=backend, **options)
    if upstream is None:
        upstream = torch.full_like(loss, 1.7)
    loss.backward(upstream)
    return loss.detach(), x.grad


def float64_reference(function, logits, *args, upstream, **options):
    """The reference's loss and gradient computed in float64, rounded once to the logits'
    dtype. (In float32, torch's CPU log_softmax backward sums its upstream gradient one
    element after another per vector lane: in a row of C = 50000 it put a gradient entry
    of 0.198 5e-5 (relative) off, where the emulated kernel was within 3e-8 of float64.)"""
    def widen(value):
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    loss, grad = loss_and_grad(function, widen(logits), *map(widen, args), upstream=widen(upstream),
                               backend="reference", **options)
    return loss.to(logits.dtype), grad.to(logits.dtype)


def check_against_reference(function, logits, *args, upstream=None, **options):
    dtype = logits.dtype
    loss, grad = loss_and_grad(function, logits, *args, upstream=upstream, backend=BACKEND, **options)
    if upstream is None:
        upstream = torch.full_like(loss, 1.7)  # loss_and_grad's default, in the logits' dtype
    ref_loss, ref_grad = float64_reference(function, logits, *args, upstream=upstream, **options)
    # A loss is a sum of terms of the size of the logits (|z| ~ 3 here), computed to a few
    # float32 roundings of those: a loss that is exactly 0 (C = 1, say) comes out as ~1e-9.
    assert_close(loss, ref_loss, dtype, "loss", floor=1.0)
    # Likewise a gradient entry is a sum of terms of size up to 1 per row, times the upstream
    # gradient over the row count under "mean": an entry that is exactly 0 (C = 1) comes
    # out as a few float32 roundings of that (the H200 run: 4.7e-10 for N = 333).
    assert_close(grad, ref_grad, dtype, "gradient", floor=1.0 / max(1, logits.shape[0]))
    return loss, grad


def random_upstream(loss: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device=loss.device).manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, device=loss.device) * 2 - 0.5).to(loss.dtype)


def row_count(n: int) -> int:
    return n if MAX_ROWS is None else min(n, MAX_ROWS)


def softmax_inputs(n, c, k, dtype, seed, *, scale=3.0, ignored=0.1, device=None):
    """Logits, old (n, k) and new (n, c) teachers and targets, with rows where the
    teachers and the student are right, so every focus mode sees both outcomes, and rows
    1 and 2 aimed at classes k and k - 1, either side of where the bias b starts (n
    capped by MAX_ROWS)."""
    n, device = row_count(n), device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, c, generator=g, device=device) * scale
    old = torch.randn(n, k, generator=g, device=device) * scale
    new = torch.randn(n, c, generator=g, device=device) * scale
    y = torch.randint(0, c, (n,), generator=g, device=device)
    rows = torch.arange(n, device=device)
    teacher_right = rows % 2 == 0
    old_right = teacher_right & (y < k)
    old[rows[old_right], y[old_right]] += 4 * scale
    new[rows[teacher_right], y[teacher_right]] += 4 * scale
    student_right = rows % 3 == 0
    z[rows[student_right], y[student_right]] += 4 * scale
    y[torch.rand(n, generator=g, device=device) < ignored] = -100
    if k < c:  # the first new class (where the bias b starts) and the last old one
        y[1:3] = torch.tensor([k, k - 1], device=device)[:max(0, min(n, 3) - 1)]
    return z.to(dtype), old.to(dtype), new.to(dtype), y


def multilabel_inputs(n, c, dtype, target_dtype, seed, *, tau=0.6, device=None):
    """Logits ~ 3·N(0, 1) kept 0.1 away from logit(τ): SPLC's correction of a negative is a
    hard decision at σ(x) = τ, where two σ may round to different sides (an H200 run of
    134M elements found two such entries, each off by the whole loss). n capped by MAX_ROWS."""
    n, device = row_count(n), device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    x = away_from_splc_threshold(torch.randn(n, c, generator=g, device=device) * 3, tau)
    positive = torch.rand(n, c, generator=g, device=device) < 0.3
    if target_dtype == torch.bool:
        targets = positive
    elif target_dtype.is_floating_point:  # soft labels around the 0.5 threshold; -1 and NaN are negatives
        targets = float_targets(positive, target_dtype, g)
        targets[0, : min(c, 3)] = 0.5  # exactly 0.5 is negative
    else:
        targets = positive.to(target_dtype) * 3
    return x.to(dtype), targets


def poison_allocator(*shapes_and_dtypes) -> None:
    """Leaves NaN in the caching allocator's free blocks, so that a buffer the kernels
    fail to write shows up as NaN instead of happening to hold zeros. (The emulation
    fills every buffer the backend allocates with NaN itself.)"""
    if DEVICE != "cuda":
        return
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape, dtype in shapes_and_dtypes]
    del blocks


# --------------------------------------------------------------------------- registration
def test_auto_rank_follows_the_measured_rule():
    # softmax family: after triton (10) at every size; multi-label: before it up to
    # N·C = 2^25 elements (host time decides there), after it beyond
    small = torch.empty(4096, 8192, device=DEVICE, dtype=torch.bfloat16)
    large = torch.empty(4096, 8193, device=DEVICE, dtype=torch.bfloat16)
    backend = select_backend("softmax", "cuda", small)
    assert backend.name == "cuda"
    assert backend.auto_rank("softmax", small) == backend.auto_rank("softmax", large) == 20.0
    assert backend.auto_rank("multilabel", small) == 5.0 and backend.auto_rank("multilabel", large) == 20.0
    assert select_backend("multilabel", "auto", small).name == "cuda"
    assert select_backend("multilabel", "auto", large).name == "triton"
    assert select_backend("softmax", "auto", small).name == "triton"
    assert cuda_backend._C.cuda_runtime_version() >= 12000


def test_refuses_cpu_and_float64():
    with pytest.raises(ValueError, match="CUDA tensors"):
        mk.margin_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), backend="cuda")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        mk.margin_cross_entropy(
            torch.randn(3, 4, device=DEVICE, dtype=torch.float64), torch.tensor([0, 1, 2], device=DEVICE),
            backend="cuda",
        )


# --------------------------------------------------------------------------- softmax family: every option
SOURCES = {"old": (True, False), "new": (False, True), "both": (True, True)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["kl", "lm"])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
@pytest.mark.parametrize("sources", list(SOURCES))
@pytest.mark.parametrize("bias", ["none", "new_class", "vector"])
def test_mpt_loss_options(dtype, kind, focus, sources, bias):
    seed = zlib.crc32(f"{kind}-{focus}-{sources}-{bias}".encode()) % 10_000  # hash() of str varies per run
    n, c, k = 256, 1000, 611
    z, old, new, y = softmax_inputs(n, c, k, dtype, seed)
    use_old, use_new = SOURCES[sources]
    options = dict(
        kind=kind, focus=focus, tau=[5.0, 2.0, 0.7][seed % 3], alpha=0.5, beta=3.0,
        scale_by_tau_sq=seed % 2 == 0, label_smoothing=[0.0, 0.1][seed % 2], ce_weight=0.9,
        old_weight=0.7, new_weight=1.3, new_class_bias=0.0, reduction=["mean", "sum"][seed % 2],
    )
    if bias == "new_class":
        options.update(new_class_bias=4.0, num_old_classes=k)
    if bias == "vector":
        options.update(class_bias=torch.linspace(-2, 3, c, device=DEVICE, dtype=torch.float64))
    check_against_reference(mk.mpt_loss, z, y, old if use_old else None, new if use_new else None, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_margin_cross_entropy(dtype, reduction, epsilon):
    z, _, _, y = softmax_inputs(300, 1234, 700, dtype, 1)
    check_against_reference(
        mk.margin_cross_entropy, z, y, num_old_classes=700, new_class_bias=2.0, label_smoothing=epsilon,
        reduction=reduction,
    )
    class_bias = torch.randn(1234, device=DEVICE, dtype=torch.float16)  # any float dtype, applied in float32
    check_against_reference(mk.margin_cross_entropy, z, y.clamp(min=0).to(torch.int32), class_bias=class_bias,
                            ignore_index=7, label_smoothing=epsilon, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["kl", "lm"])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
def test_focal_distillation_with_fewer_reference_classes(dtype, kind, focus):
    z, old, _, y = softmax_inputs(200, 1500, 1000, dtype, 2)
    check_against_reference(
        mk.focal_distillation, z, old, y, kind=kind, focus=focus, tau=4.0, scale_by_tau_sq=True, reduction="mean",
    )


# --------------------------------------------------------------------------- softmax family: shapes
# small rows (one 16-byte slot per thread), rows kept in registers (up to 4096 classes
# of float32, 8192 of 16-bit: _C.ROW_THREADS * _C.SLOTS_PER_THREAD slots), and streamed
# rows (several chunks: in shared memory between the forward's sweeps up to 4 of them,
# the rest read twice); class counts not multiples of any block, K = 2C/3 not a
# multiple of the slot either
SHAPES = [(333, 1), (333, 7), (512, 100), (256, 1000), (128, 1025), (64, 4099), (64, 8192), (32, 8193), (16, 21843),
          (8, 50000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", SHAPES)
def test_mpt_loss_shapes(dtype, n, c):
    k = max(1, (2 * c) // 3)
    z, old, new, y = softmax_inputs(n, c, k, dtype, c)
    check_against_reference(mk.mpt_loss, z, y, old, new, new_class_bias=4.0, label_smoothing=0.05, focus="neg_flip")
    check_against_reference(mk.mpt_loss, z, y, old, None, kind="lm", new_class_bias=1.0, reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1000, 32768, 131072])  # rows in registers, streamed in 4-8 and in 16-32 chunks
def test_realistic_shapes(dtype, c):
    n, k = 4096, c // 2 + 3
    z, old, new, y = softmax_inputs(n, c, k, dtype, 60 + c % 7)
    loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", reduction="none")
    check_against_reference(mk.mpt_loss, z, y, old, new, upstream=random_upstream(loss, 61), reduction="none",
                            label_smoothing=0.1, focus="neg_flip")
    check_against_reference(mk.mpt_loss, z, y, old, new, kind="lm", class_bias=torch.randn(c, device=DEVICE))
    check_against_reference(mk.margin_cross_entropy, z, y, new_class_bias=4.0, num_old_classes=k)
    check_against_reference(mk.focal_distillation, z, old, y, focus="student_wrong", reduction="sum")
    x, t = multilabel_inputs(n, c, dtype, torch.bool, 62)
    check_against_reference(mk.hill_loss, x, t, reduction="mean")
    check_against_reference(mk.splc_loss, x, t, epoch=2, reduction="none", upstream=random_upstream(x, 63))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", [(512, 100), (64, 4099), (16, 21843)])
def test_reduction_none_with_random_upstream(dtype, n, c):
    z, old, new, y = softmax_inputs(n, c, c // 2, dtype, 3)
    loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", reduction="none")
    upstream = random_upstream(loss, 4)
    upstream[:3] = 1  # rows the backward kernel leaves as the forward wrote them
    loss, grad = check_against_reference(mk.mpt_loss, z, y, old, new, upstream=upstream, reduction="none")
    assert (loss[y == -100] == 0).all() and (grad[y == -100] == 0).all()


# Shared memory for a long row's chunks between the forward's sweeps
# (cuda_backend.SHARED_ROW_BYTES): none (the row is read twice); 48 KiB, one chunk of
# the logits and both teachers (2 slots x 512 threads x 16 bytes each: 3 chunks of the
# logits alone); the device's limit (sm_90 and the emulation: 4 chunks of the three,
# all of bf16 C = 20000's 3, 4 of float32 C = 20000's 5).
SHARED_ROW_LIMITS = {"none": 0, "one_chunk": 48 * 1024, "device": None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [9000, 20000])  # 2-3 chunks; 3-5 chunks
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_long_rows_from_shared_memory_or_read_twice(dtype, c, reduction, monkeypatch):
    """Upstream 1: the gradient is the forward's, whose second sweep reads the staged
    chunks from shared memory. Each loss has other streams (both teachers, the old or the
    new one, none); every limit matches the reference and gives the same bits."""
    z, old, new, y = softmax_inputs(64, c, c // 2, dtype, 70 + c)
    options = dict(reduction=reduction)
    cases = [  # (function, its inputs, options, the streams it reads)
        (mk.mpt_loss, (z, y, old, new), dict(options, new_class_bias=2.0, label_smoothing=0.1, focus="neg_flip"), 3),
        (mk.mpt_loss, (z, y, None, new), dict(options, num_old_classes=c // 2, kind="lm"), 2),
        (mk.focal_distillation, (z, old, y), dict(options, focus="student_wrong"), 2),
        (mk.margin_cross_entropy, (z, y), dict(options, new_class_bias=4.0, num_old_classes=c // 3), 1),
    ]
    one = torch.ones(y.shape if reduction == "none" else (), device=DEVICE, dtype=dtype)
    for function, args, case_options, streams in cases:
        results, staged = {}, {}
        for name, limit in SHARED_ROW_LIMITS.items():
            monkeypatch.setattr(cuda_backend, "SHARED_ROW_BYTES", limit)
            plan = cuda_backend.softmax_forward_plan(validated_args(function, *args, **case_options))
            assert plan["chunks"] > 1 and plan["threads"] == 512, plan  # a streamed row
            assert plan["shared_bytes"] <= (limit if limit is not None else 227 * 1024), plan
            staged[name] = plan["staged_chunks"]
            results[name] = check_against_reference(function, *args, upstream=one, **case_options)
        what = (function.__name__, staged, plan["chunks"])
        assert staged["none"] == 0 and 1 <= staged["one_chunk"] <= staged["device"] <= plan["chunks"], what
        if streams == 3:  # a chunk of the logits and both teachers takes 48 KiB
            assert staged["one_chunk"] == 1, what
            if DEVICE == "cpu" or torch.cuda.get_device_capability() == (9, 0):  # 227 KiB a block
                assert staged["device"] == min(plan["chunks"], 4), what
        for name in ("one_chunk", "device"):
            assert torch.equal(results[name][0], results["none"][0]), (function.__name__, name)
            assert torch.equal(results[name][1], results["none"][1]), (function.__name__, name)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "65536"])
def test_shared_row_bytes_must_be_none_or_a_count(bad, monkeypatch):
    z, old, new, y = softmax_inputs(4, 100, 50, torch.float32, 71)
    monkeypatch.setattr(cuda_backend, "SHARED_ROW_BYTES", bad)
    with pytest.raises(ValueError, match="SHARED_ROW_BYTES must be None or an int >= 0"):
        loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_strides_and_exact_one(reduction):
    z, old, new, y = softmax_inputs(64, 999, 500, torch.float32, 5)
    # an upstream gradient of exactly 1 (the backward kernel writes nothing), and an
    # expanded one (stride 0) as `loss.sum().backward()` gives for "none"
    for make_upstream in (torch.ones_like, lambda loss: torch.full((), 0.3, device=DEVICE).expand_as(loss)):
        loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", reduction=reduction)
        check_against_reference(mk.mpt_loss, z, y, old, new, upstream=make_upstream(loss), reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored_and_empty_batch(dtype):
    z, old, new, y = softmax_inputs(40, 300, 200, dtype, 6)
    y[:] = -100
    loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND)
    assert loss.item() == 0.0 and (grad == 0).all()
    empty = torch.empty(0, 300, device=DEVICE, dtype=dtype)
    target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        loss, grad = loss_and_grad(mk.mpt_loss, empty, target, None, None, new_class_bias=0.0,
                                   reduction=reduction, backend=BACKEND)
        assert grad.shape == empty.shape
        if reduction == "none":
            assert loss.shape == (0,)
        else:
            assert loss.item() == 0.0


def test_ignored_rows_keep_zero_gradient_for_a_nan_upstream():
    # as the reference: an ignored (or out-of-range) row's gradient is 0, not 0 * NaN
    z, old, new, y = softmax_inputs(64, 700, 400, torch.float32, 24, ignored=0.0)
    y[[0, 3]] = -100
    y[5] = 700
    for reduction, upstream in (("none", torch.full(y.shape, float("nan"), device=DEVICE)),
                                ("sum", torch.tensor(float("nan"), device=DEVICE))):
        _, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, reduction=reduction,
                                upstream=upstream)
        assert (grad[[0, 3, 5]] == 0).all()
        assert torch.isnan(grad[[1, 2, 4, 6]]).all()


def test_no_gradient_buffer_without_autograd():
    n, c = 4096, 8000  # 128 MiB of float32 per N x C buffer
    z, old, new, y = softmax_inputs(n, c, 4000, torch.float32, 25)
    x, t = multilabel_inputs(n, c, torch.float32, torch.bool, 26)
    leaf = z.clone().requires_grad_(True)
    for grad_mode, logits in ((torch.no_grad, leaf), (torch.enable_grad, z), (torch.no_grad, x)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with grad_mode():
            if logits is x:
                loss = mk.hill_loss(logits, t, backend=BACKEND)
            else:
                loss = mk.mpt_loss(logits, y, old, new, backend=BACKEND)
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < n * c * 4 // 2  # no N x C gradient was allocated
        if logits is x:
            expected = mk.hill_loss(logits, t, backend="reference")
        else:
            expected = mk.mpt_loss(logits.detach(), y, old, new, backend="reference")
        assert_close(loss.detach(), expected, torch.float32, "loss")


# --------------------------------------------------------------------------- softmax family: numerics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2000, 9000])  # rows in registers; streamed
def test_masked_classes_stay_finite(dtype, c):
    k = (3 * c) // 5
    z, old, new, y = softmax_inputs(128, c, k, dtype, 7)
    y[1] = 0  # its whole new-class segment is masked below
    g = torch.Generator(device=DEVICE).manual_seed(8)
    mask = torch.rand(z.shape, generator=g, device=DEVICE) < 0.3
    mask[torch.arange(z.shape[0], device=DEVICE), y.clamp(min=0)] = False  # the targets are never masked
    z[mask] = float("-inf")
    old[mask[:, :k]] = float("-inf")
    new[mask] = float("-inf")
    old[0] = float("-inf")  # an old model sure of class 5
    old[0, 5] = 1.0
    z[0, 5] = 0.5
    z[1, k:] = new[1, k:] = float("-inf")
    loss, grad = check_against_reference(mk.mpt_loss, z, y, old, new, new_class_bias=2.0, num_old_classes=k,
                                         focus="neg_flip", reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_rows_too_long_for_32_bit_columns_are_refused():
    """An expanded row (no memory behind it) past the kernels' 32-bit column range: a
    clear error before anything is copied or launched."""
    too_long = MAX_KERNEL_CLASSES + 1
    z = torch.zeros(2, 1, device=DEVICE).expand(2, too_long)
    y = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=f"cuda backend takes at most {MAX_KERNEL_CLASSES} classes per row"):
        mk.margin_cross_entropy(z, y, backend=BACKEND)


def test_more_rows_than_a_grid_holds_are_refused():
    """One block per row: 2^31 expanded rows (no memory behind them) are our clear
    error before _C sees them."""
    z = torch.zeros(1, 1, device=DEVICE).expand(MAX_KERNEL_ROWS + 1, 1)
    y = torch.zeros(1, dtype=torch.int64, device=DEVICE).expand(MAX_KERNEL_ROWS + 1)
    with pytest.raises(ValueError, match=f"cuda backend takes at most {MAX_KERNEL_ROWS} rows"):
        mk.margin_cross_entropy(z, y, backend=BACKEND)


def test_rows_at_the_float32_minimum_are_the_documented_limit():
    """Every case of the README's limit still differs from the reference; when a fix makes
    one agree, this fails: update the README's limit then."""
    def fn(loss_name, backend, *inputs, **options):
        return loss_and_grad(getattr(mk, loss_name), *inputs, backend=backend, reduction="none", **options)

    assert rows_at_the_float32_minimum(BACKEND, fn, DEVICE) == [
        "cross_entropy_row", "teacher_row_tau_1", "teacher_row_tau_5"]


@pytest.mark.parametrize("dtype, c", [(torch.bfloat16, 100), (torch.float32, 100), (torch.bfloat16, 3000),
                                      (torch.bfloat16, 9000), (torch.float32, 5000)])
def test_masked_with_finite_values(dtype, c):
    """Classes masked with finfo(dtype).min, and a student at -inf where the teachers are
    -1e4 (tests/softmax_edges.py), in a row of few slots, a row in registers and a long
    row: a finite loss and gradient, as the reference's."""
    z, old, new, y = softmax_inputs(16, c, c // 2, dtype, 48, ignored=0.0)
    z, y, old, new = masked_with_finite_values(z, y, old, new, width=32)  # < K: see softmax_edges
    for tau in (1.0, 5.0):
        loss, grad = check_against_reference(mk.mpt_loss, z, y, old, new, tau=tau, num_old_classes=c // 2,
                                             reduction="none", upstream=random_upstream(torch.empty(y.shape, dtype=dtype, device=y.device), 49))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    loss, _ = check_against_reference(mk.margin_cross_entropy, z, y, reduction="none")
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(dtype):
    z, old, new, y = softmax_inputs(64, 777, 400, dtype, 9)
    y[:] = 1
    z[3, 100] = float("nan")
    old[5, 7] = float("nan")
    new[9, 700] = float("nan")
    loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, reduction="none")
    assert torch.isnan(loss[[3, 5, 9]]).all()
    assert torch.isfinite(loss[[0, 1, 2, 4, 6, 7, 8]]).all()
    loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND)
    assert torch.isnan(loss)


def test_extreme_logits():
    z, old, new, y = softmax_inputs(64, 3000, 2000, torch.float32, 10, scale=1e4)
    options = {"new_class_bias": 4.0, "label_smoothing": 0.1}
    loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, **options)
    ref_loss, ref_grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, torch.float32, "loss", floor=1.0)
    assert_close(grad, ref_grad, torch.float32, "gradient")


@pytest.mark.parametrize("c", [300, 5000])  # rows in registers; streamed
def test_large_logits_keep_float32_precision(c):
    """Logits near 1e4 (one offset on the student and both teachers, which no softmax
    sees) at τ = 1: loss and gradient at the usual float32 tolerance. Exponentials taken
    against a rounded LSE lost precision in proportion to |z|·log2(e)/τ (a gradient 1e-4
    off, relative to its largest entry, in the CUDA emulation)."""
    z, old, new, y = softmax_inputs(64, c, c // 2, torch.float32, 12)
    check_against_reference(mk.mpt_loss, z + 1e4, y, old + 1e4, new + 1e4, tau=1.0, new_class_bias=4.0,
                            label_smoothing=0.1, num_old_classes=c // 2, reduction="none",
                            upstream=random_upstream(torch.empty(y.shape, device=y.device), 13))
    # the cross-entropy alone, whose loss subtracted z̃_y from an LSE near 1e4 (4e-5 off)
    check_against_reference(mk.margin_cross_entropy, z + 1e4, y, reduction="none")


@pytest.mark.parametrize("c", [500, 5000])  # rows in registers; streamed
def test_out_of_range_target_poisons_its_row_without_reading_out_of_bounds(c):
    z, old, new, y = softmax_inputs(64, c, c // 2, torch.float32, 11)
    y[[2, 5]] = torch.tensor([c, -3], device=DEVICE)
    loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, reduction="none")
    assert torch.isnan(loss[[2, 5]]).all() and (grad[[2, 5]] == 0).all()
    valid = torch.ones(y.shape, dtype=torch.bool, device=DEVICE)
    valid[[2, 5]] = False
    assert torch.isfinite(loss[valid]).all()


@pytest.mark.parametrize("c", [300, 9000])  # rows in registers; streamed
def test_argmax_ties_in_bfloat16(c):
    # bf16 logits tie often; the lowest index must win as in torch.argmax
    n = row_count(512)
    g = torch.Generator(device=DEVICE).manual_seed(12)
    z = (torch.randint(0, 4, (n, c), generator=g, device=DEVICE).float()).to(torch.bfloat16)
    old = (torch.randint(0, 4, (n, c), generator=g, device=DEVICE).float()).to(torch.bfloat16)
    y = old.float().argmax(dim=1)
    y[::2] = torch.randint(0, c, (n // 2,), generator=g, device=DEVICE)
    for focus in ("ref_correct", "neg_flip", "student_wrong"):
        check_against_reference(mk.focal_distillation, z, old, y, kind="lm", focus=focus, reduction="none",
                                upstream=torch.ones(n, device=DEVICE, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- memory layouts
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["padded_rows", "misaligned_rows", "transposed", "strided_target"])
@pytest.mark.parametrize("c", [1003, 9001])  # rows in registers; streamed
def test_non_contiguous_inputs(dtype, layout, c):
    n, k = 96, c // 2
    z, old, new, y = softmax_inputs(n, c, k, dtype, 13)

    def relayout(t):
        if layout == "padded_rows":  # row stride > C, rows still 16-byte aligned: vector loads
            width = 8 * ((t.shape[1] + 7) // 8) + 16
            wide = torch.full((t.shape[0], width), float("nan"), dtype=t.dtype, device=DEVICE)
            wide[:, : t.shape[1]] = t
            return wide[:, : t.shape[1]]
        if layout == "misaligned_rows":  # offset by one element: scalar loads
            wide = torch.full((t.shape[0], t.shape[1] + 1), float("nan"), dtype=t.dtype, device=DEVICE)
            wide[:, 1:] = t
            return wide[:, 1:]
        if layout == "transposed":  # column stride != 1: copied
            return t.t().contiguous().t()
        return t

    target = y
    if layout == "strided_target":
        target = torch.stack([y, y], dim=1)[:, 0]
        assert target.stride(0) == 2
    zs, olds, news = relayout(z), relayout(old), relayout(new)
    assert torch.equal(zs, z)
    loss, grad = check_against_reference(mk.mpt_loss, zs, target, olds, news, new_class_bias=3.0,
                                         num_old_classes=k, label_smoothing=0.1)
    contiguous_loss, contiguous_grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND,
                                                     new_class_bias=3.0, num_old_classes=k, label_smoothing=0.1)
    assert torch.equal(loss, contiguous_loss) and torch.equal(grad, contiguous_grad)


# --------------------------------------------------------------------------- buffers, determinism, streams
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [100, 3000, 20000])
def test_poisoned_gradient_buffer(dtype, c):
    n = row_count(128)
    z, old, new, y = softmax_inputs(n, c, c // 2, dtype, 14, ignored=0.3)
    y[0] = 10**6  # out of range: zero gradient, NaN loss
    for reduction in ("mean", "none"):
        poison_allocator(((n, c), dtype), ((n, c), dtype), ((n,), torch.float32), ((n,), dtype))
        loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, reduction=reduction,
                                   upstream=torch.ones((n,) if reduction == "none" else (), device=DEVICE,
                                                       dtype=dtype))
        assert not torch.isnan(grad).any()
        assert (grad[y == -100] == 0).all() and (grad[0] == 0).all()
        if reduction == "none":
            assert (loss[y == -100] == 0).all() and torch.isnan(loss[0])
            assert torch.isfinite(loss[1:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    z, old, new, y = softmax_inputs(1024, 5000, 3000, dtype, 15)
    first = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, new_class_bias=4.0, num_old_classes=3000)
    for _ in range(3):
        again = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, new_class_bias=4.0, num_old_classes=3000)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    x, t = multilabel_inputs(2048, 1000, dtype, torch.bool, 16)
    first = loss_and_grad(mk.hill_loss, x, t, backend=BACKEND)
    for _ in range(3):
        again = loss_and_grad(mk.hill_loss, x, t, backend=BACKEND)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", [BACKEND, "triton"])
def test_no_host_synchronisation(backend):
    """Both fused backends (Triton's here too: its GPU suite has no such test), once the
    kernels are compiled (the first call of each variant, before the check)."""
    z, old, new, y = softmax_inputs(256, 4000, 2000, torch.bfloat16, 17)
    x, t = multilabel_inputs(256, 500, torch.float16, torch.float32, 18)
    bias = torch.randn(4000, device=DEVICE)

    def calls():
        for reduction, value in itertools.product(("mean", "none"), (1.0, 0.5)):  # 0.5: the recompute kernels
            loss_and_grad(mk.mpt_loss, z, y, old, new, class_bias=bias, reduction=reduction, backend=backend,
                          upstream=torch.full((256,) if reduction == "none" else (), value, device=DEVICE,
                                              dtype=torch.bfloat16))
            loss_and_grad(mk.splc_loss, x, t, epoch=3, reduction=reduction, backend=backend,
                          upstream=torch.full(x.shape if reduction == "none" else (), value, device=DEVICE,
                                              dtype=torch.float16))

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_runs_on_the_current_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        z, old, new, y = softmax_inputs(512, 8000, 4000, torch.float32, 19)
        loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, new_class_bias=0.0)
        ref = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", new_class_bias=0.0)
    stream.synchronize()
    assert_close(loss, ref[0], torch.float32, "loss")
    assert_close(grad, ref[1], torch.float32, "gradient")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    device = torch.device("cuda", 1)
    z, old, new, y = softmax_inputs(64, 1000, 500, torch.float32, 20, device=device)
    torch.cuda.set_device(0)
    loss, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, new_class_bias=0.0)
    # _C's static runtime calls cudaSetDevice(1); torch's current device must stay 0
    assert torch.cuda.current_device() == 0
    ref = loss_and_grad(mk.mpt_loss, z, y, old, new, backend="reference", new_class_bias=0.0)
    assert loss.device == grad.device == device
    torch.testing.assert_close(loss, ref[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref[1], rtol=2e-5, atol=1e-7)


def test_cuda_graph_capture():
    z, old, new, y = softmax_inputs(128, 2000, 1000, torch.float32, 21)
    x, t = multilabel_inputs(128, 300, torch.float32, torch.bool, 22)
    expected = (mk.mpt_loss(z, y, old, new, backend=BACKEND), mk.hill_loss(x, t, backend=BACKEND))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        mk.mpt_loss(z, y, old, new, backend=BACKEND)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (mk.mpt_loss(z, y, old, new, backend=BACKEND), mk.hill_loss(x, t, backend=BACKEND))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


def test_torch_compile_fullgraph():
    z, old, new, y = softmax_inputs(128, 1000, 600, torch.float32, 23)

    def step(logits):
        return mk.mpt_loss(logits, y, old, new, backend=BACKEND, num_old_classes=600)

    compiled = torch.compile(step, fullgraph=True)
    eager = loss_and_grad(lambda x, backend: step(x), z, backend=BACKEND)
    traced = loss_and_grad(lambda x, backend: compiled(x), z, backend=BACKEND)
    torch.testing.assert_close(traced[0], eager[0])
    torch.testing.assert_close(traced[1], eager[1])


# --------------------------------------------------------------------------- a scaled backward rounds once
def float32_reference_gradient(function, logits, *args, upstream, **options):
    """Autograd of the reference on float32 copies of the inputs: what a single rounding
    of the gradient must give."""
    def to_float32(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    leaf = logits.detach().float().requires_grad_(True)
    loss = function(leaf, *map(to_float32, args), backend="reference", **options)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.float())
    return grad


def signed_upstream(loss: torch.Tensor, seed: int) -> torch.Tensor:
    """|g| in [2, 4), alternating signs; a scalar 3.9: not powers of 2, so a double rounding shows."""
    if loss.dim() == 0:
        return torch.full_like(loss, 3.9)
    g = torch.Generator(device=loss.device).manual_seed(seed)
    magnitude = 2 + 2 * torch.rand(loss.shape, generator=g, device=loss.device)
    sign = 1 - 2 * (torch.arange(loss.numel(), device=loss.device).reshape(loss.shape) % 2)
    return (magnitude * sign).to(loss.dtype)


# (function, its arguments after the logits, options) for the inputs (old, new, y)
GRAD_SCALER_CASES = {
    "margin_cross_entropy": lambda old, new, y: (mk.margin_cross_entropy, (y,), {}),
    "mpt_loss": lambda old, new, y: (mk.mpt_loss, (y, old, new),
                                     dict(tau=1.0, new_class_bias=2.0, num_old_classes=old.shape[1])),
}


@pytest.mark.parametrize("case", list(GRAD_SCALER_CASES))
@pytest.mark.parametrize("c", [1000, 20000])  # rows in registers; rows streamed in chunks
def test_fp16_grad_scaler_gradient_is_rounded_once(case, c):
    """float16 logits, "mean" over 512 rows, GradScaler at 2^15: entries of the gradient
    for an upstream of 1 below float16's normal range come out as the float32 reference
    rounded once (the old design, rescaling the stored gradient, is off by hundreds of ulps)."""
    n = 512
    z, old, new, y = softmax_inputs(n, c, (2 * c) // 3, torch.float16, 60 + c)
    z[:, ::3] -= 9.0  # p ~ 1e-8..1e-4: p/512 is a float16 subnormal
    new[:, ::3] -= 9.0  # and so is the teacher's softmax at τ = 1
    function, rest, options = GRAD_SCALER_CASES[case](old, new, y)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**15)
    leaf = z.clone().requires_grad_(True)
    scaler.scale(function(leaf, *rest, backend=BACKEND, **options)).backward()
    upstream = torch.tensor(2.0**15, device=DEVICE)
    expected = float32_reference_gradient(function, z, *rest, upstream=upstream, **options)
    unscaled = expected / 2.0**15  # the premise: many entries are float16 subnormals for an upstream of 1
    assert ((unscaled != 0) & (unscaled.abs() < torch.finfo(torch.float16).tiny)).sum() > 10_000
    # the terms of an entry are probabilities (≤ 1) times upstream/count (count ≤ n)
    assert_single_rounding(leaf.grad, expected, case, term_scale=2.0**15 / n)
    one = torch.ones((), device=DEVICE, dtype=torch.float16)
    _, unit = loss_and_grad(function, z, *rest, backend=BACKEND, upstream=one, **options)
    assert single_rounding_errors((unit.float() * 2.0**15).half(), expected).max() > 100  # the old design fails


def test_fp16_grad_scaler_multilabel_mean():
    x, t = multilabel_inputs(512, 300, torch.float16, torch.bool, 62)  # 1/(N·C): every entry below normal
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**15)
    for function, options in ((mk.hill_loss, {}), (mk.splc_loss, {"epoch": 2})):
        leaf = x.clone().requires_grad_(True)
        scaler.scale(function(leaf, t, reduction="mean", backend=BACKEND, **options)).backward()
        upstream = torch.tensor(2.0**15, device=DEVICE)
        expected = float32_reference_gradient(function, x, t, upstream=upstream, reduction="mean", **options)
        assert_single_rounding(leaf.grad, expected, function.__name__)
        _, unit = loss_and_grad(function, x, t, backend=BACKEND, reduction="mean",
                                upstream=torch.ones((), device=DEVICE, dtype=torch.float16), **options)
        assert single_rounding_errors((unit.float() * 2.0**15).half(), expected).max() > 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("n, c", [(256, 1000), (32, 20000)])
def test_scaled_backward_rounds_once(dtype, reduction, n, c):
    z, old, new, y = softmax_inputs(n, c, c // 2, dtype, 63)
    options = dict(focus="neg_flip", label_smoothing=0.1, num_old_classes=c // 2, new_class_bias=2.0, tau=2.0,
                   reduction=reduction)
    loss, _ = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, **options)
    upstream = signed_upstream(loss, 64)
    _, grad = loss_and_grad(mk.mpt_loss, z, y, old, new, backend=BACKEND, upstream=upstream, **options)
    expected = float32_reference_gradient(mk.mpt_loss, z, y, old, new, upstream=upstream, **options)
    assert_single_rounding(grad, expected, f"mpt_loss {dtype} {reduction}", exact_fraction=0.99)

    x, t = multilabel_inputs(n, c // 10, dtype, torch.bool, 65)
    for function, ml_options in ((mk.hill_loss, {}), (mk.splc_loss, {"epoch": 2})):
        loss, _ = loss_and_grad(function, x, t, backend=BACKEND, reduction=reduction, **ml_options)
        upstream = signed_upstream(loss, 66)
        _, grad = loss_and_grad(function, x, t, backend=BACKEND, upstream=upstream, reduction=reduction,
                                **ml_options)
        expected = float32_reference_gradient(function, x, t, upstream=upstream, reduction=reduction, **ml_options)
        assert_single_rounding(grad, expected, f"{function.__name__} {dtype} {reduction}", exact_fraction=0.99)


def validated_args(function, *args, **options):
    """The validated record that a softmax-family function (mk.mpt_loss, say) hands the backend."""
    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "backend"}
    return getattr(reference, f"{function.__name__}_args")(*args, **dict(defaults, **options))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [100, 3000, 20000])
def test_backward_writes_only_rows_whose_upstream_is_not_one(dtype, c):
    """The forward's gradient is poisoned before the backward: rows whose upstream
    gradient is 1, ignored rows and out-of-range rows must keep the poison (no write),
    every other row must be the reference's, rounded once."""
    n = row_count(96)
    z, old, new, y = softmax_inputs(n, c, c // 2, dtype, 67, ignored=0.2)
    y[5] = c  # out of range
    counted = (y != -100) & (y < c)
    per_row = signed_upstream(torch.empty(n, device=DEVICE, dtype=dtype), 68)
    per_row[::4] = 1.0
    per_row[~counted] = float("nan")  # ignored rows ignore even a NaN
    cases = [("none", per_row), ("none", torch.ones((), device=DEVICE, dtype=dtype).expand(n)),
             ("mean", torch.tensor(1.0, device=DEVICE, dtype=dtype)),
             ("mean", torch.tensor(-0.37, device=DEVICE, dtype=dtype)),
             ("sum", torch.tensor(2.0**15 if dtype != torch.float32 else 3.9, device=DEVICE, dtype=dtype))]
    for reduction, upstream in cases:
        options = dict(new_class_bias=2.0, num_old_classes=c // 2, label_smoothing=0.1, reduction=reduction)
        args = validated_args(mk.mpt_loss, z, y, old, new, **options)
        _, saved = cuda_backend._softmax_forward(args, True)
        saved[0].fill_(float("nan"))
        cuda_backend._softmax_backward(upstream, saved, args)
        grad = saved[0]
        rewritten = counted & (upstream.expand(n) != 1)
        what = f"{reduction} {upstream.flatten()[:3].tolist()}"
        assert torch.isnan(grad[~rewritten]).all(), what
        assert not torch.isnan(grad[rewritten]).any(), what
        if rewritten.any():  # (row 5 reads a valid class in the reference; it is not compared)
            expected = float32_reference_gradient(mk.mpt_loss, z, y.clamp(max=c - 1), old, new, upstream=upstream,
                                                  **options)
            if dtype == torch.float32:
                assert_close(grad[rewritten], expected[rewritten], dtype, what)
            else:
                assert_single_rounding(grad[rewritten], expected[rewritten], what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multilabel_backward_writes_only_elements_whose_upstream_is_not_one(dtype):
    n, c = row_count(64), 333
    x, t = multilabel_inputs(n, c, dtype, torch.float32, 69)
    g = torch.Generator(device=DEVICE).manual_seed(70)
    per_element = signed_upstream(torch.empty(n, c, device=DEVICE, dtype=dtype), 71)
    per_element[torch.rand(n, c, generator=g, device=DEVICE) < 0.3] = 1.0  # slots with some ones
    per_element[3] = 1.0  # a whole row
    per_element[5, :64] = 1.0  # whole slots
    for reduction, upstream in (("none", per_element), ("none", torch.ones(n, c, device=DEVICE, dtype=dtype)),
                                ("sum", torch.tensor(1.0, device=DEVICE, dtype=dtype)),
                                ("mean", torch.tensor(0.37, device=DEVICE, dtype=dtype))):
        args = check_splc(x, t, epoch=2, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction=reduction)
        _, saved = cuda_backend._multilabel_forward(args, True)
        saved[0].fill_(float("nan"))
        cuda_backend._multilabel_backward(upstream, saved, args)
        grad = saved[0]
        rewritten = upstream.expand(n, c) != 1
        assert torch.isnan(grad[~rewritten]).all() and not torch.isnan(grad[rewritten]).any(), reduction
        if rewritten.any():
            expected = float32_reference_gradient(mk.splc_loss, x, t, upstream=upstream, epoch=2, reduction=reduction)
            if dtype == torch.float32:
                assert_close(grad[rewritten], expected[rewritten], dtype, reduction)
            else:
                assert_single_rounding(grad[rewritten], expected[rewritten], reduction)


def test_second_backward_is_an_error():
    # the first backward rewrote the saved gradient in place: a second one would scale it twice
    z, old, new, y = softmax_inputs(32, 500, 300, torch.float32, 72)
    x, t = multilabel_inputs(32, 50, torch.float32, torch.bool, 73)
    for loss in (mk.mpt_loss(z.clone().requires_grad_(True), y, old, new, backend=BACKEND),
                 mk.hill_loss(x.clone().requires_grad_(True), t, backend=BACKEND)):
        loss.backward(torch.tensor(0.5, device=DEVICE), retain_graph=True)
        with pytest.raises(RuntimeError, match="one backward per forward"):
            loss.backward(torch.tensor(0.5, device=DEVICE))


# --------------------------------------------------------------------------- multi-label family
TARGET_DTYPES = [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
MULTILABEL_SHAPES = [(1, 1), (333, 13), (256, 80), (64, 1000), (32, 9605)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_hill_and_splc_dtypes(dtype, target_dtype, reduction):
    x, t = multilabel_inputs(256, 80, dtype, target_dtype, 30)
    loss, _ = loss_and_grad(mk.hill_loss, x, t, backend="reference", reduction=reduction)
    upstream = random_upstream(loss, 31) if reduction == "none" else None
    check_against_reference(mk.hill_loss, x, t, upstream=upstream, reduction=reduction)
    check_against_reference(mk.splc_loss, x, t, upstream=upstream, epoch=2, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", MULTILABEL_SHAPES)
def test_multilabel_shapes(dtype, n, c):
    x, t = multilabel_inputs(n, c, dtype, torch.bool, c)
    check_against_reference(mk.hill_loss, x, t, reduction="mean")
    check_against_reference(mk.splc_loss, x, t, epoch=5, reduction="sum")


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("lamb, margin", [(1.5, 1.0), (1.0, 0.0)])
def test_hill_parameters(gamma, lamb, margin):
    x, t = multilabel_inputs(128, 500, torch.float32, torch.bool, 32)
    check_against_reference(mk.hill_loss, x, t, lamb=lamb, margin=margin, gamma=gamma)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.3])
@pytest.mark.parametrize("epoch, change_epoch", [(0, 1), (1, 1), (7, 2)])
@pytest.mark.parametrize("tau, margin", [(0.6, 1.0), (0.3, 0.0)])
def test_splc_parameters(gamma, epoch, change_epoch, tau, margin):
    x, t = multilabel_inputs(128, 500, torch.float32, torch.bool, 33, tau=tau)
    check_against_reference(mk.splc_loss, x, t, epoch=epoch, change_epoch=change_epoch, tau=tau, margin=margin,
                            gamma=gamma)


def test_splc_correction_starts_at_change_epoch_and_is_strict():
    x, t = multilabel_inputs(64, 300, torch.float32, torch.bool, 40)
    losses = {
        epoch: check_against_reference(mk.splc_loss, x, t, epoch=epoch, change_epoch=3, reduction="none",
                                        upstream=random_upstream(x, 41))[0]
        for epoch in (0, 2, 3, 7)
    }
    assert torch.equal(losses[0], losses[2]) and torch.equal(losses[3], losses[7])
    assert not torch.equal(losses[2], losses[3])
    # σ(0) = 0.5: with τ = 0.5 a negative at x = 0 is not corrected (σ(x) > τ is strict)
    x = torch.tensor([[0.0, 1e-3]], device=DEVICE).repeat(3, 1)
    t = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    loss = mk.splc_loss(x, t, epoch=1, tau=0.5, reduction="none", backend=BACKEND)
    corrected = -torch.nn.functional.logsigmoid(torch.tensor(1e-3)) * torch.sigmoid(torch.tensor(-1e-3)) ** 2
    torch.testing.assert_close(loss[0].cpu(), torch.tensor([0.25 * 0.6931471805599453, corrected.item()]))


@pytest.mark.parametrize("tau, x", splc_threshold_cases(), ids=lambda v: f"{v}" if isinstance(v, float) else "")
def test_splc_decision_at_the_threshold(tau, x):
    """σ(x) > τ decided exactly (x > logit(τ)): next to logit(0.6), at τ = 0, at τ ~ 1."""
    x = x.to(DEVICE).repeat(3, 1)
    t = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
    loss, _ = check_against_reference(mk.splc_loss, x, t, epoch=1, tau=tau, reduction="none",
                                      upstream=random_upstream(x, 46))
    torch.testing.assert_close(loss.double().cpu(), splc_negative_losses(x, tau, gamma=2.0).cpu(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multilabel_infinite_logits(dtype, gamma):
    """A negative at -inf and a positive at +inf: loss 0 and gradient 0, also for γ = 0."""
    x, t = infinite_logits(DEVICE)
    x = x.to(dtype)
    for function, options in ((mk.hill_loss, {}), (mk.splc_loss, {"epoch": 3})):
        loss, grad = check_against_reference(function, x, t, gamma=gamma, reduction="none",
                                             upstream=random_upstream(x, 47), **options)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (loss[:, :2] == 0).all() and (grad[:, :2] == 0).all()


def test_multilabel_expanded_upstream_of_none():
    x, t = multilabel_inputs(50, 70, torch.float32, torch.bool, 42)
    check_against_reference(mk.hill_loss, x, t, reduction="none",
                            upstream=torch.tensor(0.37, device=DEVICE).expand(x.shape))
    upstream = torch.rand(70, device=DEVICE).expand(x.shape)  # stride (0, 1)
    check_against_reference(mk.hill_loss, x, t, reduction="none", upstream=upstream)


@pytest.mark.parametrize("layout", ["misaligned_rows", "padded_rows", "transposed"])
def test_multilabel_non_contiguous(layout):
    x, t = multilabel_inputs(100, 333, torch.float16, torch.float32, 34)
    n = x.shape[0]
    if layout == "misaligned_rows":
        xs = torch.zeros(n, 334, dtype=x.dtype, device=DEVICE)[:, 1:]
        ts = torch.zeros(n, 334, dtype=t.dtype, device=DEVICE)[:, 1:]
    elif layout == "padded_rows":
        xs = torch.zeros(n, 400, dtype=x.dtype, device=DEVICE)[:, :333]
        ts = torch.zeros(n, 400, dtype=t.dtype, device=DEVICE)[:, :333]
    else:
        xs = torch.zeros(333, n, dtype=x.dtype, device=DEVICE).t()
        ts = torch.zeros(333, n, dtype=t.dtype, device=DEVICE).t()
    xs.copy_(x)
    ts.copy_(t)
    loss, grad = check_against_reference(mk.splc_loss, xs, ts, epoch=3)
    assert torch.equal(loss, mk.splc_loss(x, t, epoch=3, backend=BACKEND))


def test_multilabel_extremes_and_nan():
    x = torch.tensor([[1e4, -1e4, 0.0, 50.0, -50.0, float("nan")]], device=DEVICE).repeat(4, 1)
    t = torch.tensor([[1, 1, 1, 0, 0, 1]], dtype=torch.bool, device=DEVICE).repeat(4, 1)
    t[1] = ~t[1]
    for function, options in ((mk.hill_loss, {}), (mk.splc_loss, {"epoch": 3})):
        loss, grad = loss_and_grad(function, x, t, backend=BACKEND, reduction="none", upstream=torch.ones_like(x),
                                   **options)
        assert torch.isfinite(loss[:, :5]).all() and torch.isfinite(grad[:, :5]).all()
        assert torch.isnan(loss[:, 5]).all() and torch.isnan(grad[:, 5]).all()
        check_against_reference(function, x[:, :5], t[:, :5], **options)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_multilabel_poisoned_and_empty(reduction):
    x, t = multilabel_inputs(64, 1000, torch.bfloat16, torch.uint8, 35)
    poison_allocator(((64, 1000), torch.bfloat16), ((64, 1000), torch.bfloat16), ((2048,), torch.float32))
    loss, grad = check_against_reference(mk.hill_loss, x, t, reduction=reduction)
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    empty = torch.empty(0, 10, device=DEVICE)
    loss, grad = loss_and_grad(mk.hill_loss, empty, empty > 0, backend=BACKEND, reduction=reduction)
    assert grad.shape == (0, 10)
    if reduction != "none":
        assert loss.item() == 0.0


@pytest.mark.parametrize("dtype, n, c", list(itertools.product(DTYPES, [4096], [2000])))
def test_multilabel_large_sum_is_accurate(dtype, n, c):
    x, t = multilabel_inputs(n, c, dtype, torch.bool, 36)
    check_against_reference(mk.hill_loss, x, t, reduction="sum")
    check_against_reference(mk.splc_loss, x, t, epoch=1, reduction="mean")


# --------------------------------------------------------------------------- beyond int32 offsets
def test_softmax_beyond_int32_offsets():
    # N * C > 2^31: the last rows sit past every int32 offset (and C streams in 16 chunks)
    n, c = 16400, 131072
    g = torch.Generator(device=DEVICE).manual_seed(50)
    z = torch.randn(n, c, generator=g, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randint(0, c, (n,), generator=g, device=DEVICE)
    leaf = z.requires_grad_(True)
    rows = mk.margin_cross_entropy(leaf, y, reduction="none", backend=BACKEND)
    (grad,) = torch.autograd.grad(rows.sum(), leaf)
    for part in (slice(0, 8), slice(n - 8, n)):
        expected, expected_grad = loss_and_grad(mk.margin_cross_entropy, z[part].detach(), y[part],
                                                backend="reference", reduction="none",
                                                upstream=torch.ones(8, device=DEVICE, dtype=torch.bfloat16))
        assert_close(rows[part].detach(), expected, torch.bfloat16, "loss")
        assert_close(grad[part], expected_grad, torch.bfloat16, "gradient")


def test_multilabel_beyond_int32_offsets():
    c = 65539
    n = 2**31 // c + 2
    g = torch.Generator(device=DEVICE).manual_seed(51)
    x = torch.randn(n, c, generator=g, device=DEVICE, dtype=torch.bfloat16) * 2
    t = torch.rand(n, c, generator=g, device=DEVICE) < 0.3
    leaf = x.requires_grad_(True)
    total = mk.hill_loss(leaf, t, reduction="sum", backend=BACKEND)
    total.backward()
    expected = sum(
        mk.hill_loss(x[i : i + 4096].detach().float(), t[i : i + 4096], backend="reference").double()
        for i in range(0, n, 4096)
    )
    assert abs(total.item() - expected.item()) <= TOLERANCE[torch.bfloat16] * abs(expected.item())
    for part in (slice(0, 16), slice(n - 16, n)):
        _, expected_grad = loss_and_grad(mk.hill_loss, x[part].detach(), t[part], backend="reference",
                                         upstream=torch.tensor(1.0, device=DEVICE, dtype=torch.bfloat16))
        assert_close(leaf.grad[part], expected_grad, torch.bfloat16, "gradient")
