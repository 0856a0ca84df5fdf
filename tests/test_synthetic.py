"""The synthetic shop: deterministic, valid, realistic in shape, and carrying the structure it promises."""

from __future__ import annotations

import json
import re
import sys
import types
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone
from statistics import median

import numpy as np
import pytest

from retrieval.synthetic import SyntheticConfig, SyntheticData, generate, main
from retrieval.types import Interaction, InteractionType, Item

SMALL = SyntheticConfig(n_items=400, n_users=80, n_categories=6)


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate()  # the default demo dataset (~0.6 s)


def _dump(d: SyntheticData) -> str:
    return json.dumps(
        {
            "items": [it.model_dump(mode="json") for it in d.items],
            "events": [ev.model_dump(mode="json") for ev in d.interactions],
            "complements": d.complements,
            "cold": d.cold_item_ids,
        },
        sort_keys=True,
    )


def _by_user(d: SyntheticData) -> dict[str, list[Interaction]]:
    out: dict[str, list[Interaction]] = defaultdict(list)
    for ev in d.interactions:
        out[ev.user_id].append(ev)
    return out


def _leaf(d: SyntheticData) -> dict[str, str]:
    return {it.id: " > ".join(it.category) for it in d.items}


def _is_complement(d: SyntheticData, leaf: dict[str, str], a: str, b: str) -> bool:
    return leaf[b] in d.complements.get(leaf[a], [])


def _complement_shares(d: SyntheticData) -> tuple[float, float]:
    """Share of a user's consecutive purchase pairs whose 2nd item complements the 1st; and of random pairs."""
    leaf = _leaf(d)
    pairs = []
    for evs in _by_user(d).values():
        bought = [ev.item_id for ev in evs if ev.type == InteractionType.PURCHASE]
        pairs += list(zip(bought, bought[1:], strict=False))
    assert len(pairs) >= 100, f"too few purchase pairs to measure: {len(pairs)}"
    observed = float(np.mean([_is_complement(d, leaf, a, b) for a, b in pairs]))
    purchases = [ev.item_id for ev in d.interactions if ev.type == InteractionType.PURCHASE]
    rng = np.random.default_rng(0)
    a, b = rng.choice(purchases, 20000), rng.choice(purchases, 20000)
    baseline = float(np.mean([_is_complement(d, leaf, x, y) for x, y in zip(a, b, strict=True)]))
    return observed, baseline


# --- determinism ---------------------------------------------------------------------------------------------------


def test_same_config_gives_byte_identical_data() -> None:
    assert _dump(generate(SMALL)) == _dump(generate(SMALL))


def test_another_seed_gives_other_data() -> None:
    a, b = generate(SMALL), generate(SyntheticConfig(seed=1, n_items=400, n_users=80, n_categories=6))
    assert [it.title for it in a.items] != [it.title for it in b.items]
    assert [ev.item_id for ev in a.interactions] != [ev.item_id for ev in b.interactions]


# --- the catalog ---------------------------------------------------------------------------------------------------


def test_catalog_size_and_taxonomy(data: SyntheticData) -> None:
    assert len(data.items) == 2400
    tops = Counter(it.category[0] for it in data.items)
    assert len(tops) == 20
    leaves_per_top: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    subs_per_top: dict[str, set[str]] = defaultdict(set)
    for it in data.items:
        assert 2 <= len(it.category) <= 3, it.category
        leaves_per_top[it.category[0]].add(it.category)
        subs_per_top[it.category[0]].add(it.category[1])
    assert all(3 <= len(s) <= 6 for s in subs_per_top.values()), {t: len(s) for t, s in subs_per_top.items()}
    assert sum(len(c) == 3 for c in {it.category for it in data.items}) >= 40  # many third-level leaves
    assert min(tops.values()) >= 30  # no category is a token one


