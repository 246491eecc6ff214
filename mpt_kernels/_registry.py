"""The backend registry: which implementation computes a loss for given tensors.

A backend implements one or both loss families:

* ``"softmax"``: ``margin_cross_entropy``, ``focal_distillation`` and ``mpt_loss``, all
  as one function of a validated ``SoftmaxLossArgs``;
* ``"multilabel"``: ``hill_loss`` and ``splc_loss``, as one function of a validated
  ``MultiLabelLossArgs``.

Each backend says, for a family, a device and a dtype, either that it can run or why
not. ``backend="auto"`` takes the first backend that can, in the order of each
backend's ``auto_rank`` for that family and shape (lower first); a named backend that
cannot run raises with its reason, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

FAMILIES = ("softmax", "multilabel")

# (family, device, dtype) -> None when the backend can run, else the reason it cannot.
WhyNot = Callable[[str, torch.device, torch.dtype], Optional[str]]
# (family, logits) -> rank among the backends that can run; lower is chosen first.
AutoRank = Callable[[str, torch.Tensor], float]


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    families: dict = field(default_factory=dict)  # family -> callable(args) -> Tensor
    why_not: WhyNot = lambda family, device, dtype: None
    auto_rank: AutoRank = lambda family, logits: 100.0
    status: Callable[[], Optional[str]] = lambda: None  # None, or why it is unusable here

    def unavailable_reason(self, family: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if family not in self.families:
            return f"backend {self.name!r} does not implement the {family} losses"
        reason = self.status()
        if reason is not None:
            return reason
        return self.why_not(family, device, dtype)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def registered_backends() -> Sequence[Backend]:
    return tuple(_BACKENDS.values())


BACKEND_NAMES = ("auto", "reference", "triton", "cuda")


def select_backend(family: str, backend: str, logits: torch.Tensor) -> Backend:
    """The backend that computes ``family`` for ``logits``, or a ValueError saying why none can."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    device, dtype = logits.device, logits.dtype
    if backend != "auto":
        chosen = _BACKENDS.get(backend)
        if chosen is None:
            raise ValueError(f"backend {backend!r} is not available: it is not registered in this build")
        reason = chosen.unavailable_reason(family, device, dtype)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run here: {reason}")
        return chosen
    candidates = [
        b for b in _BACKENDS.values() if b.unavailable_reason(family, device, dtype) is None
    ]
    if not candidates:
        reasons = "; ".join(
            f"{b.name}: {b.unavailable_reason(family, device, dtype)}" for b in _BACKENDS.values()
        )
        raise ValueError(f"no backend can compute the {family} losses for {dtype} on {device} ({reasons})")
    # a plain loop, not min(key=...): torch.compile traces this function
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate.auto_rank(family, logits) < best.auto_rank(family, logits):
            best = candidate
    return best
