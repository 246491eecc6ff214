"""Timing one cell: CUDA events on a cold L2 (GPU), or the host clock (CPU smoke run).

Every timed run of a cell on the GPU is preceded by reading a buffer larger than twice
the L2, so each run reads its inputs from device memory. The flush reads rather than
writes: written, it would leave the L2 full of dirty lines, and the timed call would
pay for writing them back (up to the L2's size, 60 MiB on an H200: about the traffic of
a 1024 x 8192 cell). The events bracket the loss call alone, not the flush. The median
over the runs is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

FALLBACK_L2_BYTES = 50 << 20  # H100/H200, when the device does not report it
HOST_REPS = 10  # calls timed for the host time per call


class CudaClock:
    """CUDA events around each call, the L2 flushed before each."""

    is_gpu = True

    def __init__(self, device: torch.device):
        self.device = device
        props = torch.cuda.get_device_properties(device)
        self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES)
        self.flush_bytes = max(2 * self.l2_bytes, 128 << 20)
        self._flush = torch.ones(self.flush_bytes // 4, dtype=torch.int32, device=device)
        self._flush_sum = torch.empty((), dtype=torch.int32, device=device)
        self.description = (
            f"CUDA events around each call; before each, the L2 ({self.l2_bytes / 2**20:.0f} MiB) "
            f"is flushed by reading {self.flush_bytes / 2**20:.0f} MiB; median over the runs"
        )

    def flush(self) -> None:
        """Reads the flush buffer (a sum into a preallocated scalar): the L2 then holds
        clean lines of it, none of the next call's inputs."""
        torch.sum(self._flush, dim=0, out=self._flush_sum)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time_calls(self, step: Callable, reps: int) -> list:
        """Milliseconds of each of ``reps`` calls (launched back to back, one sync at the end)."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            self.flush()
            start.record()
            step()
            end.record()
        self.sync()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]

    def host_ms(self, step: Callable, reps: int) -> float:
        """Host time per call: ``reps`` calls launched back to back with no sync between
        them (the device runs behind), divided by ``reps``. Where it is about the event
        time, the CPU's Python and launch path decides the cell, not the kernels."""
        self.sync()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        elapsed = time.perf_counter() - start
        self.sync()
        return elapsed * 1e3 / reps

    def run_measuring_memory(self, step: Callable):
        """(outputs, peak bytes allocated above what was allocated before the call)."""
        self.sync()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        outputs = step()
        self.sync()
        return outputs, torch.cuda.max_memory_allocated(self.device) - before

    def free_bytes(self) -> Optional[int]:
        return torch.cuda.mem_get_info(self.device)[0]

    def release(self) -> None:
        torch.cuda.empty_cache()


class HostClock:
    """time.perf_counter around each call: for the CPU smoke run only."""

    is_gpu = False
    l2_bytes = None
    flush_bytes = None
    description = (
        "time.perf_counter around each call on CPU tensors (host wall clock, caches not "
        "flushed): NOT GPU figures"
    )

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        pass

    def time_calls(self, step: Callable, reps: int) -> list:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def host_ms(self, step: Callable, reps: int) -> None:
        return None  # on CPU every measured millisecond is host time

    def run_measuring_memory(self, step: Callable):
        return step(), None

    def free_bytes(self) -> Optional[int]:
        return None

    def release(self) -> None:
        pass


def make_clock(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else HostClock(device)


def _grad_norm(grad: torch.Tensor) -> float:
    """‖grad‖ in float32, a block of rows at a time (no float32 copy of the whole gradient)."""
    squares = torch.zeros((), dtype=torch.float32, device=grad.device)
    for rows in grad.detach().split(max(1, (64 << 20) // max(1, grad[0].numel())), dim=0):
        squares += torch.linalg.vector_norm(rows.float()).square()
    return float(squares.sqrt())


def _quantile(ordered: list, q: float) -> float:
    """Linear interpolation between the closest ranks of a sorted list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(step: Callable, clock, *, rep_ms: float, min_reps: int, max_reps: int, probes: int = 2) -> dict:
    """Time ``step`` (which returns ``(loss, grad or None)``).

    One first call (compilation, autotuning and caches land here: reported as
    ``first_call_s``), ``probes`` timed calls that warm up and size the repetitions to about
    ``rep_ms`` of measured time, one call that measures the peak memory and gives the
    loss and gradient norm for the sanity check, the timed repetitions, then up to
    ``HOST_REPS`` calls for the host time per call (``host_ms``; None on CPU).
    """
    start = time.perf_counter()
    outputs = step()
    clock.sync()
    first_call_s = time.perf_counter() - start
    del outputs

    probe_ms = min(clock.time_calls(step, probes))
    reps = int(min(max_reps, max(min_reps, rep_ms / max(probe_ms, 1e-3))))

    (loss, grad), peak_bytes = clock.run_measuring_memory(step)
    loss_value = float(loss.detach().float().sum())
    grad_norm = None if grad is None else _grad_norm(grad)
    del loss, grad

    times = sorted(clock.time_calls(step, reps))
    host_ms = clock.host_ms(step, min(reps, HOST_REPS))
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "q20_ms": _quantile(times, 0.2),
        "q80_ms": _quantile(times, 0.8),
        "reps": reps,
        "host_ms": host_ms,
        "first_call_s": first_call_s,
        "peak_bytes_above_inputs": peak_bytes,
        "loss_value": loss_value,
        "grad_norm": grad_norm,
    }


def copy_bandwidth(clock, nbytes: int, reps: int) -> dict:
    """Bytes per second of a torch copy of ``nbytes`` (read + written), timed like the cells."""
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=clock.device)
    target = torch.empty_like(source)

    def step():
        target.copy_(source)

    step()
    clock.sync()
    median_ms = statistics.median(clock.time_calls(step, reps))
    return {"bytes_each_way": nbytes, "median_ms": median_ms, "bytes_per_s": 2 * nbytes / (median_ms * 1e-3)}
