"""The ``cuda`` backend: hand-written CUDA kernels (csrc/) for both loss families.

``mpt_kernels._C`` is a pybind11 module that does not link against libtorch: this
module validates what the kernels need (dtypes, devices, unit column stride; the public
API has already checked the metadata) and hands over raw addresses, sizes, strides,
dtype codes, the device index and the current CUDA stream. The extension is built at
install time when nvcc is found (setup.py); without it this module still imports and
registers the backend, whose ``status`` says why it cannot run.

The forward computes the gradient for an upstream gradient of 1 (``mean``'s 1/count
folded in) when autograd will want it, and saves it; the backward scales it in place
(``backward_in_place``), reading the upstream gradient on the device: nothing waits
for the GPU.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from .._custom_op import define_loss_ops
from .._registry import Backend, register_backend
from .._validation import HALF_AND_SINGLE, MultiLabelLossArgs, SoftmaxLossArgs, check_target_values

try:
    _C = importlib.import_module("._C", __package__.rpartition(".")[0])  # mpt_kernels._C
except ImportError as error:  # built without nvcc, or MPT_KERNELS_CUDA=0
    _C = None
    EXTENSION_ERROR: Optional[str] = (
        f"extension not built: {type(error).__name__}: {error} (mpt_kernels._C is compiled at "
        "install time when nvcc is found; install with MPT_KERNELS_CUDA=1 to make a failed "
        "build an error)"
    )
else:
    EXTENSION_ERROR = None

_INT64_RANGE = (-(2**63), 2**63 - 1)
_MAX_CLASSES = 2**31 - 1  # column indices are 32-bit in the kernels


# --------------------------------------------------------------------------- tensors to addresses
def _with_unit_column_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need adjacent columns; copy otherwise."""
    if tensor.shape[1] <= 1 or tensor.stride(1) == 1:
        return tensor
    return tensor.contiguous()


def _launch(device: torch.device) -> dict:
    return {"device": device.index, "stream": torch.cuda.current_stream(device).cuda_stream}


def _on_device(device: torch.device):
    """torch's device guard around a _C call.

    _C's static CUDA runtime selects the device with cudaSetDevice, which makes that
    GPU's context current on the thread; torch's own runtime reads the same driver state,
    so without the guard a call on cuda:1 tensors would leave torch's current device at 1.
    The guard restores it afterwards (and never creates a context on another GPU).
    """
    return torch.cuda.device(device)


def _address(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _check_classes(num_classes: int) -> None:
    if num_classes > _MAX_CLASSES:
        raise ValueError(f"the cuda backend takes at most {_MAX_CLASSES} classes, got {num_classes}")


# --------------------------------------------------------------------------- softmax family
def softmax_row_params(args: SoftmaxLossArgs):
    """The normalised options of ``args`` as the kernels' SoftmaxRowParams."""
    row = _C.SoftmaxRowParams()
    row.num_classes = args.logits.shape[1]
    row.num_old_classes = args.num_old_classes
    row.has_ce = args.ce_weight != 0.0
    row.has_old = args.old_logits is not None and args.old_weight != 0.0
    row.has_new = args.new_logits is not None and args.new_weight != 0.0
    row.kl = args.kind == "kl"
    row.focus = _C.FOCUS[args.focus]
    row.ce_weight = args.ce_weight
    row.old_weight = args.old_weight
    row.new_weight = args.new_weight
    row.label_smoothing = args.label_smoothing
    # a class_bias vector replaces the new-class bias (validation set it to 0 then)
    row.new_class_bias = args.new_class_bias if args.class_bias is None else 0.0
    row.inv_tau = 1.0 / args.tau
    row.kl_scale = args.tau * args.tau if args.scale_by_tau_sq else 1.0
    row.alpha = args.alpha
    row.beta = args.beta
    return row


def ignore_index_arguments(ignore_index: int) -> dict:
    """An ignore_index outside int64 matches no target."""
    inside = _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]
    return {"has_ignore_index": inside, "ignore_index": ignore_index if inside else 0}


