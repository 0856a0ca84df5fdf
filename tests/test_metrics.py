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


# ---------------------------------------------------------------------------------------------------- beyond accuracy
from eval.metrics import (  # noqa: E402
    alpha_ndcg_at_k,
    catalog_coverage,
    category_coverage_at_k,
    duplicate_rate,
    gini_exposure,
    hallucination_rate,
    hit_rate_at_k,
    intra_list_diversity,
    latency_percentiles,
    novelty,
    reason_grounded,
)


def test_hit_rate_is_recall_with_one_target():
    assert hit_rate_at_k([1, 5, 6], 5).tolist() == [1, 1, 0]


def test_intra_list_diversity_by_hand():
    # three unit vectors: e1, e1, e2 -> pairwise cosines 1, 0, 0 -> mean 1/3 -> ILD 2/3
    v = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert intra_list_diversity(v) == pytest.approx(2 / 3)
    assert intra_list_diversity(np.eye(4)) == pytest.approx(1.0)
    assert intra_list_diversity(np.ones((3, 2))) == pytest.approx(0.0)
    assert math.isnan(intra_list_diversity(np.ones((1, 2))))


def test_category_coverage_divides_by_k():
    assert category_coverage_at_k(["a", "a", "b", "c", "a", "d"], 5) == pytest.approx(3 / 5)
    assert category_coverage_at_k(["a", "b"], 5) == pytest.approx(2 / 5)  # a short list covers less
    with pytest.raises(ValueError, match="k must be"):
        category_coverage_at_k(["a"], 0)


def test_alpha_ndcg_by_hand():
    a = 0.5
    # intents {x, y}; list x, x, z, y: gains 1, 0.5, 0, 1 at ranks 1..4
    dcg = 1 / math.log2(2) + 0.5 / math.log2(3) + 0 + 1 / math.log2(5)
    # ideal visits x, y, x, y: gains 1, 1, 0.5, 0.5
    ideal = 1 / math.log2(2) + 1 / math.log2(3) + 0.5 / math.log2(4) + 0.5 / math.log2(5)
    assert alpha_ndcg_at_k(["x", "x", "z", "y"], {"x", "y"}, 4, alpha=a) == pytest.approx(dcg / ideal)
    assert alpha_ndcg_at_k(["x", "y"], {"x", "y"}, 2) == pytest.approx(1.0)  # the ideal list itself
    assert alpha_ndcg_at_k(["z"], set(), 1) == 0.0


def test_novelty_catalog_coverage_and_gini_by_hand():
    pop = {"a": 3, "b": 1}
    # p_a = 4/8, p_b = 2/8, p_c = 1/8 -> self-information 1, 2, 3
    assert novelty(["a", "b", "c"], pop, n_users=7) == pytest.approx(2.0)
    lists = [["a", "b"], ["a", "c"]]
    assert catalog_coverage(lists, 4) == pytest.approx(3 / 4)
    # exposures over the catalog a..d: 2, 1, 1, 0 -> sorted 0, 1, 1, 2; sum (2j-n-1) x = -3*0 -1*1 +1*1 +3*2 = 6
    assert gini_exposure(lists, ["a", "b", "c", "d"]) == pytest.approx(6 / (4 * 4))
    assert gini_exposure([["a"], ["b"]], ["a", "b"]) == pytest.approx(0.0)  # equal exposure
    assert gini_exposure([], ["a"]) == 0.0


def test_output_check_rates_and_latency():
    assert hallucination_rate(["a", "zz", "b", "yy"], {"a", "b", "c"}) == pytest.approx(0.5)
    assert duplicate_rate(["a", "b", "a", "a"]) == pytest.approx(0.5)
    assert duplicate_rate([]) == 0.0
    lat = latency_percentiles([10, 20, 30, 40, 50])
    assert lat["p50"] == 30 and lat["mean"] == 30 and lat["p90"] == pytest.approx(46)


def _grounded(reason: str, **kw: object) -> bool:
    args: dict = {
        "pick_title": "Steelbird Pro Drill Driver 20V",
        "pick_categories": ["Tools", "Tools > Power Drills"],
        "pick_brand": "Steelbird",
        "history_titles": ["Precisa Compact Hammer Drill 18V"],
        "history_categories": ["Tools", "Tools > Power Drills"],
        "history_brands": ["Precisa"],
    }
    args.update(kw)
    return reason_grounded(reason, **args)


def test_reason_groundedness_needs_a_confirmed_claim():
    assert _grounded("Pairs well with your Precisa hammer drill.")  # cites a history title
    assert _grounded("More Power Drills, like the ones you bought.")  # a shared category, verbatim
    assert not _grounded("A great pick for you!")  # praise confirms nothing
    assert not _grounded("A strong Steelbird drill driver.")  # describes the pick only; brand not in the history
    assert _grounded("Another Steelbird, like before.", history_brands=["Steelbird"])  # a shared brand
    assert not _grounded("Popular with other shoppers.")
    assert _grounded("Matches your search for a driver.", query="cordless driver")  # a query term the pick has
    assert not _grounded("Matches your search for a saw.", query="saw")  # the pick is no saw


def test_bootstrap_ci_is_the_percentile_bootstrap_of_the_mean():
    """scipy.stats.bootstrap (percentile) draws the same resamples as the hand-written version it replaced:
    indices rng.integers(0, n, (R, n)), the alpha/2 and 1 - alpha/2 quantiles of the resampled means."""
    v = np.random.default_rng(3).random(57)
    idx = np.random.default_rng(7).integers(0, v.size, size=(1000, v.size))
    lo, hi = np.quantile(v[idx].mean(axis=1), [0.025, 0.975])
    m, blo, bhi = bootstrap_ci(v, seed=7)
    assert m == pytest.approx(v.mean()) and blo == pytest.approx(lo, abs=1e-12) and bhi == pytest.approx(hi, abs=1e-12)
    assert bootstrap_ci([0.4]) == (0.4, 0.4, 0.4) and bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
