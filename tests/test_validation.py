"""The bad-input battery: every error is a TypeError/ValueError naming the argument.

Each case runs through the public function (``mpt_kernels.<loss>``, backend "auto" and,
where it differs, a named backend) and through ``mpt_kernels.reference.<loss>``, which
validates the same way. Metadata errors come from the public functions; target values
out of range come from the CPU value check inside the backend's operator.
"""

import math

import pytest
import torch

import mpt_kernels
from mpt_kernels import reference

N, C, K = 6, 5, 3
NAMESPACES = {"public": mpt_kernels, "reference": reference}


def make_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(N, C, generator=g, dtype=dtype),
        target=torch.randint(0, C, (N,), generator=g),
        old=torch.randn(N, K, generator=g, dtype=dtype),
        new=torch.randn(N, C, generator=g, dtype=dtype),
        targets=torch.rand(N, C, generator=g) > 0.5,
    )


# Each loss as a call with overridable pieces: fn(ns, **over) where `over` replaces a
# tensor (logits, target, old, new, targets) or adds/overrides a keyword option.
TENSOR_KEYS = ("logits", "target", "old", "new", "targets")


def _split(over):
    tensors = make_inputs()
    tensors.update({k: v for k, v in over.items() if k in TENSOR_KEYS})
    options = {k: v for k, v in over.items() if k not in TENSOR_KEYS}
    return tensors, options


def call_margin_ce(ns, **over):
    t, o = _split(over)
    return ns.margin_cross_entropy(t["logits"], t["target"], **o)


def call_fd(ns, **over):
    t, o = _split(over)
    return ns.focal_distillation(t["logits"], t["old"], t["target"], **o)


def call_mpt(ns, **over):
    t, o = _split(over)
    return ns.mpt_loss(t["logits"], t["target"], t["old"], t["new"], **o)


def call_hill(ns, **over):
    t, o = _split(over)
    return ns.hill_loss(t["logits"], t["targets"], **o)


def call_splc(ns, **over):
    t, o = _split(over)
    o.setdefault("epoch", 1)
    return ns.splc_loss(t["logits"], t["targets"], **o)


SOFTMAX_CALLS = {"margin_cross_entropy": call_margin_ce, "focal_distillation": call_fd, "mpt_loss": call_mpt}
MULTILABEL_CALLS = {"hill_loss": call_hill, "splc_loss": call_splc}
ALL_CALLS = {**SOFTMAX_CALLS, **MULTILABEL_CALLS}
# how each function names its student logits (focal_distillation: student_logits)
LOGITS_NAME = {"focal_distillation": "student_logits"}


def expect_error(call, namespace, error, match, **over):
    with pytest.raises(error, match=match):
        call(NAMESPACES[namespace], **over)


def test_valid_inputs_pass():
    # the battery below only means something if the unmodified calls succeed
    for call in ALL_CALLS.values():
        for ns in NAMESPACES.values():
            assert torch.isfinite(call(ns)).all()


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_logits_wrong_ndim_dtype_type(name, namespace):
    call, arg = ALL_CALLS[name], LOGITS_NAME.get(name, "logits")
    x = make_inputs()["logits"]
    expect_error(call, namespace, ValueError, rf"{arg} must be 2-D", logits=x[0])
    expect_error(call, namespace, ValueError, rf"{arg} must be 2-D", logits=x[None])
    expect_error(call, namespace, TypeError, rf"{arg} must have dtype", logits=x.to(torch.int64))
    expect_error(call, namespace, TypeError, rf"{arg} must have dtype", logits=x.to(torch.int32))
    expect_error(call, namespace, TypeError, rf"{arg} must have dtype", logits=x.to(torch.complex64))
    expect_error(call, namespace, TypeError, rf"{arg} must be a torch.Tensor", logits=x.tolist())


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
def test_softmax_family_zero_classes(name, namespace):
    expect_error(
        SOFTMAX_CALLS[name], namespace, ValueError, rf"{LOGITS_NAME.get(name, 'logits')} must have at least one class",
        logits=torch.randn(N, 0), old=torch.randn(N, 0), new=torch.randn(N, 0),
    )


