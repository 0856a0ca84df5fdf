"""The whole retrieval stage with every REAL signal (MiniLM + FAISS, bm25s, item-kNN, SASRec, popularity),
built, fused, saved and loaded on the small synthetic shop."""

from __future__ import annotations

import pytest

from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.index import SIGNALS, build_index, load_index, read_manifest
from retrieval.sequential import SASRecConfig
from retrieval.types import Filters, Item, RetrievalRequest


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_shop, encoder):
    catalog = Catalog(small_shop.items)
    hist = histories(small_shop.interactions)
    out = tmp_path_factory.mktemp("idx") / "index"
    fusion = build_index(
        catalog,
        hist,
        out,
        encoder=encoder,
        sasrec_config=SASRecConfig(epochs=4, max_len=30, eval_every=2, progress=False, seed=0),
        progress=False,
    )
    return catalog, hist, out, fusion


def _user_with_history(hist, n=10):
    return next(u for u, evs in sorted(hist.items()) if len(evs) >= n)


def test_every_signal_is_built_and_weights_are_fitted(built):
    _, _, out, _ = built
    manifest = read_manifest(out)
    assert manifest["signals"] == list(SIGNALS)
    assert manifest["fusion_fit"]["fitted"] is True
    assert manifest["fusion_fit"]["cases"] >= 30


def test_user_mode_excludes_history_and_reports_signals(built):
    catalog, hist, _, fusion = built
    user = _user_with_history(hist)
    history = tuple(ev.item_id for ev in hist[user])
    out = fusion.retrieve(RetrievalRequest(user_id=user, history=history), 20)
    assert len(out) == 20
    assert not set(c.item_id for c in out) & set(history)
    assert all(c.sources for c in out)
    assert len({name for c in out for name in c.sources}) >= 2  # more than one signal contributes
    assert [c.score for c in out] == sorted((c.score for c in out), reverse=True)


def test_query_mode_finds_matching_titles(built, small_shop):
    catalog, _, _, fusion = built
    target = small_shop.items[5]
    out = fusion.retrieve(RetrievalRequest(query=target.title), 5)
    assert out[0].item_id == target.id
    assert {"bm25", "dense"} <= set(out[0].sources)


def test_cold_item_is_retrievable_by_content(built, small_shop):
    catalog, hist, _, fusion = built
    cold = catalog[small_shop.cold_item_ids[0]]
    assert all(ev.item_id != cold.id for evs in hist.values() for ev in evs)
    ids = [c.item_id for c in fusion.retrieve(RetrievalRequest(query=cold.title), 3)]
    assert cold.id in ids


def test_cart_mode_returns_complements(built, small_shop):
    catalog, hist, _, fusion = built
    # a purchased item whose subcategory has complements in this shop
    comp = small_shop.complements
    bought = [
        ev.item_id
        for evs in hist.values()
        for ev in evs
        if ev.type == "purchase" and " > ".join(catalog[ev.item_id].category) in comp
    ]
    hits = 0
    for item_id in bought[:20]:
        src = " > ".join(catalog[item_id].category)
        out = fusion.retrieve(RetrievalRequest(cart=(item_id,)), 10)
        assert item_id not in {c.item_id for c in out}
        hits += any(" > ".join(catalog[c.item_id].category) in comp[src] for c in out)
    assert hits >= 0.5 * min(len(bought), 20)


def test_cold_user_gets_popular_items(built):
    _, _, _, fusion = built
    out = fusion.retrieve(RetrievalRequest(user_id="nobody"), 10)
    assert len(out) == 10
    assert all("popularity" in c.sources for c in out)


def test_filters_hold_for_the_fused_list(built):
    catalog, hist, _, fusion = built
    user = _user_with_history(hist)
    top = catalog.items[0].category[0]
    f = Filters(categories=(top,), max_price=40.0, in_stock_only=True)
    out = fusion.retrieve(RetrievalRequest(history=tuple(e.item_id for e in hist[user]), filters=f), 15)
    assert out
    for c in out:
        it = catalog[c.item_id]
        assert it.category[0] == top and it.price is not None and it.price <= 40.0 and it.in_stock


def test_save_load_round_trip_and_catalog_check(built, encoder):
    catalog, hist, out, fusion = built
    loaded = load_index(out, catalog, encoder=encoder)
    user = _user_with_history(hist)
    for req in (
        RetrievalRequest(history=tuple(e.item_id for e in hist[user])),
        RetrievalRequest(query="gift"),
        RetrievalRequest(cart=(catalog.items[3].id,)),
    ):
        a = fusion.retrieve(req, 10)
        b = loaded.retrieve(req, 10)
        assert [c.item_id for c in a] == [c.item_id for c in b]
    changed = Catalog([*catalog.items, Item(id="NEW", title="Brand new thing")])
    with pytest.raises(ValueError, match="different catalog.*shoprec index"):
        load_index(out, changed, encoder=encoder)