def test_every_item_is_a_valid_item(data: SyntheticData) -> None:
    ids = [it.id for it in data.items]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"P\d{6}", i) for i in ids)
    for it in data.items:
        assert Item.model_validate(it.model_dump()) == it
        assert it.brand and it.description and it.price is not None and it.price > 0
        assert round(it.price, 2) == it.price
        assert it.created_at is not None and it.created_at.utcoffset() == timedelta(0)
        assert 1 <= it.description.count(". ") + 1 <= 3, it.description
        assert all(isinstance(v, str) and v for v in it.attributes.values())
    assert len({it.title for it in data.items}) >= 0.99 * len(data.items)
    assert 0.01 <= sum(not it.in_stock for it in data.items) / len(data.items) <= 0.06
    created = [it.created_at for it in data.items if it.created_at is not None]
    assert max(created) - min(created) >= timedelta(days=600)  # spread over ~2 years


def test_brands_have_tiers_and_prices_follow_them(data: SyntheticData) -> None:
    brands_per_top: dict[str, set[str]] = defaultdict(set)
    prices: dict[tuple[tuple[str, ...], str], list[float]] = defaultdict(list)
    for it in data.items:
        brands_per_top[it.category[0]].add(it.brand)
        prices[(it.category, data.brand_tiers[it.brand])].append(float(it.price or 0))
    assert all(len(b) >= 4 for b in brands_per_top.values())
    leaves = {it.category for it in data.items}
    compared = [
        median(prices[(c, "premium")]) > median(prices[(c, "budget")])
        for c in leaves
        if prices[(c, "premium")] and prices[(c, "budget")]
    ]
    assert len(compared) >= 100 and np.mean(compared) >= 0.95


def test_cold_items_are_new_and_untouched(data: SyntheticData) -> None:
    cold = set(data.cold_item_ids)
    assert len(cold) == round(0.05 * len(data.items))
    assert not cold & {ev.item_id for ev in data.interactions}
    recent = data.now - timedelta(days=14)
    for it in data.items:
        assert it.created_at is not None
        assert (it.created_at >= recent) == (it.id in cold), it


# --- the event log -------------------------------------------------------------------------------------------------


def test_events_refer_to_items_on_sale(data: SyntheticData) -> None:
    items = {it.id: it for it in data.items}
    for ev in data.interactions:
        item = items[ev.item_id]  # KeyError = an unknown item
        assert ev.timestamp is not None and item.created_at is not None
        assert ev.timestamp >= item.created_at, (ev, item.created_at)
        assert ev.timestamp <= data.now


def test_histories_are_ordered_with_positions(data: SyntheticData) -> None:
    histories = _by_user(data)
    assert len(histories) == 800
    assert all(re.fullmatch(r"U\d{4}", u) for u in histories)
    for evs in histories.values():
        assert [ev.position for ev in evs] == list(range(len(evs)))
        stamps = [ev.timestamp for ev in evs]
        assert all(t is not None and t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in stamps)
        assert stamps == sorted(stamps)  # type: ignore[type-var]


def test_history_lengths_mix_short_and_regular_users(data: SyntheticData) -> None:
    lengths = np.array([len(evs) for evs in _by_user(data).values()])
    assert np.mean((lengths >= 10) & (lengths <= 60)) >= 0.7
    assert 0.05 <= np.mean(lengths <= 4) <= 0.2
    assert lengths.min() >= 2


def test_event_mix_and_funnel(data: SyntheticData) -> None:
    n = Counter(ev.type for ev in data.interactions)
    assert n[InteractionType.VIEW] > 5 * n[InteractionType.CART] > 5 * n[InteractionType.PURCHASE] > 0
    for evs in _by_user(data).values():  # a purchase always follows a cart of the same item
        carted: set[str] = set()
        for ev in evs:
            if ev.type == InteractionType.CART:
                carted.add(ev.item_id)
            elif ev.type == InteractionType.PURCHASE:
                assert ev.item_id in carted, ev