# --------------------------------------------------------------------------- class targets
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
def test_target_metadata(name, namespace):
    call = SOFTMAX_CALLS[name]
    target = make_inputs()["target"]
    expect_error(call, namespace, ValueError, r"target must be 1-D", target=target[:, None])
    expect_error(call, namespace, ValueError, r"target must have shape \(6,\)", target=target[:-1])
    expect_error(call, namespace, ValueError, r"target must have shape \(6,\)", target=torch.cat([target, target]))
    expect_error(call, namespace, TypeError, r"target must have dtype int64, int32", target=target.float())
    expect_error(call, namespace, TypeError, r"target must have dtype", target=target.to(torch.uint8))
    expect_error(call, namespace, TypeError, r"target must have dtype", target=target.to(torch.bool))
    expect_error(call, namespace, TypeError, r"target must be a torch.Tensor", target=target.tolist())
    # int32 is accepted
    assert torch.isfinite(call(NAMESPACES[namespace], target=target.to(torch.int32)))


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bad", [C, C + 7, -1, -5])
def test_target_values_out_of_range(bad, reduction, name, namespace):
    call = SOFTMAX_CALLS[name]
    target = make_inputs()["target"]
    target[2] = bad
    expect_error(call, namespace, ValueError, rf"target must hold class indices in \[0, {C}\).*found {bad}",
                 target=target, reduction=reduction)
    # also when the logits need a gradient, with a custom ignore_index
    logits = make_inputs()["logits"].requires_grad_(True)
    target[3] = 0
    expect_error(call, namespace, ValueError, r"target must hold class indices", target=target,
                 logits=logits, ignore_index=-7)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
def test_ignore_index_is_not_out_of_range(name, namespace):
    call = SOFTMAX_CALLS[name]
    target = make_inputs()["target"]
    target[1] = -100
    assert torch.isfinite(call(NAMESPACES[namespace], target=target))
    target[1] = -3
    assert torch.isfinite(call(NAMESPACES[namespace], target=target, ignore_index=-3))
    # -100 is out of range once another ignore_index is chosen
    target[2] = -100
    expect_error(call, namespace, ValueError, r"found -100", target=target, ignore_index=-3)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(SOFTMAX_CALLS))
def test_ignore_index_must_fit_the_target_dtype(name, namespace):
    # torch compares an int32 target with 2^32 - 100 modulo 2^32 (it would ignore -100),
    # the kernels exactly: such an ignore_index is refused rather than read two ways
    call = SOFTMAX_CALLS[name]
    target = make_inputs()["target"].to(torch.int32)
    target[1] = -100
    expect_error(call, namespace, ValueError, r"ignore_index must fit the target's dtype torch.int32",
                 target=target, ignore_index=2**32 - 100)
    assert torch.isfinite(call(NAMESPACES[namespace], target=target, ignore_index=-100))
    target[1] = 0  # int64 targets take any int64 ignore_index
    assert torch.isfinite(call(NAMESPACES[namespace], target=target.long(), ignore_index=2**40))


def test_target_value_check_with_named_reference_backend():
    target = make_inputs()["target"]
    target[0] = C
    for call in SOFTMAX_CALLS.values():
        with pytest.raises(ValueError, match=r"target must hold class indices"):
            call(mpt_kernels, target=target, backend="reference")


# --------------------------------------------------------------------------- teachers
TEACHERS = [
    # (function, tensor key, argument name)
    ("focal_distillation", "old", "ref_logits"),
    ("mpt_loss", "old", "old_logits"),
    ("mpt_loss", "new", "new_logits"),
]


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name, key, arg", TEACHERS)
def test_teacher_metadata(name, key, arg, namespace):
    call = SOFTMAX_CALLS[name]
    teacher = make_inputs()[key]
    student_name = LOGITS_NAME.get(name, "logits")
    expect_error(call, namespace, ValueError, rf"{arg} must be 2-D", **{key: teacher[0]})
    expect_error(call, namespace, TypeError, rf"{arg} must have dtype", **{key: teacher.to(torch.int64)})
    expect_error(call, namespace, TypeError, rf"{arg} must have the same dtype as {student_name}",
                 **{key: teacher.double()})
    expect_error(call, namespace, TypeError, rf"{arg} must have the same dtype as {student_name}",
                 **{key: teacher.half()})
    expect_error(call, namespace, ValueError, rf"{arg} must have {N} rows", **{key: teacher[:-1]})
    expect_error(call, namespace, ValueError, rf"{arg} must have {N} rows", **{key: torch.cat([teacher, teacher])})
    # more columns than the student has
    expect_error(call, namespace, ValueError, rf"{arg} must have .*{C}.* columns",
                 **{key: torch.randn(N, C + 1)})
    expect_error(call, namespace, TypeError, rf"{arg} must be a torch.Tensor", **{key: teacher.tolist()})


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_teacher_columns(namespace):
    x = make_inputs()
    # new_logits must have exactly C columns
    expect_error(call_mpt, namespace, ValueError, rf"new_logits must have {C} columns", new=x["new"][:, :-1])
    # old_logits must agree with an explicit num_old_classes
    expect_error(call_mpt, namespace, ValueError, r"old_logits must have 2 columns", num_old_classes=2)
    # zero columns
    expect_error(call_fd, namespace, ValueError, r"ref_logits must have between 1 and", old=torch.randn(N, 0))
    expect_error(call_mpt, namespace, ValueError, r"old_logits must have between 1 and", old=torch.randn(N, 0))


