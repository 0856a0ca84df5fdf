"""Evidence that is evidence (issue 12, finding 4): popularity only for real best sellers, no history sentence
without a history, and the reasons of one list differ where the evidence does."""

from __future__ import annotations

import numpy as np
import pytest

from generator.reasons import (
    POPULAR_SHARE,
    ReasonContext,
    check_reason,
    distinct_choices,
    popular_items,
    reason_options,
    verify_reason,
)
from generator.recommender import GeneratorConfig, Recommender
from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.fusion import FusionRetriever
from retrieval.index import fit_signals
from retrieval.types import Candidate, Item, RetrievalRequest, SignalEvidence

HISTORY_WORDS = ("your recent", "browsing", "looked at recently", "items like yours", "with your", "as your", "to your")


@pytest.fixture(scope="module")
def shop(small_shop):
    catalog = Catalog(small_shop.items)
    hist = histories(small_shop.interactions)
    signals = fit_signals(catalog, hist, ("popularity", "itemknn", "bm25"))
    return catalog, hist, FusionRetriever(catalog, list(signals.values()))


def _cand(item_id: str, **ranks: int) -> Candidate:
    return Candidate(
        item_id=item_id, score=1.0, sources={s: SignalEvidence(rank=r, score=1.0) for s, r in ranks.items()}
    )


def test_popular_means_the_catalogs_top_few_percent():
    items = [Item(id=f"i{n}", title=f"Thing {n}", category=("Home",)) for n in range(40)]
    catalog = Catalog(items)
    counts = np.arange(40, dtype=float)[::-1].copy()  # i0 most popular (39), i39 least (0)
    counts[1] = 2.0  # falls out of the top: the top 5% of 40 are the 2 items i0 (39) and i2 (37)
    popular = popular_items(catalog, counts)
    assert popular == {"i0": 1, "i2": 2}
    ctx = ReasonContext(catalog, popular=popular)
    # the popularity signal ranking an item 15th of 40 is no longer "popular" evidence
    options = dict(reason_options(catalog["i30"], ctx, _cand("i30", popularity=15)))
    assert "popular" not in options
    assert check_reason("Popular with other shoppers.", catalog["i30"], ctx, _cand("i30", popularity=15)) is None
    assert check_reason("A best seller with other shoppers.", catalog["i0"], ctx, _cand("i0")) == "popular"
    assert check_reason("The shop's #2 most popular item.", catalog["i2"], ctx) == "popular"
    assert check_reason("The shop's #1 most popular item.", catalog["i2"], ctx) is None  # the rank is checked too
    with pytest.raises(ValueError, match="counts cover 3 items, the catalog has 40"):
        popular_items(catalog, np.ones(3))


def test_popular_items_threshold_and_share():
    items = [Item(id=f"i{n}", title=f"Thing {n}") for n in range(100)]
    catalog = Catalog(items)
    counts = np.linspace(100, 1, 100)
    assert popular_items(catalog, counts) == {f"i{n}": n + 1 for n in range(int(100 * POPULAR_SHARE))}
    assert popular_items(catalog, np.full(100, 2.0)) == {}  # a quiet shop has no best sellers
    assert popular_items(Catalog(items[:3]), np.array([5.0, 9.0, 1.0])) == {"i1": 1}  # at least one item qualifies


def test_the_least_popular_candidate_is_never_called_a_best_seller(shop):
    catalog, hist, retriever = shop
    rec = Recommender(retriever, catalog, None)
    counts = retriever.retrievers["popularity"].counts
    top = set(np.argsort(-counts)[: int(len(catalog) * POPULAR_SHARE)])
    out = rec.recommend(RetrievalRequest(user_id="new"), GeneratorConfig(k=5, diversity=1.0))
    for p in out.picks:
        if "shoppers" in p.reason and ("Popular" in p.reason or "best seller" in p.reason):
            assert catalog.index[p.item_id] in top, p
    assert set(rec.popular_items()) == {catalog.items[r].id for r in top if counts[r] >= 3.0}


