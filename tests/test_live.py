"""The live index over REAL signals (MiniLM + FAISS, bm25s, item-kNN, popularity, a small SASRec): events and item
changes take effect in the next request, without `shoprec index`."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.index import build_index, load_index, read_store_histories
from retrieval.live import LiveIndex
from retrieval.types import Filters, Interaction, InteractionType, Item, RetrievalRequest

SIGNALS = ("popularity", "itemknn", "bm25", "dense")  # SASRec is covered on its own below (training costs seconds)
NOW = datetime(2025, 1, 2, tzinfo=UTC)  # just after the synthetic shop's last day: live events are the newest


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_shop, encoder):
    catalog = Catalog(small_shop.items)
    out = tmp_path_factory.mktemp("live") / "index"
    hist = histories(small_shop.interactions)
    build_index(catalog, hist, out, names=SIGNALS, fit_fusion_weights=False, encoder=encoder, progress=False)
    return catalog, out


@pytest.fixture
def live(built, encoder):
    catalog, out = built
    return LiveIndex(load_index(out, catalog, encoder=encoder), catalog, encoder=encoder)


def _new_item(item_id: str = "NEW-1", title: str = "Zorblax quantum espresso grinder", **kw) -> Item:
    return Item(id=item_id, title=title, category=("Kitchen", "Coffee"), price=89.0, **kw)


def _ids(live: LiveIndex, request: RetrievalRequest, k: int = 10) -> list[str]:
    return [c.item_id for c in live.retrieve(request, k)]


def _events(user: str, items: list[str], kind: InteractionType = InteractionType.PURCHASE) -> list[Interaction]:
    return [
        Interaction(user_id=user, item_id=i, type=kind, timestamp=NOW + timedelta(minutes=n))
        for n, i in enumerate(items)
    ]


def test_new_item_is_searchable_within_a_second(live, encoder):
    query = RetrievalRequest(query="zorblax espresso grinder")
    assert "NEW-1" not in _ids(live, query)
    t0 = time.perf_counter()
    live.upsert_items([_new_item()])
    found = live.retrieve(query, 5)
    elapsed = time.perf_counter() - t0
    assert found[0].item_id == "NEW-1"
    assert {"bm25", "dense"} <= set(found[0].sources)  # both content signals know it
    assert elapsed < 1.0, f"upsert to retrievable took {elapsed:.3f}s"
    # the shopper-facing snapshot grew, and its vectors are the item's own embedding
    assert "NEW-1" in live.catalog and len(live.catalog) == 401
    assert live.item_vectors is not None and live.item_vectors.shape[0] == len(live.catalog)
    expected = encoder.encode([_new_item().text()])[0]
    np.testing.assert_allclose(live.vectors_for(["NEW-1"])[0], expected, atol=1e-5)


def test_a_word_the_main_index_never_saw_finds_the_new_item_by_bm25(live):
    live.upsert_items([_new_item()])
    scores = live.fusion.retrievers["bm25"].score(RetrievalRequest(query="zorblax"))
    assert scores is not None and len(scores) == len(live.fusion.catalog)
    assert np.isfinite(scores).sum() == 1 and scores[live.fusion.catalog.index["NEW-1"]] > 0


def test_live_bm25_scores_equal_the_main_index_for_the_same_text(built, encoder):
    """The delta is scored with the main index's IDF and average length: re-scoring an unchanged row live gives
    the score bm25s gives it (so live and indexed items compare fairly)."""
    catalog, out = built
    bm25 = load_index(out, catalog, encoder=encoder).retrievers["bm25"]
    item = catalog.items[7]
    request = RetrievalRequest(query=item.title + " " + catalog.items[8].title)
    before = bm25.score(request)
    bm25.update_rows(catalog, [7, 8])  # same texts, now scored by the live path
    after = bm25.score(request)
    np.testing.assert_allclose(after, before, rtol=1e-4)


def test_deleted_item_is_never_retrieved_again(live, built):
    catalog, _ = built
    live.upsert_items([_new_item()])
    target = catalog.items[5]
    assert _ids(live, RetrievalRequest(query=target.title))[0] == target.id
    live.delete_items(["NEW-1", target.id])
    assert "NEW-1" not in _ids(live, RetrievalRequest(query="zorblax espresso grinder"), 50)
    assert target.id not in _ids(live, RetrievalRequest(query=target.title), 50)
    assert target.id not in live.catalog and "NEW-1" not in live.catalog
    # every mode: a cold user's list and a cart's complements never hold it either
    assert target.id not in _ids(live, RetrievalRequest(), len(catalog))
    assert live.item_vectors is not None and live.item_vectors.shape[0] == len(live.catalog) == 399
    # an upsert brings a deleted item back
    live.upsert_items([_new_item()])
    assert _ids(live, RetrievalRequest(query="zorblax espresso grinder"))[0] == "NEW-1"


def test_price_and_stock_changes_apply_to_filters(live, built):
    catalog, _ = built
    target = catalog.items[5]
    query = RetrievalRequest(query=target.title, filters=Filters(max_price=1000.0))
    assert _ids(live, query)[0] == target.id
    live.upsert_items([target.model_copy(update={"price": 5000.0})])
    assert target.id not in _ids(live, query, 50)
    live.upsert_items([target.model_copy(update={"price": 10.0, "in_stock": False})])
    in_stock = RetrievalRequest(query=target.title, filters=Filters(in_stock_only=True))
    assert target.id not in _ids(live, in_stock, 50)
    assert _ids(live, RetrievalRequest(query=target.title))[0] == target.id  # without the filter it is still there


def test_an_edited_title_is_searched_by_its_new_words(live, built):
    catalog, _ = built
    target = catalog.items[5]
    live.upsert_items([target.model_copy(update={"title": "Blorptastic hyperwidget deluxe"})])
    assert _ids(live, RetrievalRequest(query="blorptastic hyperwidget"))[0] == target.id
    bm25 = live.fusion.retrievers["bm25"].score(RetrievalRequest(query=target.title))
    # its old title no longer matches it lexically by the old title's own rare words
    assert (
        bm25 is None
        or not np.isfinite(bm25[catalog.index[target.id]])
        or bm25[catalog.index[target.id]] < max(s for s in bm25 if np.isfinite(s))
    )


def test_purchases_make_an_item_popular_in_the_next_request(live, built):
    catalog, _ = built
    pop = live.fusion.retrievers["popularity"]
    cold = RetrievalRequest()  # a shopper with no history: popularity decides
    x = catalog.ids[int(np.argmin(pop.counts))]  # the least popular item
    assert x not in _ids(live, cold, 10)
    live.apply_events([ev for n in range(40) for ev in _events(f"buyer-{n}", [x])])
    assert _ids(live, cold, 10)[0] == x
    assert live.stats["events"] == 40


def test_co_purchases_change_the_next_item_knn_list(live, built):
    catalog, _ = built
    knn = live.fusion.retrievers["itemknn"]
    a = catalog.ids[0]
    before = knn.score(RetrievalRequest(history=(a,)))
    x = next(catalog.ids[r] for r in range(1, len(catalog)) if before is None or not np.isfinite(before[r]))
    fused_before = _ids(live, RetrievalRequest(history=(a,)), 20)
    live.apply_events([ev for n in range(30) for ev in _events(f"pair-{n}", [a, x])])
    after = knn.score(RetrievalRequest(history=(a,)))
    assert after is not None and np.isfinite(after[catalog.index[x]])
    assert [c.item_id for c in knn.retrieve(RetrievalRequest(history=(a,)), 1)] == [x]
    fused = live.retrieve(RetrievalRequest(history=(a,)), 20)
    assert x not in fused_before and x in [c.item_id for c in fused]


def test_a_new_item_is_recommendable_through_its_events(live):
    live.upsert_items([_new_item()])
    live.apply_events([ev for n in range(40) for ev in _events(f"fan-{n}", ["NEW-1"])])
    assert _ids(live, RetrievalRequest(), 5)[0] == "NEW-1"


def test_pairs_use_the_users_history_in_the_store(built, encoder, tmp_path, small_shop):
    from retrieval.store import open_store

    catalog, out = built
    store = open_store(tmp_path / "shop.db")
    store.upsert_items(catalog.items)
    a, x = catalog.ids[0], catalog.ids[1]
    store.add_events(_events("shopper", [a]))
    live = LiveIndex(load_index(out, catalog, encoder=encoder), catalog, encoder=encoder, store=store)
    new = [Interaction(user_id="shopper", item_id=x, type=InteractionType.CART, timestamp=NOW + timedelta(hours=1))]
    store.add_events(new)  # the service writes first, then applies: the batch must not pair with itself
    live.apply_events(new)
    knn = live.fusion.retrievers["itemknn"]
    assert knn._live_next == {catalog.index[a]: {catalog.index[x]: 1.0}}


def test_sync_applies_other_replicas_writes_once(built, encoder, tmp_path):
    from retrieval.store import open_store

    catalog, out = built
    store = open_store(tmp_path / "shop.db")
    store.upsert_items(catalog.items)
    here = LiveIndex(
        load_index(out, catalog, encoder=encoder),
        catalog,
        encoder=encoder,
        store=store,
        event_seq=store.last_event_seq(),
        item_version=store.item_version(),
    )
    own = _events("me", [catalog.ids[3]])
    store.add_events(own)
    here.apply_events(own)  # this replica's own write, applied at once
    # another replica's writes: a new item, a deleted one, and events
    store.upsert_items([_new_item()])
    store.delete_item(catalog.ids[5])
    store.add_events([ev for n in range(40) for ev in _events(f"other-{n}", ["NEW-1"])])
    report = here.sync(store)
    assert report == {"items_changed": 1, "items_deleted": 1, "events": 40, "events_skipped": 1}
    assert "NEW-1" in here.catalog and catalog.ids[5] not in here.catalog
    assert _ids(here, RetrievalRequest(), 5)[0] == "NEW-1"
    assert here.sync(store) == {"items_changed": 0, "items_deleted": 0, "events": 0, "events_skipped": 0}


@pytest.mark.slow
def test_open_loads_the_built_catalog_and_catches_up_with_the_store(tmp_path, small_shop, encoder):
    from retrieval.store import open_store

    store = open_store(tmp_path / "shop.db")
    store.upsert_items(small_shop.items)
    store.add_events(small_shop.interactions)
    hist, state = read_store_histories(store)  # what `shoprec index` trains on, and the position it read up to
    assert state["last_event_seq"] == store.last_event_seq() == sum(len(evs) for evs in hist.values())
    catalog = Catalog(store.items())
    build_index(
        catalog, hist, tmp_path / "index", names=SIGNALS, encoder=encoder,
        store_state=state, fit_fusion_weights=False, progress=False,
    )  # fmt: skip
    # after the build: a product is added and bought by many (the store's catalog no longer matches the index)
    store.upsert_items([_new_item()])
    store.add_events([ev for n in range(40) for ev in _events(f"late-{n}", ["NEW-1"])])
    live = LiveIndex.open(tmp_path / "index", store, encoder=encoder)
    assert live.positions["last_event_seq"] == store.last_event_seq()
    assert _ids(live, RetrievalRequest(), 5)[0] == "NEW-1"
    assert _ids(live, RetrievalRequest(query="zorblax espresso grinder"))[0] == "NEW-1"


def test_construction_reconciles_with_the_current_catalog(built, encoder):
    catalog, out = built
    now = Catalog([*catalog.items[1:], _new_item()])  # one item gone, one added since the build
    live = LiveIndex(load_index(out, catalog, encoder=encoder), now, encoder=encoder)
    assert live.catalog.ids == now.ids
    assert catalog.ids[0] not in _ids(live, RetrievalRequest(query=catalog.items[0].title), 50)


def test_reads_during_updates_never_fail_or_see_deleted_items(live, built):
    catalog, _ = built
    errors: list[BaseException] = []
    stop = threading.Event()
    deleted: set[str] = set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                item = catalog.items[int(rng.integers(len(catalog)))]
                frozen = set(deleted)  # deleted before this request started: must not come back
                for request in (RetrievalRequest(query=item.title), RetrievalRequest(history=(item.id,))):
                    got = _ids(live, request, 20)
                    assert not frozen & set(got)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for n in range(15):
        live.upsert_items([_new_item(f"NEW-{n}", f"Zorblax gadget number {n}")])
        live.apply_events(_events(f"u{n}", [catalog.ids[n], f"NEW-{n}"]))
        live.delete_items([catalog.ids[100 + n]])
        deleted.add(catalog.ids[100 + n])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(live.catalog) == 400 + 15 - 15


def test_the_recommender_sees_the_live_catalog(live):
    from generator.recommender import GeneratorConfig, Recommender

    rec = Recommender(live, live.catalog, None, item_vectors=live.item_vectors)
    live.upsert_items([_new_item()])  # after the recommender was made
    out = rec.recommend(RetrievalRequest(query="zorblax espresso grinder"), GeneratorConfig(k=3, n_candidates=10))
    assert out.picks[0].item_id == "NEW-1"


def test_sasrec_gives_new_rows_no_score(small_shop):
    from retrieval.sequential import SASRecConfig, SequentialRetriever

    catalog = Catalog(small_shop.items)
    sasrec = SequentialRetriever(catalog, SASRecConfig(epochs=1, hidden_dim=16, num_blocks=1, progress=False))
    sasrec.fit(histories(small_shop.interactions))
    grown = catalog.updated([_new_item()])
    sasrec.update_rows(grown, [len(catalog)])
    scores = sasrec.score(RetrievalRequest(history=(catalog.ids[0], "NEW-1")))
    assert scores is not None and len(scores) == len(grown)
    assert scores[-1] == -np.inf and np.isfinite(scores[:-1]).all()


@pytest.mark.slow
def test_fold_rebuilds_with_the_live_changes_and_keeps_serving(tmp_path, small_shop, encoder):
    from retrieval.store import open_store

    store = open_store(tmp_path / "shop.db")
    store.upsert_items(small_shop.items)
    store.add_events(small_shop.interactions)
    opts = {"names": SIGNALS, "fit_fusion_weights": False, "progress": False}
    hist, state = read_store_histories(store)
    build_index(Catalog(store.items()), hist, tmp_path / "index", encoder=encoder, store_state=state, **opts)
    live = LiveIndex.open(tmp_path / "index", store, encoder=encoder)
    gone = small_shop.items[5].id
    store.upsert_items([_new_item()])
    store.delete_item(gone)
    late = [ev for n in range(40) for ev in _events(f"late-{n}", ["NEW-1"])]
    store.add_events(late)
    live.sync(store)
    counts_live = live.fusion.retrievers["popularity"].counts[live.fusion.catalog.index["NEW-1"]]
    live.fold(tmp_path / "index", store, **opts)
    # the rebuilt index knows the new item natively (no live rows left) and counted its events exactly once
    assert live.fusion.catalog.ids == live.catalog.ids and "NEW-1" in live.catalog and gone not in live.catalog
    assert not live.fusion.retrievers["bm25"]._live_docs
    pop = live.fusion.retrievers["popularity"]
    assert counts_live > 0
    assert pop.counts[live.fusion.catalog.index["NEW-1"]] == pytest.approx(40 * 5.0)  # 40 purchases, once each
    assert _ids(live, RetrievalRequest(), 5)[0] == "NEW-1"
    assert live.sync(store)["events"] == 0


def test_an_approximate_dense_index_merges_the_live_rows(live, encoder):
    """With IVF (large catalogs) the FAISS index is not rebuilt: new and edited rows are searched exactly beside it."""
    from retrieval.dense import DenseRetriever, VectorIndex

    base = live.fusion.retrievers["dense"]
    ivf = DenseRetriever(base.catalog, encoder, base.vectors, VectorIndex.build(base.vectors, kind="ivf", nlist=4))
    assert not ivf.index.exact
    edited = base.catalog.items[9].model_copy(update={"title": "Zorblax quantum espresso grinder deluxe"})
    grown = base.catalog.updated([edited, _new_item()])
    ivf.update_rows(grown, [9, len(base.catalog)])
    scores = ivf.score(RetrievalRequest(query="zorblax quantum espresso grinder"))
    assert scores is not None and len(scores) == len(grown)
    top = [grown.items[r].id for r in np.argsort(-scores)[:2]]
    assert set(top) == {"NEW-1", edited.id}
