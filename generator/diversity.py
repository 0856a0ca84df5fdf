"""Diversity re-rankers: turn candidate relevance (and item similarity) into K picks, under the category guarantee.

λ ("lam") is a preference, from 1 = pure relevance down to 0 = as diverse as possible; the `CategoryConstraint` is
a guarantee, enforced at every greedy step through `generator.constraints.allowed_next`, so whenever `feasible`
says yes every method returns exactly K distinct picks that satisfy it, for every λ. `diversify` is the one entry
point; the methods (see REFERENCES.md, "Diversity"):

- ``"none"``: relevance order under the constraint (`quota_rerank`), λ ignored;
- ``"mmr"``: maximal marginal relevance, greedy argmax of λ·rel − (1−λ)·max similarity to the picks (`mmr`);
- ``"dpp"``: greedy MAP of a determinantal point process with quality from relevance (Chen, Zhang & Zhou,
  NeurIPS 2018, "Fast Greedy MAP Inference for DPP to Improve Recommendation Diversity") (`dpp`).

Relevance is min-max normalised to [0, 1] in both MMR and DPP, so λ means the same thing whatever the retriever's
score scale (a constant relevance vector becomes all zeros). Ties are broken by higher relevance, then lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from generator.constraints import CategoryConstraint, allowed_next, cut_categories, feasible

Method = Literal["none", "mmr", "dpp"]
METHODS: tuple[str, ...] = get_args(Method)

FloatArray = npt.NDArray[np.float64]
_TIE_TOL = 1e-9  # scores this close count as tied (then the more relevant item wins)


def category_similarity(categories: Sequence[str]) -> FloatArray:
    """Similarity 1 between items of the same category, else 0 (a Gram matrix of one-hot vectors, hence PSD)."""
    _, codes = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
    return (codes[:, None] == codes[None, :]).astype(np.float64)


def cosine_similarity(vectors: npt.ArrayLike) -> FloatArray:
    """Cosine similarity of the rows of `vectors` (N, D); the diagonal is 1, a zero row is similar to nothing else.

    The result is the Gram matrix of the unit rows, so it is PSD (up to rounding; `dpp` adds a ridge).
    """
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (N, D), got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def quota_rerank(
    relevance: npt.ArrayLike, categories: Sequence[str] | None, k: int, constraint: CategoryConstraint | None
) -> list[int]:
    """The K most relevant candidates, in relevance order, skipping any that would break the constraint.

    The "pure relevance + guarantee" baseline: at each step the most relevant candidate `allowed_next` permits.
    Without a constraint this is a plain (stable) sort.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    if constraint is None:
        if k > len(rel):
            raise ValueError(f"k={k} picks asked for but only {len(rel)} candidates")
        return [int(i) for i in np.argsort(-rel, kind="stable")[:k]]
    return _fill_by_relevance([], rel, _cut(categories, constraint), k, constraint)


def mmr(
    relevance: npt.ArrayLike,
    similarity: npt.ArrayLike,
    k: int,
    lam: float,
    constraint: CategoryConstraint | None = None,
    categories: Sequence[str] | None = None,
) -> list[int]:
    """Maximal marginal relevance: greedily pick argmax of λ·rel_i − (1−λ)·max_{j picked} sim_ij.

    `relevance` is min-max normalised to [0, 1] first; the similarity penalty of the first pick is 0. With a
    constraint, each step chooses only among the candidates `allowed_next` permits (`categories` are cut at
    ``constraint.level`` here). λ=1 gives relevance order; λ=0 pure novelty (ties broken by relevance).
    """
    rel = _normalise(np.asarray(relevance, dtype=np.float64))
    sim = np.asarray(similarity, dtype=np.float64)
    cats = _cut(categories, constraint)
    picks: list[int] = []
    max_sim = np.zeros(len(rel))  # max similarity to the picks so far (0 before the first pick)
    for step in range(k):
        score = lam * rel - (1.0 - lam) * max_sim
        j = _best(score, rel, _mask(constraint, cats, picks, k, len(rel)))
        picks.append(j)
        max_sim = sim[j].copy() if step == 0 else np.maximum(max_sim, sim[j])
    return picks


