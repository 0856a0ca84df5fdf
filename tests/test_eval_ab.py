"""Offline A/B: the paired statistics on hand-made values, and the whole command on a small shop: identical
configs show no difference, a deliberately broken variant is detected as worse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from eval.ab import compare, mde, run_offline, sign_flip_p
from shoprec.cli import app

CHEAP = {"signals": ["popularity", "itemknn", "bm25"], "similarity": "category"}


def test_identical_values_show_no_detectable_difference():
    v = np.r_[np.ones(20), np.zeros(30)]
    c = compare(v, v)
    assert c["diff"] == 0 and c["p_permutation"] == 1.0 and c["ties"] == 50
    assert c["verdict"].startswith("no detectable difference on NDCG@10")
    assert "the same value for every one of the 50 users" in c["verdict"]


def test_a_clear_shift_is_detected_with_its_direction():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    better = compare(a, a + 0.1 + 0.01 * rng.standard_normal(200))
    assert better["verdict"].startswith("B better on NDCG@10 by +0.09")
    assert better["ci95"][0] > 0.09 and better["p_permutation"] < 0.001 and better["p_wilcoxon"] < 0.001
    worse = compare(a, a - 0.1)
    assert worse["verdict"].startswith("B worse")


def test_noise_alone_is_not_called_a_win():
    rng = np.random.default_rng(1)
    a, b = rng.random(100), rng.random(100)  # two draws of the same distribution
    c = compare(a, b, seed=1)
    assert c["verdict"].startswith("no detectable difference") and c["p_permutation"] > 0.05


def test_mde_and_sign_flip_by_hand():
    d = np.array([1.0, -1.0, 1.0, -1.0])  # sd (ddof=1) = sqrt(4/3)
    assert mde(d) == pytest.approx(2.8016 * math.sqrt(4 / 3) / 2, rel=1e-3)
    assert sign_flip_p(np.zeros(5)) == 1.0
    # all 8 differences +1: only the all-plus sign vector (1 in 256) reaches |mean| = 1
    p = sign_flip_p(np.ones(8), n_resamples=20_000)
    assert p == pytest.approx(2 / 256, abs=0.004)
    with pytest.raises(ValueError, match="same users"):
        compare([1.0, 2.0], [1.0])


def test_offline_ab_identical_configs_and_a_broken_variant(tmp_path, shop_dir):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"name": "fusion", "system": "fusion", **CHEAP}))
    same = run_offline(str(shop_dir), str(a), str(a), users=40)
    assert same["verdict"].startswith("no detectable difference")
    broken = tmp_path / "broken.json"  # the same ranking, read backwards: must be caught as worse
    broken.write_text(json.dumps({"name": "fusion-reversed", "system": "fusion", "perturb": "reverse", **CHEAP}))
    res = run_offline(str(shop_dir), str(a), str(broken), users=40)
    assert res["verdict"].startswith("B worse on NDCG@10"), res["verdict"]
    assert res["users"] == 40 and len(res["user_ids"]) == 40


def test_cli_prints_the_verdict_and_a_broken_llm_prompt_is_worse(tmp_path, shop_dir):
    llm = {"system": "llm", "backend": "fake", "reasons": False, "batch_size": 20, **CHEAP}
    a = tmp_path / "a.json"
    a.write_text(json.dumps({**llm, "name": "llm"}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**llm, "name": "llm-reversed", "perturb": "reverse"}))
    out = tmp_path / "ab.json"
    r = CliRunner().invoke(
        app,
        ["ab", "offline", "--a", str(a), "--b", str(b), "--data", str(shop_dir), "--users", "40", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "verdict: B worse on NDCG@10" in " ".join(r.output.split())
    assert json.loads(out.read_text())["comparisons"][0]["metric"] == "ndcg@10"


def test_one_bootstrap_and_a_sign_flip_that_agrees_with_scipy():
    """The paired CI is eval.metrics.bootstrap_ci on the differences; the hand-written sign flip (kept for speed)
    matches scipy.stats.permutation_test's exact p (all 2^12 sign vectors) within Monte-Carlo error."""
    from scipy.stats import permutation_test

    from eval.ab import paired_bootstrap_ci
    from eval.metrics import bootstrap_ci

    d = np.random.default_rng(4).normal(0.3, 1.0, 12)
    assert paired_bootstrap_ci(d, seed=2) == bootstrap_ci(d, n_resamples=2000, seed=2)[1:]
    exact = permutation_test((d,), np.mean, permutation_type="samples", vectorized=True, n_resamples=10_000).pvalue
    assert sign_flip_p(d, n_resamples=20_000) == pytest.approx(exact, abs=0.01)
