"""Online A/B statistics: attribution of events to exposures, per-arm metrics, SRM, fixed-horizon and sequential tests.

The unit of analysis is the user (the unit that was randomised); a per-exposure rate such as CTR is a ratio metric
R = Σ clicks / Σ exposures over the arm's users, whose variance comes from the delta method with users as the iid
units (exposures of one user are correlated; treating them as independent understates the variance):

    Var(R) ≈ Var(u) / n,   u_i = (y_i − R·x_i) / mean(x)     (y = clicks, x = exposures of user i)

- **SRM**: Pearson's chi-square of the users per arm against the configured weights (scipy.stats.chisquare); an
  alarm at p < 0.001 (a broken assignment or logging, not chance; the report is then not to be trusted).
- **Fixed horizon**: a two-sided z-test of R_B − R_A, read ONCE, on the first N users (by first exposure) where N is
  the planned sample size: n per arm = (z_{1−α/2} + z_{power})² · (σ²_A + σ²_B) / δ², δ = MDE · baseline.
- **Sequential (mSPRT, always valid)**: Johari, Pekelis & Walsh (2017), the normal mixture with variance τ² over
  the difference θ: with θ̂ = R_B − R_A and V = Var(θ̂),

      Λ_n = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²))),    p_n = min(p_{n−1}, 1 / Λ_n)

  Under H0 (θ = 0) P(∃n: p_n ≤ α) ≤ α, so p_n may be read after every user; the matching confidence sequence is
  θ̂ ± sqrt(V (V + τ²) / τ² · (2 ln(1/α) + ln((V + τ²) / V))), intersected over time. τ = δ (the MDE in absolute
  terms): the mixture puts its weight on effects of the size the test is designed for.

What scipy has is used (chisquare, norm, binomtest's Wilson interval); the rest is written here. eval/ab.py is for
paired offline comparisons (the same users under both configs) and does not apply to randomised arms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SRM_ALARM_P = 0.001
METRIC_EVENTS = {"ctr": "click", "cart_rate": "cart", "purchase_rate": "purchase"}


# ------------------------------------------------------------------------------------------------------------------
# Inputs: what was shown, what happened, and how the experiment is designed
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """One served response inside an experiment (one row of the recommendation log)."""

    rec_id: str
    user_id: str
    variant: str
    ts: float  # seconds since the epoch
    items: tuple[str, ...]
    latency_ms: float | None = None
    fallback: bool = False
    valid: bool = True


@dataclass(frozen=True)
class Outcome:
    """One shopper event that may be attributed to an exposure: a click (or a view from a list), a cart, a purchase."""

    user_id: str
    item_id: str
    kind: str  # click | cart | purchase
    ts: float | None
    rec_id: str | None = None


@dataclass(frozen=True)
class Design:
    """How the experiment is read (from its config): arms, primary metric, α, power, MDE and planned size."""

    variants: tuple[str, ...]  # the first one is the control
    weights: tuple[float, ...]
    primary_metric: str = "ctr"
    alpha: float = 0.05
    power: float = 0.8
    mde: float = 0.10  # relative
    baseline: float | None = None
    planned_users: int | None = None
    attribution_window_s: float = 1800.0


@dataclass
class _Exposed:
    exposure: Exposure
    counts: dict[str, int] = field(default_factory=lambda: {"click": 0, "cart": 0, "purchase": 0})


# ------------------------------------------------------------------------------------------------------------------
# Attribution
# ------------------------------------------------------------------------------------------------------------------


def attribute(
    exposures: Sequence[Exposure], outcomes: Iterable[Outcome], window_s: float
) -> tuple[list[_Exposed], dict[str, int]]:
    """Credit each event to one exposure, and count what could not be credited.

    An event carrying a `rec_id` of this experiment's log goes to that exposure when the item was in its list. An
    event without one goes to the same user's latest exposure that showed the item within `window_s` seconds
    before the event. Each (exposure, item, kind) counts once: two clicks on one shown item are one click.
    """
    rows = [_Exposed(e) for e in exposures]
    by_id = {r.exposure.rec_id: r for r in rows}
    by_user: dict[str, list[_Exposed]] = {}
    for r in sorted(rows, key=lambda r: r.exposure.ts):
        by_user.setdefault(r.exposure.user_id, []).append(r)
    seen: set[tuple[str, str, str]] = set()
    stats = {"by_id": 0, "by_window": 0, "item_not_shown": 0, "no_exposure": 0, "duplicate": 0}
    for ev in outcomes:
        kind = "click" if ev.kind in ("click", "view") else ev.kind
        if kind not in ("click", "cart", "purchase"):
            continue
        target: _Exposed | None = None
        if ev.rec_id is not None and ev.rec_id in by_id:
            target = by_id[ev.rec_id]
            if ev.item_id not in target.exposure.items:
                stats["item_not_shown"] += 1
                continue
            how = "by_id"
        else:
            if ev.ts is None:
                stats["no_exposure"] += 1
                continue
            for r in reversed(by_user.get(ev.user_id, [])):
                if r.exposure.ts <= ev.ts and ev.ts - r.exposure.ts <= window_s and ev.item_id in r.exposure.items:
                    target = r
                    break
            if target is None:
                stats["no_exposure"] += 1
                continue
            how = "by_window"
        key = (target.exposure.rec_id, ev.item_id, kind)
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        target.counts[kind] += 1
        stats[how] += 1
    return rows, stats


# ------------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------------


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def srm(counts: Sequence[int], weights: Sequence[float]) -> dict[str, Any]:
    """Sample-ratio mismatch: Pearson chi-square of the users per arm against the weights; alarm at p < 0.001."""
    from scipy.stats import chisquare

    obs = np.asarray(counts, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if obs.sum() == 0:
        return {"chi2": 0.0, "p": 1.0, "alarm": False, "observed": list(map(int, obs)), "expected_share": list(w)}
    expected = obs.sum() * w / w.sum()
    res = chisquare(obs, expected)
    p = float(res.pvalue)
    return {
        "chi2": float(res.statistic),
        "p": p,
        "alarm": p < SRM_ALARM_P,
        "observed": [int(x) for x in obs],
        "expected_share": [float(x) for x in w / w.sum()],
    }


def ratio_stats(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """(R, Var(R)) of the ratio metric Σnum/Σden with users as the units (delta method); nan when n < 2."""
    n = num.size
    if n < 2 or den.sum() == 0:
        return (math.nan, math.nan)
    r = float(num.sum() / den.sum())
    u = (num - r * den) / den.mean()
    return r, float(u.var(ddof=1) / n)


def wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy.stats.binomtest)."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return (float(ci.low), float(ci.high))


def relative_lift(ra: float, va: float, rb: float, vb: float, alpha: float = 0.05) -> dict[str, Any]:
    """R_B / R_A − 1 with a CI from the delta method on log(R_B / R_A) (asymmetric, never below −100%)."""
    if not (ra > 0 and rb > 0) or math.isnan(va) or math.isnan(vb):
        return {"lift": (rb / ra - 1) if ra > 0 else None, "ci": [None, None]}
    se = math.sqrt(vb / rb**2 + va / ra**2)
    z = _z(1 - alpha / 2)
    log = math.log(rb / ra)
    return {"lift": rb / ra - 1, "ci": [math.exp(log - z * se) - 1, math.exp(log + z * se) - 1]}


def fixed_n_per_arm(delta: float, sigma2_a: float, sigma2_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Users per arm for a two-sided z-test of a difference `delta` at level α with the given power."""
    z = _z(1 - alpha / 2) + _z(power)
    return math.ceil(z**2 * (sigma2_a + sigma2_b) / delta**2)


