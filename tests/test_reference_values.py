"""The reference pinned to values worked out by hand, and the spec's edge cases.

Inputs are chosen so the arithmetic is exact in fractions: logits such as 0, log 2 and
log 3 give softmax values like 1/4, 1/2, 1/4, and teacher logits are multiplied by τ so
that softmax(r/τ) is just as simple. Every expected value is the hand arithmetic written
beside it (evaluated with the math module), never the output of the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mpt_kernels import reference as R

L2, L3, L5 = math.log(2), math.log(3), math.log(5)
FOCUS_MODES = ("ref_correct", "neg_flip", "student_wrong", "all")
SOFTMAX_REDUCTIONS = ("mean", "sum", "none")


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def assert_value(actual: torch.Tensor, expected, *, tol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol)


def reduce_by_hand(rows, reduction, counted=None):
    """mean over counted rows / sum / none, of per-row values worked out by hand."""
    counted = len(rows) if counted is None else counted
    if reduction == "none":
        return rows
    return sum(rows) / counted if reduction == "mean" else sum(rows)


# =========================================================================== §1 cross-entropy
# Row 0: z = [0, log 2, 0] -> e^z = [1, 2, 1], Σ = 4, softmax [1/4, 1/2, 1/4].
# Row 1: z = [log 3, 0, 0] -> e^z = [3, 1, 1], Σ = 5, softmax [3/5, 1/5, 1/5].
CE_LOGITS = [[0.0, L2, 0.0], [L3, 0.0, 0.0]]


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_cross_entropy(reduction):
    z = t64(CE_LOGITS + [[5.0, -1.0, 2.0]])  # row 2 is ignored
    y = torch.tensor([1, 2, -100])
    rows = [
        math.log(4) - L2,  # row 0, y = 1: LSE - z_1 = log 4 - log 2 = log 2
        L5 - 0.0,  # row 1, y = 2: log 5 - 0 = log 5
        0.0,  # ignored
    ]
    # mean: (log 2 + log 5) / 2 over the 2 counted rows; sum: log 10
    assert_value(R.margin_cross_entropy(z, y, reduction=reduction),
                 reduce_by_hand(rows, reduction, counted=2))


def test_cross_entropy_gradient_by_hand():
    z = t64(CE_LOGITS + [[5.0, -1.0, 2.0]]).requires_grad_(True)
    R.margin_cross_entropy(z, torch.tensor([1, 2, -100])).backward()
    # (softmax - onehot) / 2 counted rows; the ignored row gets nothing
    expected = [
        [(1 / 4) / 2, (1 / 2 - 1) / 2, (1 / 4) / 2],
        [(3 / 5) / 2, (1 / 5) / 2, (1 / 5 - 1) / 2],
        [0.0, 0.0, 0.0],
    ]
    assert_value(z.grad, expected)


def test_cross_entropy_custom_ignore_index():
    z = t64(CE_LOGITS + [[5.0, -1.0, 2.0]])
    y = torch.tensor([1, 2, 1])  # ignore_index = 1: rows 0 and 2 are ignored
    assert_value(R.margin_cross_entropy(z, y, ignore_index=1, reduction="none"), [0.0, L5, 0.0])
    assert_value(R.margin_cross_entropy(z, y, ignore_index=1), L5)  # mean over 1 row


@pytest.mark.parametrize("bias_dtype", (torch.float64, torch.float32), ids=str)
def test_cross_entropy_class_bias(bias_dtype):
    z = t64([[0.0, 0.0, 0.0], [L2, 0.0, 0.0]])
    bias = torch.tensor([0.0, L2, L5], dtype=bias_dtype)
    y = torch.tensor([0, 2])
    expected = [
        math.log(8) - 0.0,  # z̃ = [0, log 2, log 5]: e = [1, 2, 5], Σ = 8; y = 0: log 8
        math.log(9) - L5,  # z̃ = [log 2, log 2, log 5]: e = [2, 2, 5], Σ = 9; y = 2: log 9/5
    ]
    tol = 1e-12 if bias_dtype == torch.float64 else 1e-6  # a float32 bias is rounded
    assert_value(R.margin_cross_entropy(z, y, class_bias=bias, reduction="none"), expected,
                 tol=tol)


def test_cross_entropy_new_class_bias():
    # b = log 3 on classes j >= C_old = 2
    z = t64([[0.0, 0.0, 0.0], [L2, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    expected = [
        L5 - 0.0,  # z̃ = [0, 0, log 3]: e = [1, 1, 3], Σ = 5; y = 0: log 5
        math.log(6) - L3,  # z̃ = [log 2, 0, log 3]: e = [2, 1, 3], Σ = 6; y = 2: log 6 - log 3
    ]
    got = R.margin_cross_entropy(z, y, num_old_classes=2, new_class_bias=L3, reduction="none")
    assert_value(got, expected)
    # the same through mpt_loss without teachers
    got = R.mpt_loss(z, y, num_old_classes=2, new_class_bias=L3, reduction="none")
    assert_value(got, expected)
    # C_old = C: no class is new, so the bias changes nothing (plain CE: log 3, log 4 - 0)
    got = R.margin_cross_entropy(z, y, num_old_classes=3, new_class_bias=L3, reduction="none")
    assert_value(got, [L3, math.log(4)])


def test_cross_entropy_label_smoothing():
    z = t64(CE_LOGITS)
    y = torch.tensor([1, 2])
    eps = 0.3  # (1 - ε) = 0.7, ε / C = 0.1
    expected = [
        # 0.7 (log 4 - log 2) + 0.1 [(log 4 - 0) + (log 4 - log 2) + (log 4 - 0)]
        # = 0.7 log 2 + 0.1 · 5 log 2 = 1.2 log 2
        1.2 * L2,
        # 0.7 (log 5 - 0) + 0.1 [(log 5 - log 3) + log 5 + log 5] = log 5 - 0.1 log 3
        L5 - 0.1 * L3,
    ]
    assert_value(R.margin_cross_entropy(z, y, label_smoothing=eps, reduction="none"), expected)


def test_cross_entropy_label_smoothing_with_new_class_bias():
    # z = 0, b = log 3 on class 2: z̃ = [0, 0, log 3], LSE = log 5, y = 0, ε = 0.3
    # 0.7 log 5 + 0.1 [log 5 + log 5 + (log 5 - log 3)] = log 5 - 0.1 log 3
    z = t64([[0.0, 0.0, 0.0]])
    got = R.margin_cross_entropy(z, torch.tensor([0]), num_old_classes=2, new_class_bias=L3,
                                 label_smoothing=0.3)
    assert_value(got, L5 - 0.1 * L3)


# =========================================================================== §2 focal distillation
# K = C = 3, τ = 2; teacher and student logits are τ · (simple logs).
# Row A: r/τ = [0, log 2, 0] -> p = [1/4, 1/2, 1/4] (argmax 1)
#        s/τ = [log 2, 0, 0] -> q = [1/2, 1/4, 1/4] (argmax 0); y = 1
#        KL = 1/4 log(1/2) + 1/2 log 2 + 1/4 log 1 = 1/4 log 2
# Row B: r/τ = [0, log 2, 0] -> p = [1/4, 1/2, 1/4] (argmax 1)
#        s/τ = [0, log 3, 0] -> q = [1/5, 3/5, 1/5] (argmax 1); y = 1
#        KL = 2 · 1/4 log(5/4) + 1/2 log(5/6) = 1/2 log(25/24)
# Row C: r/τ = [log 2, 0, 0] -> p = [1/2, 1/4, 1/4] (argmax 0)
#        s/τ = [0, 0, log 3] -> q = [1/5, 1/5, 3/5] (argmax 2); y = 1
#        KL = 1/2 log(5/2) + 1/4 log(5/4) + 1/4 log(5/12) = log 5 - 3/2 log 2 - 1/4 log 3
# f by focus:   ref_correct [1, 1, 0]  neg_flip [1, 0, 0]  student_wrong [1, 0, 1]  all [0, 0, 0]
TAU = 2.0
FD_TEACHER = [[0.0, L2, 0.0], [0.0, L2, 0.0], [L2, 0.0, 0.0]]
FD_STUDENT = [[L2, 0.0, 0.0], [0.0, L3, 0.0], [0.0, 0.0, L3]]
FD_TARGET = [1, 1, 1]
FD_KL = [L2 / 4, math.log(25 / 24) / 2, L5 - 1.5 * L2 - L3 / 4]
FD_FOCUS = {
    "ref_correct": [1, 1, 0],
    "neg_flip": [1, 0, 0],
    "student_wrong": [1, 0, 1],
    "all": [0, 0, 0],
}


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("scale_by_tau_sq", (False, True))
@pytest.mark.parametrize("focus", FOCUS_MODES)
def test_focal_distillation_kl(focus, scale_by_tau_sq, reduction):
    z = TAU * t64(FD_STUDENT)
    r = TAU * t64(FD_TEACHER)
    y = torch.tensor(FD_TARGET)
    scale = TAU**2 if scale_by_tau_sq else 1.0  # S = τ² = 4 or 1
    # w_i = α + β f_i with the defaults α = 1, β = 5: 6 where f = 1, else 1
    rows = [scale * (1 + 5 * f) * d for f, d in zip(FD_FOCUS[focus], FD_KL)]
    got = R.focal_distillation(z, r, y, tau=TAU, focus=focus, scale_by_tau_sq=scale_by_tau_sq,
                               reduction=reduction)
    assert_value(got, reduce_by_hand(rows, reduction))


def test_focal_distillation_kl_gradient_by_hand():
    # row A alone, α = 1, β = 5, f = 1 (ref correct): ∂/∂s = 6 · (1/τ)(q - p)
    # = 6 · 1/2 · ([1/2, 1/4, 1/4] - [1/4, 1/2, 1/4]) = [3/4, -3/4, 0]
    z = (TAU * t64(FD_STUDENT[:1])).requires_grad_(True)
    R.focal_distillation(z, TAU * t64(FD_TEACHER[:1]), torch.tensor([1]), tau=TAU).backward()
    assert_value(z.grad, [[0.75, -0.75, 0.0]])


# K = 2 < C = 3, τ = 2, α = 0.5, β = 2; the student is restricted to its first 2 columns.
# Row 1: r/τ = [0, log 3] -> p = [1/4, 3/4] (argmax 1); s/τ = [log 2, 0] -> q = [2/3, 1/3]
#        (argmax 0); z_2 = 0; y = 1.  KL = 1/4 log(3/8) + 3/4 log(9/4)
# Row 2: r/τ = [log 3, 0] -> p = [3/4, 1/4] (argmax 0); s/τ = [log 2, 0] -> q = [2/3, 1/3]
#        (argmax 0 over the K columns; over all C it would be column 2, z_2 = 10τ); y = 0
#        KL = 3/4 log(9/8) + 1/4 log(3/4)
# Row 3: y = 2 >= K, so f = 0 for ref_correct and neg_flip, and the student is always wrong.
#        r/τ = [log 2, 0] -> p = [2/3, 1/3]; s/τ = [0, log 3] -> q = [1/4, 3/4]
#        KL = 2/3 log(8/3) + 1/3 log(4/9)
FD_NARROW_TEACHER = [[0.0, L3], [L3, 0.0], [L2, 0.0]]
FD_NARROW_STUDENT = [[L2, 0.0, 0.0], [L2, 0.0, 10.0], [0.0, L3, 0.0]]
FD_NARROW_TARGET = [1, 0, 2]
FD_NARROW_KL = [
    math.log(3 / 8) / 4 + 0.75 * math.log(9 / 4),
    0.75 * math.log(9 / 8) + math.log(3 / 4) / 4,
    (2 / 3) * math.log(8 / 3) + math.log(4 / 9) / 3,
]
FD_NARROW_FOCUS = {
    "ref_correct": [1, 1, 0],
    "neg_flip": [1, 0, 0],
    "student_wrong": [1, 0, 1],
    "all": [0, 0, 0],
}


@pytest.mark.parametrize("focus", FOCUS_MODES)
def test_focal_distillation_kl_narrow_reference(focus):
    z = TAU * t64(FD_NARROW_STUDENT)
    r = TAU * t64(FD_NARROW_TEACHER)
    rows = [(0.5 + 2.0 * f) * d for f, d in zip(FD_NARROW_FOCUS[focus], FD_NARROW_KL)]
    got = R.focal_distillation(z, r, torch.tensor(FD_NARROW_TARGET), tau=TAU, alpha=0.5,
                               beta=2.0, focus=focus, reduction="none")
    assert_value(got, rows)


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_focal_distillation_lm(reduction):
    # Row 0: r = [0, 2, 0] (argmax 1), s = [1, 1, 2], y = 1: s - r = [1, -1, 2]
    #        d = (1 + 1 + 4) / (2·3) = 1; ref correct -> w = 1 + 5 = 6
    # Row 1: r = [1, 0, 0] (argmax 0), s = [1, 3, 0], y = 2: s - r = [0, 3, 0]
    #        d = 9 / 6 = 3/2; ref wrong -> w = 1
    # Row 2: ignored
    z = t64([[1.0, 1.0, 2.0], [1.0, 3.0, 0.0], [7.0, 7.0, 7.0]])
    r = t64([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([1, 2, -100])
    rows = [6 * 1.0, 1 * 1.5, 0.0]
    got = R.focal_distillation(z, r, y, kind="lm", reduction=reduction)
    assert_value(got, reduce_by_hand(rows, reduction, counted=2))


def test_focal_distillation_lm_narrow_reference():
    # K = 2: s = [1, 3] (z_2 = 5 is not seen), r = [1, 0] (argmax 0), y = 1 -> f = 0, w = 1
    # d = ((1-1)² + (3-0)²) / (2·2) = 9/4; focus "all" with α = 2: 2 · 9/4
    z = t64([[1.0, 3.0, 5.0]])
    got = R.focal_distillation(z, t64([[1.0, 0.0]]), torch.tensor([1]), kind="lm", alpha=2.0,
                               focus="all")
    assert_value(got, 2 * 9 / 4)


# =========================================================================== §3 MPT
# C = 3, C_old = 2 (from old_logits), τ = 2, b = log 2 on class 2, α = 1, β = 5.
# Row 0: z = [0, 0, 0], y = 0.
#   CE:  z̃ = [0, 0, log 2]: e = [1, 1, 2], Σ = 4 -> log 4
#   old: s/τ = [0, 0] -> q = [1/2, 1/2]; r_old/τ = [0, log 3] -> p = [1/4, 3/4], argmax 1 != 0:
#        w = 1; KL = 1/4 log(1/2) + 3/4 log(3/2) = 3/4 log 3 - log 2
#   new: s/τ = [0, 0, 0] (no bias!) -> q = 1/3 each; r_new/τ = [log 2, 0, 0] -> p = [1/2, 1/4,
#        1/4], argmax 0 = y: w = 6; KL = 1/2 log(3/2) + 2 · 1/4 log(3/4) = 1/2 log(9/8)
# Row 1: z = [2 log 2, 0, 0] (= τ [log 2, 0, 0]), y = 2.
#   CE:  z̃ = [2 log 2, 0, log 2]: e = [4, 1, 2], Σ = 7 -> log 7 - log 2
#   old: s/τ = [log 2, 0] -> q = [2/3, 1/3]; r_old/τ = [0, 0] -> p = [1/2, 1/2]; y = 2 >= K:
#        w = 1; KL = 1/2 log(3/4) + 1/2 log(3/2) = 1/2 log(9/8)
#   new: s/τ = [log 2, 0, 0] -> q = [1/2, 1/4, 1/4]; r_new/τ = [0, 0, log 2] -> p = [1/4, 1/4,
#        1/2], argmax 2 = y: w = 6; KL = 1/4 log(1/2) + 1/4 log 1 + 1/2 log 2 = 1/4 log 2
MPT_Z = [[0.0, 0.0, 0.0], [2 * L2, 0.0, 0.0]]
MPT_OLD = [[0.0, L3], [0.0, 0.0]]
MPT_NEW = [[L2, 0.0, 0.0], [0.0, 0.0, L2]]
MPT_Y = [0, 2]
MPT_CE = [math.log(4), math.log(7) - L2]
MPT_OLD_TERM = [1 * (0.75 * L3 - L2), 1 * (math.log(9 / 8) / 2)]  # w_old · d_old
MPT_NEW_TERM = [6 * (math.log(9 / 8) / 2), 6 * (L2 / 4)]  # w_new · d_new


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("sources", ("both", "old", "new", "none"))
def test_mpt_loss_kl(sources, reduction):
    use_old, use_new = sources in ("both", "old"), sources in ("both", "new")
    rows = [
        MPT_CE[i] + use_old * MPT_OLD_TERM[i] + use_new * MPT_NEW_TERM[i]  # λ = 1 for "kl"
        for i in range(2)
    ]
    got = R.mpt_loss(
        t64(MPT_Z), torch.tensor(MPT_Y), TAU * t64(MPT_OLD) if use_old else None,
        TAU * t64(MPT_NEW) if use_new else None, num_old_classes=2, new_class_bias=L2,
        tau=TAU, reduction=reduction,
    )
    assert_value(got, reduce_by_hand(rows, reduction))


def test_mpt_loss_kl_weights():
    # λ_ce = 0.5, λ_old = 2, λ_new = 0.25, summed over both rows
    expected = sum(0.5 * MPT_CE[i] + 2 * MPT_OLD_TERM[i] + 0.25 * MPT_NEW_TERM[i] for i in range(2))
    got = R.mpt_loss(t64(MPT_Z), torch.tensor(MPT_Y), TAU * t64(MPT_OLD), TAU * t64(MPT_NEW),
                     new_class_bias=L2, tau=TAU, ce_weight=0.5, old_weight=2.0, new_weight=0.25,
                     reduction="sum")
    assert_value(got, expected)


def test_mpt_loss_class_bias_replaces_new_class_bias():
    # class_bias = [log 2, 0, 0] instead of b = 4 on class 2; row 0: z̃ = [log 2, 0, 0]:
    # e = [2, 1, 1], Σ = 4, y = 0 -> log 4 - log 2 = log 2; the distillation terms as above
    got = R.mpt_loss(t64(MPT_Z[:1]), torch.tensor(MPT_Y[:1]), TAU * t64(MPT_OLD[:1]),
                     TAU * t64(MPT_NEW[:1]), class_bias=t64([L2, 0.0, 0.0]), new_class_bias=4.0,
                     tau=TAU)
    assert_value(got, L2 + MPT_OLD_TERM[0] + MPT_NEW_TERM[0])


def test_mpt_loss_lm():
    # z = [0, 0, 0], y = 0, b = log 2 on class 2 (C_old = 2): CE = log 4 (as above)
    # old: r = [1, 3] (argmax 1 != 0, w = 1): d = ((0-1)² + (0-3)²) / (2·2) = 5/2
    # new: r = [2, 0, 0] (argmax 0 = y, w = 6): d = (2² + 0 + 0) / (2·3) = 2/3
    # λ_old = λ_new = 0.4 for "lm": log 4 + 0.4 · 5/2 + 0.4 · 6 · 2/3 = log 4 + 1 + 1.6
    got = R.mpt_loss(t64([[0.0, 0.0, 0.0]]), torch.tensor([0]), t64([[1.0, 3.0]]),
                     t64([[2.0, 0.0, 0.0]]), new_class_bias=L2, kind="lm")
    assert_value(got, math.log(4) + 1.0 + 1.6)


# =========================================================================== §4 Hill
# Defaults λ = 1.5, m = 1, γ = 2.
# positive ℓ = -(1-q)² log q, q = σ(x - 1); negative ℓ = (1.5 - p) p², p = σ(x)
HILL_X = [[1 + L3, 0.0, L3], [1.0, -L3, 1 - L3]]
HILL_T = [[1, 0, 0], [1, 0, 1]]
HILL_ELEMENTS = [
    [
        (1 / 16) * math.log(4 / 3),  # pos, q = σ(log 3) = 3/4: -(1/4)² log(3/4)
        1 / 4,  # neg, p = 1/2: (1.5 - 0.5) · 1/4
        27 / 64,  # neg, p = 3/4: (1.5 - 0.75) · 9/16
    ],
    [
        (1 / 4) * L2,  # pos, q = σ(0) = 1/2: -(1/2)² log(1/2)
        5 / 64,  # neg, p = 1/4: (1.5 - 0.25) · 1/16
        (9 / 8) * L2,  # pos, q = σ(-log 3) = 1/4: -(3/4)² log(1/4) = 9/16 · 2 log 2
    ],
]
MULTILABEL_TARGET_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16,
                            torch.float32, torch.float64)


def reduce_elements(elements, reduction):
    flat = [v for row in elements for v in row]
    if reduction == "none":
        return elements
    return sum(flat) / len(flat) if reduction == "mean" else sum(flat)


@pytest.mark.parametrize("target_dtype", MULTILABEL_TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
def test_hill_loss(reduction, target_dtype):
    got = R.hill_loss(t64(HILL_X), torch.tensor(HILL_T).to(target_dtype), reduction=reduction)
    assert_value(got, reduce_elements(HILL_ELEMENTS, reduction))


def test_hill_loss_parameters():
    # λ = 2, m = 0, γ = 1
    x = t64([[L3, L3], [-L3, 0.0]])
    targets = torch.tensor([[True, False], [True, False]])
    expected = [
        [
            (1 / 4) * math.log(4 / 3),  # pos, q = σ(log 3) = 3/4: -(1/4) log(3/4)
            45 / 64,  # neg, p = 3/4: (2 - 3/4) · 9/16
        ],
        [
            (3 / 2) * L2,  # pos, q = 1/4: -(3/4) log(1/4)
            3 / 8,  # neg, p = 1/2: (2 - 1/2) · 1/4
        ],
    ]
    got = R.hill_loss(x, targets, lamb=2.0, margin=0.0, gamma=1.0, reduction="none")
    assert_value(got, expected)


def test_hill_soft_targets_threshold():
    # positive iff t > 0.5: t = 0.5 is a negative (p = 1/2: (1.5 - 1/2) · 1/4 = 1/4), t = 0.6 a
    # positive (q = σ(-1) = 1/(1+e), 1 - q = e/(1+e): ℓ = (e/(1+e))² log(1+e))
    e = math.e
    got = R.hill_loss(t64([[0.0, 0.0]]), t64([[0.5, 0.6]]), reduction="none")
    assert_value(got, [[1 / 4, (e / (1 + e)) ** 2 * math.log(1 + e)]])


def test_hill_gradient_by_hand():
    # pos, x = 1 + log 3, q = 3/4: (1-q)² (2 q log q - (1-q)) = 1/16 (3/2 log(3/4) - 1/4)
    # neg, x = 0, p = 1/2: (2λp - 3p²) p(1-p) = (1.5 - 3/4) · 1/4 = 3/16
    x = t64([[1 + L3, 0.0]]).requires_grad_(True)
    R.hill_loss(x, torch.tensor([[True, False]])).backward()
    assert_value(x.grad, [[(1.5 * math.log(3 / 4) - 0.25) / 16, 3 / 16]])


# =========================================================================== §5 SPLC
# Defaults τ = 0.6, m = 1, γ = 2, change_epoch = 1.
# positive: p = σ(x - 1), ℓ = -(1-p)² log p; negative: p = σ(x), ℓ = -p² log(1-p), unless
# epoch >= change_epoch and p > 0.6: then it is a positive WITHOUT margin, ℓ = -(1-p)² log p.
SPLC_X = [[1 + L3, L3, 0.0], [1 - L3, -L3, L3]]
SPLC_T = [[1, 0, 0], [1, 0, 0]]
SPLC_BEFORE = [  # epoch < change_epoch: no correction
    [
        (1 / 16) * math.log(4 / 3),  # pos, p = σ(log 3) = 3/4: -(1/4)² log(3/4)
        (9 / 8) * L2,  # neg, p = 3/4: -(3/4)² log(1/4)
        (1 / 4) * L2,  # neg, p = 1/2: -(1/2)² log(1/2)
    ],
    [
        (9 / 8) * L2,  # pos, p = σ(-log 3) = 1/4: -(3/4)² log(1/4)
        (1 / 16) * math.log(4 / 3),  # neg, p = 1/4: -(1/4)² log(3/4)
        (9 / 8) * L2,  # neg, p = 3/4: -(3/4)² log(1/4)
    ],
]
SPLC_AFTER = [  # epoch >= change_epoch: the negatives with p = 3/4 > 0.6 flip
    [SPLC_BEFORE[0][0], (1 / 16) * math.log(4 / 3), SPLC_BEFORE[0][2]],  # -(1/4)² log(3/4)
    [SPLC_BEFORE[1][0], SPLC_BEFORE[1][1], (1 / 16) * math.log(4 / 3)],
]


@pytest.mark.parametrize("target_dtype", MULTILABEL_TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("epoch", (0, 1, 7))
def test_splc_loss(epoch, reduction, target_dtype):
    elements = SPLC_AFTER if epoch >= 1 else SPLC_BEFORE
    got = R.splc_loss(t64(SPLC_X), torch.tensor(SPLC_T).to(target_dtype), epoch=epoch,
                      reduction=reduction)
    assert_value(got, reduce_elements(elements, reduction))


@pytest.mark.parametrize("epoch", (2, 3))
def test_splc_loss_parameters(epoch):
    # τ = 0.8, change_epoch = 3, m = 0.5, γ = 1
    x = t64([[L3, math.log(9), 0.5 + L3]])
    targets = torch.tensor([[0, 0, 1]], dtype=torch.uint8)
    flipped = epoch >= 3
    expected = [[
        (3 / 2) * L2,  # neg, p = 3/4 <= 0.8, never flips: -(3/4) log(1/4)
        # neg, p = σ(log 9) = 9/10 > 0.8: flipped (no margin) -(1/10) log(9/10),
        # else -(9/10) log(1/10)
        (1 / 10) * math.log(10 / 9) if flipped else (9 / 10) * math.log(10),
        (1 / 4) * math.log(4 / 3),  # pos, p = σ(log 3) = 3/4: -(1/4) log(3/4)
    ]]
    got = R.splc_loss(x, targets, epoch=epoch, tau=0.8, change_epoch=3, margin=0.5, gamma=1.0,
                      reduction="none")
    assert_value(got, expected)


@pytest.mark.parametrize("epoch", (0, 1))
def test_splc_gradient_by_hand(epoch):
    # neg x = log 3 (p = 3/4); before: p² (p - 2 (1-p) log(1-p)) = 9/16 (3/4 + 1/2 log 4)
    # after (flipped, no margin): (1-p)² (2 p log p - (1-p)) = 1/16 (3/2 log(3/4) - 1/4)
    x = t64([[L3]]).requires_grad_(True)
    R.splc_loss(x, torch.tensor([[False]]), epoch=epoch).backward()
    if epoch:
        expected = (1.5 * math.log(3 / 4) - 0.25) / 16
    else:
        expected = (9 / 16) * (0.75 + 0.5 * math.log(4))
    assert_value(x.grad, [[expected]])


# =========================================================================== spec edge cases
def softmax_losses(z, y, old=None, new=None, reduction="mean"):
    """The three softmax-family losses on the same inputs (teachers of width K and C)."""
    k = old.shape[1] if old is not None else z.shape[1]
    old = old if old is not None else torch.zeros(z.shape[0], k, dtype=z.dtype)
    new = new if new is not None else torch.zeros_like(z)
    return {
        "margin_cross_entropy": R.margin_cross_entropy(
            z, y, num_old_classes=k, new_class_bias=1.0, label_smoothing=0.1, reduction=reduction),
        "focal_distillation": R.focal_distillation(z, old, y, reduction=reduction),
        "focal_distillation_lm": R.focal_distillation(z, old, y, kind="lm", reduction=reduction),
        "mpt_loss": R.mpt_loss(z, y, old, new, reduction=reduction),
        "mpt_loss_lm": R.mpt_loss(z, y, old, new, kind="lm", reduction=reduction),
    }


def multilabel_losses(x, targets, reduction="sum"):
    return {
        "hill_loss": R.hill_loss(x, targets, reduction=reduction),
        "splc_loss": R.splc_loss(x, targets, epoch=1, reduction=reduction),
    }


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_empty_batch_gives_zero(reduction):
    z = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    for name, loss in softmax_losses(z, y, torch.zeros(0, 3, dtype=torch.float64),
                                     reduction=reduction).items():
        expected = torch.zeros(0) if reduction == "none" else torch.tensor(0.0)
        assert_value(loss, expected)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert grad.shape == (0, 4), name
    for name, loss in multilabel_losses(z, torch.zeros(0, 4), reduction=reduction).items():
        expected = torch.zeros(0, 4) if reduction == "none" else torch.tensor(0.0)
        assert_value(loss, expected)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert grad.shape == (0, 4), name


def test_mean_over_no_counted_rows_is_zero_with_zero_gradient():
    z = t64([[0.3, -1.0, 2.0, 0.5], [1.0, 1.5, -0.5, 0.0]]).requires_grad_(True)
    y = torch.tensor([-100, -100])
    old = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    new = t64([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    for name, loss in softmax_losses(z, y, old, new).items():
        assert_value(loss, 0.0)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.equal(grad, torch.zeros_like(z)), name


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
def test_nan_in_an_ignored_row_changes_nothing(reduction):
    """Spec: ignored rows contribute nothing to any term. NaN in an ignored row's student,
    old and new logits leaves every loss and gradient as with finite values there, and
    that row's loss and gradient exactly 0 (not 0 · NaN)."""
    z = t64([[0.3, -1.0, 2.0, 0.5], [1.0, 1.5, -0.5, 0.0], [0.2, 0.1, -0.3, 1.2]])
    y = torch.tensor([2, -100, 3])
    old = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [0.5, -1.0, 0.0]])
    new = t64([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.5, 2.0]])
    z_nan, old_nan, new_nan = z.clone(), old.clone(), new.clone()
    z_nan[1, 1] = old_nan[1, 2] = new_nan[1, 0] = float("nan")
    z.requires_grad_(True)
    z_nan.requires_grad_(True)
    clean = softmax_losses(z, y, old, new, reduction=reduction)
    for name, loss in softmax_losses(z_nan, y, old_nan, new_nan, reduction=reduction).items():
        (grad,) = torch.autograd.grad(loss.sum(), z_nan)
        (clean_grad,) = torch.autograd.grad(clean[name].sum(), z)
        assert torch.equal(loss.detach(), clean[name].detach()), name
        assert torch.equal(grad, clean_grad), name
        assert torch.equal(grad[1], torch.zeros(4, dtype=torch.float64)), name
        if reduction == "none":
            assert loss[1] == 0, name


