"""mpt_kernels.metrics against hand-computed values and sklearn."""

import math

import numpy as np
import pytest
import torch

from mpt_kernels import metrics
from mpt_kernels.metrics import (
    accuracy,
    average_precision,
    mean_average_precision,
    negative_flip_rate,
    relative_negative_flip_rate,
)

# One small case used by several tests; the correct flags are written under each row.
TARGET = torch.tensor([0, 0, 1, 1, 2])
OLD_LABELS = torch.tensor([0, 1, 1, 0, 2])  # right: T F T F T -> accuracy 3/5
NEW_LABELS = torch.tensor([0, 0, 2, 0, 1])  # right: T T F F F -> error rate 3/5
# old right and new wrong: samples 2 and 4 -> NFR = 2/5
# relative NFR = (2/5) / ((3/5) * (3/5)) = 0.4 / 0.36 = 10/9


def one_hot_scores(labels, num_classes):
    """Scores whose argmax is ``labels``, with random values elsewhere (never zeros)."""
    scores = torch.rand(len(labels), num_classes)
    scores[torch.arange(len(labels)), labels] = 2.0
    return scores


def test_accuracy_labels_and_scores():
    assert accuracy(OLD_LABELS, TARGET) == pytest.approx(3 / 5)
    assert accuracy(one_hot_scores(NEW_LABELS, 4), TARGET) == pytest.approx(2 / 5)
    assert isinstance(accuracy(OLD_LABELS, TARGET), float)


def test_accuracy_argmax_ties_go_to_the_lowest_index():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 3.0]])  # argmax 0 and 1
    assert accuracy(scores, torch.tensor([0, 1])) == 1.0
    assert accuracy(scores, torch.tensor([1, 2])) == 0.0


def test_negative_flip_rate_hand_computed():
    assert negative_flip_rate(OLD_LABELS, NEW_LABELS, TARGET) == pytest.approx(2 / 5)
    assert relative_negative_flip_rate(OLD_LABELS, NEW_LABELS, TARGET) == pytest.approx(10 / 9)


def test_flip_rates_old_and_new_scores_with_different_class_counts():
    # The old model knows 3 classes, the new one 5; the argmax of each gives the labels above.
    old_scores, new_scores = one_hot_scores(OLD_LABELS, 3), one_hot_scores(NEW_LABELS, 5)
    assert negative_flip_rate(old_scores, new_scores, TARGET) == pytest.approx(2 / 5)
    assert relative_negative_flip_rate(old_scores, NEW_LABELS, TARGET) == pytest.approx(10 / 9)


def test_flips_are_directional():
    # Swapping the models counts positive flips instead: new right and old wrong is
    # only sample 1 -> 1/5; relative: (1/5) / ((2/5) * (2/5)) = 0.2 / 0.16 = 1.25
    assert negative_flip_rate(NEW_LABELS, OLD_LABELS, TARGET) == pytest.approx(1 / 5)
    assert relative_negative_flip_rate(NEW_LABELS, OLD_LABELS, TARGET) == pytest.approx(1.25)


def test_relative_nfr_zero_denominator():
    # New model never wrong: ER_new = 0, NFR = 0, denominator 3/5 * 0 = 0 -> 0 (not NaN).
    assert negative_flip_rate(OLD_LABELS, TARGET, TARGET) == 0.0
    assert relative_negative_flip_rate(OLD_LABELS, TARGET, TARGET) == 0.0
    # Old model always wrong: 1 - ER_old = 0 -> 0.
    always_wrong = (TARGET + 1) % 3
    assert negative_flip_rate(always_wrong, NEW_LABELS, TARGET) == 0.0
    assert relative_negative_flip_rate(always_wrong, NEW_LABELS, TARGET) == 0.0