def mde_at(n_per_arm: float, sigma2_a: float, sigma2_b: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest absolute difference the fixed-horizon test detects with this power at n users per arm."""
    if n_per_arm <= 0:
        return math.inf
    return (_z(1 - alpha / 2) + _z(power)) * math.sqrt((sigma2_a + sigma2_b) / n_per_arm)


def msprt_lambda(diff: np.ndarray, var: np.ndarray, tau2: float) -> np.ndarray:
    """The normal-mixture likelihood ratio Λ (elementwise); 1 (no evidence) where the variance is unknown or 0."""
    diff, var = np.asarray(diff, dtype=np.float64), np.asarray(var, dtype=np.float64)
    ok = np.isfinite(var) & (var > 0) & np.isfinite(diff)
    v = np.where(ok, var, 1.0)
    d = np.where(ok, diff, 0.0)
    log_lam = 0.5 * np.log(v / (v + tau2)) + tau2 * d**2 / (2 * v * (v + tau2))
    return np.where(ok, np.exp(np.minimum(log_lam, 700.0)), 1.0)


def msprt_halfwidth(var: np.ndarray, tau2: float, alpha: float) -> np.ndarray:
    """Half-width of the always-valid confidence interval for θ at each look (inf where the variance is unknown)."""
    var = np.asarray(var, dtype=np.float64)
    ok = np.isfinite(var) & (var > 0)
    v = np.where(ok, var, 1.0)
    hw = np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((v + tau2) / v)))
    return np.where(ok, hw, np.inf)


def sequential_n_per_arm(
    delta: float, sigma2_a: float, sigma2_b: float, tau2: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Users per arm at which the mSPRT, read at the last look alone, rejects with the given power.

    Conservative: a test read all along also rejects at earlier looks, so its power at this size is higher. At n
    per arm V = (σ²_A + σ²_B)/n, and Λ ≥ 1/α  ⇔  |θ̂| ≥ c_n = sqrt(V (V+τ²)/τ² (2 ln(1/α) + ln((V+τ²)/V))).
    """
    from scipy.stats import norm

    s2 = sigma2_a + sigma2_b

    def power_at(n: int) -> float:
        v = s2 / n
        c = float(msprt_halfwidth(np.array(v), tau2, alpha))
        se = math.sqrt(v)
        return float(norm.sf((c - delta) / se) + norm.cdf((-c - delta) / se))

    lo, hi = 2, 4
    while power_at(hi) < power:
        lo, hi = hi, hi * 2
        if hi > 10**10:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power_at(mid) < power else (lo, mid)
    return hi


def sequential(
    is_b: np.ndarray, num: np.ndarray, den: np.ndarray, looks: np.ndarray, tau2: float, alpha: float = 0.05
) -> dict[str, np.ndarray]:
    """The mSPRT at each look: users per arm, R_A, R_B, θ̂, V, Λ, the always-valid p and confidence sequence.

    Arrays are (..., users) in order of first exposure (a leading batch axis runs many simulated experiments at
    once); `looks` are user counts (1-based: the statistics after the first `looks[j]` users). Vectorised by
    cumulative sums of y, x, y², x², xy per arm, so every look costs O(1).
    """
    is_b = np.asarray(is_b, dtype=bool)
    y, x = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    idx = np.asarray(looks, dtype=np.int64) - 1
    out: dict[str, np.ndarray] = {}
    per_arm = []
    for arm in (~is_b, is_b):
        m = arm.astype(np.float64)
        sums = [np.cumsum(q * m, axis=-1)[..., idx] for q in (m, y, x, y * y, x * x, x * y)]
        n, sy, sx, syy, sxx, sxy = sums
        with np.errstate(invalid="ignore", divide="ignore"):
            r = sy / sx
            mx = sx / n
            # sample variance of u = (y − r x) / mean(x): Σ(y − r x)² = Syy − 2r Sxy + r² Sxx (its mean is 0)
            ss = syy - 2 * r * sxy + r * r * sxx
            var = np.where(n >= 2, ss / (n - 1) / mx**2 / n, np.nan)
        per_arm.append((n, r, var))
    (na, ra, va), (nb, rb, vb) = per_arm
    diff = rb - ra
    v = va + vb
    lam = msprt_lambda(diff, v, tau2)
    p = np.minimum.accumulate(np.minimum(1.0, 1.0 / lam), axis=-1)
    hw = msprt_halfwidth(v, tau2, alpha)
    lo = np.maximum.accumulate(np.where(np.isfinite(diff), diff - hw, -np.inf), axis=-1)
    hi = np.minimum.accumulate(np.where(np.isfinite(diff), diff + hw, np.inf), axis=-1)
    out.update(n_a=na, n_b=nb, r_a=ra, r_b=rb, diff=diff, var=v, lam=lam, p=p, ci_lo=lo, ci_hi=hi)
    return out


def z_test(diff: float, var: float) -> float:
    """Two-sided p of a z-test of a difference with known variance."""
    from scipy.stats import norm

    if not var > 0 or math.isnan(diff):
        return 1.0
    return float(2 * norm.sf(abs(diff) / math.sqrt(var)))


# ------------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------------


def _per_user(rows: Sequence[_Exposed]) -> dict[str, dict[str, Any]]:
    users: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r.exposure.ts):
        u = users.setdefault(
            r.exposure.user_id,
            {"variant": r.exposure.variant, "first": r.exposure.ts, "exposures": 0, "variants": set()},
        )
        u["variants"].add(r.exposure.variant)
        u["exposures"] += 1
        for k, c in r.counts.items():
            u[k] = u.get(k, 0) + c
    return users


