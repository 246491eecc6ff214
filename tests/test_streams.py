"""GPU only: streams, devices and tensors beyond 2^31 elements, for the kernel backends.

* Current stream: a loss and its backward run under a non-default ``torch.cuda.Stream``
  give bit for bit the default stream's results, and the work is ordered on that
  stream: the logits (and the upstream gradient) are written on it only after a
  ``torch.cuda._sleep``, so a kernel launched on any other stream would run first and
  read the NaN the buffers start with.
* Inputs' device (two GPUs or more): tensors on cuda:1 while the current device is 0.
  Every Triton launch must happen with cuda:1 current (a launch hook checks it, and
  refuses the launch otherwise, so a wrong device cannot leave a sticky CUDA error
  behind), the work is ordered on cuda:1's current stream, the results equal those
  computed on cuda:0, and the current device is 0 again afterwards.
* N·C > 2^31 (65536 x 40000 bfloat16), every kernel of every backend: the forward
  (each loss family, each reduction), the backward for an upstream gradient of 1 and
  other than 1, the inverse count of "mean", the partial sums; compared with the
  reference computed on row slices (to save memory). Skipped when the GPU lacks the
  memory.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import mpt_kernels
from mpt_kernels import reference as R
from mpt_kernels._registry import registered_backends
from spec_gradients import row_upstream

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

KERNEL_BACKENDS = ("triton", "cuda")
SLEEP_CYCLES = 200_000_000  # about 0.1 s of a GPU clock: long enough to outlast the Python launches
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3 * 2.0**-11, torch.bfloat16: 3 * 2.0**-8}
SOFTMAX = ("mpt_loss", "margin_cross_entropy", "focal_distillation")

# (function, reduction): every kernel path (the backward of "none" and of the scalar
# reductions, "mean"'s count, the distillation-only read of K columns)
CASES = [
    ("mpt_loss", "none"),
    ("mpt_loss", "mean"),
    ("margin_cross_entropy", "sum"),
    ("focal_distillation", "mean"),
    ("hill_loss", "sum"),
    ("hill_loss", "none"),
    ("splc_loss", "mean"),
]


def family_of(name: str) -> str:
    return "softmax" if name in SOFTMAX else "multilabel"


def require(backend: str, name: str, device, dtype=torch.bfloat16) -> None:
    for b in registered_backends():
        if b.name == backend:
            reason = b.unavailable_reason(family_of(name), torch.device(device), dtype)
            if reason is not None:
                pytest.skip(f"{backend} cannot run here: {reason}")
            return
    pytest.skip(f"{backend} is not registered")


# --------------------------------------------------------------------------- inputs and calls
def make_inputs(name, n, c, device, dtype=torch.bfloat16, seed=0):
    """(logits, other tensors) with random values generated on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, c, generator=g, device=device, dtype=dtype) * 2
    if family_of(name) == "multilabel":
        return logits, {"targets": torch.rand(n, c, generator=g, device=device) < 0.3}
    k = c // 2 + 3
    old = torch.randn(n, k, generator=g, device=device, dtype=dtype) * 2
    new = torch.randn(n, c, generator=g, device=device, dtype=dtype) * 2
    target = torch.randint(0, c, (n,), generator=g, device=device)
    target[::2] = old[::2].argmax(dim=1)  # the old model right on half the rows: f matters
    target[3::101] = -100
    return logits, {"target": target, "old": old, "new": new}


def loss_call(name, tensors, reduction, backend):
    """fn(logits) -> loss; backend None is the pure reference."""
    namespace = R if backend is None else mpt_kernels
    kw = {"reduction": reduction} if backend is None else {"reduction": reduction, "backend": backend}
    if name == "mpt_loss":
        return lambda z: namespace.mpt_loss(z, tensors["target"], tensors["old"], tensors["new"],
                                            focus="neg_flip", label_smoothing=0.1, **kw)
    if name == "margin_cross_entropy":
        k = tensors["old"].shape[1]
        return lambda z: namespace.margin_cross_entropy(z, tensors["target"], num_old_classes=k,
                                                        new_class_bias=2.0, **kw)
    if name == "focal_distillation":
        return lambda z: namespace.focal_distillation(z, tensors["old"], tensors["target"], tau=2.0, **kw)
    if name == "hill_loss":
        return lambda x: namespace.hill_loss(x, tensors["targets"], **kw)
    return lambda x: namespace.splc_loss(x, tensors["targets"], epoch=2, **kw)


def make_upstream(out: torch.Tensor, seed=5) -> torch.Tensor:
    """0.37 for a scalar, a random tensor for "none" (never 1: the backward kernels run)."""
    if out.dim() == 0:
        return torch.tensor(0.37, dtype=out.dtype, device=out.device)
    g = torch.Generator(device=out.device).manual_seed(seed)
    return (torch.rand(out.shape, generator=g, device=out.device) * 2 - 0.5).to(out.dtype)


def loss_and_grad(fn, logits, upstream=None):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf)
    upstream = make_upstream(out) if upstream is None else upstream
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out.detach(), grad, upstream


