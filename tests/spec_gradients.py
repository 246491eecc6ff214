"""The closed-form gradients of LOSSES.md, written from the spec's formulas (no autograd).

A plain helper module for tests (it holds no tests). It is deliberately independent of
``mpt_kernels.reference``: the bias, the focus indicator and every derivative are
re-derived here from the spec, so that checking the reference's autograd against these
formulas tests both. Kernel tests use it as a second, formula-level oracle.

Softmax family (spec §1-3), for a validated ``SoftmaxLossArgs``:

* ``softmax_family_grad(args, grad_rows)``: dL/dz (N, C) for a per-row upstream
  gradient ``grad_rows`` (N,) (g_i of spec §3); ignored rows get 0 whatever g_i is.
* ``row_upstream(args, grad_output)``: the g_i that a reduction hands each row for the
  upstream gradient ``grad_output`` of the reduced loss ((N,) for "none", a scalar
  otherwise; "mean" divides by the number of counted rows, at least 1).
* ``softmax_family_input_grad(args, grad_output)``: the two composed.

Multi-label (spec §4-5), for a validated ``MultiLabelLossArgs``:

* ``multilabel_grad(args)``: the elementwise dℓ/dx (N, C).
* ``multilabel_input_grad(args, grad_output)``: dL/dx of the reduced loss.

The pieces (``cross_entropy_grad``, ``kl_grad``, ``logit_matching_grad``,
``focus_indicator``, ``hill_grad``, ``splc_grad``) are public too. Everything is computed
in float64 for float64 logits and in float32 otherwise, and returned in that dtype: cast
to the logits' dtype to compare with a kernel's gradient. Targets must be valid class
indices or ``ignore_index`` (checked here; the spec leaves the gradient of an
out-of-range row undefined).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mpt_kernels._validation import MultiLabelLossArgs, SoftmaxLossArgs

__all__ = [
    "compute_dtype",
    "class_offsets",
    "cross_entropy_grad",
    "focus_indicator",
    "focal_weight",
    "kl_grad",
    "logit_matching_grad",
    "distillation_grad",
    "counted_rows",
    "row_upstream",
    "softmax_family_grad",
    "softmax_family_input_grad",
    "hill_grad",
    "splc_grad",
    "multilabel_grad",
    "multilabel_input_grad",
    "separated_logits",
    "focal_case",
    "multilabel_case",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- §1 cross-entropy
def class_offsets(args: SoftmaxLossArgs, dtype: torch.dtype) -> Tensor:
    """Δ (length C): ``class_bias``, or b on the classes j >= C_old and 0 before them."""
    num_classes = args.logits.shape[1]
    if args.class_bias is not None:
        return args.class_bias.detach().to(dtype)
    j = torch.arange(num_classes, device=args.logits.device)
    return torch.where(j >= args.num_old_classes, args.new_class_bias, 0.0).to(dtype)


def cross_entropy_grad(z: Tensor, y: Tensor, delta: Optional[Tensor], eps: float) -> Tensor:
    """∂ce_i/∂z_ij = softmax(z̃_i)_j - (1-ε)[j = y_i] - ε/C, z̃ = z + Δ."""
    z_tilde = z if delta is None else z + delta
    grad = torch.softmax(z_tilde, dim=1)
    grad = grad - eps / z.shape[1]
    rows = torch.arange(z.shape[0], device=z.device)
    grad[rows, y] -= 1.0 - eps
    return grad


# --------------------------------------------------------------------------- §2 focal distillation
def focus_indicator(s: Tensor, r: Tensor, y: Tensor, focus: str) -> Tensor:
    """f_i (0/1, bool): s the student's first K columns, r the reference (N, K)."""
    num_ref_classes = r.shape[1]
    # torch.argmax breaks ties toward the lowest index, as the spec asks
    ref_correct = (y < num_ref_classes) & (r.argmax(dim=1) == y)
    student_wrong = s.argmax(dim=1) != y
    if focus == "ref_correct":
        return ref_correct
    if focus == "neg_flip":
        return ref_correct & student_wrong
    if focus == "student_wrong":
        return student_wrong
    if focus == "all":
        return torch.zeros_like(ref_correct)
    raise ValueError(f"unknown focus {focus!r}")