def test_masked_class_gives_finite_cross_entropy():
    # z = [0, log 2, -inf]: softmax [1/3, 2/3, 0]; y = 1 -> log 3 - log 2
    # z = [-inf, -inf, 0, log 2] (the masked classes come first: an online softmax must not
    # compute exp(-inf - (-inf))): softmax [0, 0, 1/3, 2/3]; y = 3 -> log 3 - log 2
    cases = (([0.0, L2, -math.inf], 1, [2]), ([-math.inf, -math.inf, 0.0, L2], 3, [0, 1]))
    for row, y, masked in cases:
        z = t64([row]).requires_grad_(True)
        for kwargs in ({}, {"num_old_classes": 1, "new_class_bias": 3.0}):
            loss = R.margin_cross_entropy(z, torch.tensor([y]), **kwargs)
            if not kwargs:
                assert_value(loss, math.log(3 / 2))
            (grad,) = torch.autograd.grad(loss, z)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            assert torch.equal(grad[0, masked], torch.zeros(len(masked), dtype=torch.float64))


def test_masked_teacher_class_in_kl():
    # τ = 2, r/τ = [0, log 3, -inf] -> p = [1/4, 3/4, 0], y = 1 (ref correct, w = 6)
    # student finite at the masked class: s/τ = [log 2, 0, 0] -> q = [1/2, 1/4, 1/4]
    #   KL = 1/4 log(1/2) + 3/4 log 3 + 0;  ∂/∂s = 6 · (1/2)(q - p) = [3/4, -3/2, 3/4]
    # student masked there too: s/τ = [log 2, 0, -inf] -> q = [2/3, 1/3, 0]
    #   KL = 1/4 log(3/8) + 3/4 log(9/4);  ∂/∂s = 3 (q - p) = [5/4, -5/4, 0]
    r = TAU * t64([[0.0, L3, -math.inf]])
    cases = [
        ([L2, 0.0, 0.0], 0.25 * math.log(0.5) + 0.75 * L3, [0.75, -1.5, 0.75]),
        ([L2, 0.0, -math.inf], 0.25 * math.log(3 / 8) + 0.75 * math.log(9 / 4), [1.25, -1.25, 0.0]),
    ]
    for student, kl, grad_by_hand in cases:
        z = (TAU * t64([student])).requires_grad_(True)
        loss = R.focal_distillation(z, r, torch.tensor([1]), tau=TAU)
        assert_value(loss, 6 * kl)
        (grad,) = torch.autograd.grad(loss, z)
        assert_value(grad, [grad_by_hand])
        # and inside MPT, with a masked CE class too (not the target)
        loss = R.mpt_loss(z, torch.tensor([1]), None, r, num_old_classes=2, tau=TAU)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_nan_logits_give_nan_loss():
    z = t64([[0.0, 1.0, 2.0, 0.5], [1.0, math.nan, 0.0, 0.0]])
    y = torch.tensor([1, 0])
    old = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    new = t64([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    for name, loss in softmax_losses(z, y, old, new).items():
        assert torch.isnan(loss), name
    for name, rows in softmax_losses(z, y, old, new, reduction="none").items():
        assert torch.isfinite(rows[0]) and torch.isnan(rows[1]), name
    # a NaN in a teacher poisons the distillation term too
    bad_old = old.clone()
    bad_old[0, 1] = math.nan
    for kind in ("kl", "lm"):
        assert torch.isnan(R.focal_distillation(z[:1], bad_old[:1], y[:1], kind=kind))
    for name, loss in multilabel_losses(z, torch.ones_like(z)).items():
        assert torch.isnan(loss), name
    for name, elements in multilabel_losses(z, torch.zeros_like(z), reduction="none").items():
        assert torch.equal(torch.isnan(elements), torch.isnan(z)), name


@pytest.mark.parametrize("focus", FOCUS_MODES)
def test_target_beyond_reference_is_never_focused_by_the_reference(focus):
    # K = 2 < y = 2; τ = 2, r/τ = [log 2, 0], s/τ = [0, log 3]: KL = 2/3 log(8/3) + 1/3 log(4/9)
    # f = 0 for ref_correct / neg_flip / all; student_wrong: argmax over 2 columns != 2, f = 1
    z = TAU * t64([[0.0, L3, 5.0]])
    got = R.focal_distillation(z, TAU * t64([[L2, 0.0]]), torch.tensor([2]), tau=TAU, focus=focus)
    f = 1 if focus == "student_wrong" else 0
    assert_value(got, (1 + 5 * f) * FD_NARROW_KL[2])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_argmax_ties_break_to_the_lowest_index(dtype):
    # in bf16, 1.0 and 1.001 are the same number; in every dtype 1.0 and 1.0 tie
    r = torch.tensor([[1.0, 1.001 if dtype == torch.bfloat16 else 1.0, -1.0]]).to(dtype)
    s = torch.tensor([[2.0, 2.001 if dtype == torch.bfloat16 else 2.0, 0.0]]).to(dtype)
    assert r[0, 0] == r[0, 1] and s[0, 0] == s[0, 1]
    # KL of softmax(r/5) against softmax(s/5) with the rounded values
    a = [v / 5 for v in r[0].double().tolist()]
    c = [v / 5 for v in s[0].double().tolist()]
    lse_a = math.log(sum(math.exp(v) for v in a))
    lse_c = math.log(sum(math.exp(v) for v in c))
    kl = sum(math.exp(ai - lse_a) * ((ai - lse_a) - (ci - lse_c)) for ai, ci in zip(a, c))
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-6

    def loss(y, focus):
        return R.focal_distillation(s, r, torch.tensor([y]), focus=focus)

    # argmax r = argmax s = 0: with y = 0 both are right, with y = 1 both are wrong
    assert_value(loss(0, "ref_correct"), 6 * kl, tol=tol)
    assert_value(loss(1, "ref_correct"), 1 * kl, tol=tol)
    assert_value(loss(0, "student_wrong"), 1 * kl, tol=tol)
    assert_value(loss(1, "student_wrong"), 6 * kl, tol=tol)
    assert_value(loss(0, "neg_flip"), 1 * kl, tol=tol)  # reference right, student right


def test_teachers_and_class_bias_are_constants():
    z = t64([[0.3, -1.0, 2.0, 0.5], [1.0, 1.5, -0.5, 0.0]]).requires_grad_(True)
    y = torch.tensor([0, 2])
    old = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]]).requires_grad_(True)
    new = t64([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]).requires_grad_(True)
    bias = t64([0.0, 1.0, -1.0, 2.0]).requires_grad_(True)
    for kind in ("kl", "lm"):
        R.mpt_loss(z, y, old, new, kind=kind, class_bias=bias, label_smoothing=0.1).backward()
        R.focal_distillation(z, old, y, kind=kind).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert old.grad is None and new.grad is None and bias.grad is None
    # with only the teachers requiring grad, nothing is differentiable at all
    assert not R.mpt_loss(z.detach(), y, old, new, class_bias=bias).requires_grad


