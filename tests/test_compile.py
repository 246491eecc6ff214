"""torch.compile(fullgraph=True) of small training steps using every loss.

Each step is a tiny ``nn.Linear`` student (frozen ``nn.Linear`` teachers for the
distillation losses) followed by one loss, with the hyper-parameters passed as Python
floats. The compiled step must trace without a graph break (``fullgraph=True`` raises
on one), run compiled code on every call (the loss's grad_fn is the compiled one), and
give the eager loss and parameter gradients, also after a hyper-parameter, the SPLC
epoch or the batch size changes. (Dynamo specialises a float that reaches a custom
operator's ``float`` argument, so each new float value compiles a new graph; the SPLC
epoch is a ``SymInt`` and becomes symbolic after its first change.)

One compiled function per loss, shared by all the calls of that loss.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mpt_kernels

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

D, C, K = 8, 10, 6  # features, classes, classes the old model knows
torch.manual_seed(0)
STUDENT = torch.nn.Linear(D, C)
OLD_MODEL = torch.nn.Linear(D, K).requires_grad_(False)
NEW_MODEL = torch.nn.Linear(D, C).requires_grad_(False)
MPT_MODULE = mpt_kernels.MPTLoss(kind="lm", focus="neg_flip", class_bias=torch.linspace(0.0, 1.0, C))


# --------------------------------------------------------------------------- steps
def margin_ce_step(x, target, new_class_bias, label_smoothing):
    return mpt_kernels.margin_cross_entropy(
        STUDENT(x), target, num_old_classes=K, new_class_bias=new_class_bias,
        label_smoothing=label_smoothing,
    )


def focal_distillation_step(x, target, tau, alpha, beta):
    with torch.no_grad():
        ref_logits = OLD_MODEL(x)
    return mpt_kernels.focal_distillation(STUDENT(x), ref_logits, target, tau=tau, alpha=alpha, beta=beta)


def mpt_step(x, target, tau, new_class_bias, old_weight, new_weight):
    # both sources: the old model (K classes) and the new independently trained one
    with torch.no_grad():
        old_logits, new_logits = OLD_MODEL(x), NEW_MODEL(x)
    return mpt_kernels.mpt_loss(
        STUDENT(x), target, old_logits, new_logits, tau=tau, new_class_bias=new_class_bias,
        old_weight=old_weight, new_weight=new_weight,
    )


def mpt_module_step(x, target):
    with torch.no_grad():
        old_logits, new_logits = OLD_MODEL(x), NEW_MODEL(x)
    return MPT_MODULE(STUDENT(x), target, old_logits, new_logits)


def hill_step(x, targets, lamb, margin, gamma):
    return mpt_kernels.hill_loss(STUDENT(x), targets, lamb=lamb, margin=margin, gamma=gamma)


def splc_step(x, targets, epoch, tau):
    return mpt_kernels.splc_loss(STUDENT(x), targets, epoch=epoch, tau=tau, reduction="mean")


STEPS = {
    "margin_ce": margin_ce_step,
    "focal_distillation": focal_distillation_step,
    "mpt": mpt_step,
    "mpt_module": mpt_module_step,
    "hill": hill_step,
    "splc": splc_step,
}
# Inductor generates and compiles C++ for every graph (about 4 s each on a CPU, and a
# step compiles 3-4 graphs), so it runs the two steps that cover both operator families
# (the custom operators as inductor extern calls, the SymInt epoch); aot_eager runs the
# rest, which exercises all that is ours: Dynamo tracing, the fake operators, AOT autograd.
COMPILER = {"mpt": "inductor", "splc": "inductor"}
_COMPILED = {}


def compiled(name):
    """One compiled function per step, shared by every test that calls it."""
    if name not in _COMPILED:
        counter = CompileCounterWithBackend(COMPILER.get(name, "aot_eager"))
        _COMPILED[name] = (torch.compile(STEPS[name], backend=counter, fullgraph=True), counter)
    return _COMPILED[name]


# --------------------------------------------------------------------------- inputs
def batch(n, seed, multilabel=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if multilabel:
        return x, torch.rand(n, C, generator=g) < 0.3
    target = torch.randint(0, C, (n,), generator=g)
    with torch.no_grad():  # rows where the old model is right, so the focal weight matters
        target[::3] = OLD_MODEL(x[::3]).argmax(1)
    target[1] = -100
    return x, target


def run_step(fn, *args):
    STUDENT.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), loss.grad_fn, [p.grad.clone() for p in STUDENT.parameters()]


def assert_compiled_equals_eager(name, *args):
    compiled_fn, counter = compiled(name)
    loss, grad_fn, grads = run_step(compiled_fn, *args)
    expected_loss, _, expected_grads = run_step(STEPS[name], *args)
    # the compiled graph ran (not an eager fallback after too many recompiles)
    assert counter.frame_count >= 1 and type(grad_fn).__name__ == "CompiledFunctionBackward"
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert expected_loss.item() != 0.0 and expected_grads[0].abs().sum() > 0
    return expected_loss


# Three calls per loss: the first compiles with the floats as constants, the second
# changes them (the first retrace with symbolic floats used to break the graph in the
# validation), the third changes them and the batch size. Plain Python floats throughout.
@pytest.mark.parametrize("call", range(3))
def test_margin_cross_entropy(call):
    n, b, eps = [(12, 4.0, 0.0), (12, 1.5, 0.1), (9, 2.0, 0.2)][call]
    assert_compiled_equals_eager("margin_ce", *batch(n, call), b, eps)


@pytest.mark.parametrize("call", range(3))
def test_focal_distillation(call):
    n, tau, alpha, beta = [(12, 5.0, 1.0, 5.0), (12, 2.0, 0.5, 3.0), (9, 3.0, 1.5, 0.0)][call]
    assert_compiled_equals_eager("focal_distillation", *batch(n, call), tau, alpha, beta)


@pytest.mark.parametrize("call", range(3))
def test_mpt_loss_both_sources(call):
    n, tau, b, w_old, w_new = [(12, 5.0, 4.0, 1.0, 1.0), (12, 2.0, 1.0, 0.5, 2.0), (9, 3.0, 0.5, 0.7, 0.3)][call]
    assert_compiled_equals_eager("mpt", *batch(n, call), tau, b, w_old, w_new)


@pytest.mark.parametrize("call", range(2))
def test_mpt_module(call):
    assert_compiled_equals_eager("mpt_module", *batch(12, call))


@pytest.mark.parametrize("call", range(3))
def test_hill_loss(call):
    n, lamb, margin, gamma = [(12, 1.5, 1.0, 2.0), (12, 2.0, 0.5, 1.0), (9, 1.0, 0.0, 3.0)][call]
    assert_compiled_equals_eager("hill", *batch(n, call, multilabel=True), lamb, margin, gamma)


def test_splc_epoch_changes_across_calls():
    x, targets = batch(12, 0, multilabel=True)
    _, counter = compiled("splc")
    losses = {}
    for epoch in (0, 1):  # change_epoch = 1: epoch 0 differs from the others
        losses[epoch] = assert_compiled_equals_eager("splc", x, targets, epoch, 0.6)
    assert losses[0].item() != losses[1].item()  # the epoch reached the compiled graph
    # epoch is a SymInt operator argument: after the first change it is symbolic, so a
    # whole training run (more epochs than Dynamo's recompile limit of 8) compiles no more
    frames = counter.frame_count
    for epoch in (*range(2, 14), 0, 1):
        assert_compiled_equals_eager("splc", x, targets, epoch, 0.6)
    assert counter.frame_count == frames
    assert_compiled_equals_eager("splc", x, targets, 3, 0.5)  # a new tau works too


def test_bad_target_raises_in_compiled_step():
    # The target-range check runs in the operator, also inside the compiled graph.
    compiled_fn, _ = compiled("margin_ce")
    x, target = batch(12, 0)
    target[4] = C
    with pytest.raises(ValueError, match=r"target must hold class indices"):
        compiled_fn(x, target, 4.0, 0.0)
