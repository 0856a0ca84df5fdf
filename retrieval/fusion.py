"""Fusion of several retrievers, with weights per request mode, by one of two rules fitted on validation data.

Each signal contributes for the items in its own top-`depth` list (after the request's filters):
- ``rrf`` (weighted reciprocal rank fusion): w_s / (k_rrf + rank_s(item)); robust to the signals' unrelated score
  scales (logits, BM25, cosine, counts), but it forgets how far apart a signal's items were;
- ``minmax`` (weighted CombSUM): w_s * (score - min) / (max - min) over the signal's own list, which keeps a
  confident signal's score gaps; it wins when one signal dominates (item-kNN on ml-100k).
`fit_weights` picks the rule and the weights on validation cases, which is how the fused list comes to beat each
single signal instead of averaging them; before fitting, hand-set RRF defaults are used.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.base import Ranked, Retriever, top_k
from retrieval.catalog import Catalog
from retrieval.types import Candidate, RetrievalRequest

MODES = ("user", "query", "cart")
CONTENT_SIGNALS = ("bm25", "dense")  # the signals that can score an item nobody has used yet
FUSION_METHODS = ("rrf", "minmax")

# Hand-set defaults, used until weights are fitted on validation data: behaviour signals lead for
# recommendations, text signals for search, co-occurrence ("bought next") for carts; popularity is a weak prior
# that mostly matters for cold users, where it is the only signal left.
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "user": {"sasrec": 1.0, "itemknn": 1.0, "dense": 0.3, "bm25": 0.1, "popularity": 0.2},
    "query": {"bm25": 1.0, "dense": 1.0, "sasrec": 0.2, "itemknn": 0.2, "popularity": 0.1},
    "cart": {"itemknn": 1.0, "sasrec": 0.5, "dense": 0.4, "bm25": 0.0, "popularity": 0.1},
}


@dataclass
class FusionConfig:
    """How signals are fused. `weights[mode][signal]`; a missing signal weighs 0."""

    weights: dict[str, dict[str, float]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_WEIGHTS)))
    rrf_k: float = 60.0  # the classic RRF constant; fitted together with the weights when data is available
    depth: int = 200  # how deep each signal's own list is read
    method: str = "rrf"  # "rrf" or "minmax" (see the module docstring); fitted together with the weights
    # Share of each retrieved list reserved for NEW items (no interaction yet), best content match first. Fitted
    # weights come from items with a past, so behaviour signals dominate and a new product never surfaces: this
    # is the exploration slot that lets it reach the LLM stage (measured on the cold-items split, eval/splits.py).
    new_item_share: float = 0.0

    def __post_init__(self) -> None:
        for mode, ws in self.weights.items():
            if mode not in MODES:
                raise ValueError(f"fusion weights: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
            for name, w in ws.items():
                if not (w >= 0 and math.isfinite(w)):
                    raise ValueError(f"fusion weight for {mode}/{name} must be a finite number >= 0, got {w}")
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method must be one of {', '.join(FUSION_METHODS)}, got {self.method!r}")
        if not 0 <= self.new_item_share <= 0.5:
            raise ValueError(f"new_item_share must be in [0, 0.5], got {self.new_item_share}")

    def to_dict(self) -> dict[str, object]:
        return {
            "weights": self.weights,
            "rrf_k": self.rrf_k,
            "depth": self.depth,
            "method": self.method,
            "new_item_share": self.new_item_share,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FusionConfig:
        return cls(
            weights={m: dict(ws) for m, ws in dict(d["weights"]).items()},  # type: ignore[call-overload]
            rrf_k=float(d.get("rrf_k", 60.0)),  # type: ignore[arg-type]
            depth=int(d.get("depth", 200)),  # type: ignore[call-overload]
            method=str(d.get("method", "rrf")),
            new_item_share=float(d.get("new_item_share", 0.0)),  # type: ignore[arg-type]
        )


SignalLists = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (rows best first, their raw scores)


class FusionRetriever:
    """Weighted RRF over named retrievers; itself a `Retriever` (name "fusion")."""

    name = "fusion"

    def __init__(self, catalog: Catalog, retrievers: Sequence[Retriever], config: FusionConfig | None = None):
        self.catalog = catalog
        self.retrievers = {r.name: r for r in retrievers}
        self.config = config or FusionConfig()

    def signal_lists(
        self,
        request: RetrievalRequest,
        names: Sequence[str] | None = None,
        scores_by_signal: dict[str, np.ndarray | None] | None = None,
    ) -> SignalLists:
        """Each applicable signal's own filtered top-`depth` rows and scores. `scores_by_signal`, when given, is
        this request's memo of full score vectors: read before scoring, filled after (one scoring per signal)."""
        mask = self.catalog.mask(request.filters, request.history)
        if request.cart:
            mask[self.catalog.rows(request.cart)] = False
        weights = self.config.weights.get(request.mode, {})
        out: SignalLists = {}
        for name, retriever in self.retrievers.items():
            if names is None and weights.get(name, 0.0) <= 0:
                continue  # a zero-weight signal costs nothing
            if names is not None and name not in names:
                continue
            scores = _scored(retriever, request, scores_by_signal)
            if scores is None:
                continue
            rows = top_k(scores, self.config.depth, mask)
            if len(rows):
                out[name] = (rows, scores[rows])
        return out

    def fuse(self, lists: SignalLists, mode: str) -> np.ndarray:
        """Fused RRF scores for all rows (-inf for rows no signal retrieved)."""
        return fuse_lists(
            lists, self.config.weights.get(mode, {}), self.config.rrf_k, len(self.catalog), self.config.method
        )

    def _fused(
        self, request: RetrievalRequest, scores_by_signal: dict[str, np.ndarray | None] | None = None
    ) -> tuple[SignalLists, np.ndarray | None]:
        lists = self.signal_lists(request, scores_by_signal=scores_by_signal)
        fused = self.fuse(lists, request.mode) if lists else None
        if fused is None or not np.isfinite(fused).any():
            # Cold start: fitted weights may give 0 to the only signals that still apply (popularity for a new
            # user), so fall back to every applicable signal with equal weight rather than return nothing.
            lists = self.signal_lists(request, names=list(self.retrievers), scores_by_signal=scores_by_signal)
            equal = {name: 1.0 for name in lists}
            fused = fuse_lists(lists, equal, self.config.rrf_k, len(self.catalog), "rrf") if lists else None
        return lists, fused

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        return self._fused(request)[1]

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        return self.ranked(request, k).candidates()

    def ranked(self, request: RetrievalRequest, k: int) -> Ranked:
        """The top-k as a `Ranked`: ids and fused scores now, each candidate's evidence when it is read."""
        scored: dict[str, np.ndarray | None] = {}  # each signal scores this request once
        lists, fused = self._fused(request, scored)
        if fused is None:
            return Ranked([], [])
        rows = top_k(fused, k)
        slots = round(self.config.new_item_share * k)
        new_lists: SignalLists = {}
        if slots:  # the last `slots` places go to the best new items not already in the list
            new_lists, new_fused = self._new_items(request, rows[: k - slots], scored)
            new_rows = top_k(new_fused, slots) if new_fused is not None else rows[:0]
            if len(new_rows):
                keep = rows[: k - len(new_rows)]
                fused = fused.copy()
                # below every kept item: a new item is offered to the next stage, never promoted over the list
                floor = float(fused[keep].min()) if len(keep) else 0.0
                fused[new_rows] = floor - 1e-9 * (1 + np.arange(len(new_rows)))
                rows = np.concatenate([keep, new_rows])
        items = self.catalog.items
        # evidence: a signal's place in the main lists, else among the new items (an item only a new-item list holds)
        return Ranked([items[r].id for r in rows.tolist()], fused[rows].tolist(), rows, [lists, new_lists])

    def new_item_mask(self) -> np.ndarray | None:
        """Rows with no interaction in the behaviour data (popularity count 0); None without a popularity signal."""
        counts = getattr(self.retrievers.get("popularity"), "counts", None)
        return None if counts is None else np.asarray(counts) <= 0

    def _new_items(
        self, request: RetrievalRequest, exclude: np.ndarray, scored: dict[str, np.ndarray | None]
    ) -> tuple[SignalLists, np.ndarray | None]:
        """The content signals' lists over new items only, and their equal-weight RRF fusion."""
        new = self.new_item_mask()
        if new is None:
            return {}, None
        mask = self.catalog.mask(request.filters, request.history) & new
        if request.cart:
            mask[self.catalog.rows(request.cart)] = False
        mask[exclude] = False
        lists: SignalLists = {}
        for name in CONTENT_SIGNALS:
            retriever = self.retrievers.get(name)
            scores = _scored(retriever, request, scored) if retriever is not None and mask.any() else None
            if scores is None:
                continue
            rows = top_k(scores, self.config.depth, mask)
            if len(rows):
                lists[name] = (rows, scores[rows])
        if not lists:
            return {}, None
        return lists, fuse_lists(lists, dict.fromkeys(lists, 1.0), self.config.rrf_k, len(self.catalog), "rrf")


