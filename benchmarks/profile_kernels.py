"""Where the time of one fused loss goes, on a GPU: per-kernel device time (torch.profiler)
and the host time of a call, for each backend at a few shapes; with ``--ncu-target``,
one forward+backward of one cell for Nsight Compute to profile.

    python benchmarks/profile_kernels.py                      # the table
    ncu --clock-control none --section SpeedOfLight \
        python benchmarks/profile_kernels.py --ncu-target triton:hill_loss:32768

Inputs, calls, minimum bytes, the cold-L2 event timer and the copy bandwidth are the
benchmark's own (``mpt_kernels.bench``); bf16 by default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from mpt_kernels.bench.cases import CASES, old_classes, target_bytes
from mpt_kernels.bench.providers import BackendAPI
from mpt_kernels.bench.timing import CudaClock, copy_bandwidth

N = 4096


def make_call(loss: str, backend: str, n: int, c: int, dtype: torch.dtype):
    """The benchmark's inputs and call of one loss (mpt_kernels.bench.cases), through ``backend``:
    (logits, call(logits) -> loss, minimum bytes of a forward+backward)."""
    case = CASES[loss]
    inputs = case.make_inputs(n, c, dtype, torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0))
    logits = inputs.pop("logits")
    api = BackendAPI(backend)
    nbytes = case.min_bytes(n, c, old_classes(c), logits.element_size(), target_bytes(case, inputs), True)
    return logits, (lambda x: case.forward(api, x, inputs)), nbytes


def fwd_bwd(call, z):
    leaf = z.detach().requires_grad_(True)
    loss = call(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def event_time_ms(clock: CudaClock, fn, reps=20) -> float:
    """Median of CUDA-event times on a cold L2, as the benchmark times its cells, after
    one untimed call (a first call compiles the Triton kernels)."""
    fn()
    clock.sync()
    return statistics.median(clock.time_calls(fn, reps))


def host_time_ms(fn, reps=20):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()  # launches only: the GPU may still be busy
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def kernel_table(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:60]] += event.device_time / 5 / 1e3  # ms per call
    return per_kernel


def cuda_row_plans(call, z) -> list:
    """The plans (threads, chunks, chunks kept in shared memory, bytes) of the CUDA
    softmax forwards that one forward+backward of ``call`` launches (none for the
    multi-label losses), recorded around ``_C.softmax_forward``."""
    from mpt_kernels.backends import cuda as cuda_backend

    plans, launch = [], cuda_backend._C.softmax_forward

    def recording(**kwargs):
        plans.append(cuda_backend._C.softmax_forward_plan(
            inputs=kwargs["inputs"], with_grad=kwargs["grad"] != 0, shared_row_bytes=kwargs["shared_row_bytes"],
            device=kwargs["device"]))
        return launch(**kwargs)

    cuda_backend._C.softmax_forward = recording
    try:
        fwd_bwd(call, z)
    finally:
        cuda_backend._C.softmax_forward = launch
    return plans


def profile_cell(clock: CudaClock, copy_gbs: float, loss: str, backend: str, c: int, dtype: torch.dtype) -> str:
    """One cell's report: event times of fwd+bwd and fwd, host time, device time per kernel
    (and the CUDA softmax forward's row plan)."""
    z, call, nbytes = make_call(loss, backend, N, c, dtype)
    plans = cuda_row_plans(call, z) if backend == "cuda" else []
    total = event_time_ms(clock, lambda: fwd_bwd(call, z))
    with torch.no_grad():
        fwd = event_time_ms(clock, lambda: call(z))
    host = host_time_ms(lambda: fwd_bwd(call, z))
    kernels = kernel_table(lambda: fwd_bwd(call, z))
    lines = [f"\n{loss} C={c} {backend}: fwd+bwd {total:.3f} ms ({nbytes / total / 1e6 / copy_gbs:.0%} of copy), "
             f"fwd {fwd:.3f} ms, host {host:.3f} ms/call"]
    lines += [f"    {ms:8.3f} ms  {name}" for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])]
    lines += [f"    rows: {p['threads']} threads, {p['chunks']} chunk(s), {p['staged_chunks']} in shared memory "
              f"({p['shared_bytes']} bytes)" for p in plans]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncu-target", help="backend:loss:C, one fwd+bwd for ncu")
    parser.add_argument("--cprofile", help="backend:loss:C, the host time of 200 fwd+bwd calls by function")
    parser.add_argument("--c", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--loss", nargs="+", default=["mpt_kl", "hill_loss"])
    parser.add_argument("--backend", nargs="+", default=["triton", "cuda"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--triton-maxnreg", default=None,
                        help="register cap of the Triton softmax kernels: a number, or 'none' (default: the module's)")
    parser.add_argument("--triton-chunk", default=None, metavar="CLASSES|none",
                        help="chunked rows in the Triton softmax forward with gradient: classes per chunk, "
                             "or 'none' for one program per row (default: the module's, chunk_classes)")
    parser.add_argument("--cuda-shared-row-bytes", default=None, metavar="BYTES|device",
                        help="shared memory per row in which the CUDA softmax forward keeps a long row's chunks "
                             "between its sweeps: bytes (0: none, the row is read twice), or 'device' for the "
                             "device's limit (default: the module's, SHARED_ROW_BYTES)")
    parser.add_argument("--multilabel-tile", default=None, metavar="ELEMENTS[:WARPS]",
                        help="elements (and warps) per program of the Triton multi-label kernel "
                             "(default: the module's, TILE_ELEMENTS and TILE_WARPS)")
    args = parser.parse_args()
    if args.multilabel_tile is not None:
        from mpt_kernels.backends import triton_multilabel

        elements, _, warps = args.multilabel_tile.partition(":")
        triton_multilabel.TILE_ELEMENTS = int(elements)
        triton_multilabel.TILE_WARPS = int(warps) if warps else None
    if args.triton_maxnreg is not None or args.triton_chunk is not None:
        from mpt_kernels.backends import triton_softmax

        if args.triton_maxnreg is not None:
            triton_softmax.MAX_REGISTERS = None if args.triton_maxnreg == "none" else int(args.triton_maxnreg)
        if args.triton_chunk is not None:
            triton_softmax.chunk_classes = None if args.triton_chunk == "none" else int(args.triton_chunk)
    if args.cuda_shared_row_bytes is not None:
        from mpt_kernels.backends import cuda as cuda_backend

        limit = args.cuda_shared_row_bytes
        cuda_backend.SHARED_ROW_BYTES = None if limit == "device" else int(limit)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    if args.cprofile:
        import cProfile
        import pstats

        backend, loss, c = args.cprofile.split(":")
        z, call, _ = make_call(loss, backend, 256, int(c), dtype)
        for _ in range(20):
            fwd_bwd(call, z)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fwd_bwd(call, z)
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
        return

    if args.ncu_target:
        backend, loss, c = args.ncu_target.split(":")
        z, call, _ = make_call(loss, backend, N, int(c), dtype)
        for _ in range(2):
            fwd_bwd(call, z)
        torch.cuda.synchronize()
        return

    clock = CudaClock(torch.device("cuda"))
    copy_gbs = copy_bandwidth(clock, 2**30, 20)["bytes_per_s"] / 1e9
    print(f"copy: {copy_gbs:.0f} GB/s")
    for loss in args.loss:
        for c in args.c:
            for backend in args.backend:
                print(profile_cell(clock, copy_gbs, loss, backend, c, dtype))
                torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