def plan(design: Design, control_rate: float | None, control_sigma2: float | None) -> dict[str, Any]:
    """The planned sample size (users, all arms) of both tests, and τ² of the mSPRT."""
    base = design.baseline if design.baseline is not None else control_rate
    if base is None or not base > 0:
        return {"baseline": base, "source": None, "fixed_users": design.planned_users, "tau2": None}
    delta = design.mde * base
    if design.baseline is not None or control_sigma2 is None or not control_sigma2 > 0:
        # before data: one exposure per user, a Bernoulli outcome
        sigma2, source = base * (1 - base), "config baseline, one exposure per user"
    else:
        sigma2, source = control_sigma2, "the control arm's observed rate and per-user variance"
    tau2 = delta**2
    k = len(design.variants)
    fixed = fixed_n_per_arm(delta, sigma2, sigma2 * (1 + design.mde), design.alpha, design.power)
    seq = sequential_n_per_arm(delta, sigma2, sigma2 * (1 + design.mde), tau2, design.alpha, design.power)
    share = min(design.weights) / sum(design.weights)  # the smallest arm sets the size
    return {
        "baseline": base,
        "delta": delta,
        "sigma2_per_user": sigma2,
        "source": source,
        "fixed_users": design.planned_users or math.ceil(fixed / share),
        "fixed_users_computed": math.ceil(fixed / share),
        "sequential_users": math.ceil(seq / share),
        "tau2": tau2,
        "arms": k,
    }


