"""The PostgreSQL backend of the store: several `shoprec serve` processes or machines on one database.

`open_store("postgresql://user:password@host:5432/shop")` (psycopg 3). The queries are retrieval/store.py's,
so it answers exactly like the SQLite store; the tests run both against the same cases.

Why writers take an advisory lock: `events.seq` and `items.version` come from counters, and a reader that polls
`events_since(seq)` must never see seq 7 committed before seq 6 (it would skip 6 for good). With every write
transaction holding `pg_advisory_xact_lock` until it commits, counters are handed out and made visible in the
same order. Writes are small (one request's events, or a 10k-row ingest chunk), so serialising them costs little;
readers never wait on it. Durability is PostgreSQL's: a committed transaction is in the WAL on disk (the default
`synchronous_commit = on`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from retrieval.store import SCHEMA_VERSION, Cursor, Store, StoreError

# Any fixed 64-bit number: the advisory lock all shoprec writers of one database queue on.
_WRITE_LOCK_KEY = 0x5350_5245_4353_5452  # "SPRECSTR"
_FIX_MISSING = "Fix: run `shoprec --store URL ingest DATA` to create the tables, or check the URL's database"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id          TEXT PRIMARY KEY,
    pos         BIGINT NOT NULL UNIQUE,
    title       TEXT NOT NULL,
    category    TEXT NOT NULL,
    brand       TEXT NOT NULL,
    price       DOUBLE PRECISION,
    description TEXT NOT NULL,
    attributes  TEXT NOT NULL,
    created_at  TEXT,
    in_stock    INTEGER NOT NULL,
    version     BIGINT NOT NULL DEFAULT 1,
    deleted     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_version ON items (version);
CREATE TABLE IF NOT EXISTS events (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id           TEXT NOT NULL,
    item_id           TEXT NOT NULL REFERENCES items(id),
    type              TEXT NOT NULL,
    value             DOUBLE PRECISION,
    "timestamp"       BIGINT,
    "position"        BIGINT,
    event_id          TEXT,
    recommendation_id TEXT,
    dedup_key         TEXT
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedup ON events (dedup_key);
CREATE INDEX IF NOT EXISTS events_recommendation ON events (recommendation_id) WHERE recommendation_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS recommendations (
    id         TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    endpoint   TEXT NOT NULL,
    user_id    TEXT,
    unit_id    TEXT,
    items      TEXT NOT NULL,
    mode       TEXT NOT NULL,
    fallback   INTEGER NOT NULL,
    experiment TEXT,
    variant    TEXT,
    request    TEXT NOT NULL,
    latency_ms DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS recommendations_experiment ON recommendations (experiment, created_at);
CREATE INDEX IF NOT EXISTS recommendations_created ON recommendations (created_at);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    salt       TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT,
    state      TEXT NOT NULL,
    shown      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated_at)
"""


def display_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class _PgCursor:
    """A psycopg cursor speaking the `?` placeholders of the shared SQL."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cur.execute(sql.replace("?", "%s"), tuple(params))
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._cur.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cur.fetchall()]


class PostgresStore(Store):
    """The store in a PostgreSQL database (tables in the connection's first `search_path` schema)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self._dsn = url
        self.url = display_url(url)
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        self._lock = threading.RLock()  # in-process writers queue here, not on the server
        self._closed = False
        try:
            self._ensure_schema(create)
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        import psycopg  # the optional backend's driver, imported only when it is used

        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        try:
            conn = psycopg.connect(self._dsn, autocommit=True)
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(
                f"cannot connect to the store {self.url}: {first}. Fix: check that the server runs and the URL "
                "(user, password, host, port, database) is right"
            ) from None
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:  # broken: the server restarted or dropped us; reconnect
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        conn = self._conn()
        with self._connection_errors(), conn.transaction(), conn.cursor() as cur:  # READ COMMITTED: no lock
            yield _PgCursor(cur)

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        with self._lock:
            conn = self._conn()
            with self._connection_errors(), conn.transaction(), conn.cursor() as raw:
                cur = _PgCursor(raw)
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))  # held until commit
                yield cur

    @contextmanager
    def _connection_errors(self) -> Iterator[None]:
        """A dropped connection (server restart, network) -> a one-line StoreError; the next call reconnects."""
        import psycopg

        try:
            yield
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(
                f"lost the connection to the store {self.url} ({first}); nothing of this call was committed "
                "unless the error came at the commit itself. Fix: retry (writes are idempotent: events are "
                "deduplicated, items merge)"
            ) from None

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    @staticmethod
    def _version(cur: Cursor) -> int | None:
        row = cur.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return None
        found = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(found[0]) if found else None

    def _ensure_schema(self, create: bool) -> None:
        with self._read() as cur:
            version = self._version(cur)
        if version == SCHEMA_VERSION:
            return
        if version is None and not create:
            raise StoreError(f"store {self.url} has no shoprec tables. {_FIX_MISSING}")
        with self._write() as cur:
            version = self._version(cur)  # again under the lock: another process may have created them
            if version is None:
                for statement in (s for s in _SCHEMA.split(";") if s.strip()):
                    cur.execute(statement)
                cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version in (2, 3):
                if version == 2:  # -> 3: the served list's latency (an experiment's guardrail)
                    cur.execute("ALTER TABLE recommendations ADD COLUMN IF NOT EXISTS latency_ms DOUBLE PRECISION")
                # -> 4: chat conversations (the CREATE statements are idempotent)
                for statement in (s for s in _SCHEMA.split(";") if "conversations" in s):
                    cur.execute(statement)
                cur.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.url} has schema version {version}; this shoprec reads {SCHEMA_VERSION}. "
                    "Fix: use the shoprec version that wrote it, or a new database"
                )
