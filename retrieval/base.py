"""The one retriever interface, and the shared top-k/filter step every retriever goes through.

A retriever scores every catalog row for a request (`score`), which keeps full-ranking evaluation a single
vectorised pass; `retrieve` turns those scores into filtered, ranked `Candidate`s tagged with the signal name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from retrieval.catalog import Catalog
from retrieval.types import Candidate, Interaction, RetrievalRequest, SignalEvidence


@runtime_checkable
class Retriever(Protocol):
    """Anything that can score catalog rows for a request."""

    name: str
    catalog: Catalog

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        """Scores for all catalog rows (higher is better, -inf = cannot retrieve); None if the signal does not
        apply to this request (e.g. BM25 with no text to match)."""
        ...

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        """The top-k candidates after the request's filters, best first."""
        ...


class TrainableRetriever(Retriever, Protocol):
    """A retriever that learns from interaction histories and persists what it learned."""

    def fit(self, histories: Mapping[str, Sequence[Interaction]]) -> None: ...

    def save(self, directory: Path) -> None: ...


def top_k(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Row indices of the k highest finite scores (after the mask), best first; ties broken by row index."""
    s = scores.astype(np.float64, copy=True)
    if mask is not None:
        s[~mask] = -np.inf
    finite = np.isfinite(s)
    n = int(finite.sum())
    if n == 0 or k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, n)
    kth = -np.partition(-s, k - 1)[k - 1]  # the k-th highest score
    cand = np.flatnonzero(s >= kth)  # everything above it plus all ties at it, so the tie-break below is exact
    order = np.lexsort((cand, -s[cand]))  # primary: score descending; secondary: row index ascending
    return cand[order][:k]


def to_candidates(name: str, catalog: Catalog, scores: np.ndarray, rows: np.ndarray) -> list[Candidate]:
    return [
        Candidate(
            item_id=catalog.items[r].id,
            score=float(scores[r]),
            sources={name: SignalEvidence(rank=i + 1, score=float(scores[r]))},
        )
        for i, r in enumerate(rows)
    ]


class ScoringRetriever:
    """Base class: subclasses implement `score`; `retrieve` applies filters and top-k the same way for all."""

    name: str = "base"

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def score(self, request: RetrievalRequest) -> np.ndarray | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        scores = self.score(request)
        if scores is None:
            return []
        mask = self.catalog.mask(request.filters, request.history)
        if request.cart:
            mask[self.catalog.rows(request.cart)] = False  # never suggest what is already in the cart
        return to_candidates(self.name, self.catalog, scores, top_k(scores, k, mask))
