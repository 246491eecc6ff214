"""The host time of the package's own Python layers per call, measured on any machine.

Every benchmarked loss (``mpt_kernels.bench.cases``) runs through the ``triton`` backend
on tiny CPU tensors with each kernel launch replaced by a no-op, so what is timed is
validation, backend choice, autograd, buffer allocation and the launch arguments: the
part of a call's host time that our code decides. Next to it, the floor: a bare
``torch.autograd.Function`` that allocates its gradient and returns it.

These are not GPU figures. On a GPU, Triton's launcher adds its own time per launch
(argument specialisation and the driver call; up to four launches per forward+backward),
and the value check of the targets, which runs only on CPU tensors, is left out here.

    python benchmarks/host_overhead.py [--calls 200] [--repeats 30] [--loss mpt_kl ...]

CPU time of this thread (``time.thread_time``), the least over the repeats: other
processes on the machine change it less than wall time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before mpt_kernels defines its kernels: CPU tensors accepted

import torch  # noqa: E402

from mpt_kernels.backends import triton_multilabel, triton_softmax, triton_sum  # noqa: E402
from mpt_kernels.bench.cases import CASES  # noqa: E402
from mpt_kernels.bench.providers import BackendAPI  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> list:
    """Replaces every kernel the backend launches; returns their names."""
    stubbed = []
    for module in (triton_softmax, triton_multilabel, triton_sum):
        for name, value in list(vars(module).items()):
            if hasattr(value, "run") and hasattr(value, "fn") and name.endswith("_kernel"):  # a launched JITFunction
                setattr(module, name, _NoLaunch())
                stubbed.append(name)
    triton_softmax.check_target_values = lambda *args: None  # a GPU skips it (no host sync)
    return stubbed


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(torch.empty_like(logits))
        return logits.new_empty(())

    @staticmethod
    def backward(ctx, grad_loss):
        return ctx.saved_tensors[0]


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(calls):  # warm-up
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", nargs="+", default=list(CASES))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    stubbed = stub_kernels()
    api = BackendAPI("triton")
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(8, 64, requires_grad=True)
    floor = per_call_us(lambda: torch.autograd.grad(_Floor.apply(z), z), args.calls, args.repeats)
    print(f"host time per call, kernels stubbed (CPU, not GPU figures); floor {floor:.1f} µs "
          "(a bare autograd.Function, forward+backward)")
    print(f"stubbed: {', '.join(sorted(stubbed))}")
    print("| loss | forward µs | forward+backward µs | forward+backward above the floor µs |")
    print("|---|---|---|---|")
    for name in args.loss:
        case = CASES[name]
        inputs = case.make_inputs(8, 64, torch.float32, torch.device("cpu"), generator)
        logits = inputs.pop("logits").requires_grad_()

        def forward():
            with torch.no_grad():
                case.forward(api, logits, inputs)

        def forward_backward():
            torch.autograd.grad(case.forward(api, logits, inputs), logits)

        fwd = per_call_us(forward, args.calls, args.repeats)
        both = per_call_us(forward_backward, args.calls, args.repeats)
        print(f"| {name} | {fwd:.1f} | {both:.1f} | {both - floor:.1f} |")


if __name__ == "__main__":
    main()