@pytest.mark.parametrize("focus", FOCUS_MODES)
@pytest.mark.parametrize("kind", ("kl", "lm"))
def test_only_the_cross_entropy_sees_the_bias(kind, focus):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    old = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 2
    new = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    options = dict(kind=kind, focus=focus, reduction="none")
    distill = R.mpt_loss(z, y, old, new, ce_weight=0.0, new_class_bias=0.0, **options)
    for b in (0.5, 4.0, -3.0):
        # the distillation terms do not change with b ...
        torch.testing.assert_close(
            R.mpt_loss(z, y, old, new, ce_weight=0.0, new_class_bias=b, **options), distill)
        # ... and the whole loss is the biased CE plus them
        ce = R.margin_cross_entropy(z, y, num_old_classes=3, new_class_bias=b, reduction="none")
        torch.testing.assert_close(R.mpt_loss(z, y, old, new, new_class_bias=b, **options),
                                   ce + distill)


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("scale_by_tau_sq", (False, True))
@pytest.mark.parametrize("focus", FOCUS_MODES)
@pytest.mark.parametrize("kind", ("kl", "lm"))
def test_mpt_reduces_to_pct(kind, focus, scale_by_tau_sq, reduction):
    # C_old = C, no new source, b = 0: focal distillation (weighted λ_old) plus cross-entropy
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, 4, generator=gen, dtype=torch.float64) * 2
    old = torch.randn(7, 4, generator=gen, dtype=torch.float64) * 2
    y = torch.tensor([0, 1, 2, 3, -100, 1, 2])
    y[:3] = old[:3].argmax(dim=1)  # some rows with the reference right
    options = dict(kind=kind, focus=focus, scale_by_tau_sq=scale_by_tau_sq, tau=3.0)
    got = R.mpt_loss(z, y, old, None, new_class_bias=0.0, reduction=reduction, **options)
    weight = 1.0 if kind == "kl" else 0.4  # the kind's default λ_old
    expected = F.cross_entropy(z, y, reduction=reduction) + weight * R.focal_distillation(
        z, old, y, reduction=reduction, **options)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