def _scored(
    retriever: Retriever, request: RetrievalRequest, memo: dict[str, np.ndarray | None] | None
) -> np.ndarray | None:
    """`retriever.score(request)`, through this request's memo when there is one."""
    if memo is None:
        return retriever.score(request)
    if retriever.name not in memo:
        memo[retriever.name] = retriever.score(request)
    return memo[retriever.name]


def fuse_lists(
    lists: SignalLists, weights: Mapping[str, float], rrf_k: float, n_rows: int, method: str = "rrf"
) -> np.ndarray:
    """Fused scores for all rows (-inf for rows no weighted signal retrieved)."""
    fused = np.zeros(n_rows, dtype=np.float64)
    seen = np.zeros(n_rows, dtype=bool)
    for name, (rows, scores) in lists.items():
        w = weights.get(name, 0.0)
        if w <= 0:
            continue
        if method == "rrf":
            fused[rows] += w / (rrf_k + np.arange(1, len(rows) + 1))
        else:  # minmax: the signal's own scores rescaled to [0, 1] over its list
            s = np.asarray(scores, dtype=np.float64)
            span = float(s.max() - s.min())
            fused[rows] += w * ((s - s.min()) / span if span > 0 else np.ones_like(s))
        seen[rows] = True
    fused[~seen] = -np.inf
    return fused


