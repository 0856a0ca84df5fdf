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
    s = scores.astype(np.float64, copy=False)
    s = np.where(mask, s, -np.inf) if mask is not None else s.copy()  # one pass (runs ~6 times per request)
    n = int(np.count_nonzero(np.isfinite(s)))
    if n == 0 or k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, n)
    kth = np.partition(s, len(s) - k)[len(s) - k]  # the k-th highest score
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


SignalList = tuple[np.ndarray, np.ndarray]  # one signal's (rows best first, their raw scores)


class Ranked:
    """A retriever's top-k, best first: item ids and scores, and `Candidate`s built only for the entries read.

    Why: the recommender reads ~200 candidates' ids (their categories, to widen the list for the category
    constraint) to keep ~20; building 200 `Candidate`s, each with its signals' evidence, was ~40% of a fused
    retrieval (profiled at 16 HTTP clients). `FusionRetriever.ranked` fills the evidence lazily from its signals'
    lists; `Ranked.of` wraps candidates already built (any other retriever).
    """

    def __init__(
        self,
        ids: Sequence[str],
        scores: Sequence[float],
        rows: np.ndarray | None = None,
        lists: Sequence[Mapping[str, SignalList]] = (),
    ) -> None:
        self.ids = list(ids)
        self.scores = list(scores)
        self._rows = rows  # catalog rows of `ids` (fusion), for the evidence
        self._lists = list(lists)  # signal name -> its list, in order of precedence (the first one wins)
        self._sorted: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._made: dict[int, Candidate] = {}  # index -> its candidate, once built (the picks' evidence reads them)

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> Ranked:
        """Candidates already built (any retriever's `retrieve`)."""
        out = cls([c.item_id for c in candidates], [c.score for c in candidates])
        out._made = dict(enumerate(candidates))
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, k: int) -> Ranked:
        """The first k entries (same evidence)."""
        out = Ranked(self.ids[:k], self.scores[:k], None if self._rows is None else self._rows[:k], self._lists)
        out._sorted, out._made = self._sorted, self._made  # a prefix: the same indices mean the same entries
        return out

    def candidates(self, indices: Sequence[int] | None = None) -> list[Candidate]:
        """The entries at `indices` (all of them by default) as `Candidate`s with their signals' evidence."""
        idx = list(range(len(self.ids))) if indices is None else list(indices)
        todo = [i for i in dict.fromkeys(idx) if i not in self._made]
        sources: list[dict[str, SignalEvidence]] = [{} for _ in todo]
        if self._rows is not None and todo:
            rows = self._rows[todo]
            for n, lists in enumerate(self._lists):
                for name, (srows, sscores) in lists.items():
                    key = (n, name)
                    if key not in self._sorted:  # the list sorted by row: a binary search finds each row's place
                        order = np.argsort(srows, kind="stable")
                        self._sorted[key] = (order, srows[order])
                    order, by_row = self._sorted[key]
                    at = np.minimum(np.searchsorted(by_row, rows), len(by_row) - 1)
                    found = by_row[at] == rows
                    for j, pos in zip(np.flatnonzero(found).tolist(), order[at[found]].tolist(), strict=True):
                        if name not in sources[j]:
                            sources[j][name] = SignalEvidence(rank=pos + 1, score=float(sscores[pos]))
        for i, s in zip(todo, sources, strict=True):
            self._made[i] = Candidate(item_id=self.ids[i], score=self.scores[i], sources=s)
        return [self._made[i] for i in idx]

    def evidence(self, item_ids: Sequence[str]) -> dict[str, tuple[tuple[str, int, float], ...]]:
        """item id -> (signal, rank, score) per signal, for those of `item_ids` in this list."""
        where = {item_id: i for i, item_id in enumerate(self.ids)}
        idx = [where[i] for i in item_ids if i in where]
        return {
            c.item_id: tuple((name, e.rank, e.score) for name, e in c.sources.items()) for c in self.candidates(idx)
        }


def retrieve_ranked(retriever: object, request: RetrievalRequest, k: int) -> Ranked:
    """`retriever.ranked(request, k)` where the retriever has it (fusion builds candidates lazily), else its
    `retrieve(request, k)` wrapped."""
    fn = getattr(retriever, "ranked", None)
    if fn is not None:
        return fn(request, k)  # type: ignore[no-any-return]
    return Ranked.of(list(retriever.retrieve(request, k)))  # type: ignore[attr-defined]