def dpp_quality_exponent(lam: float) -> float:
    """α in the DPP quality q_i = exp(α·rel_i), from λ: α = λ / (2(1−λ)) (∞ at λ=1).

    The mapping of Chen et al. (2018, section 5): log det L_Y = 2α·Σ_{i∈Y} rel_i + log det S_Y, which is
    proportional to λ·Σ rel + (1−λ)·log det S_Y, the relevance/diversity trade-off the knob promises.
    """
    return np.inf if lam >= 1.0 else lam / (2.0 * (1.0 - lam))


def dpp(
    relevance: npt.ArrayLike,
    similarity: npt.ArrayLike,
    k: int,
    lam: float,
    constraint: CategoryConstraint | None = None,
    categories: Sequence[str] | None = None,
    *,
    ridge: float = 1e-6,
) -> list[int]:
    """Greedy MAP inference for a DPP with kernel L = diag(q)·S·diag(q), q_i = exp(α·rel_i), α from λ.

    Algorithm 1 of Chen, Zhang & Zhou (NeurIPS 2018), O(N·k²): each step adds the item j with the largest gain
    log det L_{Y∪j} − log det L_Y = log d_j², and updates every item's Cholesky row c_i and conditional variance
    d_i² incrementally (e_i = (L_ji − <c_j, c_i>) / d_j, d_i² −= e_i²). Because L = diag(q)·S·diag(q), the
    conditional variance under L is q_i² times that under S, so the recursion runs on S and adds 2α·rel_i to
    the log gain: the same picks, without exp(α) overflowing when λ is close to 1.

    - `relevance` is min-max normalised to [0, 1]; α = `dpp_quality_exponent(λ)`. λ=1 (α=∞) is relevance order
      (`quota_rerank`); λ=0 (q ≡ 1) is pure diversity, log det S_Y, ties broken by relevance.
    - `similarity` must be symmetric. It is made positive definite: if S + ridge·I has no Cholesky factor, its
      negative eigenvalues are clipped to 0 first; the ridge then keeps every d_i² ≥ ridge > 0.
    - Early stop: when the best item's d_i² under S is at the ridge floor (≤ 10·ridge), it lies in the span of
      the picks and adds nothing to the determinant but rounding, so the remaining slots are filled by relevance
      under the constraint; exactly k picks are returned whenever the constraint is feasible. (The paper's stop
      for unconstrained MAP, d_j² < 1 on L, would end at λ=0 as soon as every item left has some similarity to
      a pick, usually after one pick, so the fixed-K variant is used.)
    - With a constraint, each argmax runs over the candidates `allowed_next` permits.
    """
    rel = _normalise(np.asarray(relevance, dtype=np.float64))
    cats = _cut(categories, constraint)
    alpha = dpp_quality_exponent(lam)
    if not np.isfinite(alpha):
        return quota_rerank(rel, cats, k, constraint)
    s = _positive_definite(np.asarray(similarity, dtype=np.float64), ridge)
    n = len(rel)
    chol = np.zeros((k, n))  # row t holds e_i of step t: column i of the incremental Cholesky factor
    d2 = np.diag(s).copy()  # conditional variance of each item given the picks, under S
    picks: list[int] = []
    for step in range(k):
        gain = 2.0 * alpha * rel + np.log(np.maximum(d2, 1e-300))
        j = _best(gain, rel, _mask(constraint, cats, picks, k, n))
        if d2[j] <= 10.0 * ridge:
            break
        e = (s[j] - chol[:step, j] @ chol[:step]) / np.sqrt(d2[j])
        chol[step] = e
        d2 = d2 - e * e
        picks.append(j)
    return _fill_by_relevance(picks, rel, cats, k, constraint)