def focal_weight(s: Tensor, r: Tensor, y: Tensor, args: SoftmaxLossArgs) -> Tensor:
    """w_i = α + β f_i."""
    f = focus_indicator(s, r, y, args.focus)
    return args.alpha + args.beta * f.to(s.dtype)


def kl_grad(s: Tensor, r: Tensor, tau: float, scale_by_tau_sq: bool) -> Tensor:
    """∂d_i/∂s_ij = (S/τ)(q_j - p_j), p = softmax(r/τ), q = softmax(s/τ)."""
    scale = tau * tau if scale_by_tau_sq else 1.0
    p = torch.softmax(r / tau, dim=1)
    q = torch.softmax(s / tau, dim=1)
    return (scale / tau) * (q - p)


def logit_matching_grad(s: Tensor, r: Tensor) -> Tensor:
    """∂d_i/∂s_ij = (s_ij - r_ij)/K."""
    return (s - r) / s.shape[1]


def distillation_grad(s: Tensor, r: Tensor, y: Tensor, args: SoftmaxLossArgs) -> Tensor:
    """w_i ∂d_i/∂s_ij for one source (N, K)."""
    if args.kind == "kl":
        grad_d = kl_grad(s, r, args.tau, args.scale_by_tau_sq)
    else:
        grad_d = logit_matching_grad(s, r)
    return focal_weight(s, r, y, args)[:, None] * grad_d


# --------------------------------------------------------------------------- §3 MPT, reductions
def counted_rows(args: SoftmaxLossArgs) -> Tensor:
    """Rows whose target is not ignore_index (bool, (N,))."""
    return args.target != args.ignore_index


def _class_targets(args: SoftmaxLossArgs) -> Tensor:
    counted = counted_rows(args)
    num_classes = args.logits.shape[1]
    bad = counted & ((args.target < 0) | (args.target >= num_classes))
    if bool(bad.any()):
        raise ValueError("spec_gradients needs targets in [0, C) or ignore_index")
    return torch.where(counted, args.target, 0).long()  # ignored rows: any class, zeroed below


def row_upstream(args: SoftmaxLossArgs, grad_output: Tensor) -> Tensor:
    """g_i (N,) that the reduction passes to row i for the upstream ``grad_output``."""
    dtype = compute_dtype(args.logits.dtype)
    counted = counted_rows(args)
    grad_output = grad_output.to(dtype)
    if args.reduction == "none":
        g = grad_output.expand(counted.shape)
    elif args.reduction == "sum":
        g = grad_output.reshape(()).expand(counted.shape)
    else:  # "mean": over the counted rows, and 0 (not NaN) when there are none
        g = grad_output.reshape(()) / counted.sum().clamp(min=1).to(dtype)
        g = g.expand(counted.shape)
    return torch.where(counted, g, 0.0)


def softmax_family_grad(args: SoftmaxLossArgs, grad_rows: Tensor) -> Tensor:
    """dL/dz (N, C) of spec §3 for the per-row upstream gradient ``grad_rows`` (N,).

    g_i · [λ_ce (softmax(z̃_i)_j - (1-ε)[j=y_i] - ε/C)
           + λ_old w^old_i [j < C_old] ∂d^old_i/∂s_ij + λ_new w^new_i ∂d^new_i/∂z_ij],
    0 on ignored rows. Terms with weight 0 (or an absent source) are left out entirely.
    """
    dtype = compute_dtype(args.logits.dtype)
    z = args.logits.detach().to(dtype)
    y = _class_targets(args)
    grad = torch.zeros_like(z)
    if args.ce_weight != 0.0:
        grad += args.ce_weight * cross_entropy_grad(
            z, y, class_offsets(args, dtype), args.label_smoothing
        )
    if args.old_logits is not None and args.old_weight != 0.0:
        r_old = args.old_logits.detach().to(dtype)
        k = r_old.shape[1]
        grad[:, :k] += args.old_weight * distillation_grad(z[:, :k], r_old, y, args)
    if args.new_logits is not None and args.new_weight != 0.0:
        r_new = args.new_logits.detach().to(dtype)
        grad += args.new_weight * distillation_grad(z, r_new, y, args)
    g = torch.where(counted_rows(args), grad_rows.to(dtype), 0.0)
    # where, not a product: an ignored row's gradient is 0 even if its terms are not finite
    return torch.where(counted_rows(args)[:, None], g[:, None] * grad, 0.0)


