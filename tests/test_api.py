"""The public API: functional losses, backend dispatch, nn.Module wrappers, operators.

Every public function, with ``backend="auto"`` and ``backend="reference"``, must equal
the function of the same name in ``mpt_kernels.reference`` (the spec in code), in loss
and gradient, for every reduction. The defaults are checked against the spec through
values computed here independently of the package. No Triton numerics here: those
belong to the kernel tests.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mpt_kernels
from mpt_kernels import reference
from mpt_kernels._registry import registered_backends, select_backend

N, C, K = 12, 11, 7  # K < C: old and reference models know only the first K classes
BACKENDS = ("auto", "reference")
SOFTMAX_REDUCTIONS = ("mean", "sum", "none")
MULTILABEL_REDUCTIONS = ("sum", "mean", "none")


# --------------------------------------------------------------------------- inputs
def softmax_inputs(dtype=torch.float32, n=N, c=C, k=K, seed=0):
    """Student, old (N, K) and new (N, C) teachers' logits and targets.

    The targets mix rows where the old model is right, rows where the new model is
    right, rows where the student is right, targets >= K, and one ignored row, so that
    every focus mode has both values of f_i.
    """
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    old = 2.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    new = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[0::4] = old.argmax(1)[0::4]
    target[1::4] = new.argmax(1)[1::4]
    target[2::4] = logits.argmax(1)[2::4]
    if n > 5:
        target[3] = c - 1
        target[5] = -100
    return logits.to(dtype), target, old.to(dtype), new.to(dtype)


def multilabel_inputs(dtype=torch.float32, target_dtype=torch.bool, n=N, c=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    positive = torch.rand(n, c, generator=g) < 0.3
    if target_dtype == torch.bool:
        targets = positive
    elif target_dtype == torch.uint8:
        targets = positive.to(torch.uint8)
    else:  # soft-ish float targets: positive iff > 0.5
        targets = torch.where(positive, 0.9, 0.2).to(target_dtype)
    return logits.to(dtype), targets


def upstream_gradient(loss: torch.Tensor, seed=2) -> torch.Tensor:
    """A random gradient for reduction "none", a scalar != 1 otherwise."""
    g = torch.Generator().manual_seed(seed)
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)


def loss_and_grad(fn, logits, *args, grad=None, **kwargs):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward(upstream_gradient(loss) if grad is None else grad)
    return loss.detach(), x.grad


def assert_matches_reference(public, ref, logits, *args, backend, **kwargs):
    loss, grad = loss_and_grad(public, logits, *args, backend=backend, **kwargs)
    expected_loss, expected_grad = loss_and_grad(ref, logits, *args, **kwargs)
    assert loss.dtype == logits.dtype and grad.dtype == logits.dtype
    assert loss.shape == expected_loss.shape
    # The reference backend runs the same code: the results are identical.
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # guard against a vacuous comparison
    assert loss.abs().sum() > 0 and grad.abs().sum() > 0
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    return loss, grad


# --------------------------------------------------------------------------- functional == reference
BIAS_MODES = ("none", "vector", "new_classes")


def bias_options(mode, c=C, k=K, dtype=torch.float32):
    if mode == "vector":
        bias = torch.linspace(-1.0, 2.0, c, dtype=torch.float64).to(dtype)
        return {"class_bias": bias}
    if mode == "new_classes":
        return {"num_old_classes": k, "new_class_bias": 2.5}
    return {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("bias", BIAS_MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_cross_entropy_matches_reference(backend, bias, label_smoothing, reduction, dtype):
    logits, target, _, _ = softmax_inputs(dtype)
    assert_matches_reference(
        mpt_kernels.margin_cross_entropy, reference.margin_cross_entropy, logits, target,
        backend=backend, label_smoothing=label_smoothing, reduction=reduction,
        # class_bias in float16: any float dtype is accepted and applied in float32
        **bias_options(bias, dtype=torch.float16 if bias == "vector" else dtype),
    )


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("ref_classes", [K, C])
@pytest.mark.parametrize("focus", ["ref_correct", "neg_flip", "student_wrong", "all"])
@pytest.mark.parametrize("kind, scale_by_tau_sq", [("kl", False), ("kl", True), ("lm", False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_distillation_matches_reference(backend, kind, scale_by_tau_sq, focus, ref_classes, reduction):
    logits, target, _, new = softmax_inputs(torch.float64)
    ref_logits = new[:, :ref_classes]
    assert_matches_reference(
        mpt_kernels.focal_distillation, reference.focal_distillation, logits, ref_logits, target,
        backend=backend, kind=kind, tau=3.0, alpha=0.5, beta=2.0, focus=focus,
        scale_by_tau_sq=scale_by_tau_sq, reduction=reduction,
    )


MPT_CASES = {
    "defaults_both_sources": dict(sources="both"),
    "old_only": dict(sources="old"),
    "new_only_with_num_old": dict(sources="new", num_old_classes=K),
    "new_only_no_bias": dict(sources="new", new_class_bias=0.0),
    "no_sources_is_margin_ce": dict(sources="none", num_old_classes=K),
    "lm_both": dict(sources="both", kind="lm"),
    "class_bias_vector": dict(sources="both", class_bias="vector"),
    "neg_flip_tau_sq": dict(sources="both", focus="neg_flip", scale_by_tau_sq=True, tau=2.0),
    "student_wrong_weights": dict(sources="both", focus="student_wrong", old_weight=0.3, new_weight=1.7, ce_weight=0.5),
    "all_focus_smoothing": dict(sources="both", focus="all", label_smoothing=0.1, alpha=2.0),
    "no_ce": dict(sources="both", ce_weight=0.0),
    "old_weight_zero": dict(sources="both", old_weight=0.0, beta=1.0),
    "ignore_index_custom": dict(sources="both", ignore_index=3),
    "num_old_equals_C": dict(sources="new", num_old_classes=C, new_class_bias=3.0),
}


def mpt_call_args(case, dtype):
    options = dict(case)
    logits, target, old, new = softmax_inputs(dtype)
    sources = options.pop("sources")
    if options.get("class_bias") == "vector":
        options.update(bias_options("vector", dtype=dtype))
    if options.get("ignore_index") == 3:
        target = torch.where(target == -100, 3, target)
    old_logits = old if sources in ("old", "both") else None
    new_logits = new if sources in ("new", "both") else None
    return logits, (target, old_logits, new_logits), options


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("case", list(MPT_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mpt_loss_matches_reference(backend, case, reduction):
    logits, args, options = mpt_call_args(MPT_CASES[case], torch.float64)
    assert_matches_reference(
        mpt_kernels.mpt_loss, reference.mpt_loss, logits, *args, backend=backend,
        reduction=reduction, **options,
    )


HILL_CASES = [dict(), dict(lamb=1.0, margin=0.5, gamma=0.0), dict(lamb=2.0, margin=-0.5, gamma=3.5)]


@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(HILL_CASES)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hill_loss_matches_reference(backend, case, target_dtype, reduction):
    logits, targets = multilabel_inputs(torch.float64, target_dtype)
    assert_matches_reference(
        mpt_kernels.hill_loss, reference.hill_loss, logits, targets, backend=backend,
        reduction=reduction, **HILL_CASES[case],
    )


SPLC_CASES = [dict(), dict(tau=0.8, change_epoch=3, margin=0.0, gamma=1.0), dict(tau=0.0, gamma=0.0)]


@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
@pytest.mark.parametrize("epoch", [0, 1, 4])
@pytest.mark.parametrize("case", range(len(SPLC_CASES)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_splc_loss_matches_reference(backend, case, epoch, reduction):
    logits, targets = multilabel_inputs(torch.float64, torch.float32)
    assert_matches_reference(
        mpt_kernels.splc_loss, reference.splc_loss, logits, targets, backend=backend,
        epoch=epoch, reduction=reduction, **SPLC_CASES[case],
    )


def public_calls(dtype):
    """(name, public callable, reference callable, logits, args, kwargs) for every loss."""
    logits, target, old, new = softmax_inputs(dtype)
    ml_logits, targets = multilabel_inputs(dtype)
    return [
        ("margin_cross_entropy", logits, (target,), dict(num_old_classes=K, new_class_bias=1.0)),
        ("focal_distillation", logits, (old, target), dict()),
        ("mpt_loss", logits, (target, old, new), dict()),
        ("hill_loss", ml_logits, (targets,), dict()),
        ("splc_loss", ml_logits, (targets,), dict(epoch=2)),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("index", range(5))
def test_every_dtype_matches_reference(index, dtype):
    name, logits, args, kwargs = public_calls(dtype)[index]
    for backend in BACKENDS:
        for reduction in ("none", "sum"):
            assert_matches_reference(
                getattr(mpt_kernels, name), getattr(reference, name), logits, *args,
                backend=backend, reduction=reduction, **kwargs,
            )


# --------------------------------------------------------------------------- backend dispatch
class OperatorRecorder(TorchDispatchMode):
    """Records the names of the operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_picks_reference_on_cpu(index, dtype, monkeypatch):
    name, logits, args, kwargs = public_calls(dtype)[index]
    family = "multilabel" if name in ("hill_loss", "splc_loss") else "softmax"
    assert select_backend(family, "auto", logits).name == "reference"
    # and that is the backend that actually runs, in eager mode and under torch.compile
    ran = []
    for backend in registered_backends():
        if family in backend.families:
            run = backend.families[family]
            monkeypatch.setitem(backend.families, family,
                                lambda loss_args, run=run, name=backend.name: ran.append(name) or run(loss_args))
    getattr(mpt_kernels, name)(logits.clone().requires_grad_(True), *args, **kwargs)
    assert ran == ["reference"]
    graphs = []

    def record_graph(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(getattr(mpt_kernels, name), backend=record_graph, fullgraph=True)
    compiled(logits.clone().requires_grad_(True), *args, **kwargs)
    ours = [target for graph in graphs for target in graph if target.startswith("mpt_kernels.")]
    assert ours == [f"mpt_kernels.reference_{family}_forward.default"]  # what torch.compile records


def test_auto_picks_reference_without_interpreter(triton_compiled_not_interpreted):
    # Without TRITON_INTERPRET and without a GPU, triton cannot run; auto still works.
    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton is available")
    logits, target, old, new = softmax_inputs()
    assert select_backend("softmax", "auto", logits).name == "reference"
    torch.testing.assert_close(
        mpt_kernels.mpt_loss(logits, target, old, new), reference.mpt_loss(logits, target, old, new),
        rtol=0, atol=0,
    )


class _CudaLogits:
    """What an ``auto_rank`` reads of a tensor (device and size), for CUDA without a GPU."""

    def __init__(self, numel: int):
        self.device, self._numel = torch.device("cuda"), numel

    def numel(self) -> int:
        return self._numel


def test_auto_ranks_on_cuda_tensors_follow_the_measured_rule():
    # triton before cuda for the softmax family at every size; cuda before triton for
    # multi-label tensors up to 2^25 elements (backends/cuda.py says what was measured)
    ranks = {backend.name: backend.auto_rank for backend in registered_backends()}
    if "cuda" not in ranks:
        pytest.skip("the CUDA extension is not built here")
    small, large = _CudaLogits(2**25), _CudaLogits(2**25 + 1)
    assert ranks["cuda"]("multilabel", small) < ranks["triton"]("multilabel", small)
    assert ranks["triton"]("multilabel", large) < ranks["cuda"]("multilabel", large)
    for logits in (small, large, _CudaLogits(2**31)):
        assert ranks["triton"]("softmax", logits) < ranks["cuda"]("softmax", logits)
    cpu = torch.empty(2, 3)  # on CPU tensors the reference comes first
    assert ranks["reference"]("softmax", cpu) < min(ranks["triton"]("softmax", cpu), ranks["cuda"]("softmax", cpu))


# --------------------------------------------------------------------------- defaults (through values)
def independent_fd_rows(s, r, y, *, kind, tau, alpha, beta, scale=1.0):
    """Spec §2 with focus "ref_correct", written here without the package."""
    s = s[:, : r.shape[1]]
    if kind == "kl":
        p = torch.softmax(r / tau, dim=1)
        d = scale * (p * (torch.log_softmax(r / tau, dim=1) - torch.log_softmax(s / tau, dim=1))).sum(1)
    else:
        d = (s - r).square().sum(1) / (2 * r.shape[1])
    w = alpha + beta * (r.argmax(1) == y).to(s.dtype)
    return w * d


def counted_mean(rows, y, ignore_index=-100):
    counted = y != ignore_index
    return torch.where(counted, rows, 0.0).sum() / counted.sum()


def test_margin_cross_entropy_defaults_are_plain_cross_entropy():
    logits, target, _, _ = softmax_inputs(torch.float64)
    torch.testing.assert_close(mpt_kernels.margin_cross_entropy(logits, target), F.cross_entropy(logits, target))
    # label smoothing and the bias follow torch's cross_entropy of the biased logits
    bias = torch.linspace(-1.0, 2.0, C, dtype=torch.float64)
    torch.testing.assert_close(
        mpt_kernels.margin_cross_entropy(logits, target, class_bias=bias, label_smoothing=0.2),
        F.cross_entropy(logits + bias, target, label_smoothing=0.2),
    )
    new_classes = (torch.arange(C) >= K).to(torch.float64)
    torch.testing.assert_close(
        mpt_kernels.margin_cross_entropy(logits, target, num_old_classes=K, new_class_bias=1.5, reduction="sum"),
        F.cross_entropy(logits + 1.5 * new_classes, target, reduction="sum"),
    )


def test_focal_distillation_defaults():
    # kind="kl", tau=5, alpha=1, beta=5, focus="ref_correct", S=1, mean over counted rows
    logits, target, old, _ = softmax_inputs(torch.float64)
    rows = independent_fd_rows(logits, old, target, kind="kl", tau=5.0, alpha=1.0, beta=5.0)
    torch.testing.assert_close(mpt_kernels.focal_distillation(logits, old, target), counted_mean(rows, target))
    # the check can fail: another tau gives another value
    other = independent_fd_rows(logits, old, target, kind="kl", tau=4.0, alpha=1.0, beta=5.0)
    assert not torch.allclose(counted_mean(other, target), counted_mean(rows, target))


@pytest.mark.parametrize("kind, default_weight", [("kl", 1.0), ("lm", 0.4)])
def test_mpt_loss_defaults(kind, default_weight):
    # b=4 on classes >= old_logits.shape[1], tau=5, alpha=1, beta=5, ce weight 1,
    # source weights 1 (kl) / 0.4 (lm), mean over counted rows
    logits, target, old, new = softmax_inputs(torch.float64)
    y = torch.where(target == -100, 0, target)
    bias = 4.0 * (torch.arange(C) >= K).to(torch.float64)
    ce = F.cross_entropy(logits + bias, y, reduction="none")
    fd = dict(kind=kind, tau=5.0, alpha=1.0, beta=5.0)
    rows = (
        ce
        + default_weight * independent_fd_rows(logits, old, y, **fd)
        + default_weight * independent_fd_rows(logits, new, y, **fd)
    )
    expected = counted_mean(rows, target)
    torch.testing.assert_close(mpt_kernels.mpt_loss(logits, target, old, new, kind=kind), expected)
    # the defaults, spelled out, give the same value; a changed weight does not
    explicit = dict(new_class_bias=4.0, num_old_classes=K, tau=5.0, alpha=1.0, beta=5.0,
                    ce_weight=1.0, old_weight=default_weight, new_weight=default_weight)
    torch.testing.assert_close(mpt_kernels.mpt_loss(logits, target, old, new, kind=kind, **explicit), expected)
    changed = mpt_kernels.mpt_loss(logits, target, old, new, kind=kind, **{**explicit, "old_weight": 0.7})
    assert not torch.allclose(changed, expected)


def test_hill_loss_defaults():
    # lamb=1.5, margin=1, gamma=2, reduction "sum"
    x, targets = multilabel_inputs(torch.float64, torch.float32)
    q = torch.sigmoid(x - 1.0)
    p = torch.sigmoid(x)
    elements = torch.where(targets > 0.5, -(1 - q) ** 2 * torch.log(q), (1.5 - p) * p * p)
    torch.testing.assert_close(mpt_kernels.hill_loss(x, targets), elements.sum())
    torch.testing.assert_close(mpt_kernels.hill_loss(x, targets, reduction="mean"), elements.mean())


def test_splc_loss_defaults():
    # tau=0.6, change_epoch=1, margin=1, gamma=2, reduction "sum"
    x, targets = multilabel_inputs(torch.float64, torch.float32)
    positive = targets > 0.5

    def expected(epoch):
        shifted = torch.where(positive, x - 1.0, x)
        p = torch.sigmoid(shifted)
        corrected = positive | ((epoch >= 1) & (p > 0.6))
        return torch.where(corrected, -(1 - p) ** 2 * torch.log(p), -(p**2) * torch.log(1 - p)).sum()

    assert not torch.allclose(expected(0), expected(1))  # some negatives get corrected
    for epoch in (0, 1, 3):
        torch.testing.assert_close(mpt_kernels.splc_loss(x, targets, epoch=epoch), expected(epoch))


def test_module_defaults_equal_functional_defaults():
    logits, target, old, new = softmax_inputs(torch.float64)
    x, targets = multilabel_inputs(torch.float64)
    pairs = [
        (mpt_kernels.MarginCrossEntropyLoss()(logits, target), mpt_kernels.margin_cross_entropy(logits, target)),
        (mpt_kernels.FocalDistillationLoss()(logits, old, target), mpt_kernels.focal_distillation(logits, old, target)),
        (mpt_kernels.MPTLoss()(logits, target, old, new), mpt_kernels.mpt_loss(logits, target, old, new)),
        (mpt_kernels.MPTLoss(kind="lm")(logits, target, old, new), mpt_kernels.mpt_loss(logits, target, old, new, kind="lm")),
        (mpt_kernels.HillLoss()(x, targets), mpt_kernels.hill_loss(x, targets)),
        (mpt_kernels.SPLCLoss()(x, targets, 1), mpt_kernels.splc_loss(x, targets, epoch=1)),
    ]
    for module_loss, functional_loss in pairs:
        torch.testing.assert_close(module_loss, functional_loss, rtol=0, atol=0)


# --------------------------------------------------------------------------- modules
@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_modules_equal_functional_softmax_family(reduction):
    logits, target, old, new = softmax_inputs(torch.float64)
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float32)
    cases = [
        (
            mpt_kernels.MarginCrossEntropyLoss(class_bias=bias, label_smoothing=0.1, reduction=reduction),
            (target,),
            lambda x: mpt_kernels.margin_cross_entropy(x, target, class_bias=bias, label_smoothing=0.1, reduction=reduction),
        ),
        (
            mpt_kernels.MarginCrossEntropyLoss(num_old_classes=K, new_class_bias=3.0, reduction=reduction, backend="reference"),
            (target,),
            lambda x: mpt_kernels.margin_cross_entropy(x, target, num_old_classes=K, new_class_bias=3.0, reduction=reduction),
        ),
        (
            mpt_kernels.FocalDistillationLoss(kind="lm", alpha=0.5, beta=2.0, focus="neg_flip", reduction=reduction),
            (old, target),
            lambda x: mpt_kernels.focal_distillation(x, old, target, kind="lm", alpha=0.5, beta=2.0, focus="neg_flip", reduction=reduction),
        ),
        (
            mpt_kernels.MPTLoss(new_class_bias=2.0, tau=3.0, focus="student_wrong", old_weight=0.5, reduction=reduction),
            (target, old, new),
            lambda x: mpt_kernels.mpt_loss(x, target, old, new, new_class_bias=2.0, tau=3.0, focus="student_wrong", old_weight=0.5, reduction=reduction),
        ),
        (
            mpt_kernels.MPTLoss(class_bias=bias, kind="lm", ce_weight=0.5, reduction=reduction),
            (target, None, new),
            lambda x: mpt_kernels.mpt_loss(x, target, None, new, class_bias=bias, kind="lm", ce_weight=0.5, reduction=reduction),
        ),
    ]
    for module, args, functional in cases:
        module_loss, module_grad = loss_and_grad(module, logits, *args)
        expected_loss, expected_grad = loss_and_grad(functional, logits)
        torch.testing.assert_close(module_loss, expected_loss, rtol=0, atol=0)
        torch.testing.assert_close(module_grad, expected_grad, rtol=0, atol=0)
        assert module_grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