# --------------------------------------------------------------------------- class_bias
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", ["margin_cross_entropy", "mpt_loss"])
def test_class_bias_metadata(name, namespace):
    call = SOFTMAX_CALLS[name]
    bias = torch.linspace(0.0, 1.0, C)
    expect_error(call, namespace, ValueError, rf"class_bias must have shape \({C},\)", class_bias=bias[:-1])
    expect_error(call, namespace, ValueError, rf"class_bias must have shape \({C},\)", class_bias=torch.zeros(C + 1))
    expect_error(call, namespace, ValueError, r"class_bias must be 1-D", class_bias=bias[None])
    expect_error(call, namespace, TypeError, r"class_bias must have dtype", class_bias=bias.to(torch.int64))
    expect_error(call, namespace, TypeError, r"class_bias must be a torch.Tensor", class_bias=bias.tolist())
    # any float dtype is fine
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.isfinite(call(NAMESPACES[namespace], class_bias=bias.to(dtype)))


# --------------------------------------------------------------------------- multi-label targets
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name", list(MULTILABEL_CALLS))
def test_multilabel_targets_metadata(name, namespace):
    call = MULTILABEL_CALLS[name]
    targets = make_inputs()["targets"]
    expect_error(call, namespace, ValueError, r"targets must be 2-D", targets=targets[0])
    expect_error(call, namespace, ValueError, r"targets must be 2-D", targets=targets[None])
    expect_error(call, namespace, ValueError, r"targets must have the same shape as logits", targets=targets[:-1])
    expect_error(call, namespace, ValueError, r"targets must have the same shape as logits", targets=targets[:, :-1])
    expect_error(call, namespace, ValueError, r"targets must have the same shape as logits", targets=targets.T)
    expect_error(call, namespace, TypeError, r"targets must have dtype", targets=targets.to(torch.int64))
    expect_error(call, namespace, TypeError, r"targets must have dtype", targets=targets.to(torch.int32))
    expect_error(call, namespace, TypeError, r"targets must be a torch.Tensor", targets=targets.tolist())
    for dtype in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert torch.isfinite(call(NAMESPACES[namespace], targets=targets.to(dtype)))


# --------------------------------------------------------------------------- devices
# No GPU here: a tensor on the "meta" device makes the mismatch. Validation checks the
# device right after ndim/dtype, before any shape or value check, so it gets there.
DEVICE_CASES = [
    ("margin_cross_entropy", "target", "target"),
    ("focal_distillation", "target", "target"),
    ("focal_distillation", "old", "ref_logits"),
    ("mpt_loss", "target", "target"),
    ("mpt_loss", "old", "old_logits"),
    ("mpt_loss", "new", "new_logits"),
    ("mpt_loss", "class_bias", "class_bias"),
    ("margin_cross_entropy", "class_bias", "class_bias"),
    ("hill_loss", "targets", "targets"),
    ("splc_loss", "targets", "targets"),
]


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("name, key, arg", DEVICE_CASES)
def test_mixed_devices(name, key, arg, namespace):
    x = make_inputs()
    value = torch.zeros(C, device="meta") if key == "class_bias" else x[key].to("meta")
    expect_error(ALL_CALLS[name], namespace, ValueError, rf"{arg} must be on the same device as .*\(cpu\), got meta",
                 **{key: value})


# --------------------------------------------------------------------------- softmax-family parameters
NAN, INF = math.nan, math.inf

