"""Registering a backend's loss as ``torch.library`` custom operators.

Every backend exposes each loss family as the same pair of operators, so that
``torch.compile(fullgraph=True)`` sees one opaque node per loss (no graph break) and
eager autograd works the same for all backends:

* ``mpt_kernels::<backend>_<family>_forward(<family parameters>, bool needs_grad) -> (Tensor loss, Tensor[] saved)``
  returns the reduced loss in the logits' dtype and whatever the backend wants to keep
  for backward (nothing, per-row statistics, or the gradient computed in the forward);
* ``mpt_kernels::<backend>_<family>_backward(Tensor grad_loss, Tensor[] saved, <family parameters>, bool needs_grad) -> Tensor``
  returns the gradient of the logits. Teachers' logits, targets and ``class_bias`` are
  constants: they get no gradient.

The parameter list of each family is written once, below, and shared by every backend.
A backend supplies the real implementations and the fake ``saved`` list; the fake loss
(``loss_shape``) and the backward's fake are the same for every backend.

A backend that computes the gradient in its forward (for an upstream gradient of 1) and
saves it asks for ``backward_in_place=True``: its backward operator is then
``(Tensor grad_loss, Tensor(a!)[] saved, <family parameters>, bool needs_grad) -> ()``, turns
``saved[0]`` in place into the final gradient (where the upstream gradient is not 1),
and that buffer is returned, so no second N x C buffer is ever allocated.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ._validation import MultiLabelLossArgs, SoftmaxLossArgs

LIBRARY_NAME = "mpt_kernels"
_LIBRARY = torch.library.Library(LIBRARY_NAME, "FRAGMENT")

# The operators' parameters, in the order of the fields of SoftmaxLossArgs and
# MultiLabelLossArgs (``args.op_args()`` produces them).
FAMILY_PARAMETERS = {
    "softmax": (
        "Tensor logits, Tensor target, Tensor? old_logits, Tensor? new_logits, "
        "Tensor? class_bias, int num_old_classes, float new_class_bias, "
        "float label_smoothing, int ignore_index, str kind, float tau, float alpha, "
        "float beta, str focus, bool scale_by_tau_sq, float ce_weight, float old_weight, "
        "float new_weight, str reduction"
    ),
    "multilabel": (
        "Tensor logits, Tensor targets, str loss, float lamb, float margin, float gamma, "
        "float tau, SymInt epoch, SymInt change_epoch, str reduction"
    ),
}

FAMILY_ARGS = {"softmax": SoftmaxLossArgs, "multilabel": MultiLabelLossArgs}


def loss_shape(args) -> tuple:
    """The loss's shape: () for "sum" and "mean"; for "none", (N,) in the softmax family
    and (N, C) in the multi-label family."""
    if args.reduction != "none":
        return ()
    logits = args.logits
    return tuple(logits.shape[:1]) if isinstance(args, SoftmaxLossArgs) else tuple(logits.shape)


def _inputs_device(logits: torch.Tensor):
    """Makes the logits' GPU the current device while a backend runs.

    Kernels launch on the current device and stream (Triton's launcher, and _C, which
    selects the device itself through its static CUDA runtime and would otherwise leave
    torch's current device changed): with tensors on cuda:1 while cuda:0 is current, the
    launch must happen on cuda:1. torch's guard restores the previous device afterwards.
    """
    # an int index takes torch's short path (a torch.device is parsed again on every call)
    return torch.cuda.device(logits.get_device()) if logits.is_cuda else contextlib.nullcontext()


def define_loss_ops(
    backend: str,
    family: str,
    *,
    forward: Callable,
    saved_fake: Callable,
    backward: Callable,
    dispatch_key: str = "CompositeExplicitAutograd",
    backward_in_place: bool = False,
) -> Callable:
    """Defines the forward/backward operator pair; returns ``loss(args) -> Tensor``.

    The backend's functions see the validated arguments record, rebuilt from the
    operator's arguments:

    * ``forward(args, needs_grad) -> (loss, saved_list)``; ``needs_grad`` says whether
      autograd will ask for the logits' gradient (a forward may then compute it);
    * ``saved_fake(args, needs_grad)`` is the ``saved`` list ``forward`` returns, as fake
      tensors (the fake loss is the same for every backend: see ``loss_shape``);
    * ``backward(grad_loss, saved_list, args) -> grad_logits``, or, with
      ``backward_in_place``, writes the gradient into ``saved_list[0]`` and returns None.
    """
    make_args = FAMILY_ARGS[family]
    params = FAMILY_PARAMETERS[family] + ", bool needs_grad"
    forward_name = f"{backend}_{family}_forward"
    backward_name = f"{backend}_{family}_backward"
    _LIBRARY.define(f"{forward_name}({params}) -> (Tensor, Tensor[])")
    if backward_in_place:
        _LIBRARY.define(f"{backward_name}(Tensor grad_loss, Tensor(a!)[] saved, {params}) -> ()")
    else:
        _LIBRARY.define(f"{backward_name}(Tensor grad_loss, Tensor[] saved, {params}) -> Tensor")

    def forward_impl(*op_args):
        with _inputs_device(op_args[0]):
            return forward(make_args(*op_args[:-1]), op_args[-1])

    def forward_fake_impl(*op_args):
        args = make_args(*op_args[:-1])
        return args.logits.new_empty(loss_shape(args)), saved_fake(args, op_args[-1])

    def backward_impl(grad_loss, saved, *op_args):
        with _inputs_device(op_args[0]):
            return backward(grad_loss, saved, make_args(*op_args[:-1]))

    def backward_fake_impl(grad_loss, saved, logits, *rest):
        return None if backward_in_place else torch.empty_like(logits)

    _LIBRARY.impl(forward_name, forward_impl, dispatch_key)
    _LIBRARY.impl(backward_name, backward_impl, dispatch_key)
    torch.library.register_fake(f"{LIBRARY_NAME}::{forward_name}", forward_fake_impl, lib=_LIBRARY)
    torch.library.register_fake(f"{LIBRARY_NAME}::{backward_name}", backward_fake_impl, lib=_LIBRARY)
    forward_op = getattr(torch.ops.mpt_kernels, forward_name).default
    backward_op = getattr(torch.ops.mpt_kernels, backward_name).default

    def setup_context(ctx, inputs, output):
        tensor_slots = [i for i, value in enumerate(inputs) if isinstance(value, torch.Tensor)]
        ctx.tensor_slots = tensor_slots
        ctx.other_inputs = [None if i in tensor_slots else value for i, value in enumerate(inputs)]
        ctx.needs_grad = inputs[-1]  # whether the forward made (and saved) the logits' gradient
        saved = list(output[1])
        ctx.num_saved = len(saved)
        ctx.mark_non_differentiable(*saved)  # backward state, not a result to differentiate
        # no zero-filled N x C gradient for the saved outputs (autograd would materialise
        # one per saved tensor before calling the backward, which ignores it)
        ctx.set_materialize_grads(False)
        ctx.backward_done = False
        ctx.save_for_backward(*saved, *(inputs[i] for i in tensor_slots))

    def claim_backward(ctx) -> None:
        """One backward per forward where the backward overwrites the saved gradient."""
        if backward_in_place and ctx.backward_done:
            raise RuntimeError(
                f"the {backend} backend's {family} loss supports one backward per forward; "
                "with retain_graph=True, compute the loss again for a second backward"
            )
        ctx.backward_done = True

    def backward_formula(ctx, grad_loss, _grad_saved):
        num_inputs = len(ctx.other_inputs)
        if grad_loss is None:  # grads are not materialised (setup_context): no gradient flowed
            return (None,) * num_inputs
        if not ctx.needs_grad:
            # The logits did not need a gradient, so the forward saved nothing for one; the
            # loss still requires one where a constant input does (a class_bias or teacher
            # that requires grad), which gets none (spec: they are constants), as in eager.
            return (None,) * num_inputs
        claim_backward(ctx)
        tensors = ctx.saved_tensors
        saved, input_tensors = list(tensors[: ctx.num_saved]), tensors[ctx.num_saved :]
        inputs = list(ctx.other_inputs)
        for slot, value in zip(ctx.tensor_slots, input_tensors):
            inputs[slot] = value
        grad_logits = backward_op(grad_loss, saved, *inputs)
        if backward_in_place:
            grad_logits = saved[0]
        return (grad_logits,) + (None,) * (num_inputs - 1)

    torch.library.register_autograd(
        f"{LIBRARY_NAME}::{forward_name}", backward_formula, setup_context=setup_context, lib=_LIBRARY
    )

    class EagerLoss(torch.autograd.Function):
        """The same forward and backward, for eager mode, without the dispatcher: the
        custom operator's boxed call and torch.library's autograd wrapper (argument
        flattening, defaults) cost more host time per call than a large kernel runs."""

        @staticmethod
        def forward(ctx, logits, args):
            with _inputs_device(logits):
                loss, saved = forward(args, True)
            ctx.args = args  # its tensors are saved below too, so in-place changes are caught
            ctx.num_saved = len(saved)
            ctx.backward_done = False
            ctx.save_for_backward(*saved, *(value for value in args.op_args() if isinstance(value, torch.Tensor)))
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            claim_backward(ctx)
            saved = list(ctx.saved_tensors[: ctx.num_saved])
            with _inputs_device(grad_loss):
                grad_logits = backward(grad_loss, saved, ctx.args)
            return (saved[0] if backward_in_place else grad_logits), None

    def loss(args) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and args.logits.requires_grad
        if torch.compiler.is_compiling():
            # torch.compile sees one opaque node per call (the operators above)
            return forward_op(*args.op_args(), needs_grad)[0]
        if needs_grad:
            return EagerLoss.apply(args.logits, args)
        with _inputs_device(args.logits):
            return forward(args, False)[0]

    return loss