def test_modules_equal_functional_multilabel(reduction):
    x, targets = multilabel_inputs(torch.float64, torch.uint8)
    hill = mpt_kernels.HillLoss(lamb=2.0, margin=0.5, gamma=1.0, reduction=reduction)
    torch.testing.assert_close(
        loss_and_grad(hill, x, targets),
        loss_and_grad(lambda z: mpt_kernels.hill_loss(z, targets, lamb=2.0, margin=0.5, gamma=1.0, reduction=reduction), x),
        rtol=0, atol=0,
    )
    splc = mpt_kernels.SPLCLoss(tau=0.7, change_epoch=2, margin=0.5, reduction=reduction)
    for epoch in (0, 2, 5):
        torch.testing.assert_close(
            loss_and_grad(splc, x, targets, epoch),
            loss_and_grad(
                lambda z: mpt_kernels.splc_loss(z, targets, epoch=epoch, tau=0.7, change_epoch=2, margin=0.5, reduction=reduction), x
            ),
            rtol=0, atol=0,
        )
    # the epoch matters: before and after change_epoch differ
    assert not torch.allclose(splc(x, targets, 0), splc(x, targets, 2))


@pytest.mark.parametrize("module_class", [mpt_kernels.MarginCrossEntropyLoss, mpt_kernels.MPTLoss])
def test_module_to_moves_class_bias(module_class):
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float32)
    module = module_class(class_bias=bias)
    module.to(torch.float64)
    assert module.class_bias.dtype == torch.float64
    torch.testing.assert_close(module.class_bias, bias.double())
    logits, target, old, new = softmax_inputs(torch.float64)
    args = (target,) if module_class is mpt_kernels.MarginCrossEntropyLoss else (target, old, new)
    functional = mpt_kernels.margin_cross_entropy if module_class is mpt_kernels.MarginCrossEntropyLoss else mpt_kernels.mpt_loss
    torch.testing.assert_close(module(logits, *args), functional(logits, *args, class_bias=bias.double()))
    # a device move takes the bias along (the meta device stands in for a GPU here)
    module.to("meta")
    assert module.class_bias.device.type == "meta"
    # the caller's vector is untouched
    assert bias.dtype == torch.float32 and bias.device.type == "cpu"