# (parameter, bad value, error type, functions that take it)
FD_AND_MPT = ("focal_distillation", "mpt_loss")
MCE_AND_MPT = ("margin_cross_entropy", "mpt_loss")
ALL_SOFTMAX = tuple(SOFTMAX_CALLS)
SOFTMAX_PARAMETER_CASES = [
    ("tau", 0.0, ValueError, FD_AND_MPT),
    ("tau", -1.0, ValueError, FD_AND_MPT),
    ("tau", NAN, ValueError, FD_AND_MPT),
    ("tau", INF, ValueError, FD_AND_MPT),
    ("tau", "5", TypeError, FD_AND_MPT),
    ("tau", True, TypeError, FD_AND_MPT),
    ("tau", None, TypeError, FD_AND_MPT),
    ("alpha", -0.5, ValueError, FD_AND_MPT),
    ("alpha", NAN, ValueError, FD_AND_MPT),
    ("alpha", -INF, ValueError, FD_AND_MPT),
    ("beta", -1.0, ValueError, FD_AND_MPT),
    ("beta", INF, ValueError, FD_AND_MPT),
    ("old_weight", -1.0, ValueError, ("mpt_loss",)),
    ("old_weight", NAN, ValueError, ("mpt_loss",)),
    ("new_weight", -0.1, ValueError, ("mpt_loss",)),
    ("new_weight", INF, ValueError, ("mpt_loss",)),
    ("ce_weight", -1.0, ValueError, ("mpt_loss",)),
    ("ce_weight", NAN, ValueError, ("mpt_loss",)),
    ("label_smoothing", -0.1, ValueError, MCE_AND_MPT),
    ("label_smoothing", 1.5, ValueError, MCE_AND_MPT),
    ("label_smoothing", NAN, ValueError, MCE_AND_MPT),
    ("new_class_bias", NAN, ValueError, MCE_AND_MPT),
    ("new_class_bias", INF, ValueError, MCE_AND_MPT),
    ("new_class_bias", "4", TypeError, MCE_AND_MPT),
    ("num_old_classes", 0, ValueError, MCE_AND_MPT),
    ("num_old_classes", -2, ValueError, MCE_AND_MPT),
    ("num_old_classes", C + 1, ValueError, MCE_AND_MPT),
    ("num_old_classes", 2.0, TypeError, MCE_AND_MPT),
    ("num_old_classes", True, TypeError, MCE_AND_MPT),
    ("kind", "kld", ValueError, FD_AND_MPT),
    ("kind", None, ValueError, FD_AND_MPT),
    ("focus", "old_correct", ValueError, FD_AND_MPT),
    ("focus", "", ValueError, FD_AND_MPT),
    ("reduction", "avg", ValueError, ALL_SOFTMAX),
    ("reduction", None, ValueError, ALL_SOFTMAX),
    ("reduction", "Mean", ValueError, ALL_SOFTMAX),
    ("ignore_index", 1.5, TypeError, ALL_SOFTMAX),
    ("ignore_index", True, TypeError, ALL_SOFTMAX),
    ("scale_by_tau_sq", 1, TypeError, FD_AND_MPT),
    ("scale_by_tau_sq", "yes", TypeError, FD_AND_MPT),
]


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize(
    "name, parameter, value, error",
    [(name, p, v, e) for p, v, e, names in SOFTMAX_PARAMETER_CASES for name in names],
)
def test_softmax_family_parameter_out_of_range(name, parameter, value, error, namespace):
    over = {parameter: value}
    if parameter == "num_old_classes":
        over["old"] = None  # otherwise old_logits' width disagrees first
    expect_error(SOFTMAX_CALLS[name], namespace, error, rf"^{parameter} must", **over)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_softmax_family_parameter_boundaries_are_accepted(namespace):
    ns = NAMESPACES[namespace]
    for over in (dict(label_smoothing=0.0), dict(label_smoothing=1.0), dict(alpha=0.0, beta=0.0),
                 dict(ce_weight=0.0), dict(old_weight=0.0, new_weight=0.0), dict(tau=1e-3),
                 dict(num_old_classes=K), dict(new_class_bias=-2.0), dict(ignore_index=7)):
        assert torch.isfinite(call_mpt(ns, **over))
    # an int where a float is expected is the same number
    torch.testing.assert_close(call_mpt(ns, tau=2, alpha=1, beta=3, new_class_bias=4),
                               call_mpt(ns, tau=2.0, alpha=1.0, beta=3.0, new_class_bias=4.0), rtol=0, atol=0)
    assert torch.isfinite(call_margin_ce(ns, num_old_classes=C, new_class_bias=3.0))
    assert torch.isfinite(call_margin_ce(ns, num_old_classes=1, new_class_bias=3.0))


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_new_class_bias_needs_to_know_the_old_classes(namespace):
    # margin CE: a nonzero new_class_bias without num_old_classes
    expect_error(call_margin_ce, namespace, ValueError, r"new_class_bias=2\.0 needs .*num_old_classes",
                 new_class_bias=2.0)
    # mpt_loss without old_logits: the default b = 4 needs num_old_classes
    expect_error(call_mpt, namespace, ValueError, r"new_class_bias=4\.0 needs .*num_old_classes", old=None)
    expect_error(call_mpt, namespace, ValueError, r"new_class_bias=1\.0 needs", old=None, new=None,
                 new_class_bias=1.0)
    ns = NAMESPACES[namespace]
    # each way of saying which classes are old is accepted
    assert torch.isfinite(call_mpt(ns, old=None, num_old_classes=K))
    assert torch.isfinite(call_mpt(ns, old=None, new_class_bias=0.0))
    assert torch.isfinite(call_mpt(ns, old=None, class_bias=torch.ones(C)))
    assert torch.isfinite(call_margin_ce(ns, new_class_bias=0.0))


