"""torch.compile and automatic mixed precision, for every backend that runs on the device.

* ``torch.compile(fullgraph=True)`` of a small model (a linear student, frozen linear
  teachers) plus each loss: no graph break (``fullgraph=True`` raises on one), the
  compiled code runs (one frame, the loss's grad_fn is the compiled one), and the loss
  and the parameters' gradients equal eager mode's with the same backend. On a CPU the
  compiler is ``aot_eager`` (Dynamo, the fake operators, AOT autograd: all that is
  ours), plus one inductor case; on a GPU inductor throughout.
* A ``torch.autocast`` training step: the student's logits come out in the autocast
  dtype, the loss is returned in that dtype (spec: the logits' dtype) and equals the
  float32 reference computed on the same half-precision logits, rounded once: it was
  accumulated in float32. Each case also checks that a half-precision accumulation of
  the same terms would be caught by that comparison (the check can fail). The logits'
  and the parameters' gradients equal those of the pure reference's step.
* ``torch.amp.GradScaler``: the scaled backward (an upstream gradient of 2^16, not 1),
  unscaled, gives the reference's unscaled gradients and the step runs. In float16 the
  loss (returned in float16, the logits' dtype) cannot take an upstream gradient of
  2^16 > 65504: that step's gradients are inf/NaN, GradScaler skips it and halves the
  scale until a step runs, and that step is checked.

Autocast runs in bfloat16 and float16 (CPU autocast has both). On a CPU the Triton
kernels run in the interpreter, which converts float32 to bfloat16 by truncation (the
compiled kernels round to nearest): there a bfloat16 loss may sit one ulp from the
float32 value instead of half of one.

The Triton kernels run under the interpreter with small blocks for the compile tests;
the AMP tests, on more rows, keep the launch configuration chosen from the shapes. The
cuda backend's kernels run on a CPU in the CUDA emulation (tests/cuda_emulation).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mpt_kernels
from mpt_kernels import reference as R
from mpt_kernels._registry import registered_backends
from cuda_emulation import build as emulation_build
from cuda_emulation import installed_without_gpu

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's masked-out lanes
]

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
D, C, K = 8, 40, 23  # features, classes, classes of the old model (C, K not multiples of a block)
N = 256 if ON_GPU else 24
AMP_DTYPES = (torch.bfloat16, torch.float16)
# gradients: rounded to the dtype on both sides, then through a half-precision matmul
GRAD_TOLERANCE = {torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}
LOSSES = ("margin_cross_entropy", "focal_distillation", "mpt_loss", "hill_loss", "splc_loss")
MULTILABEL = ("hill_loss", "splc_loss")


def backends_on_device(dtype=torch.float32) -> list[str]:
    names = []
    for backend in registered_backends():
        if all(backend.unavailable_reason(family, DEVICE, dtype) is None for family in ("softmax", "multilabel")):
            names.append(backend.name)
    return names


# without a GPU, the cuda backend's kernels run in the CUDA emulation (fixture below)
EMULATED_CUDA = not ON_GPU and emulation_build.unavailable_reason() is None
BACKENDS = backends_on_device() + (["cuda"] if EMULATED_CUDA else [])


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels_emulated():
    with installed_without_gpu() as emulated:
        assert emulated == EMULATED_CUDA
        yield


@pytest.fixture
def default_blocks():
    """Marks a test that keeps the launch configuration chosen from the shapes."""


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Under the interpreter, blocks small enough that C = 40 crosses several (the AMP
    tests, on more rows, keep the default blocks: the interpreter's time is per block)."""
    if not ON_GPU and "default_blocks" not in request.fixturenames:
        from mpt_kernels.backends import triton_multilabel as TM
        from mpt_kernels.backends import triton_sum
        from mpt_kernels.backends import triton_softmax as TS

        monkeypatch.setattr(TS, "block_size_override", 16)
        monkeypatch.setattr(TM, "tile_shape", lambda n_cols: (4, 16))
        monkeypatch.setattr(triton_sum, "BLOCK", 16)


def test_backends_under_test():
    assert "reference" in BACKENDS and "triton" in BACKENDS, BACKENDS
    assert "cuda" in BACKENDS or not EMULATED_CUDA, BACKENDS