def softmax_family_input_grad(args: SoftmaxLossArgs, grad_output: Tensor) -> Tensor:
    """dL/dz of the reduced loss for its upstream gradient ``grad_output``."""
    return softmax_family_grad(args, row_upstream(args, grad_output))


# --------------------------------------------------------------------------- §4-5 multi-label
def hill_grad(x: Tensor, positive: Tensor, lamb: float, margin: float, gamma: float) -> Tensor:
    """Spec §4: positive (1-q)^γ (γ q log q - (1-q)), q = σ(x-m);
    negative (2λp - 3p²) p(1-p), p = σ(x)."""
    shifted = x - margin
    q = torch.sigmoid(shifted)
    one_minus_q = torch.sigmoid(-shifted)
    log_q = F.logsigmoid(shifted)  # a log-sigmoid, never log(σ): finite at large |x|
    focal = torch.exp(gamma * F.logsigmoid(-shifted))  # (1-q)^γ, also where 1-q underflows
    positive_grad = focal * (gamma * q * log_q - one_minus_q)
    p = torch.sigmoid(x)
    negative_grad = (2 * lamb * p - 3 * p * p) * p * torch.sigmoid(-x)
    return torch.where(positive, positive_grad, negative_grad)


def splc_grad(
    x: Tensor, positive: Tensor, epoch: int, tau: float, change_epoch: int, margin: float,
    gamma: float,
) -> Tensor:
    """Spec §5: x' = x - m on positives; t' = 1 where t is positive or (epoch >= change_epoch
    and σ(x') > τ); t' = 1: (1-p)^γ (γ p log p - (1-p)); t' = 0: p^γ (p - γ(1-p) log(1-p))."""
    shifted = torch.where(positive, x - margin, x)
    p = torch.sigmoid(shifted)
    one_minus_p = torch.sigmoid(-shifted)
    log_p = F.logsigmoid(shifted)
    log_one_minus_p = F.logsigmoid(-shifted)
    corrected = positive | ((epoch >= change_epoch) & (p > tau))
    positive_grad = torch.exp(gamma * log_one_minus_p) * (gamma * p * log_p - one_minus_p)
    negative_grad = torch.exp(gamma * log_p) * (p - gamma * one_minus_p * log_one_minus_p)
    return torch.where(corrected, positive_grad, negative_grad)


def multilabel_grad(args: MultiLabelLossArgs) -> Tensor:
    """The elementwise dℓ/dx (N, C) of Hill or SPLC."""
    x = args.logits.detach().to(compute_dtype(args.logits.dtype))
    positive = args.targets > 0.5
    if args.loss == "hill":
        return hill_grad(x, positive, args.lamb, args.margin, args.gamma)
    return splc_grad(
        x, positive, args.epoch, args.tau, args.change_epoch, args.margin, args.gamma
    )


def multilabel_input_grad(args: MultiLabelLossArgs, grad_output: Tensor) -> Tensor:
    """dL/dx of the reduced loss ("sum", "mean" over N·C, or "none") for ``grad_output``."""
    grad = multilabel_grad(args)
    grad_output = grad_output.to(grad.dtype)
    if args.reduction == "mean":
        grad_output = grad_output / max(grad.numel(), 1)
    return grad_output * grad