def test_numpy_inputs_and_int32():
    assert accuracy(OLD_LABELS.numpy(), TARGET.numpy()) == pytest.approx(3 / 5)
    assert negative_flip_rate(OLD_LABELS.int(), NEW_LABELS.int(), TARGET.int()) == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: accuracy(OLD_LABELS[:4], TARGET), ValueError, "pred has 4 samples but target has 5"),
        (lambda: negative_flip_rate(OLD_LABELS, NEW_LABELS[:3], TARGET), ValueError, "new_pred has 3"),
        (lambda: accuracy(OLD_LABELS.float(), TARGET), TypeError, "integer dtype"),
        (lambda: accuracy(torch.zeros(5, 2, 2), TARGET), ValueError, "shape"),
        (lambda: accuracy(OLD_LABELS, TARGET.float()), TypeError, "target must have an integer dtype"),
        (lambda: accuracy(OLD_LABELS, TARGET[:, None]), ValueError, "target must be class labels"),
        (lambda: accuracy([0, 1], TARGET), TypeError, "torch.Tensor or numpy.ndarray"),
        (lambda: accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), ValueError, "zero samples"),
        (lambda: accuracy(torch.zeros(5, dtype=torch.long, device="meta"), TARGET), ValueError, "same device"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- mAP
def test_average_precision_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.3],
            [0.8, 0.5, 0.2],
            [0.7, 0.1, 0.1],
            [0.6, 0.9, 0.4],
        ]
    )
    targets = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    # class 0: ranking 0.9(+) 0.8(-) 0.7(+) 0.6(-): precision 1/1 at the first positive,
    #   2/3 at the second -> AP = (1 + 2/3) / 2 = 5/6
    # class 1: ranking 0.9(-), then the tie 0.5(+) 0.5(-) counted together: after the tie
    #   1 positive among 3 -> AP = 1/3 (sklearn's treatment of ties)
    # class 2: no positive -> NaN, left out of the mean
    ap = average_precision(scores, targets)
    assert ap.dtype == torch.float64 and ap.shape == (3,)
    assert ap[0].item() == pytest.approx(5 / 6)
    assert ap[1].item() == pytest.approx(1 / 3)
    assert math.isnan(ap[2].item())
    # mAP = (5/6 + 1/3) / 2 = 7/12
    assert mean_average_precision(scores, targets) == pytest.approx(7 / 12)
    assert mean_average_precision(scores, targets.bool()) == pytest.approx(7 / 12)
    assert mean_average_precision(scores, targets.float() * 0.9) == pytest.approx(7 / 12)


def test_mean_average_precision_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, c = int(rng.integers(5, 60)), int(rng.integers(1, 8))
        scores = rng.normal(size=(n, c)).astype(np.float32)
        if trial % 2:  # coarse scores: many ties
            scores = np.round(scores)
        targets = rng.random((n, c)) < 0.3
        targets[int(rng.integers(n)), :] = True  # every class has a positive
        expected = np.mean(
            [sklearn_metrics.average_precision_score(targets[:, j], scores[:, j]) for j in range(c)]
        )
        got = mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_mean_average_precision_nan_and_errors():
    scores = torch.tensor([[0.2, float("nan")], [0.9, 0.3]])
    targets = torch.tensor([[1, 0], [0, 1]])
    assert math.isnan(mean_average_precision(scores, targets))
    assert not math.isnan(average_precision(scores, targets)[0].item())
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores.nan_to_num(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="targets must have the shape of scores"):
        mean_average_precision(scores, targets[:, :1])
    with pytest.raises(ValueError, match=r"scores must have shape \(N, C\)"):
        mean_average_precision(scores[0], targets[0])


@pytest.mark.gpu
def test_metrics_on_cuda():
    cuda = torch.device("cuda")
    assert negative_flip_rate(OLD_LABELS.to(cuda), NEW_LABELS.to(cuda), TARGET.to(cuda)) == pytest.approx(2 / 5)
    assert relative_negative_flip_rate(
        one_hot_scores(OLD_LABELS, 3).to(cuda), NEW_LABELS.to(cuda), TARGET.to(cuda)
    ) == pytest.approx(10 / 9)
    scores, targets = torch.rand(50, 4), torch.rand(50, 4) < 0.4
    targets[0] = True
    assert mean_average_precision(scores.to(cuda), targets.to(cuda)) == pytest.approx(
        mean_average_precision(scores, targets), rel=1e-12
    )
    with pytest.raises(ValueError, match="same device"):
        accuracy(OLD_LABELS.to(cuda), TARGET)


def test_module_exports():
    assert set(metrics.__all__) >= {
        "accuracy", "negative_flip_rate", "relative_negative_flip_rate", "mean_average_precision"
    }
