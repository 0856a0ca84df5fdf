"""Simulation study of the online A/B statistics (eval/online_ab.py): false positives, power and the SRM alarm.

Run: `python -m eval.bench.ab_sim --out eval/results/ab_sim.json` (~1 min on 2 cores; `--runs 100` for a smoke
run). Writes the JSON and a plot (same name, .png). Seeded: the same flags give the same numbers.

The shoppers are the user-level core of eval/shoppers.py, calibrated on the demo shop: the shopper model's expected
clicks per list for 2,000 synthetic shoppers, each shown 40 random 5-item lists of the catalog (a shop that does
not personalise), give the control CTR and the spread of users' propensities. Every experiment then draws its users
in arrival order (arm by a fair or a biased coin, exposures per user, clicks per exposure) and is analysed exactly
as `shoprec ab report` analyses a real one (`online_ab.sequential`, `online_ab.srm`).

What is measured, each with a 95% Wilson interval over the simulated experiments:
1. A/A (no true difference): the share of experiments in which the mSPRT's always-valid p ever fell below α = 0.05,
   with a look after every 100 users up to the planned sample size. For contrast, the same data read with a plain
   z-test at every look ("peeking"), and at 5 equally spaced looks.
2. Power for a true +10% relative CTR lift: the mSPRT read all along up to its planned sample size (the size at
   which its last look alone has 80% power, `online_ab.sequential_n_per_arm`), and the fixed-horizon z-test read
   once at its planned size (80% nominal power).
3. SRM: with the sequential planned sample size, the share of experiments whose chi-square alarm fires (p < 0.001)
   when the assignment really sends 52/48 instead of 50/50, and when it is correct. The planned size must be large
   enough for 52/48 to be visible: the chi-square statistic is ≈ 0.0016·N, and 95% power at p < 0.001 needs its
   non-centrality ≈ (3.29 + 1.645)² ≈ 24.4, i.e. N ≥ ~15,300 users; the study states N and checks it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval.online_ab import fixed_n_per_arm, sequential, sequential_n_per_arm, srm, wilson
from eval.shoppers import UserLevel, calibrate, describe, make_shoppers, per_user_variance, simulate_ab

ALPHA = 0.05
LIFT = 0.10
LOOK_EVERY = 100


def _rate(hits: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(hits, n)
    return {"rate": hits / n, "ci95": [lo, hi], "hits": hits, "runs": n}


def calibrated_level(seed: int) -> UserLevel:
    """The user-level summary of the shopper model on the demo shop (see the module docstring)."""
    from retrieval.synthetic import SyntheticConfig, generate

    items = generate(SyntheticConfig(seed=seed, n_users=1)).items
    rng = np.random.default_rng(seed)
    shoppers = make_shoppers(items, 2000, seed=seed)
    lists = [[items[int(i)] for i in rng.choice(len(items), 5, replace=False)] for _ in range(40)]
    return calibrate(shoppers, lists)


def _chunks(runs: int, size: int) -> list[int]:
    return [min(size, runs - s) for s in range(0, runs, size)]


def run_study(runs: int, srm_runs: int, seed: int, log: Any = print) -> dict[str, Any]:
    from scipy.stats import norm

    t0 = time.perf_counter()
    level = calibrated_level(seed)
    log(f"calibrated on the demo shop: {describe(level)} ({time.perf_counter() - t0:.1f} s)")
    sigma2_a = per_user_variance(level)
    sigma2_b = per_user_variance(level, LIFT)
    delta = LIFT * level.ctr
    tau2 = delta**2
    fixed_arm = fixed_n_per_arm(delta, sigma2_a, sigma2_b, ALPHA, 0.8)
    seq_arm = sequential_n_per_arm(delta, sigma2_a, sigma2_b, tau2, ALPHA, 0.8)
    n_fixed, n_seq = 2 * fixed_arm, 2 * seq_arm
    srm_min = math.ceil((norm.ppf(1 - 0.001 / 2) + norm.ppf(0.95)) ** 2 / 0.0016)
    log(f"planned users: fixed horizon {n_fixed}, sequential {n_seq} (SRM 52/48 needs >= {srm_min})")
    rng = np.random.default_rng(seed)
    looks = np.arange(LOOK_EVERY, n_seq + 1, LOOK_EVERY)
    five = np.linspace(n_seq / 5, n_seq, 5).astype(int)
    z_crit = norm.ppf(1 - ALPHA / 2)

    def batch(lift: float, n_runs: int) -> dict[str, int]:
        hits = {"msprt": 0, "peek_every_look": 0, "peek_5_looks": 0, "fixed": 0}
        for r in _chunks(n_runs, 50):
            is_b, y, x = simulate_ab(rng, r, n_seq, level=level, lift=lift)
            s = sequential(is_b, y, x, looks, tau2, ALPHA)
            hits["msprt"] += int((s["p"][:, -1] <= ALPHA).sum())
            z = np.abs(s["diff"]) / np.sqrt(s["var"])
            hits["peek_every_look"] += int((np.nan_to_num(z) > z_crit).any(axis=1).sum())
            z5 = np.abs(s["diff"][:, five // LOOK_EVERY - 1]) / np.sqrt(s["var"][:, five // LOOK_EVERY - 1])
            hits["peek_5_looks"] += int((np.nan_to_num(z5) > z_crit).any(axis=1).sum())
            f = sequential(is_b[:, :n_fixed], y[:, :n_fixed], x[:, :n_fixed], np.array([n_fixed]), tau2, ALPHA)
            hits["fixed"] += int((np.abs(f["diff"][:, 0]) / np.sqrt(f["var"][:, 0]) > z_crit).sum())
        return hits

    t1 = time.perf_counter()
    aa = batch(0.0, runs)
    log(f"A/A: {aa} of {runs} ({time.perf_counter() - t1:.1f} s)")
    t1 = time.perf_counter()
    ab = batch(LIFT, runs)
    log(f"+10%: {ab} of {runs} ({time.perf_counter() - t1:.1f} s)")

    # SRM: only the users per arm matter, so many more experiments are cheap (a binomial count per experiment)
    def srm_rate(share_b: float) -> dict[str, Any]:
        n_b = rng.binomial(n_seq, share_b, size=srm_runs)
        alarms = sum(srm([n_seq - int(b), int(b)], [1, 1])["alarm"] for b in n_b)
        return _rate(int(alarms), srm_runs)

    srm_bad, srm_ok = srm_rate(0.48), srm_rate(0.5)
    # the alarm in a full experiment's data, as a check that the counts path is the same
    is_b, _, _ = simulate_ab(rng, 200, n_seq, level=level, share_b=0.48)
    full_alarm = sum(srm([int((~b).sum()), int(b.sum())], [1, 1])["alarm"] for b in is_b)

    result = {
        "what": "simulation study of eval/online_ab.py (mSPRT, fixed horizon, SRM) on the shopper model's core",
        "seed": seed,
        "runs": runs,
        "srm_runs": srm_runs,
        "alpha": ALPHA,
        "look_every_users": LOOK_EVERY,
        "shopper_model": describe(level),
        "plan": {
            "relative_mde": LIFT,
            "delta_abs": delta,
            "tau2": tau2,
            "fixed_users": n_fixed,
            "sequential_users": n_seq,
            "srm_52_48_needs_users": srm_min,
        },
        "aa_false_positive": {
            "msprt_every_100_users": _rate(aa["msprt"], runs),
            "z_test_every_100_users": _rate(aa["peek_every_look"], runs),
            "z_test_5_looks": _rate(aa["peek_5_looks"], runs),
            "fixed_horizon_once": _rate(aa["fixed"], runs),
        },
        "power_plus_10pct": {
            "msprt_by_sequential_plan": _rate(ab["msprt"], runs),
            "fixed_horizon_at_fixed_plan": _rate(ab["fixed"], runs),
        },
        "srm": {
            "alarm_52_48": srm_bad,
            "alarm_50_50": srm_ok,
            "alarm_52_48_full_simulation": _rate(int(full_alarm), 200),
        },
        "targets": {
            "aa_fpr_le_5pct": aa["msprt"] / runs <= 0.05,
            "power_ge_80pct": ab["msprt"] / runs >= 0.8,
            "srm_52_48_ge_95pct": srm_bad["rate"] >= 0.95,
            "srm_50_50_le_0.1pct": srm_ok["rate"] <= 0.001,
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        ("A/A: mSPRT, look every 100", result["aa_false_positive"]["msprt_every_100_users"]),
        ("A/A: z-test, look every 100", result["aa_false_positive"]["z_test_every_100_users"]),
        ("A/A: z-test, 5 looks", result["aa_false_positive"]["z_test_5_looks"]),
        ("A/A: fixed horizon, once", result["aa_false_positive"]["fixed_horizon_once"]),
        ("+10%: mSPRT power", result["power_plus_10pct"]["msprt_by_sequential_plan"]),
        ("+10%: fixed-horizon power", result["power_plus_10pct"]["fixed_horizon_at_fixed_plan"]),
        ("SRM alarm, 52/48", result["srm"]["alarm_52_48"]),
        ("SRM alarm, 50/50", result["srm"]["alarm_50_50"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ys = np.arange(len(rows))[::-1]
    for y, (_, r) in zip(ys, rows, strict=True):
        lo, hi = r["ci95"]
        ax.errorbar(r["rate"], y, xerr=[[r["rate"] - lo], [hi - r["rate"]]], fmt="o", capsize=3)
        ax.text(min(r["rate"] + 0.03, 0.9), y + 0.15, f"{r['rate']:.1%}", fontsize=8)
    ax.set_yticks(ys, [label for label, _ in rows])
    ax.axvline(0.05, color="red", linestyle="--", linewidth=0.8, label="α = 5%")
    ax.axvline(0.8, color="green", linestyle="--", linewidth=0.8, label="80% power")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(f"share of {result['runs']} simulated experiments (SRM: {result['srm_runs']}), 95% CI")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(
        f"planned users: sequential {result['plan']['sequential_users']}, fixed {result['plan']['fixed_users']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/ab_sim.json"))
    ap.add_argument("--runs", type=int, default=1000, help="Simulated experiments for A/A and for power (each).")
    ap.add_argument("--srm-runs", type=int, default=20_000, help="Simulated experiments for each SRM rate.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run_study(args.runs, args.srm_runs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    plot(result, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {k: result[k] for k in ("plan", "aa_false_positive", "power_plus_10pct", "srm", "targets")}, indent=1
        )
    )
    print(f"written: {args.out}, {args.out.with_suffix('.png')} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
