"""The embedded SQLite store: the single source of truth for the catalog's items and the users' events.

One file (or `:memory:`), WAL mode so readers do not block the writer, and a schema version in a `meta`
table so an old file fails loudly instead of being misread. Every write is one transaction: a batch lands
whole or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from retrieval.types import Interaction, InteractionType, Item

SCHEMA_VERSION = 1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id          TEXT PRIMARY KEY,
    pos         INTEGER NOT NULL UNIQUE,  -- insertion order, kept when an item is updated
    title       TEXT NOT NULL,
    category    TEXT NOT NULL,            -- JSON list, root to leaf
    brand       TEXT NOT NULL,
    price       REAL,
    description TEXT NOT NULL,
    attributes  TEXT NOT NULL,            -- JSON object of str -> str
    created_at  TEXT,                     -- ISO 8601 as given (offset kept)
    in_stock    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id   TEXT NOT NULL,
    item_id   TEXT NOT NULL REFERENCES items(id),
    type      TEXT NOT NULL,
    value     REAL,
    timestamp INTEGER,                    -- microseconds since the epoch, UTC: exact and sortable
    position  INTEGER
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
"""

# Oldest first, the same order as retrieval.events.histories: timestamp, then position, then insertion order.
_OLDEST_FIRST = "COALESCE(timestamp, 0), COALESCE(position, 0), seq"
_NEWEST_FIRST = "COALESCE(timestamp, 0) DESC, COALESCE(position, 0) DESC, seq DESC"
_EVENT_COLUMNS = "user_id, item_id, type, value, timestamp, position"
_ITEM_COLUMNS = "id, title, category, brand, price, description, attributes, created_at, in_stock"


class StoreError(ValueError):
    """A write the store refuses (nothing of the batch was written), or a file it cannot open."""


def _resolve(url_or_path: str | Path) -> str:
    """Path, `sqlite:///relative/path`, `sqlite:////absolute/path` or `:memory:` -> sqlite3's target.

    The URL forms follow SQLAlchemy: three slashes then the path, so an absolute path has four; a bare
    `sqlite://` is an in-memory database.
    """
    target = str(url_or_path)
    if target.startswith("sqlite://"):
        rest = target.removeprefix("sqlite://")
        if rest and not rest.startswith("/"):
            raise StoreError(
                f"store URL {target!r} has a host part; use sqlite:///relative/path, "
                "sqlite:////absolute/path or sqlite:///:memory:"
            )
        target = rest[1:] or ":memory:"
    elif "://" in target:
        raise StoreError(f"unsupported store URL {target!r}; the store is SQLite: a path or sqlite:///path")
    if not target:
        raise StoreError("empty store path; give a file path, sqlite:///path or :memory:")
    if target != ":memory:":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    return target