# --------------------------------------------------------------------------- models and steps
def make_models(seed=0):
    torch.manual_seed(seed)
    student = torch.nn.Linear(D, C).to(DEVICE)
    old = torch.nn.Linear(D, K).to(DEVICE).requires_grad_(False)
    new = torch.nn.Linear(D, C).to(DEVICE).requires_grad_(False)
    # weights large enough that the losses are far from 0 and the argmaxes spread out
    with torch.no_grad():
        for m in (student, old, new):
            m.weight.mul_(6.0)
    return student, old, new


def batch(loss_name, seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if loss_name in MULTILABEL:
        return x.to(DEVICE), (torch.rand(n, C, generator=g) < 0.3).to(DEVICE)
    y = torch.randint(0, C, (n,), generator=g)
    y[::3] = torch.randint(0, K, (len(y[::3]),), generator=g)
    y[1] = -100
    return x.to(DEVICE), y.to(DEVICE)


def loss_of(loss_name, logits, y, old_logits, new_logits, backend, **over):
    """One loss on given logits; backend None is the pure reference (mpt_kernels.reference)."""
    namespace = R if backend is None else mpt_kernels
    kwargs = {} if backend is None else {"backend": backend}
    kwargs.update(over)
    if loss_name == "margin_cross_entropy":
        return namespace.margin_cross_entropy(logits, y, num_old_classes=K, new_class_bias=2.0,
                                              label_smoothing=0.1, **kwargs)
    if loss_name == "focal_distillation":
        return namespace.focal_distillation(logits, old_logits, y, tau=2.0, focus="neg_flip", **kwargs)
    if loss_name == "mpt_loss":
        return namespace.mpt_loss(logits, y, old_logits, new_logits, tau=3.0, new_class_bias=1.5, **kwargs)
    if loss_name == "hill_loss":
        return namespace.hill_loss(logits, y, **kwargs)
    return namespace.splc_loss(logits, y, epoch=2, **kwargs)


def forward(models, loss_name, x, y, backend):
    """(student logits, old teacher logits, new teacher logits, loss) of one step."""
    student, old, new = models
    logits = student(x)
    with torch.no_grad():
        old_logits, new_logits = old(x), new(x)
    return logits, old_logits, new_logits, loss_of(loss_name, logits, y, old_logits, new_logits, backend)


def parameter_grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- torch.compile
COMPILER = "inductor" if ON_GPU else "aot_eager"


def assert_compiled_equals_eager(loss_name, backend, compiler):
    models = make_models()
    student = models[0]

    def step(x, y):
        return forward(models, loss_name, x, y, backend)[3]

    torch._dynamo.reset()  # every case's `step` shares one code object, hence one cache
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for seed in (1, 2):  # a second batch: the compiled graph is reused, not retraced
        x, y = batch(loss_name, seed)
        student.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        assert loss.grad_fn is not None and type(loss.grad_fn).__name__ == "CompiledFunctionBackward"
        loss.backward()
        grads = parameter_grads(student)
        student.zero_grad(set_to_none=True)
        expected = step(x, y)
        expected.backward()
        expected_grads = parameter_grads(student)
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=2e-5, atol=1e-6)
        for grad, want in zip(grads, expected_grads):
            torch.testing.assert_close(grad, want, rtol=2e-5, atol=1e-6)
        assert expected.item() != 0.0 and expected_grads[0].abs().sum() > 0
    assert counter.frame_count == 1, f"{counter.frame_count} frames: a recompile or a graph break"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_compile_fullgraph(loss_name, backend):
    assert_compiled_equals_eager(loss_name, backend, COMPILER)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_where_only_a_constant_input_requires_grad(backend):
    """A frozen student's logits, with a class_bias and a teacher that require grad: the
    loss requires grad (through those inputs), its backward runs and gives them none
    (spec: constants), as in eager mode; the forward made no gradient of the logits."""
    torch.manual_seed(5)
    logits = torch.randn(N, C, device=DEVICE)
    target = torch.randint(0, C, (N,), device=DEVICE)
    old = torch.randn(N, K, device=DEVICE, requires_grad=True)
    class_bias = torch.randn(C, device=DEVICE, requires_grad=True)

    def step(logits, target, old, class_bias):
        return mpt_kernels.mpt_loss(logits, target, old, class_bias=class_bias, backend=backend)

    loss = torch.compile(step, backend=COMPILER, fullgraph=True)(logits, target, old, class_bias)
    eager = step(logits, target, old, class_bias)
    torch.testing.assert_close(loss.detach(), eager.detach(), rtol=2e-5, atol=1e-6)
    assert loss.requires_grad
    loss.backward()
    assert old.grad is None and class_bias.grad is None