@pytest.mark.parametrize("bias_form", ("class_bias", "new_class_bias"))
@pytest.mark.parametrize("ignore_index", (-100, 2))
def test_margin_cross_entropy_is_torch_cross_entropy(bias_form, label_smoothing, reduction,
                                                     ignore_index):
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(9, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 5, ignore_index, 2, 5])
    if bias_form == "class_bias":
        delta = torch.randn(6, generator=gen, dtype=torch.float64)
        options = {"class_bias": delta}
    else:
        delta = t64([0.0, 0.0, 0.0, 0.0, 1.7, 1.7])  # b = 1.7 on classes j >= 4
        options = {"num_old_classes": 4, "new_class_bias": 1.7}
    got = R.margin_cross_entropy(z, y, label_smoothing=label_smoothing, ignore_index=ignore_index,
                                 reduction=reduction, **options)
    expected = F.cross_entropy(z + delta, y, label_smoothing=label_smoothing,
                               ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(got, expected)
    upstream = torch.linspace(-1, 2, got.numel(), dtype=torch.float64).reshape(got.shape)
    (grad,) = torch.autograd.grad(got, z, upstream)
    (expected_grad,) = torch.autograd.grad(expected, z, upstream)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("reduction", SOFTMAX_REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                         ids=str)
def test_losses_return_the_logits_dtype(dtype, reduction):
    z = t64([[0.0, L2, 0.0, 1.0], [L3, 0.0, 0.0, -1.0]]).to(dtype).requires_grad_(True)
    y = torch.tensor([1, 2])
    old = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]]).to(dtype)
    new = t64([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]).to(dtype)
    losses = dict(softmax_losses(z, y, old, new, reduction=reduction))
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.uint8)
    losses.update(multilabel_losses(z, targets, reduction))
    for name, loss in losses.items():
        assert loss.dtype == dtype, name
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
    # and the value is the float32 computation, rounded once: first CE row, e^z = [1, 2, 1, e],
    # y = 1: log(4 + e) - log 2
    ce = R.margin_cross_entropy(z, y, reduction="none")
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    assert_value(ce[0], math.log(4 + math.e) - L2, tol=tol)