def test_module_without_class_bias_moves():
    module = mpt_kernels.MPTLoss().to(torch.float64)
    assert module.class_bias is None
    logits, target, old, new = softmax_inputs(torch.float64)
    torch.testing.assert_close(module(logits, target, old, new), mpt_kernels.mpt_loss(logits, target, old, new))
    assert "tau=5.0" in repr(module)


# --------------------------------------------------------------------------- float64, edge sizes
def test_float64_gradcheck_through_public_api():
    logits, target, old, new = softmax_inputs(torch.float64, n=5, c=6, k=4)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: mpt_kernels.mpt_loss(z, target, old, new, reduction="none", label_smoothing=0.1), (x,)
    )
    ml_x, targets = multilabel_inputs(torch.float64, n=4, c=5)
    assert torch.autograd.gradcheck(
        lambda z: mpt_kernels.splc_loss(z, targets, epoch=1, reduction="none"), (ml_x.clone().requires_grad_(True),)
    )


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_empty_batch_softmax_family_is_zero(reduction):
    logits, target, old, new = softmax_inputs(torch.float32, n=0)
    calls = [
        lambda x: mpt_kernels.margin_cross_entropy(x, target, reduction=reduction),
        lambda x: mpt_kernels.focal_distillation(x, old, target, reduction=reduction),
        lambda x: mpt_kernels.mpt_loss(x, target, old, new, reduction=reduction),
    ]
    for call in calls:
        loss, grad = loss_and_grad(call, logits)
        assert loss.shape == ((0,) if reduction == "none" else ())
        assert grad.shape == (0, C)
        if reduction != "none":
            assert loss.item() == 0.0  # 0, not NaN