# --------------------------------------------------------------------------- multi-label parameters
HILL, SPLC, BOTH_ML = ("hill_loss",), ("splc_loss",), ("hill_loss", "splc_loss")
MULTILABEL_PARAMETER_CASES = [
    ("lamb", NAN, ValueError, HILL),
    ("lamb", INF, ValueError, HILL),
    ("lamb", "1.5", TypeError, HILL),
    ("margin", NAN, ValueError, BOTH_ML),
    ("margin", -INF, ValueError, BOTH_ML),
    ("gamma", -1.0, ValueError, BOTH_ML),
    ("gamma", NAN, ValueError, BOTH_ML),
    ("gamma", INF, ValueError, BOTH_ML),
    ("gamma", None, TypeError, BOTH_ML),
    ("tau", -0.1, ValueError, SPLC),
    ("tau", 1.5, ValueError, SPLC),
    ("tau", NAN, ValueError, SPLC),
    ("epoch", 1.0, TypeError, SPLC),
    ("epoch", True, TypeError, SPLC),
    ("epoch", "1", TypeError, SPLC),
    ("epoch", None, TypeError, SPLC),
    ("change_epoch", 1.5, TypeError, SPLC),
    ("change_epoch", False, TypeError, SPLC),
    ("reduction", "avg", ValueError, BOTH_ML),
    ("reduction", None, ValueError, BOTH_ML),
]


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize(
    "name, parameter, value, error",
    [(name, p, v, e) for p, v, e, names in MULTILABEL_PARAMETER_CASES for name in names],
)
def test_multilabel_parameter_out_of_range(name, parameter, value, error, namespace):
    expect_error(MULTILABEL_CALLS[name], namespace, error, rf"^{parameter} must", **{parameter: value})


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_multilabel_parameter_boundaries_are_accepted(namespace):
    ns = NAMESPACES[namespace]
    for over in (dict(tau=0.0), dict(tau=1.0), dict(gamma=0.0), dict(epoch=0), dict(epoch=-1),
                 dict(change_epoch=0), dict(margin=-1.0)):
        assert torch.isfinite(call_splc(ns, **over))
    assert torch.isfinite(call_hill(ns, lamb=0.0, gamma=0.0, margin=0.0))


def test_splc_epoch_is_required():
    x = make_inputs()
    with pytest.raises(TypeError, match="epoch"):
        mpt_kernels.splc_loss(x["logits"], x["targets"])


# --------------------------------------------------------------------------- backend names
@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_invalid_backend_name(name):
    for bad in ("gpu", "Triton", "", None, 1):
        expect_error(ALL_CALLS[name], "public", ValueError,
                     r"backend must be one of 'auto', 'reference', 'triton', 'cuda'", backend=bad)


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_cuda_backend_that_cannot_run_says_why(name):
    # Not registered in this build yet; once it is, without a GPU it still cannot run.
    # Either way: a ValueError naming the backend and the reason, no silent fallback.
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'cuda' (is not available: it is not registered|cannot run here: .+)", backend="cuda")


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_triton_backend_rejects_float64(name):
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'triton' cannot run here: .*float64", backend="triton",
                 **{key: value.double() for key, value in make_inputs().items() if key in ("logits", "old", "new")})


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, triton can run")
@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_triton_backend_without_gpu_or_interpreter_says_why(name, triton_compiled_not_interpreted):
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'triton' cannot run here: no CUDA device", backend="triton")