@pytest.mark.parametrize("epoch", (0, 1))
def test_multilabel_losses_are_finite_at_large_logits(epoch):
    # float32, |x| up to 1e4, both labels
    x = torch.tensor([[-1e4, -1e3, -50.0, 50.0, 1e3, 1e4]] * 2, requires_grad=True)
    targets = torch.tensor([[True] * 6, [False] * 6])
    for name, loss in (
        ("hill", R.hill_loss(x, targets, reduction="none")),
        ("splc", R.splc_loss(x, targets, epoch=epoch, reduction="none")),
    ):
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name
    hill = R.hill_loss(x, targets, reduction="none")
    # hill positive at x = -1e4: -(1 - q)² log q with log q = log σ(-10001) = -10001 (1-q = 1)
    # hill negative at x = 1e4: (λ - 1) · 1 = 0.5
    assert_value(hill[0, 0], 10001.0, tol=1e-6)
    assert_value(hill[1, 5], 0.5, tol=1e-6)
    splc = R.splc_loss(x, targets, epoch=epoch, reduction="none")
    # splc negative at x = 1e4 (p = 1 > τ): before the change -p² log(1-p) = 1e4; after it
    # is a positive without margin, -(1-p)² log p = 0
    assert_value(splc[1, 5], 0.0 if epoch else 1e4, tol=1e-6)


