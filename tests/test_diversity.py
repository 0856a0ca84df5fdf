"""Diversity re-rankers on hand-computed examples, against brute force, and the guarantee on random instances."""

import math
import re

import numpy as np
import pytest

from generator.constraints import CategoryConstraint, check_picks, cut_categories, feasible
from generator.diversity import (
    METHODS,
    category_similarity,
    cosine_similarity,
    diversify,
    dpp,
    dpp_quality_exponent,
    mmr,
    quota_rerank,
)

# Four items; 0 and 1 are near-duplicates. Raw relevance [3, 2.8, 2, 1] min-max normalises to [1, .9, .5, 0].
REL4 = np.array([3.0, 2.8, 2.0, 1.0])
SIM4 = np.array(
    [
        [1.0, 0.9, 0.2, 0.1],
        [0.9, 1.0, 0.3, 0.2],
        [0.2, 0.3, 1.0, 0.4],
        [0.1, 0.2, 0.4, 1.0],
    ]
)


def test_similarity_helpers_by_hand():
    np.testing.assert_allclose(
        cosine_similarity([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
        [[1, 1 / math.sqrt(2), 0], [1 / math.sqrt(2), 1, 0], [0, 0, 1]],
    )
    np.testing.assert_array_equal(category_similarity(["A", "B", "A"]), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity([1.0, 2.0])


# --- MMR ---------------------------------------------------------------------------------------------------------


def test_mmr_by_hand_half_lambda():
    # score_i = .5·rel_i − .5·max_{j picked} sim_ij, rel = [1, .9, .5, 0]
    # step 1: .5·rel = [.5, .45, .25, 0]                                     -> 0
    # step 2: max sim to {0} = [., .9, .2, .1]
    #         1: .45 − .45 = 0;  2: .25 − .10 = .15;  3: 0 − .05 = −.05       -> 2
    # step 3: max sim to {0, 2}: 1: max(.9, .3) = .9;  3: max(.1, .4) = .4
    #         1: .45 − .45 = 0;  3: 0 − .20 = −.20                           -> 1
    # step 4: only 3 left                                                     -> 3
    assert mmr(REL4, SIM4, 3, 0.5) == [0, 2, 1]
    assert mmr(REL4, SIM4, 4, 0.5) == [0, 2, 1, 3]


def test_mmr_by_hand_zero_lambda_breaks_ties_by_relevance():
    # λ = 0: score = −max sim. Step 1: all 0, tie -> the most relevant, 0.
    # step 2: −[.9, .2, .1] for 1, 2, 3                                       -> 3
    # step 3: max sim to {0, 3}: 1: max(.9, .2) = .9;  2: max(.2, .4) = .4    -> 2, then 1
    assert mmr(REL4, SIM4, 4, 0.0) == [0, 3, 2, 1]


def test_mmr_respects_the_constraint():
    # λ = 1 is relevance order [0, 1, 2, 3], but at most one pick per category: 0 (A), then 1 is blocked -> 2 (B).
    c = CategoryConstraint(max_per_category=1)
    assert mmr(REL4, SIM4, 2, 1.0, c, ["A", "A", "B", "B"]) == [0, 2]
    assert quota_rerank(REL4, ["A", "A", "B", "B"], 2, c) == [0, 2]
    # min_categories=3 with k=3 over categories A, A, B, C: every pick must open a new category.
    c = CategoryConstraint(min_categories=3)
    assert mmr(REL4, SIM4, 3, 1.0, c, ["A", "A", "B", "C"]) == [0, 2, 3]


# --- DPP ---------------------------------------------------------------------------------------------------------


def test_dpp_quality_exponent():
    assert dpp_quality_exponent(0.0) == 0.0
    assert dpp_quality_exponent(0.5) == 0.5
    assert dpp_quality_exponent(0.9) == pytest.approx(4.5)
    assert dpp_quality_exponent(1.0) == math.inf


def test_dpp_by_hand():
    # S: items 0 and 1 similar (.8), item 2 orthogonal to both; rel = [1, .9, 0] (already in [0, 1]).
    # gain_i = log d_i² under L = 2α·rel_i + log d_i² under S, d² the variance left after the picks.
    sim = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rel = np.array([1.0, 0.9, 0.0])
    # λ = .5 -> α = .5, gain = rel + log d².
    # step 1: d² = 1 for all; gains [1, .9, 0]                                  -> 0
    # step 2: d²_1 = 1 − .8² = .36: gain .9 + ln .36 = .9 − 1.022 = −.122
    #         d²_2 = 1 − 0² = 1:    gain 0 + 0 = 0                              -> 2, then 1
    assert dpp(rel, sim, 3, 0.5) == [0, 2, 1]
    # λ = .9 -> α = 4.5, gain = 9·rel + log d²; step 2: 8.1 − 1.022 = 7.08 > 0  -> 1, then 2
    assert dpp(rel, sim, 3, 0.9) == [0, 1, 2]


def test_dpp_stops_when_nothing_new_and_fills_by_relevance():
    # Category similarity has rank 2 here: after one pick per category every item lies in the span
    # (d² ≈ 2·ridge), so the greedy stops and the rest is relevance order: 1 (A), then 3 (B).
    # rel normalises to [1, .75, .5, .25, 0]; λ = .5 -> gain = rel + log d².
    # step 1: d² = 1 + ridge for all -> 0.  step 2: A items d² ≈ 2e-6 (gain ≈ −12.4), B items d² ≈ 1 -> 2.
    cats = ["A", "A", "B", "B", "A"]
    rel = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert dpp(rel, category_similarity(cats), 4, 0.5) == [0, 2, 1, 3]
    assert dpp(rel, category_similarity(cats), 4, 0.0) == [0, 2, 1, 3]  # λ=0: ties go to the more relevant


def _brute_force_greedy_logdet(rel, sim, k, lam, allowed=None, ridge=1e-6):
    """Greedy on log det L_Y computed from scratch, with L = diag(q)·(S + ridge·I)·diag(q), q = exp(α·rel)."""
    r = (rel - rel.min()) / (rel.max() - rel.min())
    q = np.exp(dpp_quality_exponent(lam) * r)
    big_l = q[:, None] * (sim + ridge * np.eye(len(rel))) * q[None, :]
    picks: list[int] = []
    for _ in range(k):
        best, best_val = -1, -np.inf
        for i in range(len(rel)):
            if i in picks or (allowed is not None and not allowed(picks)[i]):
                continue
            idx = [*picks, i]
            sign, val = np.linalg.slogdet(big_l[np.ix_(idx, idx)])
            if sign > 0 and val > best_val:
                best, best_val = i, val
        picks.append(best)
    return picks


def test_dpp_matches_brute_force_log_det_greedy():
    rng = np.random.default_rng(5)
    for trial in range(12):
        n, k = 9, 5
        rel = rng.random(n)
        sim = cosine_similarity(rng.normal(size=(n, n)))  # full rank: no early stop
        lam = [0.2, 0.5, 0.8][trial % 3]
        assert dpp(rel, sim, k, lam) == _brute_force_greedy_logdet(rel, sim, k, lam), trial
    # Under a constraint the argmax runs over the allowed items only.
    from generator.constraints import allowed_next

    cats = ["A", "A", "A", "B", "B", "C", "C", "C", "C"]
    c = CategoryConstraint(max_per_category=2, min_categories=3)
    rel = rng.random(9)
    sim = cosine_similarity(rng.normal(size=(9, 9)))
    expected = _brute_force_greedy_logdet(rel, sim, 5, 0.6, allowed=lambda p: allowed_next(c, cats, p, 5))
    assert dpp(rel, sim, 5, 0.6, c, cats) == expected


def test_dpp_handles_a_similarity_that_is_not_psd():
    sim = np.array([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]])
    assert np.linalg.eigvalsh(sim).min() < 0
    picks = dpp([0.3, 0.2, 0.1], sim, 3, 0.3)
    assert sorted(picks) == [0, 1, 2]
    with pytest.raises(ValueError, match="symmetric"):
        dpp([0.3, 0.2], [[1.0, 0.5], [0.1, 1.0]], 2, 0.3)


# --- the knob ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_lambda_one_is_relevance_order(method):
    rng = np.random.default_rng(6)
    rel = rng.normal(size=20)
    sim = cosine_similarity(rng.normal(size=(20, 4)))
    picks = diversify(rel, 10, method=method, lam=1.0, similarity=sim)
    assert picks == np.argsort(-rel, kind="stable")[:10].tolist()


@pytest.mark.parametrize("method", ["mmr", "dpp"])
def test_small_lambda_covers_more_categories(method):
    # 40 candidates in 8 categories; relevance is mostly the category's, so the top of the list is two categories.
    rng = np.random.default_rng(7)
    cat_of = rng.integers(0, 8, 40)
    rel = 3.0 * (cat_of >= 6) + rng.random(40)
    centroids = rng.normal(size=(8, 16))
    sim = cosine_similarity(centroids[cat_of] + 0.3 * rng.normal(size=(40, 16)))

    def coverage(lam: float) -> int:
        return len(set(cat_of[diversify(rel, 8, method=method, lam=lam, similarity=sim)].tolist()))

    assert coverage(1.0) == 2
    assert coverage(0.2) >= 5


# --- the entry point ---------------------------------------------------------------------------------------------


def test_diversify_rejects_bad_input_with_clear_messages():
    sim = np.eye(4)
    with pytest.raises(ValueError, match="unknown diversity method 'xquad'; valid methods: none, mmr, dpp"):
        diversify(REL4, 2, method="xquad", lam=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        diversify(np.ones((2, 2)), 1, method="none", lam=1.0)
    with pytest.raises(ValueError, match="NaN"):
        diversify([1.0, np.nan], 1, method="none", lam=1.0)
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\]"):
        diversify(REL4, 2, method="mmr", lam=1.5, similarity=sim)
    with pytest.raises(ValueError, match="needs similarity"):
        diversify(REL4, 2, method="dpp", lam=0.5)
    with pytest.raises(ValueError, match="shape \\(4, 4\\)"):
        diversify(REL4, 2, method="mmr", lam=0.5, similarity=np.eye(3))
    with pytest.raises(ValueError, match="categories has 3 entries"):
        diversify(REL4, 2, method="none", lam=1.0, categories=["A", "B", "C"])
    with pytest.raises(ValueError, match="needs categories"):
        diversify(REL4, 2, method="none", lam=1.0, constraint=CategoryConstraint(max_per_category=1))
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        diversify(REL4, -1, method="none", lam=1.0)
    with pytest.raises(ValueError, match="only 4 candidates"):
        diversify(REL4, 5, method="none", lam=1.0)
    c = CategoryConstraint(min_categories=3)
    with pytest.raises(ValueError, match="only 2 distinct categories among the candidates"):
        diversify(REL4, 3, method="mmr", lam=0.5, similarity=sim, categories=["A", "A", "B", "B"], constraint=c)
    assert diversify(REL4, 0, method="dpp", lam=0.5, similarity=sim) == []


def test_guarantee_on_random_instances():
    """~500 random requests x every method: feasible -> exactly k distinct valid picks; else the same reason."""
    rng = np.random.default_rng(8)
    outcomes = {"feasible": 0, "infeasible": 0}
    for _ in range(500):
        n = int(rng.integers(1, 31))
        n_top = int(rng.integers(1, 7))
        paths = [f"D{a} > S{b}" for a, b in zip(rng.integers(0, n_top, n), rng.integers(0, 3, n), strict=True)]
        constraint = None
        if rng.random() < 0.85:
            constraint = CategoryConstraint(
                max_per_category=None if rng.random() < 0.3 else int(rng.integers(1, 4)),
                min_categories=None if rng.random() < 0.3 else int(rng.integers(1, 7)),
                level=int(rng.integers(1, 3)),
            )
        k = int(rng.integers(0, min(n, 8) + 2))
        lam = float(rng.choice([0.0, 1.0, rng.random()], p=[0.1, 0.1, 0.8]))
        rel = rng.normal(size=n) * (1.0 if rng.random() < 0.9 else 0.0)  # sometimes all tied
        kind = rng.integers(0, 3)
        if kind == 0:  # low-rank embeddings: exercises the DPP early stop
            sim = cosine_similarity(rng.normal(size=(n, int(rng.integers(1, 6)))))
        elif kind == 1:
            sim = category_similarity(cut_categories(paths, constraint.level if constraint else 1))
        else:  # symmetric but not PSD
            a = rng.uniform(-1, 1, size=(n, n))
            sim = (a + a.T) / 2
            np.fill_diagonal(sim, 1.0)

        why = feasible(constraint, paths, k) if constraint else (None if k <= n else "only")
        ids = [f"item{i}" for i in range(n)]
        for method in METHODS:
            args = {"method": method, "lam": lam, "similarity": sim, "categories": paths, "constraint": constraint}
            if why is None:
                picks = diversify(rel, k, **args)
                assert len(picks) == k and len(set(picks)) == k
                assert check_picks([ids[i] for i in picks], ids, paths, k, constraint) == [], (method, lam, picks)
            else:
                with pytest.raises(ValueError, match=re.escape(why)):
                    diversify(rel, k, **args)
        outcomes["feasible" if why is None else "infeasible"] += 1
    assert outcomes["feasible"] > 250 and outcomes["infeasible"] > 50, outcomes