@pytest.mark.parametrize("reduction", MULTILABEL_REDUCTIONS)
def test_empty_batch_multilabel_is_zero(reduction):
    x, targets = multilabel_inputs(torch.float32, n=0)
    for call in (
        lambda z: mpt_kernels.hill_loss(z, targets, reduction=reduction),
        lambda z: mpt_kernels.splc_loss(z, targets, epoch=1, reduction=reduction),
    ):
        loss, grad = loss_and_grad(call, x)
        assert loss.shape == ((0, C) if reduction == "none" else ())
        assert grad.shape == (0, C)
        if reduction != "none":
            assert loss.item() == 0.0


def test_all_rows_ignored_mean_is_zero_with_zero_gradient():
    logits, _, old, new = softmax_inputs(torch.float32)
    target = torch.full((N,), -100)
    loss, grad = loss_and_grad(lambda x: mpt_kernels.mpt_loss(x, target, old, new), logits)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_single_class():
    # C = 1 is a valid (degenerate) problem: CE and KL are 0, logit matching is not.
    logits, target, old, new = softmax_inputs(torch.float64, c=1, k=1)
    target = torch.where(target == -100, -100, 0)
    loss, grad = loss_and_grad(lambda x: mpt_kernels.mpt_loss(x, target, old, new), logits)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert_matches_reference(
        mpt_kernels.mpt_loss, reference.mpt_loss, logits, target, old, new, backend="auto", kind="lm",
        reduction="none",
    )
    x, targets = multilabel_inputs(torch.float64, c=1)
    assert_matches_reference(mpt_kernels.hill_loss, reference.hill_loss, x, targets, backend="auto")


