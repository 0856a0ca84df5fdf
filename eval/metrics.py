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
    quantiles of the resampled means (scipy.stats.bootstrap, method "percentile"). Deterministic for a given seed.
    The one bootstrap of the project: paired differences (eval.ab) are resampled through it too.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    if v.size == 1 or np.all(v == v[0]):  # every resample has the same mean (scipy needs >= 2 distinct values)
        return (float(v.mean()), float(v[0]), float(v[0]))
    from scipy.stats import bootstrap

    ci = bootstrap(
        (v,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=1 - alpha,
        method="percentile",
        vectorized=True,
        axis=-1,
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return (float(v.mean()), float(ci.low), float(ci.high))


def hit_rate_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Per-user HR@K: 1 if the target is in the top K. With one target per user this IS Recall@K."""
    return recall_at_k(ranks, k)


# ---------------------------------------------------------------------------------------------------- beyond accuracy
# These score one ranked list (a user's top K) or a set of lists; the runner averages the per-list values over users.


def intra_list_diversity(vectors: np.ndarray) -> float:
    """ILD of one list from its items' embeddings (rows): 1 − mean pairwise cosine similarity.

    ILD = 1 − (2 / (K(K−1))) · Σ_{i<j} cos(v_i, v_j). 0 for K identical items, 1 for mutually orthogonal ones
    (it can exceed 1 with negative cosines). A list of fewer than 2 items has no pairs: NaN (skipped by the mean).
    """
    v = np.asarray(vectors, dtype=np.float64)
    k = v.shape[0]
    if k < 2:
        return math.nan
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    sim = unit @ unit.T
    pairs = sim[np.triu_indices(k, 1)]
    return float(1.0 - pairs.mean())


def category_coverage_at_k(categories: Sequence[str], k: int) -> float:
    """Category coverage@K of one list: |distinct categories among the top K| / K.

    Divided by K (not by the number of categories in the catalog), so 1.0 means "every pick from a different
    category" and 1/K means "all from one". A list shorter than K is still divided by K (missing picks cover nothing).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(categories[:k])) / k


def alpha_ndcg_at_k(categories: Sequence[str], intents: Sequence[str] | set[str], k: int, alpha: float = 0.5) -> float:
    """α-NDCG@K (Clarke et al., SIGIR 2008) of one list, with categories as the subtopics ("intents").

    An item covers one subtopic, its category; it is relevant to it when that category is one of the user's
    `intents` (the runner uses the categories of the target and of the recent history). The gain at rank r is
    (1 − α)^{c_r}, where c_r counts the earlier items of the same relevant category (redundancy is discounted),
    0 for an item outside the intents:

        α-DCG@K = Σ_{r=1..K} gain_r / log2(r + 1),    α-NDCG@K = α-DCG@K / α-DCG*@K.

    The ideal α-DCG* assumes enough items in every intent, each item covering one: it visits the m intents in
    rounds, so gain*_r = (1 − α)^{floor((r − 1) / m)}. 0 when there are no intents.
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    wanted = set(intents)
    if not wanted:
        return 0.0
    seen: dict[str, int] = {}
    dcg = 0.0
    for r, cat in enumerate(categories[:k], start=1):
        if cat in wanted:
            dcg += (1 - alpha) ** seen.get(cat, 0) / math.log2(r + 1)
            seen[cat] = seen.get(cat, 0) + 1
    m = len(wanted)
    ideal = sum((1 - alpha) ** ((r - 1) // m) / math.log2(r + 1) for r in range(1, k + 1))
    return dcg / ideal


def novelty(item_ids: Sequence[str], popularity: dict[str, int], n_users: int) -> float:
    """Novelty of one list: the mean self-information of its items, mean_i −log2 p_i (Zhou et al., PNAS 2010).

    p_i = (users who interacted with item i + 1) / (n_users + 1): the share of users who know it, add-one smoothed
    so a never-seen item gets the highest novelty instead of infinity. NaN for an empty list.
    """
    if not item_ids:
        return math.nan
    return float(np.mean([-math.log2((popularity.get(i, 0) + 1) / (n_users + 1)) for i in item_ids]))


def catalog_coverage(lists: Sequence[Sequence[str]], n_items: int) -> float:
    """Share of the catalog recommended at least once over all lists: |∪_u L_u| / |I|."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    return len({i for lst in lists for i in lst}) / n_items


def gini_exposure(lists: Sequence[Sequence[str]], item_ids: Sequence[str]) -> float:
    """Gini coefficient of exposure over the WHOLE catalog: 0 = every item shown equally often, → 1 = one item only.

    x_i = how many lists contain item i (0 for items never shown); with x sorted ascending (x_(1) ≤ … ≤ x_(n)):
        G = Σ_{j=1..n} (2j − n − 1) · x_(j) / (n · Σ_j x_j).
    0 when nothing was shown at all.
    """
    counts = dict.fromkeys(item_ids, 0)
    for lst in lists:
        for i in set(lst):
            if i in counts:
                counts[i] += 1
    x = np.sort(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    j = np.arange(1, n + 1)
    return float(((2 * j - n - 1) * x).sum() / (n * total))


# ---------------------------------------------------------------------------------------------------- output checks


def hallucination_rate(picks: Sequence[str], allowed: Sequence[str] | set[str]) -> float:
    """Share of one output's picks that are not among the request's candidates (`allowed`): |{p ∉ C}| / |picks|."""
    if not picks:
        return 0.0
    ok = set(allowed)
    return sum(p not in ok for p in picks) / len(picks)


def duplicate_rate(picks: Sequence[str]) -> float:
    """Share of one output's picks that repeat an earlier pick: (|picks| − |distinct picks|) / |picks|."""
    if not picks:
        return 0.0
    return (len(picks) - len(set(picks))) / len(picks)


def latency_percentiles(ms: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": …, "p90": …, "p99": …, "mean": …} of per-request latencies in milliseconds (linear interpolation)."""
    v = np.asarray(ms, dtype=np.float64)
    if v.size == 0:
        return {**{f"p{q:g}": math.nan for q in qs}, "mean": math.nan}
    out = {f"p{q:g}": float(np.percentile(v, q)) for q in qs}
    out["mean"] = float(v.mean())
    return out


_STOP_WORDS = """a an and are as at be because by for from has have in is it its of on or that the this to was with you
your yours recent recently item items pick picks product products shopper shoppers popular other others often bought
likely next step same department great good new more like also just one"""
_STOP = frozenset(_STOP_WORDS.split())


def _words(text: str) -> set[str]:
    out, word = set(), []
    for ch in text.lower() + " ":
        if ch.isalnum():
            word.append(ch)
        elif word:
            w = "".join(word)
            if len(w) >= 3 and w not in _STOP and not w.isdigit():
                out.add(w)
            word = []
    return out


def _leaf(path: str) -> str:
    return path.rsplit(" > ", 1)[-1].strip().lower()


def reason_grounded(
    reason: str,
    *,
    pick_title: str,
    pick_categories: Sequence[str],
    pick_brand: str,
    history_titles: Sequence[str],
    history_categories: Sequence[str],
    history_brands: Sequence[str],
    query: str | None = None,
) -> bool:
    """Whether a reason makes at least one claim the data confirms (a checker, not a judge of style).

    A reason is grounded when ONE of these holds (words: lower-cased alphanumeric runs of >= 3 characters, minus
    stop words and filler such as "recent" or "popular"):
    1. it cites a history item: it shares a word with a history title that is not also in the pick's own title
       (describing the pick is not citing the history);
    2. it names a shared category: the name of some level of the pick's category path (the last part of each
       ' > '-joined prefix given, e.g. "Power Drills") appears in the reason verbatim (case-insensitive) and the
       history has a category of that name;
    3. it names a shared brand: the pick's brand appears in the reason and in the history's brands;
    4. it cites the query: it shares a word with the query that also occurs in the pick's title or category.
    Generic praise ("a great pick") confirms nothing and is not grounded.
    """
    text = reason.lower()
    words = _words(reason)
    own = _words(pick_title)
    for title in history_titles:
        if (words & _words(title)) - own:
            return True
    hist_cats = {_leaf(c) for c in history_categories if c}
    for cat in pick_categories:
        c = _leaf(cat)
        if c and c in hist_cats and c in text:
            return True
    brand = pick_brand.strip().lower()
    if brand and brand in text and brand in {b.strip().lower() for b in history_brands}:
        return True
    if query:
        pick_words = own | _words(" ".join(pick_categories))
        if words & _words(query) & pick_words:
            return True
    return False
