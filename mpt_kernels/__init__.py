"""mpt_kernels: fused loss kernels for Margin Preserving Training, Hill and SPLC.

Functional API (``mpt_loss``, ``margin_cross_entropy``, ``focal_distillation``,
``hill_loss``, ``splc_loss``), ``nn.Module`` wrappers, the pure-PyTorch reference
(``mpt_kernels.reference``) and metrics (``mpt_kernels.metrics``).
"""

from ._version import __version__
from .backends import load_backends as _load_backends
from .functional import focal_distillation, hill_loss, margin_cross_entropy, mpt_loss, splc_loss
from .modules import FocalDistillationLoss, HillLoss, MarginCrossEntropyLoss, MPTLoss, SPLCLoss

_load_backends()

__all__ = [
    "__version__",
    "margin_cross_entropy",
    "focal_distillation",
    "mpt_loss",
    "hill_loss",
    "splc_loss",
    "MarginCrossEntropyLoss",
    "FocalDistillationLoss",
    "MPTLoss",
    "HillLoss",
    "SPLCLoss",
]