# --------------------------------------------------------------------------- current stream
@pytest.mark.parametrize("name, reduction", CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_runs_on_the_current_stream(backend, name, reduction):
    require(backend, name, "cuda")
    logits, tensors = make_inputs(name, 512, 1000, "cuda")
    fn = loss_call(name, tensors, reduction, backend)
    # on the default stream first: the expected values, and every kernel compiled
    expected, expected_grad, upstream = loss_and_grad(fn, logits)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        leaf = torch.full_like(logits, math.nan)
        late_upstream = torch.full_like(upstream, math.nan)
        torch.cuda._sleep(SLEEP_CYCLES)
        leaf.copy_(logits)  # written on `side` only after the sleep
        leaf.requires_grad_(True)
        out = fn(leaf)
        torch.cuda._sleep(SLEEP_CYCLES)
        late_upstream.copy_(upstream)
        (grad,) = torch.autograd.grad(out, leaf, late_upstream)
        out_copy, grad_copy = out.detach().clone(), grad.clone()  # read on `side`
    torch.cuda.synchronize()
    assert not out_copy.isnan().any() and not grad_copy.isnan().any(), "a kernel ran before its inputs were written"
    assert torch.equal(out_copy, expected), "the loss differs from the default stream's"
    assert torch.equal(grad_copy, expected_grad), "the gradient differs from the default stream's"


# --------------------------------------------------------------------------- inputs' device
def triton_kernels():
    from mpt_kernels.backends import triton_multilabel, triton_softmax

    for module in (triton_softmax, triton_multilabel):
        for value in vars(module).values():
            if hasattr(value, "pre_run_hooks") and hasattr(value, "run"):
                yield value


@contextlib.contextmanager
def triton_launch_device_check(expected_index: int):
    """Records the current device at every Triton launch; refuses a launch elsewhere."""
    seen = []

    def hook(*args, **kwargs):
        seen.append(torch.cuda.current_device())
        if seen[-1] != expected_index:
            raise RuntimeError(f"a Triton kernel was launched with cuda:{seen[-1]} current, "
                               f"its tensors are on cuda:{expected_index}")

    kernels = list(triton_kernels())
    for kernel in kernels:
        kernel.pre_run_hooks.append(hook)
    try:
        yield seen
    finally:
        for kernel in kernels:
            kernel.pre_run_hooks.remove(hook)


def _second_device_params():
    return [(backend, name, reduction) for backend in KERNEL_BACKENDS for name, reduction in CASES]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend, name, reduction", _second_device_params())
def test_runs_on_the_inputs_device(backend, name, reduction):
    require(backend, name, "cuda:1")
    torch.cuda.set_device(0)
    logits0, tensors0 = make_inputs(name, 512, 1000, "cuda:0")
    expected, expected_grad, upstream0 = loss_and_grad(loss_call(name, tensors0, reduction, backend), logits0)

    logits1 = logits0.to("cuda:1")
    tensors1 = {key: value.to("cuda:1") for key, value in tensors0.items()}
    upstream1 = upstream0.to("cuda:1")
    fn = loss_call(name, tensors1, reduction, backend)
    with triton_launch_device_check(1):  # compiles for cuda:1; a launch on cuda:0 is refused
        loss_and_grad(fn, logits1, upstream1)
    torch.cuda.synchronize(1)
    with torch.cuda.device(1):  # the inputs are written on cuda:1's current stream after a sleep
        leaf = torch.full_like(logits1, math.nan)
        torch.cuda._sleep(SLEEP_CYCLES)
        leaf.copy_(logits1)
    leaf.requires_grad_(True)
    assert torch.cuda.current_device() == 0
    with triton_launch_device_check(1) as launches:
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, upstream1)
    assert torch.cuda.current_device() == 0, "the loss left another device current"
    assert out.device == grad.device == torch.device("cuda:1")
    if backend == "triton":
        assert launches and set(launches) == {1}
    torch.cuda.synchronize(1)
    same_gpu = torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1)
    for actual, want, what in ((out.detach(), expected, "loss"), (grad, expected_grad, "gradient")):
        actual = actual.to("cuda:0")
        assert not actual.isnan().any(), f"{what}: a kernel ran before its inputs were written"
        if same_gpu:
            assert torch.equal(actual, want), f"{what} differs from cuda:0's"
        else:
            tol = TOLERANCE[want.dtype]
            torch.testing.assert_close(actual, want, rtol=tol, atol=tol * want.abs().max().item())


# --------------------------------------------------------------------------- N·C > 2^31
HUGE_N, HUGE_C = 65536, 40000  # 2.62e9 elements
CHUNK = 4096


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def _skip_unless_memory(streams_of_nc: float) -> None:
    """streams_of_nc: how many N x C bf16 tensors the case holds at once (plus slack)."""
    need = int((streams_of_nc + 1.5) * HUGE_N * HUGE_C * 2)
    torch.cuda.empty_cache()  # blocks the caching allocator holds do not count as free
    if _free_bytes() < need:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free GPU memory, {_free_bytes() / 2**30:.0f} GiB free")


