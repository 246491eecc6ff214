"""The ``cuda`` backend's kernels (csrc/), compiled for the CPU and run against the
reference, without a GPU: tests/test_cuda_backend.py's suite, in the CUDA emulation.

tests/cuda_emulation builds csrc/ with the host compiler against a small emulation of
CUDA (every CUDA thread a fiber, __syncthreads and warp shuffles as barriers) and puts
it behind ``backend="cuda"`` for CPU tensors; the backend's Python code is the real one.
So CI runs every kernel of the backend, its launch configurations, indexing, block
reductions and paths (rows of one slot per thread, rows kept in registers, rows
streamed in chunks, kept in shared memory between the sweeps or read twice; 16-byte and
scalar accesses; the backward's recompute) on every submission, and
test_cuda_emulated_asan.py runs this file again under AddressSanitizer.

The tests are test_cuda_backend's own (imported below, so that one suite serves both),
with DEVICE "cpu" and at most ``MAX_ROWS`` rows per case (the emulation runs a row's
threads one after another); class counts are as written, so every path is crossed.
Out-of-range targets reach the kernels as they do on a GPU (on CPU tensors the backend
checks them first: that check is off here), and every gradient and statistics buffer
the forward allocates is filled with NaN first. test_thread_order_does_not_change_the_bits
runs the kernels' threads and blocks in both orders, which a missing barrier would make
differ (a check of what compute-sanitizer's racecheck looks for). Left to a GPU
(test_cuda_backend only): the approximate exp2 and reciprocal (exact on the host), the
memory model, streams, graphs and devices, realistic and > 2^31-element sizes, speed.
"""

from __future__ import annotations

import pytest
import torch

import mpt_kernels as mk
import test_cuda_backend as suite
from cuda_emulation import build, installed
from mpt_kernels.backends import cuda as cuda_backend
from test_cuda_backend import (  # noqa: F401  (collected here as well)
    test_all_rows_ignored_and_empty_batch,
    test_argmax_ties_in_bfloat16,
    test_backward_writes_only_rows_whose_upstream_is_not_one,
    test_extreme_logits,
    test_focal_distillation_with_fewer_reference_classes,
    test_hill_and_splc_dtypes,
    test_hill_parameters,
    test_large_logits_keep_float32_precision,
    test_ignored_rows_keep_zero_gradient_for_a_nan_upstream,
    test_long_rows_from_shared_memory_or_read_twice,
    test_margin_cross_entropy,
    test_masked_classes_stay_finite,
    test_masked_with_finite_values,
    test_mpt_loss_options,
    test_more_rows_than_a_grid_holds_are_refused,
    test_mpt_loss_shapes,
    test_multilabel_backward_writes_only_elements_whose_upstream_is_not_one,
    test_multilabel_expanded_upstream_of_none,
    test_multilabel_extremes_and_nan,
    test_multilabel_infinite_logits,
    test_multilabel_non_contiguous,
    test_multilabel_poisoned_and_empty,
    test_multilabel_shapes,
    test_nan_propagates,
    test_non_contiguous_inputs,
    test_out_of_range_target_poisons_its_row_without_reading_out_of_bounds,
    test_poisoned_gradient_buffer,
    test_reduction_none_with_random_upstream,
    test_rows_at_the_float32_minimum_are_the_documented_limit,
    test_rows_too_long_for_32_bit_columns_are_refused,
    test_scaled_backward_rounds_once,
    test_second_backward_is_an_error,
    test_shared_row_bytes_must_be_none_or_a_count,
    test_splc_correction_starts_at_change_epoch_and_is_strict,
    test_splc_decision_at_the_threshold,
    test_splc_parameters,
    test_upstream_strides_and_exact_one,
)

if build.unavailable_reason() is not None:
    pytest.skip(f"no CUDA emulation here: {build.unavailable_reason()}", allow_module_level=True)

MAX_ROWS = 16


@pytest.fixture(scope="module", autouse=True)
def emulated_cuda_backend():
    with installed() as module:
        yield module


