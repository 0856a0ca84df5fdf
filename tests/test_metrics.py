"""Metrics on hand-computed arrays, and the pessimistic tie rule."""

import math

import numpy as np
import pytest

from eval.metrics import bootstrap_ci, mrr_at_k, ndcg_at_k, rank_of, recall_at_k


def test_rank_of_counts_ties_against_the_target():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert rank_of(scores, 1) == 1
    assert rank_of(scores, 0) == 3  # row 2 ties with it and counts as ahead
    assert rank_of(scores, 3) == 4


def test_rank_of_respects_mask_and_unretrievable_targets():
    scores = np.array([0.9, 0.8, -np.inf])
    mask = np.array([False, True, True])
    assert rank_of(scores, 1, mask) == 1  # row 0 is masked out (e.g. already in the history)
    assert rank_of(scores, 2) == math.inf
    assert rank_of(scores, 0, mask) == math.inf


def test_recall_ndcg_mrr_by_hand():
    ranks = [1, 3, 11, math.inf]
    assert recall_at_k(ranks, 10).tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(ndcg_at_k(ranks, 10), [1.0, 1 / math.log2(4), 0, 0])
    np.testing.assert_allclose(mrr_at_k(ranks, 10), [1.0, 1 / 3, 0, 0])
    assert ndcg_at_k([2], 1).tolist() == [0.0]


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    v = np.r_[np.ones(30), np.zeros(70)]
    m, lo, hi = bootstrap_ci(v, seed=1)
    assert m == pytest.approx(0.3)
    assert lo < 0.3 < hi and lo > 0.15 and hi < 0.45
    assert bootstrap_ci(v, seed=1) == (m, lo, hi)
    assert math.isnan(bootstrap_ci([])[0])