def analyse(
    design: Design,
    exposures: Sequence[Exposure],
    outcomes: Iterable[Outcome],
    *,
    look_every: int = 100,
) -> dict[str, Any]:
    """The whole report: attribution, per-arm metrics with CIs, lifts, SRM, fixed-horizon and sequential tests."""
    alpha = design.alpha
    unknown = sorted({e.variant for e in exposures} - set(design.variants))
    rows, attribution = attribute(exposures, outcomes, design.attribution_window_s)
    users = _per_user(rows)
    switched = sum(len(u["variants"]) > 1 for u in users.values())
    primary = METRIC_EVENTS[design.primary_metric]

    arms: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for v in design.variants:
        us = [u for u in users.values() if u["variant"] == v]
        ex = [r for r in rows if r.exposure.variant == v]
        den = np.array([u["exposures"] for u in us], dtype=np.float64)
        arrays[v] = {"den": den}
        metrics: dict[str, Any] = {}
        for name, kind in METRIC_EVENTS.items():
            num = np.array([u.get(kind, 0) for u in us], dtype=np.float64)
            arrays[v][kind] = num
            r, var = ratio_stats(num, den)
            z = _z(1 - alpha / 2)
            half = z * math.sqrt(var) if var == var else math.nan
            k_users = int((num > 0).sum())
            metrics[name] = {
                "per_exposure": r,
                "ci": [max(0.0, r - half), r + half],  # a rate is never negative; the normal CI can reach below 0
                "var": var,
                "events": int(num.sum()),
                "per_user": k_users / len(us) if us else math.nan,
                "per_user_ci": list(wilson(k_users, len(us), alpha)),
            }
        lat = [e.exposure.latency_ms for e in ex if e.exposure.latency_ms is not None]
        arms[v] = {
            "users": len(us),
            "exposures": len(ex),
            "metrics": metrics,
            "guardrails": {
                "p95_latency_ms": float(np.percentile(lat, 95)) if lat else None,
                "fallback_rate": sum(e.exposure.fallback for e in ex) / len(ex) if ex else None,
                "validity_rate": sum(e.exposure.valid for e in ex) / len(ex) if ex else None,
            },
        }

    control = design.variants[0]
    c = arms[control]["metrics"][design.primary_metric]
    sigma2_c = c["var"] * arms[control]["users"] if c["var"] == c["var"] else None
    planned = plan(design, c["per_exposure"] if c["per_exposure"] == c["per_exposure"] else None, sigma2_c)
    out: dict[str, Any] = {
        "design": {
            "variants": list(design.variants),
            "weights": list(design.weights),
            "primary_metric": design.primary_metric,
            "alpha": alpha,
            "power": design.power,
            "mde": design.mde,
            "attribution_window_s": design.attribution_window_s,
        },
        "users": len(users),
        "exposures": len(rows),
        "attribution": attribution,
        "users_in_two_arms": switched,
        "unknown_variants": unknown,
        "arms": arms,
        "srm": srm([arms[v]["users"] for v in design.variants], design.weights),
        "plan": planned,
        "comparisons": [],
    }
    order = sorted(users.values(), key=lambda u: u["first"])
    for v in design.variants[1:]:
        out["comparisons"].append(_compare(design, control, v, order, arms, planned, primary, look_every))
    out["verdict"] = _verdict(out)
    return out