def _softmax_forward(args: SoftmaxLossArgs, needs_grad: bool):
    if not torch.compiler.is_compiling():
        check_target_values(args.target, args.logits.shape[1], args.ignore_index)
    logits = _with_unit_column_stride(args.logits)
    num_rows, num_classes = logits.shape
    _check_classes(num_classes)
    row = softmax_row_params(args)
    old = _with_unit_column_stride(args.old_logits) if row.has_old else None
    new = _with_unit_column_stride(args.new_logits) if row.has_new else None
    bias = None
    if row.has_ce and args.class_bias is not None:  # C values: applied in float32
        bias = args.class_bias.detach().to(torch.float32).contiguous()
    device, dtype = logits.device, logits.dtype
    row_loss = torch.empty(num_rows, dtype=torch.float32, device=device)
    counted_rows = torch.empty(1, dtype=torch.int64, device=device) if args.reduction == "mean" else None
    loss = torch.empty((), dtype=dtype, device=device) if args.reduction != "none" else None
    grad = torch.empty((num_rows, num_classes), dtype=dtype, device=device) if needs_grad else None
    with _on_device(device):
        _C.softmax_forward(
            row=row,
            dtype=_C.DTYPES[_dtype_name(dtype)],
            num_rows=num_rows,
            logits=logits.data_ptr(),
            logits_row_stride=logits.stride(0),
            old_logits=_address(old),
            old_row_stride=0 if old is None else old.stride(0),
            new_logits=_address(new),
            new_row_stride=0 if new is None else new.stride(0),
            class_bias=_address(bias),
            target=args.target.data_ptr(),
            target_stride=args.target.stride(0),
            target_is_int64=args.target.dtype == torch.int64,
            **ignore_index_arguments(args.ignore_index),
            reduction=_C.REDUCTIONS[args.reduction],
            row_loss=row_loss.data_ptr(),
            counted_rows=_address(counted_rows),
            loss=_address(loss),
            grad=_address(grad),
            **_launch(device),
        )
    if args.reduction == "none":
        loss = row_loss.to(dtype)
    return loss, ([grad] if needs_grad else [])


def _softmax_forward_fake(args: SoftmaxLossArgs, needs_grad: bool):
    logits = args.logits
    loss = logits.new_empty(() if args.reduction != "none" else (logits.shape[0],))
    return loss, ([logits.new_empty(logits.shape)] if needs_grad else [])


# --------------------------------------------------------------------------- multi-label family
def multilabel_params(args: MultiLabelLossArgs):
    """The options of ``args`` as the kernels' MultilabelParams."""
    math = _C.MultilabelParams()
    math.splc = args.loss == "splc"
    math.lamb = args.lamb
    math.margin = args.margin
    math.gamma = args.gamma
    math.tau = args.tau
    math.correct_negatives = args.epoch >= args.change_epoch
    return math


def _multilabel_forward(args: MultiLabelLossArgs, needs_grad: bool):
    logits = _with_unit_column_stride(args.logits)
    targets = _with_unit_column_stride(args.targets)
    num_rows, num_cols = logits.shape
    device, dtype = logits.device, logits.dtype
    numel = num_rows * num_cols
    if args.reduction == "none":
        loss = torch.empty((num_rows, num_cols), dtype=dtype, device=device)
        partials = None
    else:
        loss = torch.empty((), dtype=dtype, device=device)
        partials = torch.empty(_C.MULTILABEL_MAX_BLOCKS, dtype=torch.float32, device=device)
    grad = torch.empty((num_rows, num_cols), dtype=dtype, device=device) if needs_grad else None
    with _on_device(device):
        _C.multilabel_forward(
            math=multilabel_params(args),
            dtype=_C.DTYPES[_dtype_name(dtype)],
            target_dtype=_C.DTYPES[_dtype_name(targets.dtype)],
            num_rows=num_rows,
            num_cols=num_cols,
            logits=logits.data_ptr(),
            logits_row_stride=logits.stride(0),
            targets=targets.data_ptr(),
            targets_row_stride=targets.stride(0),
            reduction=_C.REDUCTIONS[args.reduction],
            grad_scale=1.0 / numel if args.reduction == "mean" and numel > 0 else 1.0,
            partials=_address(partials),
            loss=_address(loss),
            grad=_address(grad),
            **_launch(device),
        )
    return loss, ([grad] if needs_grad else [])


def _multilabel_forward_fake(args: MultiLabelLossArgs, needs_grad: bool):
    logits = args.logits
    loss = logits.new_empty(() if args.reduction != "none" else logits.shape)
    return loss, ([logits.new_empty(logits.shape)] if needs_grad else [])


