"""Run-to-run determinism: the same inputs give bitwise-identical losses and gradients.

For every backend that runs on the test device, both loss families, every public
function and every reduction, the loss and the logits' gradient (for an upstream
gradient other than 1: a random (N,)/(N, C) tensor for "none", a scalar otherwise, so
the backward kernels run too) are computed three times on the same inputs and must be
equal bit for bit (NaN never occurs here). Between the repeats other work runs on the
device (another loss on other shapes), so a result that depended on leftover state, on
scheduling or on an atomic accumulation order would show.

On CPU the Triton kernels run in the interpreter with small blocks (several class
blocks, several tiles, partial-sum loops); the ``gpu`` tests repeat at realistic sizes,
where many programs run concurrently.
"""

from __future__ import annotations

import pytest
import torch

import mpt_kernels
from mpt_kernels._registry import registered_backends
from spec_gradients import focal_case, multilabel_case

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
REPEATS = 3
SOFTMAX_REDUCTIONS = ("mean", "sum", "none")
MULTILABEL_REDUCTIONS = ("sum", "mean", "none")
# float16 shares its code paths with bfloat16; on a CPU (the interpreter) it is left out for time
DTYPES = (torch.float32, torch.bfloat16, torch.float16) if ON_GPU else (torch.float32, torch.bfloat16)


def backends(family: str, dtype: torch.dtype) -> list[str]:
    return [b.name for b in registered_backends() if b.unavailable_reason(family, DEVICE, dtype) is None]


@pytest.fixture
def small_blocks(monkeypatch):
    if not ON_GPU:
        from mpt_kernels.backends import triton_multilabel as TM
        from mpt_kernels.backends import triton_softmax as TS
        from mpt_kernels.backends import triton_sum

        monkeypatch.setattr(TS, "block_size_override", 16)
        monkeypatch.setattr(TM, "tile_shape", lambda n_cols: (2, 16))
        monkeypatch.setattr(triton_sum, "BLOCK", 4)


def softmax_inputs(n, c, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, y, old, new = focal_case(n, c, k, g)
    return [t.to(dtype).to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in (z, y, old, new)]


SOFTMAX_CALLS = {
    "mpt_loss": lambda z, y, old, new, **kw: mpt_kernels.mpt_loss(
        z, y, old, new, focus="neg_flip", label_smoothing=0.1, tau=2.0, **kw),
    "mpt_loss_lm_bias": lambda z, y, old, new, **kw: mpt_kernels.mpt_loss(
        z, y, old, new, kind="lm", class_bias=torch.linspace(-1.0, 1.0, z.shape[1], device=z.device), **kw),
    "margin_cross_entropy": lambda z, y, old, new, **kw: mpt_kernels.margin_cross_entropy(
        z, y, num_old_classes=old.shape[1], new_class_bias=3.0, **kw),
    "focal_distillation": lambda z, y, old, new, **kw: mpt_kernels.focal_distillation(
        z, old, y, focus="student_wrong", scale_by_tau_sq=True, **kw),
}
MULTILABEL_CALLS = {
    "hill_loss": lambda x, t, **kw: mpt_kernels.hill_loss(x, t, **kw),
    "splc_loss": lambda x, t, **kw: mpt_kernels.splc_loss(x, t, epoch=3, **kw),
}


def upstream_for(out: torch.Tensor, seed: int, scale: float = 1.0) -> torch.Tensor:
    if out.dim() == 0:
        return torch.tensor(0.37 * scale, dtype=out.dtype, device=out.device)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out.shape, generator=g) * 2 - 0.5).to(out.dtype).to(out.device)


