"""Property: over random small shops and requests, every reason shoprec serves is true of its item and shopper.

"True" is `generator.reasons.verify_reason`: the catalog confirms the evidence the sentence cites (`check_reason`),
or it is an honest no-evidence sentence naming the item's own department, used only when nothing checkable
holds. Checked in every way a reason is served: score mode and generate mode (fake backend: any sentence the
decoder allows may come out), the fallback after a model failure, and retrieval-only mode.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generator.backends import make_backend
from generator.constraints import CategoryConstraint
from generator.prompts import PromptLibrary
from generator.reasons import check_reason, grounded_sentences, verify_reason
from generator.recommender import GeneratorConfig, Recommender
from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.fusion import FusionRetriever
from retrieval.index import fit_signals
from retrieval.types import Candidate, Interaction, Item, RetrievalRequest

WORDS = ["wireless", "compact", "deluxe", "steel", "cotton", "smart", "mini", "classic", "travel", "organic"]
BRANDS = ["Acme", "Zentro", "Lumen", "Oak"]
PROMPTS = PromptLibrary()  # compiled once: template compilation is most of a recommender's start-up


def _shop(seed: int, n_items: int, n_users: int, n_depts: int):
    rng = np.random.default_rng(seed)
    items = []
    for n in range(n_items):
        dept, leaf = f"Dept{rng.integers(n_depts)}", f"Leaf{rng.integers(2)}"
        words = " ".join(rng.choice(WORDS, size=2, replace=False))
        brand = str(rng.choice(BRANDS))
        items.append(Item(id=f"i{n}", title=f"{brand} {words} thing {n}", category=(dept, leaf), brand=brand))
    events = [
        Interaction(user_id=f"u{u}", item_id=f"i{rng.integers(n_items)}", position=j)
        for u in range(n_users)
        for j in range(int(rng.integers(1, 6)))
    ]
    leaves = sorted({" > ".join(it.category) for it in items})
    complements = {a: frozenset({b}) for a, b in zip(leaves, leaves[1:], strict=False) if rng.random() < 0.5}
    return Catalog(items), histories(events), complements


class _AllSignals:
    """The fused retriever, with the dense and sequential evidence stood in by item-kNN's and BM25's ranks, so that
    every kind of sentence (co-bought, next step, similar, popular) can come up."""

    def __init__(self, fusion: FusionRetriever) -> None:
        self.fusion = fusion
        self.catalog = fusion.catalog
        self.retrievers = fusion.retrievers

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        out = []
        for c in self.fusion.retrieve(request, k):
            extra = {}
            if "itemknn" in c.sources:
                extra["sasrec"] = c.sources["itemknn"]
            if "bm25" in c.sources:
                extra["dense"] = c.sources["bm25"]
            out.append(c.model_copy(update={"sources": {**c.sources, **extra}}))
        return out


class _Broken:
    """A backend that fails on every call: the fallback path."""

    def __init__(self) -> None:
        self.tokenizer = make_backend("fake").tokenizer

    def label_logprobs(self, prompts, labels):
        raise RuntimeError("engine crashed")

    def generate(self, prompts, controllers=None, max_new_tokens=256, timeout_s=None):
        raise RuntimeError("engine crashed")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_items=st.integers(14, 40),
    n_users=st.integers(3, 12),
    n_depts=st.integers(2, 4),
    kind=st.sampled_from(["user", "new", "query", "cart", "query+user"]),
    k=st.integers(2, 4),
)
def test_every_served_reason_is_true(seed, n_items, n_users, n_depts, kind, k):
    catalog, hist, complements = _shop(seed, n_items, n_users, n_depts)
    fusion = FusionRetriever(catalog, list(fit_signals(catalog, hist, ("popularity", "itemknn", "bm25")).values()))
    retriever = _AllSignals(fusion)
    counts = fusion.retrievers["popularity"].counts  # the best sellers, computed here independently of reasons.py
    best = np.argsort(-counts, kind="stable")[: max(1, len(counts) // 20)]
    top = {catalog.items[r].id for r in best if counts[r] >= 3}
    rng = np.random.default_rng(seed + 1)
    user = sorted(hist)[int(rng.integers(len(hist)))]
    history = tuple(e.item_id for e in hist[user]) if kind in ("user", "query+user", "cart") else ()
    query = " ".join(rng.choice(WORDS, size=2, replace=False)) if kind.startswith("query") else None
    cart = (f"i{rng.integers(n_items)}",) if kind == "cart" else ()
    request = RetrievalRequest(user_id=user, history=history, query=query, cart=cart)

    base = GeneratorConfig(k=k, max_reason_tokens=64, constraint=CategoryConstraint(max_per_category=k))
    cases = [
        ("score", make_backend("fake", seed=seed), base, base.reason_history_shown),
        ("generate", make_backend("fake", seed=seed), base.model_copy(update={"mode": "generate"}), base.max_history),
        ("fallback", _Broken(), base, min(base.max_history, base.reason_history)),
        ("retrieval", None, base, min(base.max_history, base.reason_history)),
    ]
    for name, backend, cfg, shown in cases:
        rec = Recommender(retriever, catalog, backend, prompts=PROMPTS, complements=complements)
        out = rec.recommend(request, cfg)
        assert out.fallback == (name == "fallback"), (name, out.fallback_reason)
        ctx = rec.reason_context(request, shown)
        by_id = {c.item_id: c for c in rec.prepare(request, cfg).candidates}
        for pick in out.picks:
            item, candidate = catalog[pick.item_id], by_id[pick.item_id]
            kind_said = verify_reason(pick.reason, item, ctx, candidate)
            assert kind_said is not None, (name, pick, ctx.history, ctx.query, ctx.cart)
            if kind_said == "none":  # honest "no evidence" only when no checkable sentence holds
                options = grounded_sentences(item, ctx, candidate)
                assert all(check_reason(o, item, ctx, candidate) is None for o in options), (name, pick, options)
            if "popular" in pick.reason or "best seller" in pick.reason:
                assert pick.item_id in top, (name, pick)
            if not ctx.history:
                assert not any(w in pick.reason for w in ("recent", "browsing", "your ")) or pick.reason.startswith(
                    ("Matches your search", "Goes with the")
                ), (name, pick)
