"""The ``cuda`` backend: hand-written CUDA kernels (csrc/) for both loss families.

``mpt_kernels._C`` is a pybind11 module that does not link against libtorch: this
module validates what the kernels need (dtypes, devices, unit column stride; the public
API has already checked the metadata) and hands over raw addresses, sizes, strides,
dtype codes, the device index and the current CUDA stream. The extension is built at
install time when nvcc is found (setup.py); without it this module still imports and
registers the backend, whose ``status`` says why it cannot run.

When autograd will want the gradient, the forward also computes it for an upstream
gradient of 1 (``mean``'s 1/count folded in), rounded once into the logits' dtype, and
saves it as ``saved[0]``; the softmax family also saves its rows' float32 statistics
(``saved[1]``, (N, ``_C.SOFTMAX_STAT_FLOATS``)). The backward (``backward_in_place``)
reads the upstream gradient on the device, so nothing waits for the GPU: where it is 1
(a scalar, per row of the softmax family's "none", per element of the multi-label
"none") it leaves ``saved[0]`` as it is, and elsewhere it recomputes the gradient from
the inputs (and the statistics) times the upstream gradient in float32 and rounds it
once into ``saved[0]``: never a rounded gradient rescaled, which would flush an fp16
gradient scaled by GradScaler. Ignored softmax rows keep their zero gradient whatever
the upstream gradient, NaN included. Inputs whose columns are not adjacent are copied in
the forward and again in the backward.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .._custom_op import _inputs_device, define_loss_ops
from .._registry import Backend, register_backend
from .._validation import (
    HALF_AND_SINGLE, MultiLabelLossArgs, SoftmaxLossArgs, check_kernel_shape, check_target_values, splc_flip_logit,
)

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

# Shared memory (bytes per row) in which the softmax forward with gradient may keep a
# long row's first chunks between its statistics and gradient sweeps, so that they are
# read once (csrc/softmax_loss.cu, StagedChunks): None, as much as the device gives a
# block; 0, none (a row longer than the registers hold is read twice). For tests and
# profiling.
SHARED_ROW_BYTES: Optional[int] = None


# --------------------------------------------------------------------------- tensors to addresses
def _with_unit_column_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need adjacent columns; copy otherwise."""
    if tensor.shape[1] <= 1 or tensor.stride(1) == 1:
        return tensor
    return tensor.contiguous()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffers the kernels write besides the saved gradient and statistics (losses,
    partial sums, the row count): every element written (tests fill them first)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(device: torch.device) -> dict:
    return {"device": device.index, "stream": torch.cuda.current_stream(device).cuda_stream}


def _address(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


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
    """An ignore_index outside int64 matches no target (a guard: validation keeps it
    within the targets' dtype)."""
    inside = _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]
    return {"has_ignore_index": inside, "ignore_index": ignore_index if inside else 0}


def softmax_inputs(args: SoftmaxLossArgs):
    """What the softmax kernels read, as ``_C.SoftmaxInputs``, and the tensors behind its
    addresses (copies among them), which the caller keeps alive through the launch."""
    check_kernel_shape("cuda", args.logits)  # before any copy
    logits = _with_unit_column_stride(args.logits)
    num_rows, num_classes = logits.shape
    row = softmax_row_params(args)
    old = _with_unit_column_stride(args.old_logits) if row.has_old else None
    new = _with_unit_column_stride(args.new_logits) if row.has_new else None
    bias = None
    if row.has_ce and args.class_bias is not None:  # C values: applied in float32
        bias = args.class_bias.detach().to(torch.float32).contiguous()
    inputs = _C.SoftmaxInputs()
    inputs.row = row
    inputs.dtype = _C.DTYPES[_dtype_name(logits.dtype)]
    inputs.num_rows = num_rows
    inputs.logits = logits.data_ptr()
    inputs.logits_row_stride = logits.stride(0)
    inputs.old_logits = _address(old)
    inputs.old_row_stride = 0 if old is None else old.stride(0)
    inputs.new_logits = _address(new)
    inputs.new_row_stride = 0 if new is None else new.stride(0)
    inputs.class_bias = _address(bias)
    inputs.target = args.target.data_ptr()
    inputs.target_stride = args.target.stride(0)
    inputs.target_is_int64 = args.target.dtype == torch.int64
    ignore = ignore_index_arguments(args.ignore_index)
    inputs.has_ignore_index, inputs.ignore_index = ignore["has_ignore_index"], ignore["ignore_index"]
    return inputs, (logits, old, new, bias)