def _compare(
    design: Design,
    control: str,
    v: str,
    order: list[dict[str, Any]],
    arms: dict[str, dict[str, Any]],
    planned: dict[str, Any],
    primary: str,
    look_every: int,
) -> dict[str, Any]:
    alpha = design.alpha
    a, b = arms[control]["metrics"][design.primary_metric], arms[v]["metrics"][design.primary_metric]
    diff = b["per_exposure"] - a["per_exposure"]
    var = a["var"] + b["var"]
    z = _z(1 - alpha / 2)
    sd = math.sqrt(var) if var == var else math.nan
    pair = [u for u in order if u["variant"] in (control, v)]
    is_b = np.array([u["variant"] == v for u in pair], dtype=bool)
    num = np.array([u.get(primary, 0) for u in pair], dtype=np.float64)
    den = np.array([u["exposures"] for u in pair], dtype=np.float64)
    res: dict[str, Any] = {
        "variant": v,
        "control": control,
        "metric": design.primary_metric,
        "diff": diff,
        "diff_ci": [diff - z * sd, diff + z * sd],
        **{
            f"relative_{k}": val
            for k, val in relative_lift(a["per_exposure"], a["var"], b["per_exposure"], b["var"], alpha).items()
        },
        "p_naive": z_test(diff, var),
    }
    tau2 = planned.get("tau2")
    n = len(pair)
    # the fixed-horizon test: once, on the first N users of this pair (N = the planned users of two arms)
    share = (design.weights[0] + design.weights[design.variants.index(v)]) / sum(design.weights)
    horizon = planned.get("fixed_users")
    horizon_pair = math.ceil(horizon * share) if horizon else None
    fixed: dict[str, Any] = {"planned_users": horizon_pair, "users": n}
    sigma2 = planned.get("sigma2_per_user")
    if horizon_pair and n >= horizon_pair:
        first = sequential(
            is_b[:horizon_pair], num[:horizon_pair], den[:horizon_pair], np.array([horizon_pair]), tau2 or 1.0, alpha
        )
        d, vv = float(first["diff"][0]), float(first["var"][0])
        p = z_test(d, vv)
        fixed.update(ready=True, diff=d, ci=[d - z * math.sqrt(vv), d + z * math.sqrt(vv)], p=p, significant=p < alpha)
    else:
        fixed.update(ready=False)
    if sigma2:
        n_arm = min(int(is_b.sum()), int((~is_b).sum()))
        fixed["mde_now_relative"] = mde_at(n_arm, sigma2, sigma2, alpha, design.power) / planned["baseline"]
    res["fixed_horizon"] = fixed
    if tau2 and n >= 2:
        looks = np.unique(np.append(np.arange(look_every, n + 1, look_every), n))
        s = sequential(is_b, num, den, looks, tau2, alpha)
        res["sequential"] = {
            "tau2": tau2,
            "p_always_valid": float(s["p"][-1]),
            "ci_always_valid": [float(s["ci_lo"][-1]), float(s["ci_hi"][-1])],
            "significant": bool(s["p"][-1] < alpha),
            "trace": {
                "users": looks.tolist(),
                "diff": _floats(s["diff"]),
                "p": _floats(s["p"]),
                "ci_lo": _floats(s["ci_lo"]),
                "ci_hi": _floats(s["ci_hi"]),
            },
        }
    else:
        res["sequential"] = {"tau2": tau2, "p_always_valid": 1.0, "significant": False, "trace": None}
    return res


