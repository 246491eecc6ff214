"""Where the time of one fused loss goes, on a GPU: per-kernel device time (torch.profiler)
and the host time of a call, for each backend at a few shapes; with ``--ncu-target``,
one forward+backward of one cell for Nsight Compute to profile.

    python benchmarks/profile_kernels.py                      # the table
    ncu --clock-control none --section SpeedOfLight \
        python benchmarks/profile_kernels.py --ncu-target triton:hill_loss:32768

Inputs are random (logits ~ 2·N(0, 1), bf16 by default), as in ``mpt-kernels bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import mpt_kernels as mk

N = 4096


def make_call(loss: str, backend: str, n: int, c: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (2 * torch.randn(n, c, generator=g, device="cuda")).to(dtype)
    if loss in ("hill_loss", "splc_loss"):
        t = torch.rand(n, c, generator=g, device="cuda") < 0.1
        fn = getattr(mk, loss)
        extra = {"epoch": 1} if loss == "splc_loss" else {}
        return z, lambda x: fn(x, t, backend=backend, **extra)
    k = c // 2
    old = (2 * torch.randn(n, k, generator=g, device="cuda")).to(dtype)
    new = (2 * torch.randn(n, c, generator=g, device="cuda")).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device="cuda")
    kind = "lm" if loss == "mpt_lm" else "kl"
    return z, lambda x: mk.mpt_loss(x, y, old, new, kind=kind, num_old_classes=k, backend=backend)


def fwd_bwd(call, z):
    leaf = z.detach().requires_grad_(True)
    loss = call(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def event_time_ms(fn, reps=20):
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    args = parser.parse_args()
    if args.triton_maxnreg is not None:
        from mpt_kernels.backends import triton_softmax

        triton_softmax.MAX_REGISTERS = None if args.triton_maxnreg == "none" else int(args.triton_maxnreg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    if args.cprofile:
        import cProfile
        import pstats

        backend, loss, c = args.cprofile.split(":")
        z, call = make_call(loss, backend, 256, int(c), dtype)
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
        z, call = make_call(loss, backend, N, int(c), dtype)
        for _ in range(2):
            fwd_bwd(call, z)
        torch.cuda.synchronize()
        return

    copy_src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = event_time_ms(lambda: copy_dst.copy_(copy_src))
    copy_gbs = 2 * 2**30 / copy_ms / 1e6
    print(f"copy: {copy_gbs:.0f} GB/s")
    del copy_src, copy_dst
    e = torch.tensor([], dtype=dtype).element_size()
    for loss in args.loss:
        for c in args.c:
            for backend in args.backend:
                z, call = make_call(loss, backend, N, c, dtype)
                if loss.startswith("mpt"):
                    nbytes = N * c * e * 2 + N * (c // 2) * e + N * c * e + 8 * N
                else:
                    nbytes = N * c * (2 * e + 1)
                fwd_bwd(call, z)
                total = event_time_ms(lambda: fwd_bwd(call, z))
                with torch.no_grad():
                    fwd = event_time_ms(lambda: call(z))
                host = host_time_ms(lambda: fwd_bwd(call, z))
                kernels = kernel_table(lambda: fwd_bwd(call, z))
                print(f"\n{loss} C={c} {backend}: fwd+bwd {total:.3f} ms "
                      f"({nbytes / total / 1e6 / copy_gbs:.0%} of copy), fwd {fwd:.3f} ms, host {host:.3f} ms/call")
                for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
                    print(f"    {ms:8.3f} ms  {name}")
                del z, call
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
