"""Online A/B statistics on hand-computed arrays, attribution rules, and small simulations of the tests' guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.online_ab import (
    Design,
    Exposure,
    Outcome,
    analyse,
    attribute,
    fixed_n_per_arm,
    msprt_halfwidth,
    msprt_lambda,
    plot_sequential,
    ratio_stats,
    relative_lift,
    sequential,
    sequential_n_per_arm,
    srm,
)
from eval.shoppers import UserLevel, per_user_variance, simulate_ab


def test_ratio_stats_is_the_delta_method_by_hand() -> None:
    y = np.array([0.0, 1.0, 2.0, 0.0])
    x = np.array([1.0, 2.0, 4.0, 1.0])
    r, var = ratio_stats(y, x)
    assert r == pytest.approx(3 / 8)
    # u_i = (y_i − r x_i) / mean(x) with mean(x) = 2: (−0.1875, 0.125, 0.25, −0.1875); sample var / n
    u = np.array([-0.375, 0.25, 0.5, -0.375]) / 2
    assert var == pytest.approx(u.var(ddof=1) / 4)
    assert math.isnan(ratio_stats(np.array([1.0]), np.array([1.0]))[1])


def test_srm_chi_square_by_hand() -> None:
    s = srm([5200, 4800], [1, 1])
    assert s["chi2"] == pytest.approx(2 * 200**2 / 5000)  # 16
    assert s["alarm"] and s["p"] < 1e-4
    ok = srm([5030, 4970], [1, 1])
    assert not ok["alarm"] and ok["p"] > 0.5
    assert srm([3000, 1000, 1000], [3, 1, 1])["chi2"] == pytest.approx(0.0)


def test_fixed_sample_size_matches_the_textbook_formula() -> None:
    # 10% -> 11% (Bernoulli): (1.96 + 0.8416)^2 (0.09 + 0.0979) / 0.01^2 = 14,749 per arm
    assert fixed_n_per_arm(0.01, 0.1 * 0.9, 0.11 * 0.89) == 14_749


def test_msprt_lambda_and_its_boundary() -> None:
    v, tau2 = 1e-4, 4e-4
    assert msprt_lambda(np.array(0.0), np.array(v), tau2) == pytest.approx(math.sqrt(v / (v + tau2)))
    hw = float(msprt_halfwidth(np.array(v), tau2, 0.05))
    # at the half-width Λ is exactly 1/α: the confidence sequence and the p-value agree
    assert msprt_lambda(np.array(hw), np.array(v), tau2) == pytest.approx(20.0)
    assert msprt_lambda(np.array(0.5), np.array(np.nan), tau2) == 1.0


def test_sequential_matches_direct_statistics_at_every_look() -> None:
    rng = np.random.default_rng(1)
    is_b, y, x = simulate_ab(rng, 1, 600, lift=0.5)
    looks = np.array([100, 350, 600])
    s = sequential(is_b[0], y[0], x[0], looks, 1e-4)
    for j, n in enumerate(looks):
        b = is_b[0, :n]
        ra, va = ratio_stats(y[0, :n][~b], x[0, :n][~b])
        rb, vb = ratio_stats(y[0, :n][b], x[0, :n][b])
        assert s["r_a"][j] == pytest.approx(ra) and s["r_b"][j] == pytest.approx(rb)
        assert s["var"][j] == pytest.approx(va + vb)
    assert np.all(np.diff(s["p"]) <= 0)  # the always-valid p only goes down
    assert np.all(np.diff(s["ci_hi"] - s["ci_lo"]) <= 0)  # and the confidence sequence only narrows


def test_sequential_plan_is_larger_than_the_fixed_one() -> None:
    level = UserLevel()
    s2 = per_user_variance(level)
    delta = 0.1 * level.ctr
    fixed = fixed_n_per_arm(delta, s2, s2)
    seq = sequential_n_per_arm(delta, s2, s2, delta**2)
    assert fixed < seq < 4 * fixed


def test_msprt_false_positives_stay_below_alpha_when_peeking() -> None:
    """200 A/A experiments of 4,000 users, a look every 100: the always-valid p stays honest, a z-test does not."""
    rng = np.random.default_rng(7)
    level = UserLevel(ctr=0.1)
    is_b, y, x = simulate_ab(rng, 200, 4000, level=level)
    looks = np.arange(100, 4001, 100)
    s = sequential(is_b, y, x, looks, (0.1 * 0.1) ** 2)
    fpr = float((s["p"][:, -1] <= 0.05).mean())
    naive = float((np.nan_to_num(np.abs(s["diff"]) / np.sqrt(s["var"])) > 1.96).any(axis=1).mean())
    assert fpr <= 0.08  # 5% nominal; 200 runs: +2 sd
    assert naive > 0.15  # 40 looks at 1.96 inflate it several-fold


def test_msprt_detects_a_large_lift() -> None:
    rng = np.random.default_rng(3)
    is_b, y, x = simulate_ab(rng, 50, 4000, level=UserLevel(ctr=0.1), lift=0.3)
    s = sequential(is_b, y, x, np.arange(100, 4001, 100), (0.03) ** 2)
    assert (s["p"][:, -1] <= 0.05).mean() >= 0.8


def test_relative_lift_ci_brackets_the_estimate() -> None:
    r = relative_lift(0.10, 1e-5, 0.12, 1e-5)
    assert r["lift"] == pytest.approx(0.2)
    assert r["ci"][0] < 0.2 < r["ci"][1]


def _exp(rec: str, user: str, variant: str, ts: float, items: tuple[str, ...] = ("i1", "i2")) -> Exposure:
    return Exposure(rec_id=rec, user_id=user, variant=variant, ts=ts, items=items)


def test_attribution_by_id_by_window_and_what_is_not_credited() -> None:
    exposures = [_exp("r1", "u1", "a", 100.0), _exp("r2", "u1", "a", 200.0, ("i3",)), _exp("r3", "u2", "b", 150.0)]
    outcomes = [
        Outcome("u1", "i1", "click", 105.0, "r1"),  # by id
        Outcome("u1", "i1", "view", 106.0, "r1"),  # the same click again: counted once
        Outcome("u1", "i9", "click", 107.0, "r1"),  # item not in r1's list
        Outcome("u1", "i3", "cart", 250.0),  # no id: u1's latest exposure showing i3 within the window -> r2
        Outcome("u2", "i1", "purchase", 150.0 + 4000.0),  # no id, outside a 1,800 s window
        Outcome("u3", "i1", "click", 300.0),  # a user never exposed
        Outcome("u1", "i2", "rating", 110.0, "r1"),  # not an outcome kind
    ]
    rows, stats = attribute(exposures, outcomes, window_s=1800)
    counts = {r.exposure.rec_id: r.counts for r in rows}
    assert counts["r1"] == {"click": 1, "cart": 0, "purchase": 0}
    assert counts["r2"] == {"click": 0, "cart": 1, "purchase": 0}
    assert counts["r3"] == {"click": 0, "cart": 0, "purchase": 0}
    assert stats == {"by_id": 1, "by_window": 1, "item_not_shown": 1, "no_exposure": 2, "duplicate": 1}


def _logs(n_users: int, ctr_a: float, ctr_b: float, share_b: float, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    exposures, outcomes = [], []
    for u in range(n_users):
        arm = "b" if rng.random() < share_b else "a"
        for j in range(3):
            rec = f"r{u}-{j}"
            ts = u * 10.0 + j
            exposures.append(Exposure(rec, f"u{u}", arm, ts, ("i1", "i2"), latency_ms=10.0 + j, fallback=j == 2))
            if rng.random() < (ctr_b if arm == "b" else ctr_a):
                outcomes.append(Outcome(f"u{u}", "i1", "click", ts + 1, rec))
    return exposures, outcomes


def test_analyse_reports_a_true_lift_and_the_guardrails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exposures, outcomes = _logs(4000, 0.10, 0.15, 0.5, seed=0)
    design = Design(variants=("a", "b"), weights=(1, 1), baseline=0.10, mde=0.2, planned_users=3000)
    r = analyse(design, exposures, outcomes)
    assert r["users"] == 4000 and r["exposures"] == 12_000
    assert not r["srm"]["alarm"]
    a, b = r["arms"]["a"], r["arms"]["b"]
    assert a["metrics"]["ctr"]["ci"][0] < 0.10 < a["metrics"]["ctr"]["ci"][1]
    assert b["metrics"]["ctr"]["ci"][0] < 0.15 < b["metrics"]["ctr"]["ci"][1]
    assert a["guardrails"]["fallback_rate"] == pytest.approx(1 / 3)
    assert a["guardrails"]["p95_latency_ms"] == pytest.approx(12.0)
    c = r["comparisons"][0]
    assert c["relative_ci"][0] < 0.5 < c["relative_ci"][1]
    assert c["sequential"]["significant"] and c["sequential"]["p_always_valid"] < 0.05
    assert c["fixed_horizon"]["ready"] and c["fixed_horizon"]["significant"]
    assert "b is better than a on ctr" in r["verdict"]
    png = plot_sequential(r, tmp_path / "seq.png")
    assert png is not None and png.stat().st_size > 1000


def test_analyse_raises_the_srm_alarm_and_says_not_to_read_on() -> None:
    exposures, outcomes = _logs(20_000, 0.1, 0.1, 0.46, seed=1)
    r = analyse(Design(variants=("a", "b"), weights=(1, 1), baseline=0.1), exposures, outcomes)
    assert r["srm"]["alarm"]
    assert r["verdict"].startswith("SAMPLE RATIO MISMATCH")


def test_analyse_before_the_planned_size_says_so() -> None:
    exposures, outcomes = _logs(300, 0.1, 0.1, 0.5, seed=2)
    r = analyse(Design(variants=("a", "b"), weights=(1, 1), baseline=0.1), exposures, outcomes)
    f = r["comparisons"][0]["fixed_horizon"]
    assert not f["ready"] and f["planned_users"] > 300
    assert "read it only once they are in" in r["verdict"]
    assert analyse(Design(variants=("a", "b"), weights=(1, 1)), [], [])["verdict"] == "no exposures logged yet."