def test_validation_happens_before_dispatch():
    # a bad argument is reported as such, whatever the backend: never a backend error
    x = make_inputs()
    for backend in ("auto", "reference", "triton", "cuda"):
        with pytest.raises(ValueError, match=r"^tau must be > 0"):
            mpt_kernels.mpt_loss(x["logits"], x["target"], x["old"], x["new"], tau=0.0, backend=backend)


# =========================================================================== hardening
# Every backend that runs on CPU tensors here (reference; triton in the interpreter),
# each called by name through the public API, plus the pure reference module.
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from mpt_kernels import _registry  # noqa: E402
from mpt_kernels.bench import providers  # noqa: E402

CPU = torch.device("cpu")
# numpy (Triton's interpreter) warns about lanes it computes and then masks out
INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def cpu_backends(family: str, dtype=torch.float32) -> list:
    return [b.name for b in _registry.registered_backends() if b.unavailable_reason(family, CPU, dtype) is None]


def family_of(name: str) -> str:
    return "softmax" if name in SOFTMAX_CALLS else "multilabel"


# (function, backend): None is the pure reference (mpt_kernels.reference)
CALLS_AND_BACKENDS = [
    pytest.param(name, backend, id=f"{name}-{backend or 'pure_reference'}")
    for name in ALL_CALLS
    for backend in [None, *cpu_backends(family_of(name))]
]


def call_on(name, backend, **over):
    if backend is None:
        return ALL_CALLS[name](reference, **over)
    return ALL_CALLS[name](mpt_kernels, backend=backend, **over)


@pytest.mark.skipif(not providers.interpreter_enabled(), reason="CPU tensors reach Triton only in its interpreter")
def test_cpu_backends_include_the_kernels():
    for family in ("softmax", "multilabel"):
        assert {"reference", "triton"} <= set(cpu_backends(family)), cpu_backends(family)


# --------------------------------------------------------------------------- CPU tensors, GPU backend
def _pretend_runnable(monkeypatch, name):
    """The backend as if its extension were built and a GPU were visible: then only the
    tensors' device can stop it."""
    backend = _registry._BACKENDS.get(name)
    if backend is None:
        pytest.skip(f"backend {name!r} is not registered in this build")
    monkeypatch.setitem(_registry._BACKENDS, name, dataclasses.replace(backend, status=lambda: None))


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_cpu_tensors_to_the_cuda_backend(name, monkeypatch):
    _pretend_runnable(monkeypatch, "cuda")
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'cuda' cannot run here: CUDA kernels run on CUDA tensors, got a cpu tensor",
                 backend="cuda")


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_cpu_tensors_to_the_triton_backend_without_interpreter(name, monkeypatch, triton_compiled_not_interpreted):
    _pretend_runnable(monkeypatch, "triton")
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'triton' cannot run here: Triton kernels run on CUDA tensors, got a cpu tensor",
                 backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_cpu_tensors_to_the_cuda_backend_on_a_gpu_machine(name):
    if _registry._BACKENDS.get("cuda") is None or _registry._BACKENDS["cuda"].status() is not None:
        pytest.skip("the cuda backend cannot run here at all")
    expect_error(ALL_CALLS[name], "public", ValueError,
                 r"backend 'cuda' cannot run here: CUDA kernels run on CUDA tensors, got a cpu tensor",
                 backend="cuda")


# --------------------------------------------------------------------------- NaN in the inputs
@INTERPRETER_WARNINGS
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name, backend", CALLS_AND_BACKENDS)
def test_nan_logits_give_a_nan_loss(name, backend, reduction):
    """NaN propagates, never silently finite; only the rows (elements) it touches."""
    logits = make_inputs()["logits"]
    logits[2, 1] = math.nan  # column 1 < K: focal distillation reads it too
    leaf = logits.clone().requires_grad_(True)
    loss = call_on(name, backend, logits=leaf, reduction=reduction)
    if reduction != "none":
        assert loss.isnan(), loss
    elif family_of(name) == "softmax":
        assert loss[2].isnan() and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all(), loss
    else:
        assert loss[2, 1].isnan() and int(loss.isnan().sum()) == 1, loss
    (grad,) = torch.autograd.grad(loss.sum() if reduction == "none" else loss, leaf)
    assert grad[2].isnan().any(), "a NaN row got a finite gradient"


@INTERPRETER_WARNINGS
@pytest.mark.parametrize("key", ["old", "new"])
@pytest.mark.parametrize("backend", [None, *cpu_backends("softmax")])
def test_nan_teacher_logits_give_a_nan_loss(key, backend):
    teacher = make_inputs()[key]
    teacher[4, 0] = math.nan
    loss = call_on("mpt_loss", backend, reduction="none", **{key: teacher})
    assert loss[4].isnan() and torch.isfinite(loss[[0, 1, 2, 3, 5]]).all(), loss