def _softmax_forward(args: SoftmaxLossArgs, needs_grad: bool):
    inputs, keep_alive = softmax_inputs(args)  # checks the shape first
    if not torch.compiler.is_compiling():
        check_target_values(args.target, args.logits.shape[1], args.ignore_index)
    num_rows = args.logits.shape[0]
    device, dtype = args.logits.device, args.logits.dtype
    row_loss = _empty(num_rows, torch.float32, device)
    counted_rows = _empty(1, torch.int64, device) if args.reduction == "mean" else None
    loss = _empty((), dtype, device) if args.reduction != "none" else None
    saved = _softmax_saved(args, needs_grad)
    _C.softmax_forward(
        inputs=inputs,
        reduction=_C.REDUCTIONS[args.reduction],
        row_loss=row_loss.data_ptr(),
        counted_rows=_address(counted_rows),
        loss=_address(loss),
        grad=_address(saved[0] if saved else None),
        stats=_address(saved[1] if saved else None),
        shared_row_bytes=_shared_row_bytes(),
        **_launch(device),
    )
    del keep_alive  # after the launch: on the same stream, the allocator reuses them only after the kernels
    if args.reduction == "none":
        loss = row_loss.to(dtype)
    return loss, saved


def _shared_row_bytes() -> int:
    """SHARED_ROW_BYTES as the kernels take it (-1: the device's limit)."""
    if SHARED_ROW_BYTES is None:
        return -1
    if isinstance(SHARED_ROW_BYTES, bool) or not isinstance(SHARED_ROW_BYTES, int) or SHARED_ROW_BYTES < 0:
        raise ValueError("mpt_kernels.backends.cuda.SHARED_ROW_BYTES must be None or an int >= 0, "
                         f"got {SHARED_ROW_BYTES!r}")
    return SHARED_ROW_BYTES


def softmax_forward_plan(args: SoftmaxLossArgs, needs_grad: bool = True) -> dict:
    """How the forward runs each row of ``args`` (threads per block, chunks, the chunks
    kept in shared memory between its sweeps, dynamic shared memory per block), as it
    would launch now: for tests and profiles."""
    inputs, _ = softmax_inputs(args)
    with _inputs_device(args.logits):  # _C selects the device itself (see _inputs_device)
        return _C.softmax_forward_plan(inputs=inputs, with_grad=needs_grad, shared_row_bytes=_shared_row_bytes(),
                                       device=_launch(args.logits.device)["device"])


def _softmax_saved(args: SoftmaxLossArgs, needs_grad: bool) -> list:
    """[gradient (N, C) in the logits' dtype, row statistics (N, SOFTMAX_STAT_FLOATS) float32], or []."""
    if not needs_grad:
        return []
    logits = args.logits
    stats_shape = (logits.shape[0], _C.SOFTMAX_STAT_FLOATS)
    return [logits.new_empty(logits.shape), logits.new_empty(stats_shape, dtype=torch.float32)]


def _softmax_backward(grad_loss: torch.Tensor, saved: list, args: SoftmaxLossArgs) -> None:
    """Rewrites the rows of saved[0] whose upstream gradient is not 1 (see the module)."""
    grad, stats = saved
    inputs, keep_alive = softmax_inputs(args)
    upstream = _upstream_in(grad_loss, grad.dtype)
    _C.softmax_backward(
        inputs=inputs,
        stats=stats.data_ptr(),
        upstream=upstream.data_ptr(),
        upstream_stride=upstream.stride(0) if upstream.dim() == 1 else 0,
        grad=grad.data_ptr(),
        **_launch(grad.device),
    )
    del keep_alive


# --------------------------------------------------------------------------- multi-label family
def multilabel_params(args: MultiLabelLossArgs):
    """The options of ``args`` as the kernels' MultilabelParams."""
    math = _C.MultilabelParams()
    math.splc = args.loss == "splc"
    math.lamb = args.lamb
    math.margin = args.margin
    math.gamma = args.gamma
    math.flip_logit = splc_flip_logit(args)
    return math


