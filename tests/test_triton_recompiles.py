"""A new batch size compiles no new Triton kernel.

Triton's JIT compiles a kernel once per specialisation: the constexprs, and each integer
argument's class (equal to 1, divisible by 16, other). An argument set by the batch size
would then compile every kernel again for a last batch of another size (seconds each, on
the GPU, in the middle of training). The kernels do not specialise on those arguments
(``do_not_specialize``); they still do on the class count, whose divisibility by 16 makes
their 16-byte loads.

How, without a GPU: a fresh process defines the kernels for the compiler (not the
interpreter), replaces ``JITFunction.run`` by a recorder, and runs each loss forward and
backward through the public API on CPU tensors (the backend's device check is told the
interpreter is on; no kernel runs). For each launch it asks Triton's own binder for the
key the JIT would compile under, for an sm_90 target. Batch sizes from 1 up, and a class
count below the multi-label tile's width (C = 80: a small batch then has fewer rows than
a tile, which the tile masks rather than shrinks).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from sm90_compile import run_without_interpreter  # noqa: E402

SCRIPT = r'''
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import mpt_kernels
from mpt_kernels.backends import triton_interpreter

triton_interpreter._INTERPRETER = True  # lets the backend take CPU tensors; launches are recorded
launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
BACKEND = make_backend(GPUTarget("cuda", 90, 32))


def compiled_keys(step):
    """The kernels step() launches, each with the specialisation the JIT compiles it for."""
    launches.clear()
    step()
    keys = []
    for fn, args, kwargs in launches:
        _, specialization, options = create_function_from_signature(fn.signature, fn.params, BACKEND)(*args, **kwargs)
        keys.append(f"{fn.__name__} {specialization} {sorted(options.items())}")
    return keys


def softmax_step(n, c, reduction, **params):
    def step():
        g = torch.Generator().manual_seed(n)
        logits = torch.randn(n, c, generator=g, dtype=torch.bfloat16, requires_grad=True)
        target = torch.randint(0, c, (n,), generator=g)
        old = torch.randn(n, c // 2, generator=g, dtype=torch.bfloat16)
        new = torch.randn(n, c, generator=g, dtype=torch.bfloat16)
        loss = mpt_kernels.mpt_loss(logits, target, old, new, reduction=reduction, backend="triton", **params)
        loss.backward(torch.full_like(loss, 2.0))
    return step


def multilabel_step(loss_fn, n, c, reduction, strided=False, **params):
    def step():
        g = torch.Generator().manual_seed(n)
        logits = torch.randn(n, c, generator=g, dtype=torch.bfloat16)
        logits = (logits.t().contiguous().t() if strided else logits).requires_grad_(True)
        targets = torch.rand(n, c, generator=g) > 0.5
        loss = loss_fn(logits, targets, reduction=reduction, backend="triton", **params)
        loss.backward(torch.full_like(loss, 2.0))
    return step


cases = {}
for c in (80, 1000, 1024):
    for reduction in ("mean", "none"):
        cases[f"mpt_loss C={c} {reduction}"] = {n: compiled_keys(softmax_step(n, c, reduction))
                                              for n in (1, 2, 5, 16, 17, 1000)}
    cases[f"hill_loss C={c} sum"] = {n: compiled_keys(multilabel_step(mpt_kernels.hill_loss, n, c, "sum"))
                                     for n in (1, 2, 5, 16, 1000)}
    cases[f"splc_loss C={c} mean"] = {n: compiled_keys(multilabel_step(mpt_kernels.splc_loss, n, c, "mean", epoch=3))
                                      for n in (1, 2, 5, 16, 1000)}
    # transposed logits, column stride N: the 2-D tiles (from N = 2: one row is contiguous)
    cases[f"hill_loss C={c} none strided"] = {
        n: compiled_keys(multilabel_step(mpt_kernels.hill_loss, n, c, "none", strided=True)) for n in (2, 5, 16, 1000)}
# new float hyper-parameters (none turns a term on or off): the same kernels
HYPER_PARAMETERS = {
    "defaults": {},
    "tau": dict(tau=2.0, scale_by_tau_sq=True),
    "smoothing and bias": dict(label_smoothing=0.1, new_class_bias=1.5),
    "focal weights": dict(alpha=0.5, beta=2.0),
    "term weights": dict(ce_weight=0.5, old_weight=0.3, new_weight=0.7),
}
cases["mpt_loss C=1000 mean hyper-parameters"] = {
    name: compiled_keys(softmax_step(8, 1000, "mean", **params)) for name, params in HYPER_PARAMETERS.items()}
print(json.dumps(cases))
print("recorded")
'''


@pytest.fixture(scope="module")
def compiled_keys() -> dict:
    """{case: {batch size: [the key of each launch, in order]}}"""
    return json.loads(run_without_interpreter(SCRIPT, "recorded").splitlines()[-2])


CASES = [f"{loss} C={c} {reduction}" for c in (80, 1000, 1024)
         for loss, reduction in (("mpt_loss", "mean"), ("mpt_loss", "none"), ("hill_loss", "sum"),
                                 ("splc_loss", "mean"), ("hill_loss", "none strided"))]


@pytest.mark.parametrize("case", CASES)
def test_a_new_batch_size_compiles_nothing(compiled_keys, case):
    by_batch = compiled_keys[case]
    first = next(iter(by_batch.values()))
    assert first, f"{case}: no kernel launch was recorded"
    for batch, keys in by_batch.items():
        assert keys == first, f"{case}: batch size {batch} compiles another kernel:\n{keys}\nagainst\n{first}"


@pytest.mark.parametrize("loss", ["mpt_loss C={} mean", "hill_loss C={} sum"])
def test_the_class_count_is_still_specialised(compiled_keys, loss):
    """C = 1024 (divisible by 16: aligned rows, 16-byte loads) and C = 1000 compile apart,
    so the comparison above can tell two specialisations apart."""
    aligned, unaligned = (next(iter(compiled_keys[loss.format(c)].values())) for c in (1024, 1000))
    assert aligned != unaligned


def test_new_float_hyper_parameters_compile_nothing(compiled_keys):
    """τ, label smoothing, the bias b, α, β and the term weights are runtime arguments of
    the softmax kernels (never constexpr: each value would compile anew)."""
    by_params = compiled_keys["mpt_loss C=1000 mean hyper-parameters"]
    first = by_params["defaults"]
    assert first, "no kernel launch was recorded"
    for name, keys in by_params.items():
        assert keys == first, f"{name} compiles another kernel:\n{keys}\nagainst\n{first}"