@pytest.fixture(autouse=True)
def suite_on_the_emulation(monkeypatch):
    monkeypatch.setattr(suite, "DEVICE", "cpu")
    monkeypatch.setattr(suite, "MAX_ROWS", MAX_ROWS)
    monkeypatch.setattr(cuda_backend, "check_target_values", lambda *args: None)


def test_the_emulation_is_what_runs(emulated_cuda_backend):
    assert cuda_backend._C is emulated_cuda_backend and emulated_cuda_backend.cuda_runtime_version() == 0
    x, t = suite.multilabel_inputs(40, 7, torch.float32, torch.bool, 0)
    assert x.device.type == "cpu" and x.shape == (MAX_ROWS, 7)
    loss, grad = suite.check_against_reference(mk.hill_loss, x, t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# One case per path of the softmax kernels (bf16: a row of few slots, a row kept in
# registers, a row streamed in chunks; float32: streamed from 4097 classes) and
# multi-label tensors of one to several blocks; upstream 1 ("sum": the forward's
# gradient), 1.7 ("mean": the backward's recompute) and random ("none").
@pytest.mark.parametrize("dtype, c", [(torch.bfloat16, 100), (torch.bfloat16, 3000), (torch.bfloat16, 9000),
                                      (torch.float32, 5000)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_thread_order_does_not_change_the_bits(dtype, c, reduction, monkeypatch):
    """Every exchange between the kernels' threads (block merges, the row count, the
    multi-label partial sums) is ordered by a barrier or a launch: the threads and blocks
    run in the reverse order (the emulation's schedule, see emulation.cpp) give the same
    bits. A missing __syncthreads would not."""
    z, old, new, y = suite.softmax_inputs(8, c, c // 2, dtype, c)
    x, t = suite.multilabel_inputs(8, c, dtype, torch.bool, c + 1)

    def upstream(shape):
        if reduction == "none":
            return suite.random_upstream(torch.empty(shape, dtype=dtype), c + 2)
        return torch.tensor(1.0 if reduction == "sum" else 1.7, dtype=dtype)

    def run():
        return [
            *suite.loss_and_grad(mk.mpt_loss, z, y, old, new, upstream=upstream(y.shape), backend="cuda",
                                 reduction=reduction, new_class_bias=2.0, num_old_classes=c // 2, label_smoothing=0.1),
            *suite.loss_and_grad(mk.hill_loss, x, t, upstream=upstream(x.shape), backend="cuda", reduction=reduction),
            *suite.loss_and_grad(mk.splc_loss, x, t, upstream=upstream(x.shape), backend="cuda", reduction=reduction,
                                 epoch=20),
        ]

    monkeypatch.setenv("MPT_KERNELS_EMULATION_SCHEDULE", "forward")
    forward = run()
    monkeypatch.setenv("MPT_KERNELS_EMULATION_SCHEDULE", "reverse")
    reverse = run()
    for a, b in zip(forward, reverse):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_the_profile_reports_the_row_plan(monkeypatch):
    """benchmarks/profile_kernels.py records the plan of each CUDA softmax forward it
    profiles (what the next GPU run reads its timings against), and puts _C back."""
    monkeypatch.syspath_prepend(str(build.CSRC.parent / "benchmarks"))
    import profile_kernels

    launch = cuda_backend._C.softmax_forward
    z, old, new, y = suite.softmax_inputs(4, 20000, 10000, torch.float32, 72)
    plans = profile_kernels.cuda_row_plans(lambda x: mk.mpt_loss(x, y, old, new, backend="cuda"), z)
    # float32, both teachers: 5 chunks of 48 KiB, 4 of them in the emulated sm_90's shared memory
    assert plans == [{"threads": 512, "chunks": 5, "staged_chunks": 4, "shared_bytes": 4 * 48 * 1024}]
    assert cuda_backend._C.softmax_forward is launch
    x, t = suite.multilabel_inputs(4, 100, torch.float32, torch.bool, 73)
    assert profile_kernels.cuda_row_plans(lambda v: mk.hill_loss(v, t, backend="cuda"), x) == []