def multilabel_inputs(args: MultiLabelLossArgs):
    """What the multi-label kernels read, as ``_C.MultilabelInputs``, and the tensors
    behind its addresses (copies among them), which the caller keeps alive through the launch."""
    logits = _with_unit_column_stride(args.logits)
    targets = _with_unit_column_stride(args.targets)
    num_rows, num_cols = logits.shape
    numel = num_rows * num_cols
    inputs = _C.MultilabelInputs()
    inputs.math = multilabel_params(args)
    inputs.dtype = _C.DTYPES[_dtype_name(logits.dtype)]
    inputs.target_dtype = _C.DTYPES[_dtype_name(targets.dtype)]
    inputs.num_rows = num_rows
    inputs.num_cols = num_cols
    inputs.logits = logits.data_ptr()
    inputs.logits_row_stride = logits.stride(0)
    inputs.targets = targets.data_ptr()
    inputs.targets_row_stride = targets.stride(0)
    inputs.grad_scale = 1.0 / numel if args.reduction == "mean" and numel > 0 else 1.0
    return inputs, (logits, targets)


def _multilabel_forward(args: MultiLabelLossArgs, needs_grad: bool):
    inputs, keep_alive = multilabel_inputs(args)
    device, dtype = args.logits.device, args.logits.dtype
    if args.reduction == "none":
        loss = _empty(args.logits.shape, dtype, device)
        partials = None
    else:
        loss = _empty((), dtype, device)
        partials = _empty(_C.MULTILABEL_MAX_BLOCKS, torch.float32, device)
    saved = _multilabel_saved(args, needs_grad)
    _C.multilabel_forward(
        inputs=inputs,
        reduction=_C.REDUCTIONS[args.reduction],
        partials=_address(partials),
        loss=_address(loss),
        grad=_address(saved[0] if saved else None),
        **_launch(device),
    )
    del keep_alive
    return loss, saved


def _multilabel_saved(args: MultiLabelLossArgs, needs_grad: bool) -> list:
    """[gradient (N, C) in the logits' dtype], or []."""
    return [args.logits.new_empty(args.logits.shape)] if needs_grad else []


def _multilabel_backward(grad_loss: torch.Tensor, saved: list, args: MultiLabelLossArgs) -> None:
    """Rewrites the elements of saved[0] whose upstream gradient is not 1 (see the module)."""
    (grad,) = saved
    inputs, keep_alive = multilabel_inputs(args)
    upstream = _upstream_in(grad_loss, grad.dtype)
    strides = list(upstream.stride()) + [0, 0]  # a scalar: (0, 0)
    _C.multilabel_backward(
        inputs=inputs,
        upstream=upstream.data_ptr(),
        upstream_stride0=strides[0],
        upstream_stride1=strides[1],
        grad=grad.data_ptr(),
        **_launch(grad.device),
    )
    del keep_alive


# --------------------------------------------------------------------------- helpers
def _upstream_in(grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The upstream gradient in the logits' dtype (autograd hands it so already)."""
    return grad_loss if grad_loss.dtype == dtype else grad_loss.to(dtype)


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


# Read once at import (neither call creates a CUDA context): _status runs on every loss
# call, also inside torch.compile's tracing, which cannot trace a call into _C.
_DRIVER_STATUS = None if _C is None else driver_too_old(_C.cuda_runtime_version(), _C.cuda_driver_version())


def _status() -> Optional[str]:
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _DRIVER_STATUS


# Measured on an H200 (benchmarks/results/bench-20261122-184325-nvidia-h200-merged.md,
# forward+backward): this backend's multi-label kernel is slower per element than Triton's,
# but a call costs less host time, and that decides small tensors. At N·C = 2^25 (4096 x
# 8192, bf16) Hill and SPLC took 0.24 and 0.21 ms here against Triton's 0.39 and 0.30 ms
# (fp32: 0.57 against 0.71 ms); at 2^27 Triton took 0.29 ms against 0.91 ms. The softmax
# family: Triton at every shape measured (0.45 against 1.19 ms at 4096 x 8192, bf16).
SMALL_MULTILABEL_ELEMENTS = 2**25


def _auto_rank(family: str, logits: torch.Tensor) -> float:
    """Before triton (10) for small multi-label tensors, after it otherwise; never chosen
    for CPU tensors (_why_not rules them out)."""
    if logits.device.type != "cuda":
        return 10_000.0
    if family == "multilabel" and logits.numel() <= SMALL_MULTILABEL_ELEMENTS:
        return 5.0
    return 20.0


_FAMILIES = {
    "softmax": define_loss_ops(
        "cuda", "softmax", forward=_softmax_forward, saved_fake=_softmax_saved,
        backward=_softmax_backward, dispatch_key="CUDA", backward_in_place=True,
    ),
    "multilabel": define_loss_ops(
        "cuda", "multilabel", forward=_multilabel_forward, saved_fake=_multilabel_saved,
        backward=_multilabel_backward, dispatch_key="CUDA", backward_in_place=True,
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
