"""Multi-label inputs at the edges of spec §4-5, shared by the reference's and each
backend's tests (a plain helper module; it holds no tests).

* ``infinite_logits(device)``: logits with ±inf where the element's loss is finite (a
  negative at -inf, a positive at +inf: loss 0, gradient 0) among finite ones. With
  γ = 0 the focal factor there is 0^0 = 1 (torch.pow(0., 0.)), never exp(0 · -inf).
* ``splc_threshold_cases()``: SPLC negatives next to the correction threshold σ(x) > τ,
  which is x > logit(τ) exactly (σ is increasing): the float32 neighbours of logit(0.6),
  τ = 0 (σ(x) > 0 for every finite x: every negative flips, even where σ(x) underflows
  to 0) and τ just below 1 (σ(x) > τ while σ(x) rounds to 1 in float32).
* ``corrected_exactly(x, tau)``: which negatives the spec corrects (float64 logit), and
  ``splc_negative_losses(x, tau, gamma)`` their losses by the spec, in float64. A wrong
  decision is far off (0.33 against 0.08 next to logit(0.6)); compare with rtol 1e-4,
  since a float32 kernel's loss of 3e-37 at x = 28 is 2e-5 off (exp of -56 amplifies
  the rounding of log(1 - p) = -28).
* ``float32_neighbours(value, count)``: the float32 values around ``value``.
* ``float_targets(positive, dtype, generator)``: float targets that are > 0.5 exactly
  where ``positive``, with -1 and NaN among the negatives.
"""

from __future__ import annotations

import math

import torch


def infinite_logits(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (4, 6) float32, positive (4, 6) bool): each row holds a negative at -inf and a
    positive at +inf, and finite logits of both labels."""
    inf = math.inf
    x = torch.tensor([[-inf, inf, 0.3, -1.2, 2.0, -0.4]], device=device).repeat(4, 1)
    positive = torch.tensor([[False, True, True, False, False, True]], device=device).repeat(4, 1)
    x[1:, 2:] = x[1:, 2:] * torch.arange(2, 5, device=device, dtype=x.dtype)[:, None]
    return x, positive


def float32_neighbours(value: float, count: int) -> torch.Tensor:
    """The float32 nearest ``value`` and the ``count`` float32 on each side of it, ascending."""
    near = torch.tensor(value, dtype=torch.float32)
    neighbours = [near]
    for direction in (math.inf, -math.inf):
        x = near
        for _ in range(count):
            x = torch.nextafter(x, torch.tensor(direction, dtype=torch.float32))
            neighbours.append(x)
    return torch.stack(sorted(neighbours, key=float))


def splc_threshold_cases() -> list[tuple[float, torch.Tensor]]:
    """[(τ, float32 logits of negatives, one row)]."""
    tau = 0.6
    return [
        (tau, float32_neighbours(math.log(tau) - math.log1p(-tau), 6)[None, :]),
        (0.0, torch.tensor([[-1e4, -200.0, -120.0, -3.0, 0.0, 5.0]])),
        (1.0 - 1e-9, torch.tensor([[19.0, 20.0, 25.0, 28.0]])),  # the losses stay float32-normal
        (1.0, torch.tensor([[1e4, 90.0, 0.0]])),
    ]


def corrected_exactly(x: torch.Tensor, tau: float) -> torch.Tensor:
    """σ(x) > τ for negatives, decided as x > logit(τ) in float64."""
    if tau <= 0.0:
        return x == x  # every finite x (NaN: never)
    if tau >= 1.0:
        return torch.zeros_like(x, dtype=torch.bool)
    return x.double() > math.log(tau) - math.log1p(-tau)


def splc_negative_losses(x: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """SPLC's loss of negatives at logits x from change_epoch on (spec §5, no margin on a
    negative): -(1 - p)^γ log p where corrected, else -p^γ log(1 - p); float64."""
    x64 = x.double()
    p = torch.sigmoid(x64)
    log_p, log_one_minus_p = torch.nn.functional.logsigmoid(x64), torch.nn.functional.logsigmoid(-x64)
    return torch.where(corrected_exactly(x, tau), -((1 - p) ** gamma) * log_p, -(p**gamma) * log_one_minus_p)


def float_targets(positive: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Targets of a float ``dtype`` that are > 0.5 exactly where ``positive``: soft values
    on both sides of 0.5 (0.5 itself is a negative), and -1 and NaN among the negatives
    (a kernel that compared a bfloat16's raw bits took both for positives)."""
    pick = torch.randint(0, 5, positive.shape, generator=generator, device=positive.device)
    high = torch.tensor([0.5625, 0.75, 1.0, 2.0, 1.0], device=positive.device)[pick]
    low = torch.tensor([0.0, 0.25, 0.5, -1.0, math.nan], device=positive.device)[pick]
    return torch.where(positive, high, low).to(dtype)