def test_targets_between_ref_classes_and_classes_are_never_focused():
    # y >= K: the reference cannot predict it, so f_i = 0 and the weight is alpha alone
    logits, target, old, _ = softmax_inputs(torch.float64)
    target = torch.full((N,), C - 1)
    focused = mpt_kernels.focal_distillation(logits, old, target, alpha=1.0, beta=5.0, reduction="none")
    plain = mpt_kernels.focal_distillation(logits, old, target, alpha=1.0, beta=0.0, reduction="none")
    torch.testing.assert_close(focused, plain, rtol=0, atol=0)


# --------------------------------------------------------------------------- caller's tensors
def test_callers_tensors_are_not_modified():
    logits, target, old, new = softmax_inputs(torch.float32)
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float16)
    ml_logits, targets = multilabel_inputs(torch.float32, torch.float32)
    calls = [
        (mpt_kernels.mpt_loss, logits, (target, old, new), dict(label_smoothing=0.1)),
        (mpt_kernels.mpt_loss, logits, (target, old, new), dict(class_bias=bias, reduction="none")),
        (mpt_kernels.margin_cross_entropy, logits, (target,), dict(class_bias=bias)),
        (mpt_kernels.focal_distillation, logits, (old, target), dict(reduction="sum")),
        (mpt_kernels.hill_loss, ml_logits, (targets,), dict()),
        (mpt_kernels.splc_loss, ml_logits, (targets,), dict(epoch=3, reduction="none")),
    ]
    for fn, x, args, kwargs in calls:
        x = x.clone().requires_grad_(True)
        tensors = [x, *[a for a in args if a is not None], *[v for v in kwargs.values() if torch.is_tensor(v)]]
        before = [t.detach().clone() for t in tensors]
        loss = fn(x, *args, **kwargs)
        loss.backward(upstream_gradient(loss))
        for t, b in zip(tensors, before):
            assert torch.equal(t.detach(), b), fn.__name__