def test_popularity_is_long_tailed(data: SyntheticData) -> None:
    counts = np.sort(np.array(list(Counter(ev.item_id for ev in data.interactions).values())))[::-1]
    top_fifth = counts[: len(data.items) // 5].sum() / counts.sum()
    assert top_fifth >= 0.45  # uniform popularity would give ~0.2
    assert counts[0] >= 10 * np.median(counts)


def test_item_appeal_is_skewed_within_a_subcategory(data: SyntheticData) -> None:
    """Zipf-like appeal inside each subcategory, not only between categories (flat appeal gives ~0.34 here)."""
    events = Counter(ev.item_id for ev in data.interactions)
    cold = set(data.cold_item_ids)
    per_leaf: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for it in data.items:
        if it.id not in cold:
            per_leaf[it.category].append(events.get(it.id, 0))
    shares = []
    for counts in per_leaf.values():
        c = np.sort(np.array(counts))[::-1]
        if len(c) >= 10 and c.sum() >= 50:
            shares.append(c[: len(c) // 5].sum() / c.sum())
    assert len(shares) >= 50
    assert np.mean(shares) >= 0.4


# --- learnable structure -------------------------------------------------------------------------------------------


def test_complement_map_is_real(data: SyntheticData) -> None:
    leaves = {" > ".join(it.category) for it in data.items}
    assert len(data.complements) >= 15
    for src, dsts in data.complements.items():
        assert src in leaves and dsts and set(dsts) <= leaves and src not in dsts
    assert (
        "Electronics > Phones & Accessories > Phone Cases"
        in data.complements["Electronics > Phones & Accessories > Smartphones"]
    )
    assert (
        "Office Products > Printers & Ink > Ink & Toner"
        in data.complements["Office Products > Printers & Ink > Printers"]
    )


def test_next_purchase_is_often_a_complement(data: SyntheticData) -> None:
    observed, baseline = _complement_shares(data)
    assert observed >= 0.15
    assert observed >= 10 * baseline


def test_complement_signal_comes_from_the_behaviour() -> None:
    """Turning complement-seeking off removes the signal, so the test above measures the mechanism."""
    on = generate(SyntheticConfig(n_items=600, n_users=400))
    off = generate(SyntheticConfig(n_items=600, n_users=400, complement_prob=0.0))
    assert _complement_shares(on)[0] >= 3 * _complement_shares(off)[0]


def test_users_stick_to_their_favourite_categories(data: SyntheticData) -> None:
    top_share, shuffled_share = [], []
    items = {it.id: it.category[0] for it in data.items}
    all_cats = np.array([items[ev.item_id] for ev in data.interactions])
    shuffled = iter(np.random.default_rng(0).permutation(all_cats))
    for evs in _by_user(data).values():
        if len(evs) < 10:
            continue
        top_share.append(max(Counter(items[ev.item_id] for ev in evs).values()) / len(evs))
        shuffled_share.append(max(Counter(next(shuffled) for _ in evs).values()) / len(evs))
    assert np.mean(top_share) >= 0.45
    assert np.mean(top_share) >= 2.5 * np.mean(shuffled_share)


def test_sessions_stay_in_one_category(data: SyntheticData) -> None:
    top = {it.id: it.category[0] for it in data.items}
    same = []
    for evs in _by_user(data).values():
        for a, b in zip(evs, evs[1:], strict=False):
            assert a.timestamp is not None and b.timestamp is not None
            if b.timestamp - a.timestamp < timedelta(minutes=30):
                same.append(top[a.item_id] == top[b.item_id])
    assert np.mean(same) >= 0.9


# --- config and CLI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_categories": 0}, "n_categories.*got 0"),
        ({"n_categories": 21}, "n_categories.*got 21"),
        ({"n_items": 10}, "n_items.*got 10"),
        ({"n_users": 0}, "n_users.*got 0"),
        ({"sessions_per_user": (5, 2)}, r"sessions_per_user.*\(5, 2\)"),
        ({"new_item_fraction": 1.5}, "new_item_fraction.*1.5"),
        ({"complement_prob": -0.1}, "complement_prob.*-0.1"),
        ({"days": 10}, "days.*got 10"),
        ({"start": datetime(2023, 1, 1)}, "start.*UTC.*2023-01-01T00:00:00"),
        ({"start": datetime(2023, 1, 1, tzinfo=timezone(timedelta(hours=2)))}, r"start.*UTC.*\+02:00"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_writes_through_write_generic(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = []

    def write_generic(items: list[Item], interactions: list[Interaction], directory: object) -> None:
        calls.append((items, interactions, directory))

    fake = types.ModuleType("retrieval.loaders")  # stands in for the real loaders: only the call is under test
    fake.write_generic = write_generic  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "retrieval.loaders", fake)
    main(["--out", str(tmp_path), "--seed", "3", "--items", "300", "--users", "20"])
    [(items, interactions, directory)] = calls
    assert str(directory) == str(tmp_path)
    assert len(items) == 300 and all(isinstance(it, Item) for it in items)
    assert len({ev.user_id for ev in interactions}) == 20
    assert "300 items" in capsys.readouterr().out
    assert items == generate(SyntheticConfig(seed=3, n_items=300, n_users=20)).items


def test_start_is_respected() -> None:
    d = generate(SyntheticConfig(n_items=200, n_users=30, n_categories=3, start=datetime(2020, 6, 1, tzinfo=UTC)))
    assert min(ev.timestamp for ev in d.interactions if ev.timestamp) >= datetime(2020, 6, 1, tzinfo=UTC)
    assert d.now == datetime(2020, 6, 1, tzinfo=UTC) + timedelta(days=730)


def test_cli_output_loads_back_identically(tmp_path) -> None:
    loaders = pytest.importorskip("retrieval.loaders")
    main(["--out", str(tmp_path), "--items", "300", "--users", "20"])
    loaded = loaders.load_dataset(tmp_path)
    expected = generate(SyntheticConfig(n_items=300, n_users=20))
    assert loaded.items == expected.items
    assert loaded.interactions == expected.interactions


# The digests of the demo shop and the test fixture's shop, taken before the taxonomy moved from Python literals to
# retrieval/data/synthetic_taxonomy.json: the same seed must keep giving the same data, byte for byte.
DIGESTS = {
    "demo (seed 0)": (SyntheticConfig(), "6a75c81d2fd0e72025fad72b62e422499fb972cda8f208317bfb6cf0c3e593ea"),
    "fixture (seed 1)": (
        SyntheticConfig(seed=1, n_items=400, n_users=120, n_categories=6),
        "692afab8746343c23dd3c3168888ff772b35647e2a993a4eacea088a9bb70150",
    ),
}


def _digest(d: SyntheticData) -> str:
    import hashlib

    h = hashlib.sha256()
    for it in d.items:
        created = it.created_at.isoformat() if it.created_at else None
        row = [it.id, it.title, list(it.category), it.brand, it.price, it.description, sorted(it.attributes.items())]
        h.update(json.dumps([*row, created, it.in_stock]).encode() + b"\n")
    for ev in d.interactions:
        ts = ev.timestamp.isoformat() if ev.timestamp else None
        h.update(json.dumps([ev.user_id, ev.item_id, str(ev.type), ev.value, ts, ev.position]).encode() + b"\n")
    h.update(json.dumps([d.complements, d.cold_item_ids, d.brand_tiers, d.now.isoformat()], sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", list(DIGESTS))
def test_same_seed_same_bytes_as_before_the_taxonomy_became_a_data_file(name):
    config, expected = DIGESTS[name]
    assert _digest(generate(config)) == expected


def test_the_taxonomy_file_is_package_data_and_consistent():
    from importlib import resources

    from retrieval import synthetic

    text = resources.files("retrieval").joinpath(synthetic.TAXONOMY_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    assert len(data["tops"]) == synthetic.MAX_CATEGORIES == 20 and len(data["leaves"]) == 154
    tops = {t["name"] for t in data["tops"]}
    assert {leaf["path"][0] for leaf in data["leaves"]} == tops  # every leaf hangs under a known top category
    names = {leaf["path"][-1] for leaf in data["leaves"]}
    assert {n for chain in data["complement_chains"] for n in chain} <= names
