"""The metrics of one system's lists: per-user vectors (`case_metrics`: accuracy, diversity, validity, grounded
reasons; NaN where a metric does not apply) and their summary (`summarise`: means with 95% bootstrap CIs, plus
the list-set metrics: catalog coverage, Gini exposure, latency percentiles).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval.metrics import (
    alpha_ndcg_at_k,
    bootstrap_ci,
    catalog_coverage,
    category_coverage_at_k,
    duplicate_rate,
    gini_exposure,
    hallucination_rate,
    intra_list_diversity,
    latency_percentiles,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    reason_grounded,
    recall_at_k,
)
from eval.prepare import Prepared
from eval.runners import CaseOutput
from eval.splits import Case


def case_metrics(prep: Prepared, cases: Sequence[Case], outputs: Sequence[CaseOutput]) -> dict[str, np.ndarray]:
    """Per-user metric vectors (aligned with `cases`); NaN where a metric does not apply to a user."""
    cat = prep.catalog
    level = prep.level

    def cats(ids: Sequence[str]) -> list[str]:
        return [cat[i].category_at(level) if i in cat else "" for i in ids]

    ranks = []
    per: dict[str, list[float]] = {k: [] for k in ("coverage@5", "coverage@10", "ild@5", "ild@10", "alpha_ndcg@10")}
    per.update({k: [] for k in ("novelty@10", "hallucination", "duplicates", "violation", "latency_ms")})
    per.update({k: [] for k in ("valid", "fallback", "grounded", "infeasible")})
    for case, o in zip(cases, outputs, strict=True):
        ranks.append(float(o.items.index(case.target) + 1) if case.target in o.items else math.inf)
        c = cats(o.items)
        per["coverage@5"].append(category_coverage_at_k(c, 5))
        per["coverage@10"].append(category_coverage_at_k(c, 10))
        for k in (5, 10):
            rows = cat.rows(o.items[:k])
            per[f"ild@{k}"].append(intra_list_diversity(prep.vectors[rows]) if prep.vectors is not None else math.nan)
        intents = set(cats([case.target, *case.history[-10:]]))
        per["alpha_ndcg@10"].append(alpha_ndcg_at_k(c, intents, 10))
        per["novelty@10"].append(novelty(o.items[:10], prep.popularity, prep.n_train_users))
        allowed = o.candidates or cat.ids
        per["hallucination"].append(hallucination_rate(o.items, set(allowed)))
        per["duplicates"].append(duplicate_rate(o.items))
        per["violation"].append(float(o.violations > 0))
        per["latency_ms"].append(o.latency_ms)
        valid = not o.fallback and per["hallucination"][-1] == 0 and per["duplicates"][-1] == 0 and not o.violations
        per["valid"].append(float(valid))
        per["fallback"].append(float(o.fallback))
        per["infeasible"].append(float(o.infeasible))
        per["grounded"].append(_grounded_share(prep, case, o))
    out = {
        "ndcg@10": ndcg_at_k(ranks, 10),
        "recall@10": recall_at_k(ranks, 10),
        "mrr@10": mrr_at_k(ranks, 10),
        "ndcg@5": ndcg_at_k(ranks, 5),
        "recall@5": recall_at_k(ranks, 5),
    }
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in per.items()})
    return out


def _grounded_share(prep: Prepared, case: Case, o: CaseOutput) -> float:
    if o.reasons is None or not o.reasons:
        return math.nan
    cat = prep.catalog
    hist = [cat[i] for i in case.history[-10:] if i in cat]
    hist_cats = [it.category_at(lv) for it in hist for lv in range(1, len(it.category) + 1)]
    ok = 0
    for item_id, reason in zip(o.items, o.reasons, strict=False):
        if item_id not in cat:
            continue
        it = cat[item_id]
        ok += reason_grounded(
            reason,
            pick_title=it.title,
            pick_categories=[it.category_at(lv) for lv in range(1, len(it.category) + 1)],
            pick_brand=it.brand,
            history_titles=[h.title for h in hist],
            history_categories=hist_cats,
            history_brands=[h.brand for h in hist],
        )
    return ok / len(o.reasons)


def summarise(
    prep: Prepared, cases: Sequence[Case], outputs: Sequence[CaseOutput], values: Mapping[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """Means with 95% bootstrap CIs per metric, and the list-set metrics (catalog coverage, Gini, latency)."""
    metrics: dict[str, list[float] | None] = {}
    for name, v in values.items():
        finite = v[~np.isnan(v)]
        metrics[name] = [round(x, 5) for x in bootstrap_ci(finite, seed=seed)] if finite.size else None
    lists10 = [o.items[:10] for o in outputs]
    return {
        "metrics": metrics,
        "aggregate": {
            "catalog_coverage@10": round(catalog_coverage(lists10, len(prep.catalog)), 5),
            "gini@10": round(gini_exposure(lists10, prep.catalog.ids), 5),
            "latency_ms": {k: round(v, 2) for k, v in latency_percentiles([o.latency_ms for o in outputs]).items()},
            "fallback_reasons": dict(Counter((o.fallback_reason or "")[:60] for o in outputs if o.fallback)),
        },
    }
