"""The ``reference`` backend: the pure-PyTorch reference behind custom operators.

Forward runs the reference; backward recomputes it under autograd and differentiates
it, so this backend's gradient is autograd's gradient of the spec in code. It keeps
nothing between the two (``saved`` is empty): it is the correctness baseline, not a
fast path. It runs on any device and in float64 too.
"""

from __future__ import annotations

import dataclasses

import torch

from .._custom_op import define_loss_ops
from .._registry import Backend, register_backend
from .. import reference

_LOSS_OF_FAMILY = {"softmax": reference.softmax_family_loss, "multilabel": reference.multilabel_loss}


def _define(family: str):
    loss_of = _LOSS_OF_FAMILY[family]

    def forward(args, needs_grad):
        return loss_of(args), []

    def backward(grad_loss, saved, args):
        with torch.enable_grad():
            logits = args.logits.detach().requires_grad_(True)
            loss = loss_of(dataclasses.replace(args, logits=logits))
            (grad_logits,) = torch.autograd.grad(loss, logits, grad_loss)
        return grad_logits

    return define_loss_ops(
        "reference", family, forward=forward, saved_fake=lambda args, needs_grad: [], backward=backward
    )


register_backend(
    Backend(
        name="reference",
        description="pure PyTorch (autograd of the spec); any device, float16 to float64",
        families={family: _define(family) for family in ("softmax", "multilabel")},
        auto_rank=lambda family, logits: 1000.0,  # the fallback: chosen when nothing faster runs
    )
)
