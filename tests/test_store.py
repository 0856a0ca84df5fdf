"""The SQLite store: exact round-trips, all-or-nothing batches, history order, URL forms, bulk speed."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from retrieval.events import histories
from retrieval.store import SCHEMA_VERSION, Store, StoreError
from retrieval.types import Interaction, InteractionType, Item

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_items(n: int = 3) -> list[Item]:
    items = [Item(id=f"i{k}", title=f"Item {k}") for k in range(n)]
    items[0] = Item(
        id="i0",
        title='Café "crème" ☕',
        category=("Food", "Coffee, Tea & Cocoa"),
        brand="Ünïcode",
        price=0.1 + 0.2,  # not exactly 0.3: must come back bit for bit
        description="multi\nline",
        attributes={"b": "2", "a": "1"},
        created_at=datetime(2024, 5, 1, 8, 30, 15, 123456, tzinfo=UTC),
        in_stock=False,
    )
    return items


def ev(
    user: str,
    item: str,
    seconds: int | None = None,
    position: int | None = None,
    type: InteractionType = InteractionType.VIEW,
    value: float | None = None,
) -> Interaction:
    ts = T0 + timedelta(seconds=seconds, microseconds=7) if seconds is not None else None
    return Interaction(user_id=user, item_id=item, timestamp=ts, position=position, type=type, value=value)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    items = make_items()
    events = [
        ev("u1", "i0", 10, type=InteractionType.RATING, value=4.5),
        ev("u1", "i1", position=0, type=InteractionType.PURCHASE),
        ev("u2", "i2", 5, position=2, type=InteractionType.CART, value=3),
    ]
    with Store(tmp_path / "shop.db") as store:
        assert store.upsert_items(items) == 3
        assert store.add_events(events) == 3
    with Store(tmp_path / "shop.db") as store:  # reopened: it was persisted
        assert store.items() == items
        assert store.item("i0") == items[0] and store.item("nope") is None
        assert store.interactions() == events
        assert store.users() == ["u1", "u2"]
        assert store.counts() == {"users": 2, "items": 3, "interactions": 3}


def test_upsert_replaces_and_keeps_order() -> None:
    with Store(":memory:") as store:
        store.upsert_items(make_items())
        changed = Item(id="i1", title="Renamed", price=5)
        store.upsert_items([changed, Item(id="i9", title="New")])
        assert [it.id for it in store.items()] == ["i0", "i1", "i2", "i9"]
        assert store.item("i1") == changed
        assert store.counts()["items"] == 4


def test_bad_batch_rolls_back_whole() -> None:
    with Store(":memory:") as store:
        store.upsert_items(make_items())
        store.add_events([ev("u1", "i0", 1)])
        batch = [ev("u2", "i1", 2), ev("u2", "ghost", 3), ev("u3", "i2", 4)]
        with pytest.raises(StoreError) as info:
            store.add_events(batch)
        message = str(info.value)
        assert "'ghost'" in message and "batch index 1" in message and "upsert_items" in message
        assert store.counts() == {"users": 1, "items": 3, "interactions": 1}
        assert store.history("u2") == []
        store.add_events(batch[:1])  # the store is still usable after the rollback
        assert store.counts()["interactions"] == 2


def test_ingest_is_one_transaction() -> None:
    with Store(":memory:") as store:
        items = make_items()
        with pytest.raises(StoreError, match="'ghost'"):
            store.ingest(items, [ev("u1", "i0", 1), ev("u1", "ghost", 2)])
        assert store.counts() == {"users": 0, "items": 0, "interactions": 0}  # the items were rolled back too
        assert store.ingest(items, [ev("u1", "i0", 1)]) == {"items": 3, "interactions": 1}
        assert store.counts() == {"users": 1, "items": 3, "interactions": 1}


def test_history_is_oldest_first_like_histories() -> None:
    events = [
        ev("u", "i0", 30),
        ev("u", "i1", 10),
        ev("other", "i0", 5),
        ev("u", "i2", 10),  # same time as the i1 event: input order breaks the tie
        ev("p", "i0", position=2),
        ev("p", "i1", position=0),
        ev("p", "i2", position=1),
    ]
    with Store(":memory:") as store:
        store.upsert_items(make_items())
        store.add_events(events)
        expected = histories(events)
        for user in ("u", "p", "other"):
            assert store.history(user) == expected[user]
        assert [e.item_id for e in store.history("u")] == ["i1", "i2", "i0"]
        assert [e.item_id for e in store.history("p")] == ["i1", "i2", "i0"]
        newest_two = store.history("u", limit=2)
        assert [e.item_id for e in newest_two] == ["i2", "i0"]  # still oldest first
        assert store.history("u", limit=0) == [] and store.history("nobody") == []
        with pytest.raises(ValueError, match="limit"):
            store.history("u", limit=-1)


@pytest.mark.parametrize("form", ["path", "str", "url-relative", "url-absolute"])
def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "deep" / "er" / "shop.db"
    forms: dict[str, str | Path] = {
        "path": target,
        "str": str(target),
        "url-relative": "sqlite:///deep/er/shop.db",
        "url-absolute": f"sqlite:///{target}",  # an absolute path after three slashes: four in all
    }
    with Store(forms[form]) as store:
        store.upsert_items(make_items(1))
        assert Path(store.path).resolve() == target
    assert target.is_file()  # parent folders were created
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(SCHEMA_VERSION)


@pytest.mark.parametrize("arg", [":memory:", "sqlite:///:memory:", "sqlite://"])
def test_memory_forms(arg: str) -> None:
    with Store(arg) as store:
        store.upsert_items(make_items(2))
        assert store.path == ":memory:" and store.counts()["items"] == 2


@pytest.mark.parametrize("arg", ["postgresql://db/shop", "sqlite://host/shop.db", ""])
def test_bad_urls(arg: str) -> None:
    with pytest.raises(StoreError):
        Store(arg)


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "old.db").close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 0"):
        Store(tmp_path / "old.db")


def test_bulk_load_100k_events_is_fast(tmp_path: Path) -> None:
    items = [Item(id=str(k), title=f"Item {k}") for k in range(2000)]
    events = [Interaction(user_id=str(k % 1000), item_id=str(k % 2000), timestamp=T0) for k in range(100_000)]
    with Store(tmp_path / "bulk.db") as store:
        start = time.perf_counter()
        store.upsert_items(items)
        store.add_events(events)
        elapsed = time.perf_counter() - start
        assert store.counts() == {"users": 1000, "items": 2000, "interactions": 100_000}
    assert elapsed < 5, f"bulk load took {elapsed:.1f} s"