# --------------------------------------------------------------------------- backward
def _scale_saved_gradient(grad_loss: torch.Tensor, saved: list, args) -> None:
    """saved[0] (the gradient for an upstream gradient of 1) *= grad_loss, in place.

    Softmax-family rows whose target is ignored (or out of range) keep their zero
    gradient whatever the upstream gradient, NaN included, as in the reference.
    """
    grad = saved[0]
    upstream = grad_loss if grad_loss.dtype == grad.dtype else grad_loss.to(grad.dtype)
    mode = ("scalar", "per_row", "per_element")[upstream.dim()]
    strides = list(upstream.stride()) + [0, 0]
    if isinstance(args, SoftmaxLossArgs):
        rows = dict(
            target=args.target.data_ptr(),
            target_stride=args.target.stride(0),
            target_is_int64=args.target.dtype == torch.int64,
            **ignore_index_arguments(args.ignore_index),
        )
    else:
        rows = dict(target=0, target_stride=0, target_is_int64=True, has_ignore_index=False, ignore_index=0)
    with _on_device(grad.device):
        _C.scale_gradient(
            dtype=_C.DTYPES[_dtype_name(grad.dtype)],
            num_rows=grad.shape[0],
            num_cols=grad.shape[1],
            grad=grad.data_ptr(),
            upstream=upstream.data_ptr(),
            mode=_C.UPSTREAM_MODES[mode],
            upstream_stride0=strides[0],
            upstream_stride1=strides[1],
            **rows,
            **_launch(grad.device),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- registration
def _why_not(family: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in HALF_AND_SINGLE:
        return f"its kernels take float32, float16 or bfloat16 logits, got {dtype}"
    if device.type != "cuda":
        return f"CUDA kernels run on CUDA tensors, got a {device.type} tensor"
    return None


def driver_too_old(runtime_version: int, driver_version: int) -> Optional[str]:
    """Why _C's statically linked CUDA runtime cannot run on this driver, or None.

    A CUDA runtime runs on any driver of its major version or newer (minor version
    compatibility); versions are CUDA's integers, 1000 * major + 10 * minor.
    """
    if driver_version // 1000 >= runtime_version // 1000:
        return None

    def name(version: int) -> str:
        return f"{version // 1000}.{version % 1000 // 10}"

    if driver_version <= 0:
        return f"mpt_kernels._C links the CUDA {name(runtime_version)} runtime, but no NVIDIA driver was found"
    return (
        f"mpt_kernels._C links the CUDA {name(runtime_version)} runtime statically, but the NVIDIA "
        f"driver supports CUDA {name(driver_version)} only: update the driver, or rebuild _C with a "
        f"CUDA {driver_version // 1000} toolkit"
    )


@functools.lru_cache(maxsize=None)
def _driver_status() -> Optional[str]:
    return driver_too_old(_C.cuda_runtime_version(), _C.cuda_driver_version())


def _status() -> Optional[str]:
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _driver_status()


def _auto_rank(family: str, logits: torch.Tensor) -> float:
    # After triton (10) on CUDA tensors for now: which backend wins per family and shape
    # awaits GPU measurements. Never chosen for CPU tensors (_why_not rules them out).
    return 20.0 if logits.device.type == "cuda" else 10_000.0


_FAMILIES = {
    "softmax": define_loss_ops(
        "cuda", "softmax", forward=_softmax_forward, forward_fake=_softmax_forward_fake,
        backward=_scale_saved_gradient, dispatch_key="CUDA", backward_in_place=True,
    ),
    "multilabel": define_loss_ops(
        "cuda", "multilabel", forward=_multilabel_forward, forward_fake=_multilabel_forward_fake,
        backward=_scale_saved_gradient, dispatch_key="CUDA", backward_in_place=True,
    ),
}

def _description() -> str:
    if _C is None:
        return "hand-written CUDA kernels (mpt_kernels._C, not built here)"
    major, minor = divmod(_C.cuda_runtime_version() // 10, 100)
    return f"hand-written CUDA kernels (mpt_kernels._C, CUDA runtime {major}.{minor} linked statically; CUDA tensors)"


register_backend(
    Backend(
        name="cuda",
        description=_description(),
        families=_FAMILIES,
        why_not=_why_not,
        auto_rank=_auto_rank,
        status=_status,
    )
)
