"""Ranking metrics for the single-target (leave-one-out) protocols, each with its formula, and bootstrap CIs.

Conventions: `rank` is the 1-based position of the held-out target in a ranked list; `math.inf` (or any rank
> K) means the target was not retrieved within the cut-off and scores 0. Ties are broken pessimistically
(`rank_of`), so a retriever that gives every item the same score cannot look good by accident.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rank_of(scores: np.ndarray, target: int, mask: np.ndarray | None = None) -> float:
    """1-based rank of row `target` among the rows allowed by `mask`, with ties counted against the target.

    rank = 1 + |{j != target : mask_j and s_j >= s_target}|; `inf` when the target's score is not finite
    (the retriever could not produce it) or the target is masked out.
    """
    t = scores[target]
    if not np.isfinite(t) or (mask is not None and not mask[target]):
        return math.inf
    better = scores >= t
    if mask is not None:
        better &= mask
    return float(int(better.sum()))  # includes the target itself, so this is already 1 + others


def recall_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@K (= HR@K with one target): 1 if rank <= K else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return (r <= k).astype(np.float64)


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@K with one relevant item: 1 / log2(rank + 1) if rank <= K else 0 (the ideal DCG is 1)."""
    r = np.asarray(ranks, dtype=np.float64)
    out = np.zeros_like(r)
    hit = r <= k
    out[hit] = 1.0 / np.log2(r[hit] + 1.0)
    return out


def mrr_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Per-user MRR@K: 1 / rank if rank <= K else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    out = np.zeros_like(r)
    hit = r <= k
    out[hit] = 1.0 / r[hit]
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and the percentile bootstrap (1 - alpha) confidence interval over users: (mean, low, high).

    Users are resampled with replacement `n_resamples` times; the interval is the alpha/2 and 1 - alpha/2
    quantiles of the resampled means. Deterministic for a given seed.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_resamples, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(v.mean()), float(lo), float(hi))
