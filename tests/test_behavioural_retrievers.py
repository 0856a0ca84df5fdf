"""Behaviour-based retrievers (popularity, item-kNN, SASRec) on a tiny synthetic shop with a known next-item rule.

The shop: 60 items in 3 categories, grouped into 20 chains (3k -> 3k+1 -> 3k+2). Every user walks through a few
random chains in order, so "what comes next" is known exactly and each retriever can be checked against it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from retrieval.base import ScoringRetriever
from retrieval.catalog import Catalog
from retrieval.collaborative import ItemKNNConfig, ItemKNNRetriever
from retrieval.popularity import PopularityConfig, PopularityRetriever
from retrieval.sequential import SASRecConfig, SequentialRetriever
from retrieval.types import Filters, Interaction, InteractionType, Item, RetrievalRequest

N_ITEMS = 60
CATEGORIES = ("Pens", "Paper", "Desks")


def iid(i: int) -> str:
    return f"i{i:02d}"


def category_of(i: int) -> str:
    return CATEGORIES[(i // 3) % 3]  # a whole chain shares one category


def make_catalog(n: int = N_ITEMS) -> Catalog:
    return Catalog(
        Item(id=iid(i), title=f"item {i}", category=(category_of(i), "Sub"), price=float(i)) for i in range(n)
    )


def events(user: str, items: list[str], kind: InteractionType = InteractionType.PURCHASE) -> list[Interaction]:
    return [Interaction(user_id=user, item_id=it, type=kind, position=k) for k, it in enumerate(items)]


def chain_histories(n_users: int = 300, chains_per_user: int = 3, seed: int = 0) -> dict[str, list[Interaction]]:
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(n_users):
        chains = rng.choice(N_ITEMS // 3, size=chains_per_user, replace=False)
        items = [iid(3 * int(c) + k) for c in chains for k in range(3)]
        out[f"u{u}"] = events(f"u{u}", items)
    return out


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="module")
def histories() -> dict[str, list[Interaction]]:
    return chain_histories()


@pytest.fixture(scope="module")
def fitted(catalog: Catalog, histories: dict[str, list[Interaction]]) -> dict[str, ScoringRetriever]:
    pop = PopularityRetriever(catalog)
    pop.fit(histories)
    knn = ItemKNNRetriever(catalog)
    knn.fit(histories)
    sas = SequentialRetriever(catalog, SMALL_SASREC)
    sas.fit(histories)
    return {"popularity": pop, "itemknn": knn, "sasrec": sas}


SMALL_SASREC = SASRecConfig(
    hidden_dim=32, max_len=12, dropout=0.1, lr=5e-3, batch_size=64, epochs=40, patience=3, num_threads=1, progress=False
)
ALL = ("popularity", "itemknn", "sasrec")
LOADERS = {"popularity": PopularityRetriever, "itemknn": ItemKNNRetriever, "sasrec": SequentialRetriever}


def top_ids(r: ScoringRetriever, request: RetrievalRequest, k: int) -> list[str]:
    return [c.item_id for c in r.retrieve(request, k)]


# ---------------------------------------------------------------------------------------------- popularity
def test_popularity_ranks_the_most_bought_first_and_weighs_purchases_over_views(catalog: Catalog) -> None:
    hist = {f"u{u}": events(f"u{u}", [iid(5)]) for u in range(4)}  # 4 purchases of i05
    hist |= {f"v{u}": events(f"v{u}", [iid(7)], InteractionType.VIEW) for u in range(10)}  # 10 views of i07
    hist |= {f"w{u}": events(f"w{u}", [iid(9)]) for u in range(2)}  # 2 purchases of i09
    pop = PopularityRetriever(catalog)
    pop.fit(hist)
    # 4 purchases x 5 = 20 > 10 views x 1 = 10 > 2 purchases x 5 = 10 (tie broken by row: i07 before i09)
    assert top_ids(pop, RetrievalRequest(), 3) == [iid(5), iid(7), iid(9)]


def test_popularity_recency_decay_with_timestamps(catalog: Catalog) -> None:
    now = datetime(2024, 6, 1, tzinfo=UTC)

    def bought(user: str, item: str, when: datetime) -> list[Interaction]:
        return [Interaction(user_id=user, item_id=item, type=InteractionType.PURCHASE, timestamp=when)]

    hist = {f"old{u}": bought(f"old{u}", iid(1), now - timedelta(days=365)) for u in range(6)}
    hist |= {f"new{u}": bought(f"new{u}", iid(2), now - timedelta(days=u)) for u in range(4)}
    decayed = PopularityRetriever(catalog, PopularityConfig(half_life_days=30))
    decayed.fit(hist)
    flat = PopularityRetriever(catalog, PopularityConfig(half_life_days=None))
    flat.fit(hist)
    assert top_ids(decayed, RetrievalRequest(), 2) == [iid(2), iid(1)]  # 4 recent sales beat 6 a year ago
    assert top_ids(flat, RetrievalRequest(), 2) == [iid(1), iid(2)]  # without decay, counts win


def test_popularity_recency_by_event_order_without_timestamps(catalog: Catalog) -> None:
    # Every user bought i03 first and i04 last: equal counts, but i04 is the more recent in each history.
    hist = {f"u{u}": events(f"u{u}", [iid(3), iid(10 + u), iid(4)]) for u in range(5)}
    pop = PopularityRetriever(catalog, PopularityConfig(half_life_events=2.0))
    pop.fit(hist)
    scores = pop.score(RetrievalRequest())
    assert scores is not None
    assert scores[catalog.index[iid(4)]] > scores[catalog.index[iid(3)]]


def test_popularity_blends_in_the_categories_of_the_user(catalog: Catalog) -> None:
    hist = {f"u{u}": events(f"u{u}", [iid(0)]) for u in range(10)}  # i00 (Pens) is the global best seller
    hist |= {f"v{u}": events(f"v{u}", [iid(4)]) for u in range(3)}  # i04 is the best seller of Paper
    pop = PopularityRetriever(catalog, PopularityConfig(category_blend=0.5))
    pop.fit(hist)
    assert top_ids(pop, RetrievalRequest(), 1) == [iid(0)]
    paper_fan = RetrievalRequest(history=(iid(5), iid(22)))  # both Paper
    assert top_ids(pop, paper_fan, 1) == [iid(4)]
    # query and cart modes stay global: popularity is only their cold-start prior
    assert top_ids(pop, RetrievalRequest(history=paper_fan.history, query="pens"), 1) == [iid(0)]


# ------------------------------------------------------------------------------------------------ item-kNN
def test_itemknn_retrieves_the_next_item_of_the_pattern(fitted: dict[str, ScoringRetriever]) -> None:
    knn = fitted["itemknn"]
    for start in (0, 9, 30):
        assert top_ids(knn, RetrievalRequest(history=(iid(start),)), 1) == [iid(start + 1)]
        assert top_ids(knn, RetrievalRequest(history=(iid(start), iid(start + 1))), 1) == [iid(start + 2)]
    # the most recent item weighs most: the next items of three chain starts come out newest first
    ranked = top_ids(knn, RetrievalRequest(history=(iid(30), iid(3), iid(9))), N_ITEMS)
    assert ranked[0] == iid(10) and ranked.index(iid(4)) < ranked.index(iid(31))


def test_itemknn_cart_complements_follow_the_direction(fitted: dict[str, ScoringRetriever]) -> None:
    knn = fitted["itemknn"]
    assert isinstance(knn, ItemKNNRetriever)
    # i31 follows i30 and precedes i32: the cart's complement is what comes next, not what came before
    assert top_ids(knn, RetrievalRequest(cart=(iid(31),)), 1) == [iid(32)]
    assert knn.neighbours(iid(31), k=1, directional=True)[0][0] == iid(32)
    assert {n for n, _ in knn.neighbours(iid(31), k=2, directional=False)} == {iid(30), iid(32)}
    assert iid(31) not in top_ids(knn, RetrievalRequest(cart=(iid(31),)), 10)  # never the cart itself


def test_itemknn_without_history_or_cart_is_not_applicable(fitted: dict[str, ScoringRetriever]) -> None:
    knn = fitted["itemknn"]
    assert knn.score(RetrievalRequest()) is None
    assert knn.score(RetrievalRequest(query="desk")) is None
    assert knn.retrieve(RetrievalRequest(), 5) == []


def test_itemknn_scores_items_without_evidence_minus_infinity(catalog: Catalog) -> None:
    knn = ItemKNNRetriever(catalog)
    knn.fit({"u": events("u", [iid(0), iid(1), iid(2)]), "v": events("v", [iid(7), iid(8)])})
    scores = knn.score(RetrievalRequest(history=(iid(0),)))
    assert scores is not None
    assert np.isfinite(scores[[1, 2]]).all() and scores[1] > scores[2]  # the nearer follower first
    assert np.isneginf(np.delete(scores, [1, 2])).all()  # i00 itself, the other chain and the unseen items


# -------------------------------------------------------------------------------------------------- SASRec
def test_sasrec_learns_the_next_item(fitted: dict[str, ScoringRetriever]) -> None:
    sas = fitted["sasrec"]
    hits = 0
    for start in range(0, N_ITEMS, 3):
        hits += iid(start + 1) in top_ids(sas, RetrievalRequest(history=(iid((start + 30) % 60), iid(start))), 3)
        hits += iid(start + 2) in top_ids(sas, RetrievalRequest(history=(iid(start), iid(start + 1))), 3)
    assert hits >= 38  # of 40 pattern steps


def test_sasrec_cart_mode_appends_the_cart(fitted: dict[str, ScoringRetriever]) -> None:
    sas = fitted["sasrec"]
    assert iid(31) in top_ids(sas, RetrievalRequest(history=(iid(3), iid(4), iid(5)), cart=(iid(30),)), 3)
    assert sas.score(RetrievalRequest()) is None
    assert sas.score(RetrievalRequest(history=("not-in-catalog",))) is None


def test_sasrec_is_deterministic_by_seed(catalog: Catalog) -> None:
    hist = chain_histories(n_users=60)
    cfg = SASRecConfig(
        hidden_dim=16, max_len=10, epochs=3, eval_every=1, holdout_users=25, num_threads=1, progress=False
    )
    req = RetrievalRequest(history=(iid(0), iid(1)))
    runs = []
    for _ in range(2):
        r = SequentialRetriever(catalog, cfg)
        r.fit(hist)
        runs.append(r.score(req))
    assert runs[0] is not None and runs[1] is not None
    np.testing.assert_array_equal(runs[0], runs[1])
    assert r.report.epochs_run == 3 and r.report.n_valid_cases == 25  # 25 of the 60 users' last events held out


def test_sasrec_early_stops_on_the_given_validation_cases_and_keeps_the_best_weights(catalog: Catalog) -> None:
    hist = chain_histories(n_users=60)
    valid = [((iid(3 * c),), iid(3 * c + 1)) for c in range(20)] + [(("unknown",), iid(1))]
    cfg = SASRecConfig(hidden_dim=16, max_len=10, lr=1e-2, epochs=60, patience=2, eval_every=1, num_threads=1)
    r = SequentialRetriever(catalog, replace(cfg, progress=False))
    r.fit(hist, validation=valid)
    assert r.report.n_valid_cases == 20  # the case whose history has no catalog item is skipped
    assert r.report.epochs_run == r.report.best_epoch + 2 < 60  # stopped `patience` evaluations after the best
    ndcg = []
    for h, target in valid[:20]:
        scores = r.score(RetrievalRequest(history=h))
        assert scores is not None
        scores[catalog.rows(h)] = -np.inf
        rank = int((scores > scores[catalog.index[target]]).sum()) + 1
        ndcg.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    assert np.mean(ndcg) == pytest.approx(r.report.best_valid_ndcg10)  # the best weights, not the last ones


def test_importing_sequential_does_not_import_torch() -> None:
    code = "import sys, retrieval.sequential; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -------------------------------------------------------------------------------- all retrievers, same tests
@pytest.mark.parametrize("name", ALL)
def test_history_is_excluded_and_filters_apply(name: str, fitted: dict[str, ScoringRetriever]) -> None:
    r = fitted[name]
    history = (iid(0), iid(1), iid(2), iid(3))
    got = top_ids(r, RetrievalRequest(history=history), 20)
    assert got and not set(got) & set(history)
    paper = top_ids(r, RetrievalRequest(history=history, filters=Filters(categories=("Paper",))), 10)
    assert paper and all(category_of(int(i[1:])) == "Paper" for i in paper)
    cheap = top_ids(r, RetrievalRequest(history=history, filters=Filters(max_price=10.0, exclude=(iid(4),))), 10)
    assert cheap and all(int(i[1:]) <= 10 for i in cheap) and iid(4) not in cheap
    kept = top_ids(r, RetrievalRequest(history=history, filters=Filters(exclude_history=False)), N_ITEMS)
    assert set(history) & set(kept)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_gives_identical_scores(
    name: str, fitted: dict[str, ScoringRetriever], catalog: Catalog, tmp_path: Path
) -> None:
    r = fitted[name]
    r.save(tmp_path)  # type: ignore[attr-defined]
    again = LOADERS[name].load(tmp_path, catalog)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp
    for req in (
        RetrievalRequest(history=(iid(6), iid(7))),
        RetrievalRequest(cart=(iid(12),)),
        RetrievalRequest(history=(iid(40),), query="pens"),
    ):
        a, b = r.score(req), again.score(req)
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_load_against_another_catalog_fails_clearly(
    name: str, fitted: dict[str, ScoringRetriever], tmp_path: Path
) -> None:
    fitted[name].save(tmp_path)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"different catalog \(the model has 60 items, the catalog 59\)"):
        LOADERS[name].load(tmp_path, make_catalog(59))
    shuffled = Catalog(reversed(make_catalog().items))
    with pytest.raises(ValueError, match=r"first difference at row 0: model item 'i00', catalog item 'i59'"):
        LOADERS[name].load(tmp_path, shuffled)


@pytest.mark.parametrize(
    ("make", "field", "bad"),
    [
        (SASRecConfig, "dropout", 1.5),
        (SASRecConfig, "hidden_dim", 0),
        (SASRecConfig, "max_len", 2.5),
        (SASRecConfig, "lr", -1.0),
        (ItemKNNConfig, "alpha", 2.0),
        (ItemKNNConfig, "window", 0),
        (ItemKNNConfig, "history_half_life", 0.0),
        (PopularityConfig, "category_blend", -0.1),
        (PopularityConfig, "half_life_days", -3.0),
        (PopularityConfig, "category_level", 0),
    ],
)
def test_config_validation_names_the_bad_value(make: type, field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"{field} must .* got {bad!r}"):
        make(**{field: bad})


def test_sasrec_heads_must_divide_the_hidden_size() -> None:
    with pytest.raises(ValueError, match=r"hidden_dim \(30\) must be divisible by num_heads \(4\)"):
        SASRecConfig(hidden_dim=30, num_heads=4)