# --------------------------------------------------------------------------- operators
def opcheck(op_name, args):
    op = getattr(torch.ops.mpt_kernels, op_name).default
    result = torch.library.opcheck(op, args)
    assert all(value == "SUCCESS" for value in result.values()), result


SOFTMAX_OP_CASES = {
    # (dtype, old, new, class_bias, num_old_classes, new_class_bias, label_smoothing, kind, focus, tau_sq, ce, wo, wn, reduction)
    "mpt_both_kl_mean": (torch.float64, True, True, False, K, 4.0, 0.1, "kl", "ref_correct", False, 1.0, 1.0, 1.0, "mean"),
    "class_bias_ce_none": (torch.float32, False, False, True, C, 0.0, 0.0, "kl", "all", False, 1.0, 0.0, 0.0, "none"),
    "fd_lm_sum": (torch.float64, True, False, False, K, 0.0, 0.0, "lm", "neg_flip", True, 0.0, 1.0, 0.0, "sum"),
}


@pytest.mark.parametrize("case", list(SOFTMAX_OP_CASES))
def test_opcheck_reference_softmax_forward(case):
    (dtype, with_old, with_new, with_bias, num_old, b, eps, kind, focus, tau_sq, ce, wo, wn, reduction) = SOFTMAX_OP_CASES[case]
    logits, target, old, new = softmax_inputs(dtype)
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float32) if with_bias else None
    opcheck("reference_softmax_forward", (
        logits.requires_grad_(True), target, old if with_old else None, new if with_new else None, bias,
        num_old, b, eps, -100, kind, 3.0, 1.0, 5.0, focus, tau_sq, ce, wo, wn, reduction, True,
    ))


