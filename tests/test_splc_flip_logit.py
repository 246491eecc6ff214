"""SPLC's correction threshold as the kernels take it (``splc_flip_logit``).

Both kernel backends decide SPLC's hard correction (spec §5: a negative with σ(x) > τ
counts as positive) by comparing the float32 logit with one float, not σ with τ, so
that the decision does not depend on how a kernel approximates σ. These tests check
that float against the exact comparison, next to the boundary.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpt_kernels._validation import check_hill, check_splc, splc_flip_logit
from multilabel_edges import float32_neighbours


@pytest.mark.parametrize("tau", [0.6, 0.3, 0.5, 0.9, 1e-7, 1 - 1e-7, 0.25 + 2**-30])
def test_splc_flip_logit_decides_as_sigmoid_above_tau(tau):
    # the kernels flip a negative where float32 x > splc_flip_logit, which must be exactly
    # where σ(x) > τ (x > logit(τ), in float64), also for the float32 x next to logit(τ)
    def args(epoch):
        return check_splc(torch.zeros(1, 1), torch.zeros(1, 1), epoch=epoch, tau=tau, change_epoch=2, margin=1.0,
                          gamma=2.0, reduction="sum")

    threshold = splc_flip_logit(args(2))
    assert torch.tensor(threshold, dtype=torch.float32).item() == threshold  # a float32
    exact = math.log(tau) - math.log1p(-tau)
    assert threshold <= exact
    for x in float32_neighbours(threshold, 4).tolist():
        assert (x > threshold) == (x > exact), (x, threshold, exact)
    assert splc_flip_logit(args(1)) == math.inf  # before change_epoch: never


def test_splc_flip_logit_at_the_ends_of_tau():
    def flip(tau):
        return splc_flip_logit(check_splc(torch.zeros(1, 1), torch.zeros(1, 1), epoch=5, tau=tau, change_epoch=1,
                                          margin=1.0, gamma=2.0, reduction="sum"))

    assert flip(1.0) == math.inf and flip(0.0) == -math.inf and flip(0.5) == 0.0
    hill = check_hill(torch.zeros(1, 1), torch.zeros(1, 1), lamb=1.5, margin=1.0, gamma=2.0, reduction="sum")
    assert splc_flip_logit(hill) == math.inf