def loss_and_grad(call, logits, *rest, upstream_scale=1.0, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    out = call(leaf, *rest, **kwargs)
    (grad,) = torch.autograd.grad(out, leaf, upstream_for(out, 7, upstream_scale))
    return out.detach(), grad


def other_work(dtype):
    """A loss of other shapes between the repeats: different launch grids and buffers."""
    z, y, old, new = softmax_inputs(3, 21, 9, dtype, seed=99)
    loss_and_grad(SOFTMAX_CALLS["mpt_loss"], z, y, old, new, backend="reference")
    x, t = multilabel_case(3, 19, torch.Generator().manual_seed(98), dtype=dtype)
    loss_and_grad(MULTILABEL_CALLS["hill_loss"], x.to(DEVICE), t.to(DEVICE), backend="reference", reduction="none")


def assert_repeats_identical(run, dtype, loss_may_overflow=False):
    first = run()
    assert loss_may_overflow or torch.isfinite(first[0]).all()
    assert torch.isfinite(first[1]).all()
    assert first[1].abs().sum() > 0, "a gradient of zeros proves nothing"
    for _ in range(REPEATS - 1):
        other_work(dtype)
        again = run()
        for value, want, what in zip(again, first, ("loss", "gradient")):
            assert value.dtype == want.dtype and value.shape == want.shape
            assert torch.equal(value, want), f"{what} differs between runs"


def _softmax_params():
    return [
        pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")
        for dtype in DTYPES
        for backend in backends("softmax", dtype)
    ]


def _multilabel_params():
    return [
        pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")
        for dtype in DTYPES
        for backend in backends("multilabel", dtype)
    ]


def test_backends_under_test():
    assert {"reference", "triton"} <= set(backends("softmax", torch.float32))
    assert {"reference", "triton"} <= set(backends("multilabel", torch.float32))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
@pytest.mark.parametrize("backend, dtype", _softmax_params())
def test_softmax_family_is_deterministic(backend, dtype, name, reduction):
    z, y, old, new = softmax_inputs(7, 45, 26, dtype)
    assert_repeats_identical(
        lambda: loss_and_grad(SOFTMAX_CALLS[name], z, y, old, new, backend=backend, reduction=reduction), dtype)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
@pytest.mark.parametrize("name", list(MULTILABEL_CALLS))
@pytest.mark.parametrize("backend, dtype", _multilabel_params())
def test_multilabel_is_deterministic(backend, dtype, name, reduction):
    x, t = multilabel_case(9, 37, torch.Generator().manual_seed(1), dtype=dtype)
    x, t = x.to(DEVICE), t.to(DEVICE)
    assert_repeats_identical(
        lambda: loss_and_grad(MULTILABEL_CALLS[name], x, t, backend=backend, reduction=reduction), dtype)


# --------------------------------------------------------------------------- GPU, realistic sizes
# At these sizes float16 cannot hold a "sum" (the reference's is inf too; the gradient
# stays finite), and a "mean"'s gradient 1/count is below float16's range unless scaled
# as GradScaler does.
def half_sum(dtype, reduction):
    return dtype == torch.float16 and reduction == "sum"


def half_scale(dtype, reduction):
    return 2.0**14 if dtype == torch.float16 and reduction == "mean" else 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("backend, dtype", _softmax_params())
def test_gpu_softmax_family_is_deterministic(backend, dtype, reduction):
    g = torch.Generator(device=DEVICE).manual_seed(3)
    n, c, k = 4096, 32000, 17000
    z, new = (torch.randn(n, c, generator=g, device=DEVICE) * 3).to(dtype), torch.randn(n, c, generator=g, device=DEVICE).to(dtype)
    old = (torch.randn(n, k, generator=g, device=DEVICE) * 3).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device=DEVICE)
    y[::2] = old[::2].argmax(1)  # the old model right on half the rows
    y[5::97] = -100
    for name in ("mpt_loss", "margin_cross_entropy"):
        assert_repeats_identical(
            lambda call=SOFTMAX_CALLS[name]: loss_and_grad(call, z, y, old, new, backend=backend, reduction=reduction,
                                                           upstream_scale=half_scale(dtype, reduction)),
            dtype, loss_may_overflow=half_sum(dtype, reduction))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
@pytest.mark.parametrize("backend, dtype", _multilabel_params())
def test_gpu_multilabel_is_deterministic(backend, dtype, reduction):
    x, t = multilabel_case(4096, 9605, torch.Generator().manual_seed(4), dtype=dtype)
    x, t = x.to(DEVICE), t.to(DEVICE)
    for call in MULTILABEL_CALLS.values():
        assert_repeats_identical(
            lambda call=call: loss_and_grad(call, x, t, backend=backend, reduction=reduction,
                                            upstream_scale=half_scale(dtype, reduction)),
            dtype, loss_may_overflow=half_sum(dtype, reduction))