@INTERPRETER_WARNINGS
@pytest.mark.parametrize("backend", [None, *cpu_backends("softmax")])
def test_nan_in_an_ignored_row_changes_nothing(backend):
    x = make_inputs()
    x["target"][3] = -100
    logits, old, new = x["logits"].clone(), x["old"].clone(), x["new"].clone()
    logits[3, 0] = old[3, 1] = new[3, 2] = math.nan
    clean = call_on("mpt_loss", backend, target=x["target"], reduction="none")
    dirty = call_on("mpt_loss", backend, logits=logits, old=old, new=new, target=x["target"], reduction="none")
    assert dirty[3] == 0 and torch.equal(dirty, clean)


@INTERPRETER_WARNINGS
@pytest.mark.parametrize("backend", [None, *cpu_backends("softmax")])
def test_non_finite_class_bias_propagates(backend):
    """class_bias is a tensor of values (not validated): NaN reaches the loss."""
    bias = torch.zeros(C)
    bias[1] = math.nan
    for name in ("margin_cross_entropy", "mpt_loss"):
        loss = call_on(name, backend, class_bias=bias, reduction="none")
        assert loss.isnan().all(), (name, loss)  # the bias enters every row's log-sum-exp


# --------------------------------------------------------------------------- empty batch, one class
@INTERPRETER_WARNINGS
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name, backend", CALLS_AND_BACKENDS)
def test_empty_batch(name, backend, reduction):
    """N = 0: a mean or sum over nothing is 0 (not NaN), "none" is empty, backward works."""
    x = make_inputs()
    empty = {key: value[:0] for key, value in x.items()}
    leaf = empty["logits"].clone().requires_grad_(True)
    loss = call_on(name, backend, **dict(empty, logits=leaf), reduction=reduction)
    assert loss.dtype == leaf.dtype
    if reduction == "none":
        assert loss.shape == ((0,) if family_of(name) == "softmax" else (0, C))
        upstream = torch.ones_like(loss)
    else:
        assert loss.shape == () and loss.item() == 0.0
        upstream = torch.tensor(0.5)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert grad.shape == (0, C)


@INTERPRETER_WARNINGS
@pytest.mark.parametrize("name, backend", CALLS_AND_BACKENDS)
def test_single_class(name, backend):
    """C = 1 (and C_old = K = 1): the CE and the KL of one class are 0 with 0 gradient;
    logit matching and the multi-label losses are not; every backend equals the reference."""
    x = make_inputs()
    one = dict(logits=x["logits"][:, :1].contiguous(), old=x["old"][:, :1].contiguous(),
               new=x["new"][:, :1].contiguous(), target=torch.zeros(N, dtype=torch.int64),
               targets=x["targets"][:, :1].contiguous())
    options = {"new_class_bias": 0.0} if name == "mpt_loss" else {}
    for kind in (["kl", "lm"] if name in ("focal_distillation", "mpt_loss") else [None]):
        over = dict(one, **options, reduction="none", **({"kind": kind} if kind else {}))
        leaf = one["logits"].clone().requires_grad_(True)
        loss = call_on(name, backend, **dict(over, logits=leaf))
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        ref_leaf = one["logits"].clone().requires_grad_(True)
        expected = call_on(name, None, **dict(over, logits=ref_leaf))
        (expected_grad,) = torch.autograd.grad(expected.sum(), ref_leaf)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=2e-5, atol=1e-6)
        if family_of(name) == "softmax" and kind != "lm":
            # 0 up to the rounding of the one-sweep KL identity (s - r) - r + s
            assert loss.abs().max() <= 1e-6 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad)
        else:
            assert loss.abs().sum() > 0