@pytest.mark.parametrize("gamma", (0.0, 2.0))
def test_multilabel_infinite_logits_where_the_loss_is_finite(gamma):
    # a negative at -inf (p = 0) and a positive at +inf (q = 1): loss 0 and gradient 0. The
    # other branch of each element (infinite there) must not leak a 0 · inf = NaN into the
    # gradient, and for γ = 0 the focal factor is 0^0 = 1, not exp(0 · -inf) = NaN.
    x = torch.tensor([[-math.inf, math.inf, 0.5]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[False, True, True]])
    for name, loss in (
        ("hill", R.hill_loss(x, targets, gamma=gamma, reduction="none")),
        ("splc", R.splc_loss(x, targets, epoch=1, gamma=gamma, reduction="none")),
    ):
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert loss[0, :2].tolist() == [0.0, 0.0] and grad[0, :2].tolist() == [0.0, 0.0], name
        # the finite positive at x = 1/2: -(1 - q)^γ log q, q = σ(-1/2) (margin 1)
        q = 1 / (1 + math.exp(0.5))
        assert_value(loss[0, 2], -((1 - q) ** gamma) * math.log(q))


@pytest.mark.parametrize("tau, x, corrected", [
    # logit(0.6) = log 1.5 = 0.405465108...: the float32 values next to it fall on either
    # side (σ in float32 moved the boundary by three of them)
    (0.6, [0.40546507, 0.40546510, 0.40546513], [False, False, True]),
    # σ(x) > 0 for every finite x, also where σ(x) underflows (σ(-1e4) = e^-10000)
    (0.0, [-1e4, -120.0, 3.0], [True, True, True]),
    # σ(25) = 1 - 1.4e-11 > 1 - 1e-9, though it rounds to 1 in float32; σ(19) = 1 - 5.6e-9 < τ
    (1 - 1e-9, [19.0, 25.0, 28.0], [False, True, True]),
])
def test_splc_correction_is_decided_exactly(tau, x, corrected):
    x = torch.tensor([x], dtype=torch.float32)
    loss = R.splc_loss(x, torch.zeros(x.shape, dtype=torch.bool), epoch=1, tau=tau, reduction="none")
    for value, flipped, actual in zip(x[0].tolist(), corrected, loss[0].tolist()):
        log_p = -math.log1p(math.exp(-value)) if value >= 0 else value - math.log1p(math.exp(value))  # log σ(x)
        p = math.exp(log_p)
        if flipped:  # a positive without margin: -(1 - p)² log p
            expected = -((1 - p) ** 2) * log_p
        else:  # -p² log(1 - p), log(1 - p) = log p - x
            expected = -(p**2) * (log_p - value)
        assert actual == pytest.approx(expected, rel=1e-5), (tau, value)
