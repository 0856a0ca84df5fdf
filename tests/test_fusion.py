"""Fusion logic, isolated with fake signals (real signals are covered in test_retrieval_stage.py)."""

import numpy as np
import pytest

from retrieval.base import ScoringRetriever, top_k
from retrieval.catalog import Catalog
from retrieval.fusion import FusionConfig, FusionRetriever, fit_weights, fuse_lists
from retrieval.types import Filters, Item, RetrievalRequest


class Fixed(ScoringRetriever):
    def __init__(self, catalog: Catalog, name: str, scores: list[float]):
        super().__init__(catalog)
        self.name = name
        self._scores = np.array(scores, dtype=float)

    def score(self, request):
        return self._scores.copy()


@pytest.fixture
def catalog() -> Catalog:
    cats = ["A", "A", "B", "B", "C"]
    return Catalog(
        Item(id=f"i{i}", title=f"item {i}", category=(c,), price=10.0 * (i + 1), in_stock=i != 3)
        for i, c in enumerate(cats)
    )


def test_rrf_by_hand():
    lists = {"a": (np.array([0, 1]), np.array([9.0, 8.0])), "b": (np.array([1, 2]), np.array([5.0, 4.0]))}
    fused = fuse_lists(lists, {"a": 1.0, "b": 2.0}, 10.0, 4)
    np.testing.assert_allclose(fused[:3], [1 / 11, 1 / 12 + 2 / 11, 2 / 12])
    assert fused[3] == -np.inf


def test_fusion_agrees_when_signals_agree_and_records_every_signal(catalog):
    a = Fixed(catalog, "sasrec", [5, 4, 3, 2, 1])
    b = Fixed(catalog, "itemknn", [1, 4, 3, 2, 0])
    fusion = FusionRetriever(catalog, [a, b], FusionConfig(weights={"user": {"sasrec": 1, "itemknn": 1}}))
    out = fusion.retrieve(RetrievalRequest(history=("i4",)), k=3)
    assert [c.item_id for c in out] == ["i1", "i0", "i2"]
    assert set(out[0].sources) == {"sasrec", "itemknn"}
    assert out[0].sources["itemknn"].rank == 1 and out[0].sources["sasrec"].rank == 2


def test_filters_and_history_apply_before_fusion(catalog):
    a = Fixed(catalog, "sasrec", [5, 4, 3, 2, 1])
    fusion = FusionRetriever(catalog, [a], FusionConfig(weights={"user": {"sasrec": 1}}))
    req = RetrievalRequest(history=("i0",), filters=Filters(in_stock_only=True, max_price=45))
    assert [c.item_id for c in fusion.retrieve(req, 5)] == ["i1", "i2"]  # i0 seen, i3 out of stock, i4 too dear
    req = RetrievalRequest(filters=Filters(categories=("B",)), cart=("i2",))
    fusion.config = FusionConfig(weights={"cart": {"sasrec": 1}})
    assert [c.item_id for c in fusion.retrieve(req, 5)] == ["i3"]  # the cart item itself is never suggested


def test_zero_weight_signal_is_not_consulted(catalog):
    calls = []

    class Spy(Fixed):
        def score(self, request):
            calls.append(1)
            return super().score(request)

    fusion = FusionRetriever(
        catalog,
        [Fixed(catalog, "bm25", [1] * 5), Spy(catalog, "sasrec", [1] * 5)],
        FusionConfig(weights={"query": {"bm25": 1, "sasrec": 0}}),
    )
    fusion.retrieve(RetrievalRequest(query="x"), 2)
    assert calls == []


def test_fit_weights_finds_the_informative_signal():
    rng = np.random.default_rng(0)
    n, cases = 50, []
    for _ in range(40):
        target = int(rng.integers(n))
        good = rng.normal(size=n)
        good[target] = 10  # the informative signal always has the target first
        noise = rng.normal(size=n)
        lists = {name: (top_k(s, 20), s[top_k(s, 20)]) for name, s in (("good", good), ("noise", noise))}
        cases.append((lists, target))
    for method in ("rrf", "minmax"):
        weights, _, recall, chosen = fit_weights(cases, ["good", "noise"], n, k=1, methods=(method,))
        assert recall == 1.0 and chosen == method
        assert weights["good"] > weights["noise"]


def test_minmax_keeps_a_confident_signals_score_gap():
    # signal a: row 0 far ahead of rows 1, 2; signal b: rows 1, 0, 2 almost tied
    lists = {
        "a": (np.array([0, 1, 2]), np.array([10.0, 1.0, 0.0])),
        "b": (np.array([1, 0, 2]), np.array([1.0, 0.99, 0.0])),
    }
    fused = fuse_lists(lists, {"a": 1.0, "b": 1.0}, 60.0, 3, "minmax")
    np.testing.assert_allclose(fused, [1.0 + 0.99, 0.1 + 1.0, 0.0])
    rrf = fuse_lists(lists, {"a": 1.0, "b": 1.0}, 60.0, 3, "rrf")
    assert rrf[0] == rrf[1]  # RRF sees only the ranks: a tie
    with pytest.raises(ValueError, match="fusion method must be one of rrf, minmax"):
        FusionConfig(method="borda")


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="unknown mode 'browse'"):
        FusionConfig(weights={"browse": {}})
    with pytest.raises(ValueError, match="user/dense must be a finite number >= 0, got -1"):
        FusionConfig(weights={"user": {"dense": -1}})
    cfg = FusionConfig(weights={"user": {"a": 0.5}}, rrf_k=5, depth=10)
    assert FusionConfig.from_dict(cfg.to_dict()) == cfg