@pytest.mark.skipif(ON_GPU, reason="on a GPU every compile case uses inductor")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")
def test_compile_inductor_triton_on_cpu():
    """Inductor generates C++ for the model around the Triton kernel's custom operator.
    (Without its on-disk caches: they key a compiled backward on the Dynamo graph, which
    does not show how many tensors an operator's fake forward saves, so a cache left by
    an earlier version of the package would replay a stale backward.)"""
    with torch._inductor.config.patch(force_disable_caches=True):
        assert_compiled_equals_eager("mpt_loss", "triton", "inductor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_under_autocast(backend):
    """The fake operators give the autocast dtype too: a compiled mixed-precision step."""
    models = make_models()
    x, y = batch("mpt_loss")

    def step(x, y):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return forward(models, "mpt_loss", x, y, backend)[3]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, y)
    expected = step(x, y)
    assert loss.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- autocast
# Rows and seed of the autocast step: a half-precision running sum of these terms misses
# the float32 value by more than one rounding, in both dtypes (asserted below; the miss
# grows like the square root of the number of terms, so a GPU, where the interpreter's
# cost does not count, takes many more rows).
N_AMP, AMP_SEED = (1024, 8) if ON_GPU else (64, 8)
N_SCALER = 64


def float32_value(loss_name, logits, y, old_logits, new_logits, reduction):
    """The pure reference in float32 on the given half-precision logits and teachers."""
    return loss_of(loss_name, logits.detach().float(), y, old_logits.float(), new_logits.float(), None,
                   reduction=reduction)


def half_accumulation(terms: torch.Tensor, dtype) -> torch.Tensor:
    """What a kernel that accumulated in ``dtype`` would return: a running sum rounded at
    every step (torch's own sum accumulates half types in float32, so it is written out)."""
    total = torch.zeros((), dtype=dtype)
    for value in terms.flatten().to(dtype).cpu():
        total = (total + value).to(dtype)
    return total


def one_rounding(value: float, dtype, backend) -> float:
    """The error of one rounding of ``value`` to ``dtype``: half its spacing there (a whole
    spacing for Triton's interpreter, which truncates float32 to bfloat16)."""
    spacing = 2.0 ** math.floor(math.log2(abs(value))) * torch.finfo(dtype).eps
    truncates = backend == "triton" and not ON_GPU and dtype == torch.bfloat16
    return spacing if truncates else spacing / 2


def reference_step(loss_name, x, y, amp_dtype, reduction=None):
    """Gradients of the logits and of the student's parameters: pure reference, same autocast."""
    models = make_models()
    over = {} if reduction is None else {"reduction": reduction}
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        logits = models[0](x)
        with torch.no_grad():
            old_logits, new_logits = models[1](x), models[2](x)
        loss = loss_of(loss_name, logits, y, old_logits, new_logits, None, **over)
    logits.retain_grad()
    loss.backward()
    return logits.grad, parameter_grads(models[0])


