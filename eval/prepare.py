"""A dataset made ready to evaluate: load, split, sample the test users, fit every signal the configs need on the
training part only (`prepare` -> `Prepared`), and the fusion fitted on validation users (`fusion_for`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from eval import datasets
from eval.config import RETRIEVERS, EvalConfig
from eval.splits import Case, Split, make_split, sample_users
from retrieval.base import Retriever
from retrieval.catalog import Catalog
from retrieval.types import Candidate, Interaction, Item, RetrievalRequest

if TYPE_CHECKING:  # heavy modules: imported where they are used
    from retrieval.embed import Encoder
    from retrieval.fusion import FusionRetriever


@dataclass
class Prepared:
    """A dataset ready to evaluate: catalog, split, sampled test cases and the fitted retrieval signals."""

    name: str
    catalog: Catalog
    split: Split
    cases: list[Case]
    retrievers: dict[str, Retriever]  # each wrapped in _Memo
    fusion: dict[tuple[str, ...], FusionRetriever]  # signal set -> fitted FusionRetriever
    vectors: np.ndarray | None  # dense item embeddings (row-aligned with the catalog), for ILD and MMR
    level: int  # category level the diversity metrics count at
    popularity: dict[str, int]  # item -> training users who interacted with it
    n_train_users: int
    info: dict[str, Any] = field(default_factory=dict)


def metric_level(items: Sequence[Item], minimum: int = 10) -> int:
    """The category depth the diversity metrics use: the shallowest level with >= `minimum` distinct categories.

    Why: Office's top level has 9 departments, 1665 of 2420 items in one; coverage there would measure almost
    nothing, while level 2 (43 categories) does. ml-100k (one genre level, 19) and the demo shop use level 1.
    """
    depth = max((len(it.category) for it in items), default=1) or 1
    for level in range(1, depth + 1):
        if len({it.category_at(level) for it in items}) >= minimum:
            return level
    return depth


def data_hash(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]]) -> str:
    """sha256 over the catalog fingerprint and every event (user, item, time, position) in history order."""
    from retrieval.index import catalog_text_fingerprint

    h = hashlib.sha256(catalog_text_fingerprint(catalog).encode())
    for user in sorted(hist):
        for e in hist[user]:
            ts = e.timestamp.isoformat() if e.timestamp is not None else ""
            h.update(f"{user}\x00{e.item_id}\x00{ts}\x00{e.position}\x01".encode())
    return h.hexdigest()


def prepare(
    dataset: str,
    configs: Sequence[EvalConfig],
    *,
    split: str = "loo",
    users: int | None = None,
    seed: int = 0,
    encoder: Encoder | None = None,
    fusion_fit_users: int = 1000,
    log: Callable[[str], None] = lambda _: None,
) -> Prepared:
    """Load the dataset, split it, sample the users and fit every signal the configs need (on training data only)."""
    from retrieval.events import histories
    from retrieval.index import fit_signals
    from retrieval.sequential import SASRecConfig

    name, items, interactions = datasets.load(dataset, seed=seed)
    if not items or not interactions:
        raise ValueError(f"dataset {dataset!r} has no items or no events. Fix: check the folder's files.")
    catalog = Catalog(items)
    hist = histories(interactions)
    sp = make_split(split, hist, seed=seed)
    cases = sample_users(sp.test, users, seed)
    if not cases:
        raise ValueError(f"dataset {dataset!r}: no user has enough events to evaluate under the {split!r} split.")
    needed = _needed_signals(configs)
    log(f"[{name}] {len(catalog)} items, {len(hist)} users, {len(cases)} test users; fitting {', '.join(needed)}")
    if "dense" in needed and encoder is None:
        from retrieval.embed import Encoder

        encoder = Encoder()
    t0 = time.perf_counter()
    fitted = fit_signals(
        catalog,
        sp.train,
        needed,
        log=lambda m: log(f"[{name}] {m}"),
        encoder=encoder,
        sasrec_config=SASRecConfig(seed=seed, progress=False),
        # as in eval/bench/retrieval.py: SASRec early-stops on half of the validation users, the fusion is fitted
        # on the other half, so the fusion does not over-weight the signal whose epoch was picked on its cases
        sasrec_validation=[(c.history, c.target) for c in sp.valid[0::2]],
        progress=False,
    )
    retrievers: dict[str, Retriever] = {n: _Memo(r) for n, r in fitted.items()}
    fit_s = time.perf_counter() - t0
    fusion_cases = sample_users(sp.valid[1::2], fusion_fit_users, seed)
    fusions = {}
    for sigs in {tuple(c.signals) for c in configs if c.system in ("fusion", "llm")}:
        fusions[sigs] = _fit_fusion(catalog, [retrievers[s] for s in sigs], fusion_cases)
    dense = fitted.get("dense")
    vectors = getattr(dense, "vectors", None)
    popularity: Counter[str] = Counter()
    for evs in sp.train.values():
        popularity.update({e.item_id for e in evs})
    return Prepared(
        name=name,
        catalog=catalog,
        split=sp,
        cases=cases,
        retrievers=retrievers,
        fusion=fusions,
        vectors=None if vectors is None else np.asarray(vectors),
        level=metric_level(items),
        popularity=dict(popularity),
        n_train_users=sum(1 for evs in sp.train.values() if evs),
        info={
            "dataset": name,
            "source": dataset,
            "data_hash": data_hash(catalog, hist),
            "items": len(catalog),
            "users": len(hist),
            "events": len(interactions),
            "split": split,
            "test_users_total": len(sp.test),
            "test_users": len(cases),
            "fusion_fit_users": len(fusion_cases),
            "fit_seconds": round(fit_s, 1),
        },
    )


def _needed_signals(configs: Sequence[EvalConfig]) -> tuple[str, ...]:
    need: set[str] = set()
    for c in configs:
        need |= set(c.signals) if c.system in ("fusion", "llm") else {c.system}
    if any(c.similarity == "embedding" for c in configs):
        need.add("dense")  # ILD and embedding-MMR need the item embeddings
    return tuple(s for s in RETRIEVERS if s in need)  # cheap ones first, as retrieval.index builds them


class _Memo:
    """A retriever wrapper that remembers the scores of the last request: the fusion and the single signal reuse
    them within one case instead of scoring twice (SASRec and dense are the costly ones)."""

    def __init__(self, inner: Retriever) -> None:
        self.inner = inner
        self.name = inner.name
        self.catalog = inner.catalog
        self._key: tuple[object, ...] | None = None
        self._scores: np.ndarray | None = None

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        key = (request.user_id, request.history, request.query, request.cart)
        if key != self._key:
            self._key, self._scores = key, self.inner.score(request)
        return self._scores

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        return list(self.inner.retrieve(request, k))

    def __getattr__(self, name: str) -> Any:  # the rest of the signal (e.g. popularity's counts) as is
        if name == "inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _fit_fusion(catalog: Catalog, retrievers: Sequence[Retriever], cases: Sequence[Case]) -> FusionRetriever:
    """A FusionRetriever whose user-mode rule and weights are fitted on validation cases (hand defaults if < 30)."""
    from retrieval.fusion import DEFAULT_WEIGHTS, FusionConfig, FusionRetriever, fit_weights

    fusion = FusionRetriever(catalog, list(retrievers))
    if len(cases) < 30 or len(retrievers) < 2:
        return fusion
    prepared = []
    for c in cases:
        if c.target in catalog.index:
            lists = fusion.signal_lists(
                RetrievalRequest(user_id=c.user_id, history=c.history), names=list(fusion.retrievers)
            )
            prepared.append((lists, catalog.index[c.target]))
    weights, rrf_k, _, method = fit_weights(prepared, list(fusion.retrievers), len(catalog), k=20)
    fusion.config = FusionConfig(
        weights={**json.loads(json.dumps(DEFAULT_WEIGHTS)), "user": weights}, rrf_k=rrf_k, method=method
    )
    return fusion


def fusion_for(prep: Prepared, signals: tuple[str, ...], new_item_share: float = 0.0) -> FusionRetriever:
    """The fusion of `signals` fitted on validation users (once per signal set), with `new_item_share` places for
    new items when asked (same fitted weights)."""
    if signals not in prep.fusion:
        prep.fusion[signals] = _fit_fusion(
            prep.catalog, [prep.retrievers[s] for s in signals], sample_users(prep.split.valid[1::2], 1000, 0)
        )
    fitted = prep.fusion[signals]
    if not new_item_share:
        return fitted
    from retrieval.fusion import FusionRetriever

    config = dataclasses.replace(fitted.config, new_item_share=new_item_share)  # the same fitted weights
    return FusionRetriever(prep.catalog, list(fitted.retrievers.values()), config)