class Store:
    """Items and events in one SQLite database.

    `Store("var/shop.db")`, `Store("sqlite:///var/shop.db")` or `Store(":memory:")`; use it as a context
    manager or call `close()`. Safe to share between threads (one lock around the connection).
    """

    def __init__(self, url_or_path: str | Path) -> None:
        self.path = _resolve(url_or_path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")  # ignored (stays 'memory') for :memory:
            self._conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses <= 1 commit
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    # -----------------------------------------------------------------------------------------------
    # Lifecycle
    # -----------------------------------------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._transaction() as cur:  # one by one: executescript() would commit on its own
            for statement in _SCHEMA.split(";"):  # (no ';' inside the schema's comments)
                if statement.strip():
                    cur.execute(statement)
            row = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                version = (str(SCHEMA_VERSION),)
                cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", version)
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(
                    f"{self.path} has schema version {row[0]}, this code reads version {SCHEMA_VERSION}. "
                    "Fix: rebuild the store from the source data (load_dataset, then upsert_items/add_events)"
                )

    def close(self) -> None:
        """Close the connection; the store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn, self._lock)

    # -----------------------------------------------------------------------------------------------
    # Writes
    # -----------------------------------------------------------------------------------------------

    def upsert_items(self, items: Iterable[Item]) -> int:
        """Insert new items and replace existing ones (same id), keeping their place; returns the count."""
        batch = list(items)
        with self._transaction() as cur:
            self._upsert_items(cur, batch)
        return len(batch)

    def add_events(self, events: Iterable[Interaction]) -> int:
        """Append events in one transaction. If any names an item that is not in the store, nothing is written
        and `StoreError` names the unknown ids. Returns the number of events added."""
        batch = list(events)
        with self._transaction() as cur:
            self._add_events(cur, batch)
        return len(batch)

    def ingest(self, items: Iterable[Item], events: Iterable[Interaction]) -> dict[str, int]:
        """Upsert items and append events in ONE transaction (a loaded Dataset lands whole or not at all).

        Returns how many items and events were written."""
        item_batch, event_batch = list(items), list(events)
        with self._transaction() as cur:
            self._upsert_items(cur, item_batch)
            self._add_events(cur, event_batch)
        return {"items": len(item_batch), "interactions": len(event_batch)}

    @staticmethod
    def _upsert_items(cur: sqlite3.Cursor, batch: list[Item]) -> None:
        rows = (_item_row(it) for it in batch)
        cur.executemany(
            """
            INSERT INTO items (pos, id, title, category, brand, price, description, attributes,
                               created_at, in_stock)
            VALUES ((SELECT COALESCE(MAX(pos), -1) + 1 FROM items), ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET
                title = excluded.title, category = excluded.category, brand = excluded.brand,
                price = excluded.price, description = excluded.description,
                attributes = excluded.attributes, created_at = excluded.created_at,
                in_stock = excluded.in_stock
            """,
            rows,
        )

    @classmethod
    def _add_events(cls, cur: sqlite3.Cursor, batch: list[Interaction]) -> None:
        wanted = {ev.item_id for ev in batch}
        unknown = wanted - cls._existing_ids(cur, wanted)
        if unknown:
            first = next(i for i, ev in enumerate(batch) if ev.item_id in unknown)
            shown = ", ".join(repr(i) for i in sorted(unknown)[:10])
            more = " ..." if len(unknown) > 10 else ""
            raise StoreError(
                f"{len(unknown)} item id(s) of these events are not in the store: {shown}{more} "
                f"(first at batch index {first}); nothing of this batch of {len(batch)} events was "
                "written. Fix: upsert_items() those items first, or drop the events that name them"
            )
        rows = (_event_row(ev) for ev in batch)
        cur.executemany(f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)

    @staticmethod
    def _existing_ids(cur: sqlite3.Cursor, ids: set[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(ids), 500):  # stay under SQLite's limit on bound parameters
            marks = ", ".join("?" * len(chunk))
            found.update(r[0] for r in cur.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk))
        return found

    # -----------------------------------------------------------------------------------------------
    # Reads
    # -----------------------------------------------------------------------------------------------

    def items(self) -> list[Item]:
        """All items, in the order they were first inserted."""
        return [_item_from(r) for r in self._query(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY pos")]

    def item(self, item_id: str) -> Item | None:
        """One item by id; None when there is no such item."""
        rows = self._query(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,))
        return _item_from(rows[0]) if rows else None

    def interactions(self) -> list[Interaction]:
        """All events, in the order they were added."""
        return [_event_from(r) for r in self._query(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq")]

    def history(self, user_id: str, limit: int | None = None) -> list[Interaction]:
        """The user's events, oldest first; with `limit`, only the newest `limit` (still oldest first)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        select = f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = ?"
        if limit is None:
            rows = self._query(f"{select} ORDER BY {_OLDEST_FIRST}", (user_id,))
        else:  # the newest `limit`, turned back to oldest first
            rows = self._query(f"{select} ORDER BY {_NEWEST_FIRST} LIMIT ?", (user_id, limit))[::-1]
        return [_event_from(r) for r in rows]

    def users(self) -> list[str]:
        """Every user id with at least one event, in order of first appearance."""
        return [r[0] for r in self._query("SELECT user_id FROM events GROUP BY user_id ORDER BY MIN(seq)")]

    def counts(self) -> dict[str, int]:
        """Distinct users, items and events, keyed like `Dataset.summary()`."""
        (users,), (items,), (events,) = (
            self._query("SELECT COUNT(DISTINCT user_id) FROM events")[0],
            self._query("SELECT COUNT(*) FROM items")[0],
            self._query("SELECT COUNT(*) FROM events")[0],
        )
        return {"users": users, "items": items, "interactions": events}

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; holds the store's lock throughout."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Cursor:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
        except BaseException:
            self._lock.release()
            raise
        return self._conn.cursor()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()


# ---------------------------------------------------------------------------------------------------
# Row <-> model
# ---------------------------------------------------------------------------------------------------


def _item_row(it: Item) -> tuple[Any, ...]:
    return (
        it.id,
        it.title,
        json.dumps(list(it.category), ensure_ascii=False),
        it.brand,
        it.price,
        it.description,
        json.dumps(it.attributes, ensure_ascii=False, sort_keys=True),
        it.created_at.isoformat() if it.created_at is not None else None,
        int(it.in_stock),
    )


def _item_from(r: tuple[Any, ...]) -> Item:
    item_id, title, category, brand, price, description, attributes, created_at, in_stock = r
    return Item(
        id=item_id,
        title=title,
        category=tuple(json.loads(category)),
        brand=brand,
        price=price,
        description=description,
        attributes=json.loads(attributes),
        created_at=datetime.fromisoformat(created_at) if created_at is not None else None,
        in_stock=bool(in_stock),
    )


def _micros(ts: datetime) -> int:
    if ts.tzinfo is None:  # the data types document timestamps as UTC; a naive one is taken to be UTC
        ts = ts.replace(tzinfo=UTC)
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _event_row(ev: Interaction) -> tuple[Any, ...]:
    ts = _micros(ev.timestamp) if ev.timestamp is not None else None
    return (ev.user_id, ev.item_id, ev.type.value, ev.value, ts, ev.position)


def _event_from(r: tuple[Any, ...]) -> Interaction:
    user_id, item_id, type_, value, ts, position = r
    return Interaction(
        user_id=user_id,
        item_id=item_id,
        type=InteractionType(type_),
        value=value,
        timestamp=_EPOCH + timedelta(microseconds=ts) if ts is not None else None,
        position=position,
    )


def _chunks(seq: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