@pytest.mark.parametrize("loss, reduction", [("hill", "sum"), ("splc", "none"), ("splc", "mean")])
def test_opcheck_reference_multilabel_forward(loss, reduction):
    x, targets = multilabel_inputs(torch.float64, torch.float32)
    opcheck("reference_multilabel_forward", (
        x.requires_grad_(True), targets, loss, 1.5, 1.0, 2.0, 0.6, 2, 1, reduction, True,
    ))


# Known limitation (reported, not fixed here): the reference backend's backward operator
# recomputes the loss under autograd, but under a TorchDispatchMode (opcheck's schema
# check, ...) the dispatcher has excluded the autograd keys by the time the operator's
# implementation runs, so torch.autograd.grad fails with "element 0 of tensors does not
# require grad". Only the operators are affected (what torch.compile traces): eager calls
# run the backends through a plain autograd.Function, so FlopCounterMode works there.
def test_backward_under_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    logits, target, old, new = softmax_inputs(torch.float32)
    x = logits.clone().requires_grad_(True)
    with FlopCounterMode(display=False):
        mpt_kernels.mpt_loss(x, target, old, new).backward()
    torch.testing.assert_close(x.grad, loss_and_grad(reference.mpt_loss, logits, target, old, new, grad=torch.tensor(1.0))[1])


@pytest.mark.xfail(strict=True, reason="reference backward under opcheck's schema-check mode: see above")
def test_opcheck_reference_backward_operators():
    logits, target, old, new = softmax_inputs(torch.float64)
    opcheck("reference_softmax_backward", (
        torch.randn(N, dtype=torch.float64), [], logits, target, old, new, None, K, 4.0, 0.0,
        -100, "kl", 5.0, 1.0, 5.0, "ref_correct", False, 1.0, 1.0, 1.0, "none", True,
    ))
    x, targets = multilabel_inputs(torch.float64)
    opcheck("reference_multilabel_backward", (
        torch.tensor(1.3, dtype=torch.float64), [], x, targets, "hill", 1.5, 1.0, 2.0, 0.6, 0, 1, "sum", True,
    ))