@INTERPRETER_WARNINGS
@pytest.mark.parametrize("backend", [None, *cpu_backends("softmax")])
def test_single_class_with_label_smoothing_and_bias(backend):
    x = make_inputs()
    z, target = x["logits"][:, :1].contiguous(), torch.zeros(N, dtype=torch.int64)
    for options in (dict(label_smoothing=0.3), dict(class_bias=torch.tensor([2.0])),
                    dict(num_old_classes=1, new_class_bias=3.0)):
        loss = call_on("margin_cross_entropy", backend, logits=z, target=target, reduction="none", **options)
        assert torch.equal(loss, torch.zeros_like(loss)), options


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_num_old_classes_outside_one_to_c(namespace):
    """C_old = 0 and C_old > C, given as num_old_classes or as the old logits' width."""
    x = make_inputs()
    for bad in (0, -1, C + 1, 10 * C):
        expect_error(call_mpt, namespace, ValueError, r"^num_old_classes must be", num_old_classes=bad, old=None)
        expect_error(call_margin_ce, namespace, ValueError, r"^num_old_classes must be", num_old_classes=bad,
                     new_class_bias=1.0)
    for width in (0, C + 1):
        teacher = torch.randn(N, width)
        expect_error(call_mpt, namespace, ValueError, r"old_logits must have between 1 and", old=teacher)
        expect_error(call_fd, namespace, ValueError, r"ref_logits must have between 1 and", old=teacher)
    # an explicit num_old_classes that disagrees with the old logits' width
    expect_error(call_mpt, namespace, ValueError, r"old_logits must have 4 columns", num_old_classes=4,
                 old=x["old"])


# --------------------------------------------------------------------------- non-finite parameters
FLOAT_PARAMETERS = {
    "margin_cross_entropy": ("new_class_bias", "label_smoothing"),
    "focal_distillation": ("tau", "alpha", "beta"),
    "mpt_loss": ("new_class_bias", "tau", "alpha", "beta", "ce_weight", "old_weight", "new_weight",
                 "label_smoothing"),
    "hill_loss": ("lamb", "margin", "gamma"),
    "splc_loss": ("tau", "margin", "gamma"),
}


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("inf")],
                         ids=["nan", "inf", "-inf", "np_nan", "np_inf"])
@pytest.mark.parametrize(
    "name, parameter", [(name, p) for name, ps in FLOAT_PARAMETERS.items() for p in ps])
def test_non_finite_parameters(name, parameter, value, namespace):
    expect_error(ALL_CALLS[name], namespace, ValueError, rf"^{parameter} must be (finite|>=|>|<=)",
                 **{parameter: value})


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize(
    "name, parameter", [(name, p) for name, ps in FLOAT_PARAMETERS.items() for p in ps])
def test_tensor_parameters_are_refused(name, parameter, namespace):
    """A 0-d tensor would need a host read (a GPU sync) to validate: a TypeError instead."""
    expect_error(ALL_CALLS[name], namespace, TypeError, rf"^{parameter} must be a real number, got Tensor",
                 **{parameter: torch.tensor(0.5)})


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_numpy_scalars_are_numbers(namespace):
    ns = NAMESPACES[namespace]
    torch.testing.assert_close(call_fd(ns, tau=np.float32(2.0), beta=np.int64(3)), call_fd(ns, tau=2.0, beta=3.0),
                               rtol=0, atol=0)
    torch.testing.assert_close(call_splc(ns, epoch=np.int64(2), change_epoch=np.int32(1)),
                               call_splc(ns, epoch=2, change_epoch=1), rtol=0, atol=0)


# --------------------------------------------------------------------------- the epoch
@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("parameter", ["epoch", "change_epoch"])
@pytest.mark.parametrize("value", [2.5, 2.0, math.nan, math.inf, torch.tensor(1), np.float64(1.0), "2", None],
                         ids=["2.5", "2.0", "nan", "inf", "tensor", "np_float", "str", "None"])
def test_non_integer_epoch(parameter, value, namespace):
    expect_error(call_splc, namespace, TypeError, rf"^{parameter} must be an int", **{parameter: value})


# --------------------------------------------------------------------------- target values
BAD_TARGETS = [C, C + 7, 2**40, -1, -5, -(2**40)]


@INTERPRETER_WARNINGS
@pytest.mark.parametrize(
    "bad, target_dtype",
    [(bad, torch.int64) for bad in BAD_TARGETS] + [(bad, torch.int32) for bad in BAD_TARGETS if abs(bad) < 2**31],
    ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name, backend", [p for p in CALLS_AND_BACKENDS if p.values[0] in SOFTMAX_CALLS])
def test_target_out_of_range_on_every_cpu_backend(name, backend, bad, target_dtype):
    target = make_inputs()["target"]
    target[4] = bad
    target = target.to(target_dtype)
    for reduction in ("mean", "none"):
        for logits in (make_inputs()["logits"], make_inputs()["logits"].requires_grad_(True)):
            with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, {C}\).*found {bad}"):
                call_on(name, backend, logits=logits, target=target, reduction=reduction)