def assert_close_rows(actual, expected, what):
    tol = TOLERANCE[torch.bfloat16]
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def _compare_chunks(name, logits, tensors, reduction, loss, grad, chunk_upstream):
    """The reference's "none" loss on slices of CHUNK rows, its gradient for
    ``chunk_upstream(rows, ref_rows)`` compared with ``grad`` (and each row's loss with
    ``loss`` for "none"); returns the float64 sum of the reference's row losses."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        part = {key: value[rows] for key, value in tensors.items()}
        leaf = logits[rows].detach().clone().requires_grad_(True)
        ref_rows = loss_call(name, part, "none", None)(leaf)
        (ref_grad,) = torch.autograd.grad(ref_rows, leaf, chunk_upstream(rows, ref_rows))
        assert_close_rows(grad[rows], ref_grad, f"gradient, rows {start}..")
        if reduction == "none":
            assert_close_rows(loss[rows], ref_rows.detach(), f"loss, rows {start}..")
        total += ref_rows.detach().double().sum()
    return total


def _chunked_reference_softmax(name, logits, tensors, reduction, upstream, loss, grad):
    """Compares the kernel's loss and gradient with the reference on slices of CHUNK rows."""
    full_args = {
        "mpt_loss": lambda: R.mpt_loss_args(
            logits, tensors["target"], tensors["old"], tensors["new"], new_class_bias=4.0, num_old_classes=None,
            class_bias=None, kind="kl", tau=5.0, alpha=1.0, beta=5.0, focus="neg_flip", scale_by_tau_sq=False,
            ce_weight=1.0, old_weight=None, new_weight=None, label_smoothing=0.1, ignore_index=-100,
            reduction=reduction),
        "margin_cross_entropy": lambda: R.margin_cross_entropy_args(
            logits, tensors["target"], class_bias=None, num_old_classes=tensors["old"].shape[1],
            new_class_bias=2.0, label_smoothing=0.0, ignore_index=-100, reduction=reduction),
        "focal_distillation": lambda: R.focal_distillation_args(
            logits, tensors["old"], tensors["target"], kind="kl", tau=2.0, alpha=1.0, beta=5.0,
            focus="ref_correct", scale_by_tau_sq=False, ignore_index=-100, reduction=reduction),
    }[name]()
    g_rows = row_upstream(full_args, upstream)  # (N,): what each row's gradient is multiplied by
    total = _compare_chunks(name, logits, tensors, reduction, loss, grad,
                            lambda rows, ref: g_rows[rows].to(ref.dtype))
    if reduction != "none":
        if reduction == "mean":
            total /= max(int((tensors["target"] != -100).sum()), 1)
        assert_close_rows(loss, total.to(loss.dtype), "reduced loss")


def _chunked_reference_multilabel(name, logits, tensors, reduction, upstream, loss, grad):
    numel = logits.numel()
    scale = 1.0 / numel if reduction == "mean" else 1.0

    def chunk_upstream(rows, ref):
        return upstream[rows] if reduction == "none" else torch.full_like(ref, float(upstream) * scale)

    total = _compare_chunks(name, logits, tensors, reduction, loss, grad, chunk_upstream)
    if reduction != "none":
        assert_close_rows(loss, (total * scale).to(loss.dtype), "reduced loss")


HUGE_CASES = [
    # (function, reduction, upstream): upstream "one" runs the plain loss.backward() path
    ("mpt_loss", "none", "random"),
    ("mpt_loss", "mean", "random"),
    ("margin_cross_entropy", "sum", "one"),
    ("focal_distillation", "mean", "random"),
    ("hill_loss", "sum", "random"),
    ("hill_loss", "mean", "one"),
    ("splc_loss", "none", "random"),
]
# how many N x C bf16 tensors each case holds at once: inputs, gradient, upstream, loss
HUGE_MEMORY = {"mpt_loss": 4.5, "margin_cross_entropy": 3.5, "focal_distillation": 3.5,
               "hill_loss": 3.5, "splc_loss": 5.0}


@pytest.mark.parametrize("name, reduction, upstream_kind", HUGE_CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_beyond_int32_elements(backend, name, reduction, upstream_kind):
    require(backend, name, "cuda")
    assert HUGE_N * HUGE_C > 2**31
    _skip_unless_memory(HUGE_MEMORY[name])
    logits, tensors = make_inputs(name, HUGE_N, HUGE_C, "cuda", seed=11)
    leaf = logits.requires_grad_(True)
    loss = loss_call(name, tensors, reduction, backend)(leaf)
    if upstream_kind == "one":
        upstream = torch.ones_like(loss)
    else:
        upstream = make_upstream(loss)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    loss = loss.detach()
    leaf = leaf.detach()
    assert torch.isfinite(loss).all() and torch.isfinite(grad[-CHUNK:]).all()
    compare = _chunked_reference_softmax if family_of(name) == "softmax" else _chunked_reference_multilabel
    compare(name, leaf, tensors, reduction, upstream, loss, grad)