def fit_weights(
    cases: Sequence[tuple[SignalLists, int]],
    names: Sequence[str],
    n_rows: int,
    *,
    k: int = 20,
    grid: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
    rrf_ks: Sequence[float] = (5.0, 20.0, 60.0),
    rounds: int = 2,
    methods: Sequence[str] = FUSION_METHODS,
) -> tuple[dict[str, float], float, float, str]:
    """Fit one mode's rule and weights on validation cases by coordinate ascent on Recall@k (NDCG@10 breaks ties).

    `cases` pairs each validation request's signal lists with its target row. Returns
    (weights, rrf_k, recall, method). Coordinate ascent over a small grid is enough here: 4-6 signals, and the
    objective is piecewise constant, so gradient methods do not apply.
    """

    def objective(ws: Mapping[str, float], rk: float, method: str) -> tuple[float, float]:
        hits = 0.0
        ndcg = 0.0
        for lists, target in cases:
            fused = fuse_lists(lists, ws, rk, n_rows, method)
            t = fused[target]
            if not np.isfinite(t):
                continue
            rank = int((fused >= t).sum())  # pessimistic ties, as in eval.metrics.rank_of
            if rank <= k:
                hits += 1
            if rank <= 10:
                ndcg += 1.0 / math.log2(rank + 1)
        n = max(len(cases), 1)
        return (hits / n, ndcg / n)

    overall: tuple[tuple[float, float], dict[str, float], float, str] | None = None
    for method in methods:
        best_ws = {n: 1.0 for n in names}
        best_rk = 60.0
        best = objective(best_ws, best_rk, method)
        for _ in range(rounds):
            improved = False
            if method == "rrf":
                for rk in rrf_ks:
                    val = objective(best_ws, rk, method)
                    if val > best:
                        best, best_rk, improved = val, rk, True
            for name, w in itertools.product(names, grid):
                if best_ws[name] == w:
                    continue
                trial = {**best_ws, name: w}
                if not any(v > 0 for v in trial.values()):
                    continue
                val = objective(trial, best_rk, method)
                if val > best:
                    best, best_ws, improved = val, trial, True
            if not improved:
                break
        if overall is None or best > overall[0]:
            overall = (best, best_ws, best_rk, method)
    assert overall is not None
    return overall[1], overall[2], overall[0][0], overall[3]