def diversify(
    relevance: npt.ArrayLike,
    k: int,
    *,
    method: Method,
    lam: float,
    similarity: npt.ArrayLike | None = None,
    categories: Sequence[str] | None = None,
    constraint: CategoryConstraint | None = None,
) -> list[int]:
    """Pick k candidate indices: the single entry point to the re-rankers of this module.

    `relevance` (N,) scores the candidates (any scale); `similarity` (N, N) is needed by "mmr" and "dpp" (e.g.
    `cosine_similarity(embeddings)` or `category_similarity(categories)`); `categories` (N category paths) is needed
    with a `constraint`. λ in [0, 1] (1 = pure relevance) is ignored by "none". Raises ValueError for an unknown
    method, bad shapes or values, and, with the `feasible` message, when no k-subset satisfies the constraint.
    Otherwise returns exactly k distinct indices that satisfy the constraint, for every method and λ.
    """
    if method not in METHODS:
        raise ValueError(f"unknown diversity method {method!r}; valid methods: {', '.join(METHODS)}")
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.ndim != 1:
        raise ValueError(f"relevance must be a 1-D array of N scores, got shape {rel.shape}")
    if not np.all(np.isfinite(rel)):
        raise ValueError("relevance contains NaN or infinite scores; drop or score those candidates first")
    n = len(rel)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if method != "none" and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (1 = pure relevance, 0 = most diverse), got {lam}")
    if categories is not None and len(categories) != n:
        raise ValueError(f"categories has {len(categories)} entries but relevance has {n}; give one per candidate")
    if constraint is not None:
        if categories is None:
            raise ValueError("a constraint needs categories: pass categories=[one category path per candidate]")
        why = feasible(constraint, categories, k)
        if why is not None:
            raise ValueError(f"no {k} picks satisfy {constraint!r}: {why}")
    elif k > n:
        raise ValueError(f"k={k} picks asked for but only {n} candidates")

    if method == "none":
        return quota_rerank(rel, categories, k, constraint)
    if similarity is None:
        raise ValueError(
            f"method {method!r} needs similarity: pass similarity=cosine_similarity(embeddings) "
            "or similarity=category_similarity(categories)"
        )
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape != (n, n):
        raise ValueError(f"similarity must have shape ({n}, {n}) for {n} candidates, got {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity contains NaN or infinite values")
    if method == "mmr":
        return mmr(rel, sim, k, lam, constraint, categories)
    return dpp(rel, sim, k, lam, constraint, categories)


def _normalise(rel: FloatArray) -> FloatArray:
    """Min-max to [0, 1]; a constant vector becomes all zeros (no item is more relevant than another)."""
    if rel.size == 0:
        return rel
    lo, hi = rel.min(), rel.max()
    return (rel - lo) / (hi - lo) if hi > lo else np.zeros_like(rel)


def _positive_definite(sim: FloatArray, ridge: float) -> FloatArray:
    """S + ridge·I, with S's negative eigenvalues clipped to 0 first if S is not PSD (only then: eigh costs more)."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix, got shape {sim.shape}")
    n = sim.shape[0]
    if n and np.abs(sim - sim.T).max() > 1e-8:
        raise ValueError("similarity must be symmetric for a DPP kernel (sim[i, j] == sim[j, i])")
    s = (sim + sim.T) / 2.0
    ridged = s + ridge * np.eye(n)
    try:
        np.linalg.cholesky(ridged)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s)
        ridged = (v * np.maximum(w, 0.0)) @ v.T + ridge * np.eye(n)
    return ridged
    return s


def _cut(categories: Sequence[str] | None, constraint: CategoryConstraint | None) -> list[str] | None:
    if constraint is None:
        return None
    if categories is None:
        raise ValueError("a constraint needs categories: pass categories=[one category path per candidate]")
    return cut_categories(categories, constraint.level)


def _mask(
    constraint: CategoryConstraint | None, cats: list[str] | None, picks: list[int], k: int, n: int
) -> npt.NDArray[np.bool_]:
    """Which candidates the next pick may be: `allowed_next` under a constraint, else anything not yet picked."""
    if constraint is not None and cats is not None:
        return allowed_next(constraint, cats, picks, k)
    mask = np.ones(n, dtype=bool)
    mask[picks] = False
    if k <= len(picks) or not mask.any():
        raise ValueError(f"no candidate left for pick {len(picks) + 1} of k={k} among {n} candidates")
    return mask


def _best(score: FloatArray, rel: FloatArray, mask: npt.NDArray[np.bool_]) -> int:
    """Argmax of `score` over `mask`; near-ties (within _TIE_TOL) go to the more relevant, then the lower index."""
    masked = np.where(mask, score, -np.inf)
    top = masked.max()
    tied = masked >= top - _TIE_TOL * max(1.0, abs(top))
    return int(np.argmax(np.where(tied, rel, -np.inf)))


def _fill_by_relevance(
    picks: list[int], rel: FloatArray, cats: list[str] | None, k: int, constraint: CategoryConstraint | None
) -> list[int]:
    """Complete `picks` to k with the most relevant candidates the constraint still allows, one at a time."""
    picks = list(picks)
    while len(picks) < k:
        mask = _mask(constraint, cats, picks, k, len(rel))
        picks.append(int(np.argmax(np.where(mask, rel, -np.inf))))
    return picks