def _floats(a: np.ndarray) -> list[float | None]:
    return [float(x) if np.isfinite(x) else None for x in a]


def _verdict(r: dict[str, Any]) -> str:
    """One plain paragraph: SRM first (nothing else counts when it fires), then each arm's sequential and fixed
    readings."""
    if r["users"] == 0:
        return "no exposures logged yet."
    if r["srm"]["alarm"]:
        return (
            f"SAMPLE RATIO MISMATCH (chi-square p={r['srm']['p']:.2g} < {SRM_ALARM_P}): users per arm "
            f"{r['srm']['observed']} vs shares {[round(s, 3) for s in r['srm']['expected_share']]}. The assignment or "
            "the exposure logging is broken; do not read the metrics until the cause is found."
        )
    lines = []
    metric = r["design"]["primary_metric"]
    for c in r["comparisons"]:
        seq = c["sequential"]
        rel = c["relative_lift"]
        lo, hi = c["relative_ci"]
        rel_s = f"{rel:+.1%}" if rel is not None else "n/a"
        ci_s = f" [{lo:+.1%}, {hi:+.1%}]" if lo is not None else ""
        if seq["significant"]:
            who = "better" if c["diff"] > 0 else "worse"
            lines.append(
                f"{c['variant']} is {who} than {c['control']} on {metric}: {rel_s}{ci_s} relative, always-valid "
                f"p={seq['p_always_valid']:.3g} < {r['design']['alpha']} (may be read at any time)."
            )
        else:
            lines.append(
                f"{c['variant']} vs {c['control']} on {metric}: {rel_s}{ci_s}, no decision yet "
                f"(always-valid p={seq['p_always_valid']:.3g})."
            )
        f = c["fixed_horizon"]
        if f.get("ready"):
            word = "significant" if f["significant"] else "not significant"
            lines.append(f"  Fixed horizon at the planned {f['planned_users']} users: p={f['p']:.3g}, {word}.")
        elif f.get("planned_users"):
            lines.append(
                f"  Fixed horizon: {f['users']} of the planned {f['planned_users']} users; read it only once "
                "they are in."
            )
    return "\n".join(lines)


def plot_sequential(report: dict[str, Any], path: Any) -> Any:
    """A PNG of the sequential evidence over users: the always-valid p and the confidence sequence of θ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [c for c in report["comparisons"] if c["sequential"].get("trace")]
    if not comps:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    alpha = report["design"]["alpha"]
    bounds: list[float] = []
    for c in comps:
        t = c["sequential"]["trace"]
        users = np.array(t["users"])
        ax1.plot(users, t["p"], label=f"{c['variant']} vs {c['control']}")
        lo = np.array([np.nan if x is None else x for x in t["ci_lo"]], dtype=float)
        hi = np.array([np.nan if x is None else x for x in t["ci_hi"]], dtype=float)
        d = np.array([np.nan if x is None else x for x in t["diff"]], dtype=float)
        ax2.plot(users, d, label=f"{c['variant']} − {c['control']}")
        ax2.fill_between(users, lo, hi, alpha=0.2)
        tail = slice(len(users) // 10, None)  # the first looks' intervals are wide: scale the axis to the rest
        bounds += [x for x in (*lo[tail], *hi[tail]) if np.isfinite(x)]
    if bounds:
        pad = 0.1 * (max(bounds) - min(bounds)) or 0.01
        ax2.set_ylim(min(bounds) - pad, max(bounds) + pad)
    ax1.axhline(alpha, color="red", linestyle="--", label=f"α = {alpha}")
    ax1.set_yscale("log")
    ax1.set_ylabel("always-valid p (mSPRT)")
    ax1.legend()
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_ylabel(f"{report['design']['primary_metric']}: B − A (always-valid 95% CS)")
    ax2.set_xlabel("users (in order of first exposure)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
