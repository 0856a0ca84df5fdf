"""BM25 retrieval (bm25s) over the hand-built catalog of tests/test_dense.py; persistence; the tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.base import Retriever
from retrieval.catalog import Catalog
from retrieval.lexical import BM25Retriever, s_stem, tokenize
from retrieval.types import Filters, RetrievalRequest
from tests.test_dense import ITEMS, KITCHEN, make_catalog


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="module")
def bm25(catalog: Catalog) -> BM25Retriever:
    return BM25Retriever.build(catalog)


def ids(candidates: list) -> list[str]:  # type: ignore[type-arg]
    return [c.item_id for c in candidates]


def test_tokenizer_lowercases_drops_stopwords_and_folds_plurals() -> None:
    assert tokenize("The Staplers and PENS for Batteries") == ["stapler", "pen", "battery"]
    words = ("batteries", "glasses", "glass", "boxes", "watches", "shoes", "bus", "gas")
    assert [s_stem(w) for w in words] == ["battery", "glass", "glass", "box", "watch", "shoe", "bus", "gas"]


def test_is_a_retriever(bm25: BM25Retriever) -> None:
    assert isinstance(bm25, Retriever) and bm25.name == "bm25"


def test_query_finds_the_obvious_item(bm25: BM25Retriever) -> None:
    assert ids(bm25.retrieve(RetrievalRequest(query="stapler"), 3)) == ["o1"]
    assert ids(bm25.retrieve(RetrievalRequest(query="staplers"), 3)) == ["o1"]  # plural folded
    assert ids(bm25.retrieve(RetrievalRequest(query="Sonique headphones"), 3))[0] == "a1"  # brand is indexed


def test_rows_without_a_match_are_not_retrieved(bm25: BM25Retriever) -> None:
    scores = bm25.score(RetrievalRequest(query="coffee"))
    assert scores is not None
    matched = {ITEMS[i].id for i in np.flatnonzero(np.isfinite(scores))}
    assert matched == {"k1", "k4", "k5"}
    assert np.all(scores[np.isfinite(scores)] > 0)


def test_nothing_to_match_is_none(bm25: BM25Retriever) -> None:
    assert bm25.score(RetrievalRequest()) is None
    assert bm25.score(RetrievalRequest(query="the and of")) is None  # stopwords only
    assert bm25.score(RetrievalRequest(query="zyxxy")) is None  # not in the vocabulary
    assert bm25.retrieve(RetrievalRequest(query="zyxxy"), 5) == []


def test_user_mode_matches_recent_history_titles(bm25: BM25Retriever) -> None:
    # Only the last three titles count: the old sandals do not, the recent coffee items do.
    history = ("s4", "k1", "k2", "k4")
    top = ids(bm25.retrieve(RetrievalRequest(history=history), 3))
    assert top[0] == "k5", top
    assert not {"s1", "s2", "s3", "s5"} & set(top)


def test_cart_mode_matches_cart_titles(bm25: BM25Retriever, catalog: Catalog) -> None:
    top = ids(bm25.retrieve(RetrievalRequest(cart=("p2",)), 3))  # phone case -> other phone items
    assert "p2" not in top and top and all(catalog[i].category[0] == "Electronics" for i in top)


def test_filters_are_applied(bm25: BM25Retriever, catalog: Catalog) -> None:
    request = RetrievalRequest(query="running sneakers shoes", filters=Filters(in_stock_only=True, max_price=90))
    top = ids(bm25.retrieve(request, 10))
    assert top and "s3" not in top and "s2" not in top
    only_kitchen = RetrievalRequest(query="coffee", filters=Filters(categories=(" > ".join(KITCHEN),)))
    assert set(ids(bm25.retrieve(only_kitchen, 10))) == {"k1", "k4", "k5"}


def test_save_load_round_trip_gives_identical_scores(tmp_path: Path, bm25: BM25Retriever, catalog: Catalog) -> None:
    bm25.save(tmp_path / "bm25")
    loaded = BM25Retriever.load(tmp_path / "bm25", catalog)
    for request in (
        RetrievalRequest(query="wireless earbuds"),
        RetrievalRequest(history=("k1", "k4")),
        RetrievalRequest(cart=("g3",)),
    ):
        np.testing.assert_array_equal(loaded.score(request), bm25.score(request))


def test_load_refuses_another_catalog(tmp_path: Path, bm25: BM25Retriever) -> None:
    bm25.save(tmp_path / "bm25")
    with pytest.raises(ValueError, match="different catalog.*shoprec index"):
        BM25Retriever.load(tmp_path / "bm25", Catalog(ITEMS[:-1]))
    with pytest.raises(ValueError, match="shoprec index"):
        BM25Retriever.load(tmp_path / "missing", Catalog(ITEMS))


def test_interrupted_save_keeps_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bm25: BM25Retriever, catalog: Catalog
) -> None:
    from retrieval import lexical

    target = tmp_path / "bm25"
    bm25.save(target)
    smaller = BM25Retriever.build(Catalog(ITEMS[:5]))

    def crash(path: Path, data: dict) -> None:  # type: ignore[type-arg]
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(lexical, "write_json", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        smaller.save(target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["bm25"]  # no temp dirs left behind
    loaded = BM25Retriever.load(target, catalog)
    request = RetrievalRequest(query="garden hose")
    np.testing.assert_array_equal(loaded.score(request), bm25.score(request))