def test_no_history_sentence_without_a_history():
    items = [Item(id=f"i{n}", title=f"Acme Thing {n}", category=("Home", "Kitchen"), brand="Acme") for n in range(4)]
    catalog = Catalog(items)
    strong = _cand("i1", itemknn=1, sasrec=1, dense=1, popularity=1)
    for ctx in (ReasonContext(catalog), ReasonContext(catalog, query="acme thing")):  # a new shopper, a search
        said = [s for _, s in reason_options(catalog["i1"], ctx, strong)]
        assert not [s for s in said if any(w in s for w in HISTORY_WORDS)], said
        for s in ("Similar to what you have been browsing.", "Often bought with your recent items."):
            assert check_reason(s, catalog["i1"], ctx, strong) is None
    # with a history, but answering a search: the dense match was to the query, not to the browsing
    search = ReasonContext(catalog, history=("i0",), query="kitchen")
    assert check_reason("Similar to what you have been browsing.", catalog["i1"], search, strong) is None
    assert check_reason("Often bought with your recent items.", catalog["i1"], search, strong) == "co-bought"
    browsing = ReasonContext(catalog, history=("i0",))
    assert check_reason("Similar to what you have been browsing.", catalog["i1"], browsing, strong) == "similar"
    # a cart request: item-kNN matched the cart, and says so
    cart = ReasonContext(catalog, cart=("i0",))
    said = [s for _, s in reason_options(catalog["i1"], cart, strong)]
    assert "Often bought with the items in your cart." in said and "Often bought with your recent items." not in said
    assert check_reason("Often bought with the items in your cart.", catalog["i1"], cart, strong) == "co-bought"


def test_no_evidence_sentences_claim_nothing_and_name_the_right_department():
    catalog = Catalog(
        [Item(id="a", title="Alpha", category=("Garden",)), Item(id="b", title="Beta", category=("Toys",))]
    )
    ctx = ReasonContext(catalog)
    said = [s for kind, s in reason_options(catalog["a"], ctx) if kind == "none"]
    assert said and not any("review" in s for s in said)
    assert all(verify_reason(s, catalog["a"], ctx) == "none" for s in said)
    assert all(verify_reason(s, catalog["b"], ctx) is None for s in said)  # Garden is not Toys' department


def test_distinct_choices_prefer_what_earlier_picks_did_not_say():
    pop = ["Popular with other shoppers.", "A best seller with other shoppers.", "Worth a look in Home."]
    brand = ["Same brand as your Acme Kettle.", "Popular with other shoppers.", "Worth a look in Home."]
    got = distinct_choices([pop, brand, pop, pop])
    leads = [c[0] for c in got]
    assert leads == [
        "Popular with other shoppers.",
        "Same brand as your Acme Kettle.",
        "A best seller with other shoppers.",
        "Popular with other shoppers.",  # only a no-evidence line is left otherwise: the true evidence repeats
    ]
    assert "Popular with other shoppers." not in got[1]  # the model's choices drop a repeat when others hold
    none = [["Worth a look in Home.", "Another choice from Home."]] * 2
    assert [c[0] for c in distinct_choices(none)] == ["Worth a look in Home.", "Another choice from Home."]


def test_reasons_of_one_list_differ(shop):
    catalog, hist, retriever = shop
    rec = Recommender(retriever, catalog, None)
    users = sorted(hist)[:15]
    requests = [RetrievalRequest(user_id="new")] + [
        RetrievalRequest(user_id=u, history=tuple(e.item_id for e in hist[u])) for u in users
    ]
    for request in requests:
        reasons = [p.reason for p in rec.recommend(request, GeneratorConfig(k=5)).picks]
        assert len(set(reasons)) == len(reasons), reasons


def test_score_mode_rows_avoid_what_earlier_picks_may_say(shop):
    """Score mode decodes each pick's reason in its own row, in parallel: a later row is offered no sentence an
    earlier row may write while it has another true one (these 16 lists: 7 repeated a reason before, 1 now)."""
    from generator.backends import make_backend

    catalog, hist, retriever = shop
    rec = Recommender(retriever, catalog, make_backend("fake", seed=2))
    requests = [RetrievalRequest(user_id="new")] + [
        RetrievalRequest(user_id=u, history=tuple(e.item_id for e in hist[u])) for u in sorted(hist)[:15]
    ]
    repeated = 0
    for request in requests:
        out = rec.recommend(request, GeneratorConfig(k=5, max_reason_tokens=64))
        assert not out.fallback, out.fallback_reason
        reasons = [p.reason for p in out.picks]
        repeated += len(set(reasons)) < len(reasons)
    assert repeated <= 2, repeated