# --------------------------------------------------------------------------- test inputs
# Random inputs whose hard decisions (argmax, the SPLC threshold) sit well away from a
# tie, so that a finite-difference step or a half-precision rounding cannot flip them,
# and whose targets cover every focus case. Shared by the reference and kernel tests.
ARGMAX_SPACING = 0.75  # any two logits of a row differ by at least half of this


def separated_logits(n: int, c: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    """(n, c) logits: each row a shuffled grid of spacing ARGMAX_SPACING plus noise below
    half the spacing, shifted by a random offset; no two entries of a row are closer than
    ARGMAX_SPACING / 2, in any subset of columns."""
    ranks = torch.rand(n, c, generator=generator).argsort(dim=1)  # a permutation per row
    noise = torch.rand(n, c, generator=generator, dtype=torch.float64) * (ARGMAX_SPACING / 2)
    offset = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 4 - 2
    return (ranks * ARGMAX_SPACING + noise + offset - (c - 1) * ARGMAX_SPACING / 2).to(dtype)


def _put_argmax(row: Tensor, cols: int, want: int, at_want: bool) -> None:
    """Swap entries of row[:cols] so that its argmax is (or is not) column ``want``."""
    top = int(row[:cols].argmax())
    if at_want and top != want:
        row[[top, want]] = row[[want, top]]
    elif not at_want and top == want:
        other = (want + 1) % cols
        row[[top, other]] = row[[other, top]]


def focal_case(
    n: int, c: int, k: int, generator: torch.Generator, *, dtype=torch.float64,
    ignore_index: int = -100, ignored: bool = True, target_dtype=torch.int64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits (n, c), target (n,), old_logits (n, k), new_logits (n, c)).

    Rows cycle through: reference right & student right, right & wrong, wrong & right,
    wrong & wrong (against the old reference, the student's first k columns), then an
    ignored row (if ``ignored``) and a target >= k (if k < c). The new reference is
    right on every other row. Needs k >= 2.
    """
    logits = separated_logits(n, c, generator)
    old = separated_logits(n, k, generator)
    new = separated_logits(n, c, generator)
    kinds = [(True, True), (True, False), (False, True), (False, False)]
    if ignored:
        kinds.append("ignored")
    if k < c:
        kinds.append("beyond_k")
    target = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "ignored":
            target[i] = ignore_index
            continue
        if kind == "beyond_k":
            target[i] = int(torch.randint(k, c, (1,), generator=generator))
        else:
            target[i] = int(torch.randint(0, k, (1,), generator=generator))
            ref_right, student_right = kind
            _put_argmax(old[i], k, int(target[i]), ref_right)
            _put_argmax(logits[i], k, int(target[i]), student_right)
        _put_argmax(new[i], c, int(target[i]), i % 2 == 0)
    return logits.to(dtype), target.to(target_dtype), old.to(dtype), new.to(dtype)


def multilabel_case(
    n: int, c: int, generator: torch.Generator, *, tau: float = 0.6, dtype=torch.float64,
) -> tuple[Tensor, Tensor]:
    """(logits (n, c), positive (n, c) bool): logits ~ 2·N(0, 1), moved at least 0.1 away
    from logit(τ), the SPLC threshold of a negative, so no finite-difference step or
    rounding crosses it; about 40% positives."""
    x = away_from_splc_threshold(torch.randn(n, c, generator=generator, dtype=torch.float64) * 2, tau)
    positive = torch.rand(n, c, generator=generator) < 0.4
    return x.to(dtype), positive


def away_from_splc_threshold(x: Tensor, tau: float) -> Tensor:
    """``x`` with every value within 0.1 of logit(τ) moved to 0.2 from it, on its own side.
    SPLC's correction of a negative is the hard decision σ(x) > τ: two implementations
    whose σ differ by an ulp (or a finite-difference step) may land on different sides."""
    threshold = torch.logit(torch.tensor(tau, dtype=torch.float64)).item()
    side = torch.where(x >= threshold, 1.0, -1.0).to(x.dtype)
    return torch.where((x - threshold).abs() < 0.1, threshold + 0.2 * side, x)