def assert_grads_close(actual, expected, dtype, what):
    scale = max(e.abs().max().item() for e in expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype, what
        torch.testing.assert_close(a.float(), e.float(), rtol=GRAD_TOLERANCE[dtype],
                                   atol=GRAD_TOLERANCE[dtype] * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_autocast_step(loss_name, backend, amp_dtype, default_blocks):
    """A training step under autocast, with reduction "sum" (every term accumulated)."""
    x, y = batch(loss_name, seed=AMP_SEED, n=N_AMP)
    models = make_models()
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        logits = models[0](x)
        with torch.no_grad():
            old_logits, new_logits = models[1](x), models[2](x)
        loss = loss_of(loss_name, logits, y, old_logits, new_logits, backend, reduction="sum")
    logits.retain_grad()
    assert logits.dtype == amp_dtype and old_logits.dtype == amp_dtype
    assert loss.dtype == amp_dtype and loss.dim() == 0

    # the value: the float32 reference on the same half-precision logits, rounded once
    # (plus the float32 noise of a different summation order)
    expected = float32_value(loss_name, logits, y, old_logits, new_logits, "sum").item()
    terms = float32_value(loss_name, logits, y, old_logits, new_logits, "none")
    noise = 32 * 2.0**-24 * terms.abs().sum().item()  # a few float32 roundings per term
    rounded_once = one_rounding(expected, amp_dtype, backend) + noise
    assert abs(loss.float().item() - expected) <= rounded_once, (loss.item(), expected)
    # ... which a half-precision accumulation of the same terms misses
    naive = half_accumulation(terms, amp_dtype).float().item()
    assert abs(naive - expected) > rounded_once, "on these inputs the check above could not fail"

    loss.backward()
    ref_logits_grad, ref_param_grads = reference_step(loss_name, x, y, amp_dtype, reduction="sum")
    assert logits.grad.dtype == amp_dtype
    assert_grads_close([logits.grad], [ref_logits_grad], amp_dtype, "logits' gradient")
    assert_grads_close(parameter_grads(models[0]), ref_param_grads, amp_dtype, "parameters' gradients")


def make_grad_scaler():
    try:
        return torch.amp.GradScaler(DEVICE.type, init_scale=2.0**16)
    except (AttributeError, RuntimeError, TypeError) as error:  # an older torch: GradScaler is CUDA-only
        pytest.skip(f"torch.amp.GradScaler({DEVICE.type!r}) is not supported here: {error}")


def scaled_step(scaler, models, optimizer, loss_name, x, y, backend, amp_dtype):
    """One GradScaler step; returns (scale used, scaled logits' gradient, whether it stepped)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        logits, _, _, loss = forward(models, loss_name, x, y, backend)
    assert loss.dtype == amp_dtype
    logits.retain_grad()
    scale = scaler.get_scale()
    scaler.scale(loss).backward()  # the loss's upstream gradient is the scale, not 1
    scaled_logits_grad = logits.grad.detach().clone()
    scaler.unscale_(optimizer)
    unscaled = parameter_grads(models[0])
    scaler.step(optimizer)
    scaler.update()
    return scale, scaled_logits_grad, unscaled, scaler.get_scale() == scale


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_grad_scaler_step(loss_name, backend, amp_dtype, default_blocks):
    """The scaled gradients, unscaled, are the reference's. The loss comes back in the
    autocast dtype (the logits'), so in float16 the default initial scale 2^16 does not
    fit its upstream gradient (float16 tops out at 65504): that step's gradients are inf
    or NaN, never silently finite, and GradScaler skips it and halves the scale (as it
    does while a half-precision matmul of the model overflows), until a step runs; that
    step's gradients are the reference's."""
    scaler = make_grad_scaler()
    x, y = batch(loss_name, seed=3, n=N_SCALER)
    models = make_models()
    student = models[0]
    before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for attempt in range(16):
        scale, scaled_logits_grad, grads, stepped = scaled_step(
            scaler, models, optimizer, loss_name, x, y, backend, amp_dtype)
        assert scale == 2.0 ** (16 - attempt)
        if stepped:
            break
        assert not all(torch.isfinite(g).all() for g in grads), "a step was skipped with finite gradients"
        assert torch.equal(student.weight, before["weight"]), "a step with inf gradients was taken"
    assert stepped, "GradScaler never found finite gradients"
    # in bfloat16 the first step runs; in float16 the first cannot (the upstream gradient is inf)
    assert (attempt == 0) == (amp_dtype == torch.bfloat16), attempt
    ref_logits_grad, ref_param_grads = reference_step(loss_name, x, y, amp_dtype)
    assert_grads_close([scaled_logits_grad.float() / scale], [ref_logits_grad.float()], amp_dtype, "logits' gradient")
    assert_grads_close(grads, ref_param_grads, amp_dtype, "unscaled parameters' gradients")
    assert not torch.equal(student.weight, before["weight"]), "the optimizer step did not run"
