"""The CUDA emulation itself (tests/cuda_emulation), on the kernels of selftest.cpp: what
it runs must be what a GPU computes, and what a GPU would not run must fail loudly
(an exception naming the problem), never hang or carry on."""

from __future__ import annotations

import pytest
import torch

from cuda_emulation import build

if build.unavailable_reason() is not None:
    pytest.skip(f"no CUDA emulation here: {build.unavailable_reason()}", allow_module_level=True)


@pytest.fixture(scope="module")
def selftest():
    return build.load(build.build_selftest())


@pytest.mark.parametrize("grid, block", [(1, 32), (3, 64), (2, 1024), (5, 96)])
def test_block_reduction_sums_every_thread(selftest, grid, block):
    # csrc's block_merge: shuffles within each warp, then across the warps through shared memory
    sums = torch.full((grid,), -1, dtype=torch.int64)
    selftest.block_sums(sums.data_ptr(), grid, block)
    index = torch.arange(grid * block, dtype=torch.int64).reshape(grid, block)
    assert torch.equal(sums, index.sum(dim=1))


def test_exited_threads_do_not_block_a_barrier(selftest):
    out = torch.zeros(1, dtype=torch.int32)
    selftest.early_exit_then_barrier(out.data_ptr())
    assert out.item() == 7


def test_a_barrier_that_cannot_open_is_an_error(selftest):
    out = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="wait at barriers that cannot open.*thread 0 at a shuffle"):
        selftest.divergent_shuffle(out.data_ptr())


def test_a_shuffle_without_every_lane_is_an_error(selftest):
    with pytest.raises(RuntimeError, match="mask is not every lane"):
        selftest.partial_mask_shuffle(torch.zeros(1, dtype=torch.int32).data_ptr())


def test_an_exception_in_a_kernel_is_reported(selftest):
    with pytest.raises(RuntimeError, match="thrown inside the kernel"):
        selftest.throwing_kernel(torch.zeros(1, dtype=torch.int32).data_ptr())


@pytest.mark.parametrize("grid, block", [(0, 32), (1, 0), (1, 1025)])
def test_invalid_launch_configuration(selftest, grid, block):
    # as cudaGetLastError reports it after a launch, through csrc's check_cuda
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
        selftest.launch(grid, block, torch.zeros(1, dtype=torch.int32).data_ptr())


def test_still_usable_after_errors(selftest):
    test_block_reduction_sums_every_thread(selftest, 2, 64)


@pytest.mark.parametrize("synced", [True, False])
def test_thread_order_exposes_a_missing_barrier(selftest, synced, monkeypatch):
    # the same launch in both turn orders: the same bits with the barrier, not without it
    block = 64
    expected = (torch.arange(block) + 1) % block
    results = {}
    for token, schedule in ((100, "forward"), (200, "reverse")):
        monkeypatch.setenv("MPT_KERNELS_EMULATION_SCHEDULE", schedule)
        out = torch.full((block,), -1, dtype=torch.int32)
        selftest.read_neighbour(synced, token, out.data_ptr(), block)
        results[schedule] = out - token  # the neighbour's index where it read this launch's value
    if synced:
        assert torch.equal(results["forward"], expected) and torch.equal(results["reverse"], expected)
    else:  # forward: every thread but the last reads before its neighbour writes; reverse: only the last
        assert not torch.equal(results["forward"], results["reverse"])
        assert torch.equal(results["reverse"][:-1], expected[:-1]) and results["reverse"][-1] != expected[-1]


def test_unknown_schedule_is_an_error(selftest, monkeypatch):
    monkeypatch.setenv("MPT_KERNELS_EMULATION_SCHEDULE", "random")
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(ValueError, match="MPT_KERNELS_EMULATION_SCHEDULE must be forward or reverse"):
        selftest.read_neighbour(True, 0, out.data_ptr(), 32)


SM90_SHARED_OPT_IN = 232448  # bytes of shared memory a block may opt in to on sm_90 (227 KiB)


@pytest.mark.parametrize("shared_bytes", [512, 48 * 1024])  # more words than the 64 threads write
def test_dynamic_shared_memory_up_to_48_kib_needs_no_opt_in(selftest, shared_bytes):
    block = 64
    out = torch.zeros(block + 1, dtype=torch.int32)
    assert selftest.dynamic_shared_words(False, shared_bytes, block, out.data_ptr()) == -1
    assert torch.equal(out[:block], (torch.arange(block, dtype=torch.int32) + 1) % block + 1)
    assert out[block] == -1  # a word no thread wrote holds the 0xff bytes the block started with


def test_more_dynamic_shared_memory_than_48_kib_without_opt_in_is_an_error(selftest):
    # as a GPU refuses it: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) comes first
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        selftest.dynamic_shared_words(False, 48 * 1024 + 16, 64, torch.zeros(65, dtype=torch.int32).data_ptr())


def test_dynamic_shared_limit_opts_in_to_the_device_limit(selftest):
    # csrc's dynamic_shared_limit: the device's opt-in limit less the kernel's static shared
    # memory (0 here: the emulation cannot see it), granted so that a launch may use it all
    out = torch.zeros(65, dtype=torch.int32)
    assert selftest.dynamic_shared_words(True, SM90_SHARED_OPT_IN, 64, out.data_ptr()) == SM90_SHARED_OPT_IN
    assert out[64] == -1
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        selftest.dynamic_shared_words(True, SM90_SHARED_OPT_IN + 16, 64, out.data_ptr())
