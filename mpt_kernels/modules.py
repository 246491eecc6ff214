"""``nn.Module`` wrappers: the options are set once, the tensors are passed per call."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F


class _LossModule(nn.Module):
    """Holds the keyword options of a functional loss and passes them on each call."""

    _function = None

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))


class MarginCrossEntropyLoss(_LossModule):
    """``margin_cross_entropy`` as a module: ``loss = MarginCrossEntropyLoss(...)(logits, target)``."""

    def __init__(self, *, class_bias=None, num_old_classes=None, new_class_bias=0.0,
                 label_smoothing=0.0, ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(num_old_classes=num_old_classes, new_class_bias=new_class_bias,
                         label_smoothing=label_smoothing, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)
        # a buffer, so that .to(device) moves the bias with the module
        self.register_buffer("class_bias", class_bias, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.margin_cross_entropy(logits, target, class_bias=self.class_bias, **self.options)


class FocalDistillationLoss(_LossModule):
    """``focal_distillation`` as a module: ``loss(student_logits, ref_logits, target)``."""

    def __init__(self, *, kind="kl", tau=5.0, alpha=1.0, beta=5.0, focus="ref_correct",
                 scale_by_tau_sq=False, ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(kind=kind, tau=tau, alpha=alpha, beta=beta, focus=focus,
                         scale_by_tau_sq=scale_by_tau_sq, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)

    def forward(self, student_logits: Tensor, ref_logits: Tensor, target: Tensor) -> Tensor:
        return F.focal_distillation(student_logits, ref_logits, target, **self.options)


class MPTLoss(_LossModule):
    """``mpt_loss`` as a module: ``loss(logits, target, old_logits=None, new_logits=None)``."""

    def __init__(self, *, new_class_bias=4.0, num_old_classes=None, class_bias=None, kind="kl",
                 tau=5.0, alpha=1.0, beta=5.0, focus="ref_correct", scale_by_tau_sq=False,
                 ce_weight=1.0, old_weight=None, new_weight=None, label_smoothing=0.0,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(new_class_bias=new_class_bias, num_old_classes=num_old_classes,
                         kind=kind, tau=tau, alpha=alpha, beta=beta, focus=focus,
                         scale_by_tau_sq=scale_by_tau_sq, ce_weight=ce_weight,
                         old_weight=old_weight, new_weight=new_weight,
                         label_smoothing=label_smoothing, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)
        self.register_buffer("class_bias", class_bias, persistent=False)

    def forward(self, logits: Tensor, target: Tensor, old_logits=None, new_logits=None) -> Tensor:
        return F.mpt_loss(logits, target, old_logits, new_logits, class_bias=self.class_bias,
                          **self.options)


class HillLoss(_LossModule):
    """``hill_loss`` as a module: ``loss(logits, targets)``."""

    def __init__(self, *, lamb=1.5, margin=1.0, gamma=2.0, reduction="sum", backend="auto"):
        super().__init__(lamb=lamb, margin=margin, gamma=gamma, reduction=reduction, backend=backend)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.hill_loss(logits, targets, **self.options)


class SPLCLoss(_LossModule):
    """``splc_loss`` as a module: ``loss(logits, targets, epoch)``."""

    def __init__(self, *, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, reduction="sum",
                 backend="auto"):
        super().__init__(tau=tau, change_epoch=change_epoch, margin=margin, gamma=gamma,
                         reduction=reduction, backend=backend)

    def forward(self, logits: Tensor, targets: Tensor, epoch: int) -> Tensor:
        return F.splc_loss(logits, targets, epoch=epoch, **self.options)