def test_cold_start_falls_back_to_signals_with_zero_weight(catalog):
    class OnlyWithoutHistory(Fixed):
        def score(self, request):
            return None if request.history else super().score(request)

    pop = OnlyWithoutHistory(catalog, "popularity", [1, 2, 3, 4, 5])
    knn = Fixed(catalog, "itemknn", [5, 4, 3, 2, 1])
    fusion = FusionRetriever(catalog, [pop, knn], FusionConfig(weights={"user": {"popularity": 0, "itemknn": 1}}))
    # itemknn does not apply to a cold user here -> popularity is used although its fitted weight is 0
    knn.score = lambda request: None  # type: ignore[method-assign]
    assert [c.item_id for c in fusion.retrieve(RetrievalRequest(), 2)] == ["i4", "i3"]


def test_new_item_places_offer_unseen_items_at_the_end_of_the_list():
    """Behaviour signals never rank an item nobody used; the reserved places offer the best content match instead."""
    catalog = Catalog(Item(id=f"i{n}", title=f"item {n}", category=("A",)) for n in range(10))
    pop = Fixed(catalog, "popularity", [9, 8, 7, 6, 5, 4, 3, 2, 0, 0])  # i8, i9: no interactions yet
    pop.counts = np.array([9, 8, 7, 6, 5, 4, 3, 2, 0, 0], dtype=np.float64)  # type: ignore[attr-defined]
    text = Fixed(catalog, "bm25", [0, 0, 0, 0, 0, 0, 0, 0, 1, 2])  # the new i9 matches best, then i8
    calls = []
    text_score = text.score
    text.score = lambda request: calls.append(1) or text_score(request)  # type: ignore[method-assign]
    weights = {"user": {"popularity": 1.0, "bm25": 0.1}}
    plain = FusionRetriever(catalog, [pop, text], FusionConfig(weights=weights))
    assert [c.item_id for c in plain.retrieve(RetrievalRequest(history=("i0",)), 4)] == ["i1", "i2", "i3", "i4"]
    fresh = FusionRetriever(catalog, [pop, text], FusionConfig(weights=weights, new_item_share=0.5))
    got = fresh.retrieve(RetrievalRequest(history=("i0",)), 4)
    assert [c.item_id for c in got] == ["i1", "i2", "i9", "i8"]  # best content match first, after the kept items
    assert got[2].score < got[1].score and got[2].sources["bm25"].rank == 1
    assert len(calls) == 2  # once per retrieve: the fused list and the new-item places share one scoring
    assert FusionConfig.from_dict(fresh.config.to_dict()).new_item_share == 0.5
    with pytest.raises(ValueError, match="new_item_share"):
        FusionConfig(new_item_share=0.9)


def test_ranked_builds_the_same_candidates_for_any_subset_and_each_rank_is_the_signals_own():
    """`ranked` gives ids and scores at once and a candidate's evidence when it is read: any subset, in any order,
    reads exactly what the whole list holds, and each signal's rank is the item's place in that signal's list."""
    rng = np.random.default_rng(0)
    catalog = Catalog(Item(id=f"i{n}", title=f"item {n}", category=("A",)) for n in range(60))
    signals = [Fixed(catalog, name, rng.normal(size=60).tolist()) for name in ("sasrec", "itemknn", "bm25")]
    fusion = FusionRetriever(catalog, signals, FusionConfig(weights={"user": dict.fromkeys(["sasrec", "itemknn"], 1)}))
    fusion.config.depth = 25  # shorter than the list asked for: some candidates miss some signals
    request = RetrievalRequest(history=("i0", "i1"))
    ranked = fusion.ranked(request, 40)
    everything = ranked.candidates()
    assert [c.item_id for c in everything] == ranked.ids and [c.score for c in everything] == ranked.scores
    subset = [33, 2, 17, 0]
    assert ranked.candidates(subset) == [everything[i] for i in subset]
    assert ranked.head(5).candidates() == everything[:5]
    lists = fusion.signal_lists(request)
    for c in everything:
        row = catalog.index[c.item_id]
        for name, (rows, scores) in lists.items():
            where = np.flatnonzero(rows == row)
            if len(where):
                assert c.sources[name].rank == where[0] + 1 and c.sources[name].score == scores[where[0]]
            else:
                assert name not in c.sources
    assert any(len(c.sources) < len(lists) for c in everything)  # the depth cut mattered
    third = ranked.ids[3]
    assert ranked.evidence(["not-retrieved", third]) == {
        third: tuple((n, e.rank, e.score) for n, e in everything[3].sources.items())
    }
