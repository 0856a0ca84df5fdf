"""The SQLite backend of the store (the embedded default): one file, WAL, one connection per thread.

Why it is safe to share: WAL lets readers run beside the one writer, and a reader here never takes the write lock
(the schema is only created or migrated when a read shows it missing or old). Writers are serialised by a lock
within the process and by SQLite's write lock across processes, waiting up to `busy_timeout_s` for it.

Durability: `synchronous=NORMAL` under WAL. A committed transaction is in the WAL file (the operating system's
cache) before `COMMIT` returns, so it survives the process being killed, SIGKILL included; only a power loss or
kernel crash can lose the last commits. That is what a service needs from "acknowledged = stored" at a fraction of
FULL's cost (an fsync per commit); `synchronous="full"` buys power-loss safety.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from retrieval.store import SCHEMA_VERSION, Cursor, Store, StoreError

_FIX_MISSING = "Fix: run `shoprec ingest DATA` to create it, or check --home / --store / SHOPREC_HOME"
_FIX_DAMAGED = "Fix: restore the file from a backup, or point --store at a new file and run `shoprec ingest DATA` again"

_TABLES = """
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
    in_stock    INTEGER NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,  -- the catalog change counter when the row last changed
    deleted     INTEGER NOT NULL DEFAULT 0   -- soft delete: events keep pointing at the row
);
CREATE TABLE IF NOT EXISTS events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the change feed's cursor
    user_id           TEXT NOT NULL,
    item_id           TEXT NOT NULL REFERENCES items(id),
    type              TEXT NOT NULL,
    value             REAL,
    "timestamp"       INTEGER,            -- microseconds since the epoch, UTC: exact and sortable
    "position"        INTEGER,
    event_id          TEXT,
    recommendation_id TEXT,
    dedup_key         TEXT                -- retrieval.store.dedup_key (unique index below)
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id)
"""

# Version 2's additions, shared by a new store and the migration from version 1.
_V2 = """
CREATE INDEX IF NOT EXISTS items_version ON items (version);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedup ON events (dedup_key);
CREATE INDEX IF NOT EXISTS events_recommendation ON events (recommendation_id) WHERE recommendation_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS recommendations (
    id         TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,          -- microseconds since the epoch, UTC
    endpoint   TEXT NOT NULL,
    user_id    TEXT,
    unit_id    TEXT,
    items      TEXT NOT NULL,             -- JSON list of item ids, in the order shown
    mode       TEXT NOT NULL,
    fallback   INTEGER NOT NULL,
    experiment TEXT,
    variant    TEXT,
    request    TEXT NOT NULL              -- JSON object
);
CREATE INDEX IF NOT EXISTS recommendations_experiment ON recommendations (experiment, created_at);
CREATE INDEX IF NOT EXISTS recommendations_created ON recommendations (created_at);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    scopes     TEXT NOT NULL,             -- JSON list
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    salt       TEXT NOT NULL,
    hash       TEXT NOT NULL              -- SHA-256 of salt + secret (the secret itself is never stored)
)
"""

# Version 1 -> 2 in place. Rows stay; events get their dedup key, the first of any repeated event only (a version-1
# store may hold the same event twice from a re-ingest: those copies are kept, never deleted, but from now on the
# same event is not added again).
_MIGRATE_1_TO_2 = """
ALTER TABLE items ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE items ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN event_id TEXT;
ALTER TABLE events ADD COLUMN recommendation_id TEXT;
ALTER TABLE events ADD COLUMN dedup_key TEXT;
UPDATE events SET dedup_key = 'k' || char(31) || user_id || char(31) || item_id || char(31) || type || char(31)
    || COALESCE("timestamp", '') || char(31) || COALESCE("position", '')
    WHERE seq IN (SELECT MIN(seq) FROM events GROUP BY user_id, item_id, type, "timestamp", "position")
"""


# Version 2 -> 3: the served list's latency (an experiment's guardrail). New stores get it the same way.
_MIGRATE_2_TO_3 = """
ALTER TABLE recommendations ADD COLUMN latency_ms REAL
"""


# Version 3 -> 4: chat conversations, so every worker and replica continues the same one.
_MIGRATE_3_TO_4 = """
CREATE TABLE IF NOT EXISTS conversations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT,
    state      TEXT NOT NULL,             -- JSON object (the chat layer's ChatState)
    shown      TEXT NOT NULL,             -- JSON object: recommendation_id -> item ids
    version    INTEGER NOT NULL,          -- bumped by every save (compare-and-set)
    updated_at INTEGER NOT NULL           -- microseconds since the epoch, UTC
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated_at)
"""


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (executescript() would commit on its own), comments dropped."""
    text = re.sub(r"--[^\n]*", "", script)
    return [s for s in text.split(";") if s.strip()]


def _resolve(url_or_path: str | Path, create: bool) -> str:
    """Path, `sqlite:///relative/path`, `sqlite:////absolute/path` or `:memory:` -> sqlite3's target, checked.

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
        raise StoreError(
            f"unsupported store URL {target!r}; use a file path, sqlite:///path or postgresql://user@host/db"
        )
    if not target:
        raise StoreError("empty store path; give a file path, sqlite:///path, :memory: or postgresql://...")
    if target == ":memory:":
        return target
    path = Path(target)
    if path.is_dir():
        raise StoreError(f"store {target} is a directory, not a file. Fix: give a file, e.g. --store {path}/shoprec.db")
    if not path.exists():
        if not create:
            raise StoreError(f"no store at {target}. {_FIX_MISSING}")
        path.parent.mkdir(parents=True, exist_ok=True)
    return target


def _truncated(path: str) -> str | None:
    """Why the file is shorter than its own header says, or None. Cheap (reads 100 bytes), unlike an integrity
    check; a file cut short (a copy that stopped half-way) is otherwise found only when a query hits a lost page."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = os.path.getsize(path)
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None  # empty (a new store) or not SQLite at all: sqlite3 says which
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # the in-header size is only meaningful when these agree
    if valid and pages and size < pages * page_size:
        return f"is truncated ({size:,} bytes, its header says {pages * page_size:,})"
    return None


class SQLiteStore(Store):
    """The store in one SQLite file (or `:memory:`): `open_store("var/shop.db")` or `SQLiteStore(path)`."""

    def __init__(
        self,
        url_or_path: str | Path,
        *,
        create: bool = True,
        busy_timeout_s: float = 10.0,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        self.path = _resolve(url_or_path, create)
        self.url = self.path
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._memory = self.path == ":memory:"
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # In-process writers queue here rather than in SQLite's busy handler, which sleeps in growing steps.
        # For :memory: (one connection, shared) it guards reads too.
        self._lock = threading.RLock()
        self._closed = False
        try:
            problem = None if self._memory else _truncated(self.path)
            if problem:
                raise StoreError(f"store {self.path} {problem}. {_FIX_DAMAGED}")
            self._ensure_schema(create)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"store {self.path} is not a readable shoprec store ({e}). {_FIX_DAMAGED}") from None
        except BaseException:
            self.close()
            raise

    # -----------------------------------------------------------------------------------------------
    # Connections and transactions
    # -----------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._memory:  # every connection to :memory: is a new database: all threads share one
            shared = self.__dict__.get("_shared")
            if shared is None:
                shared = self.__dict__["_shared"] = self._connect()
            return shared
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        with self._lock if self._memory else _nothing():
            conn = self._conn()
            with _friendly(self.path):
                conn.execute("BEGIN")  # deferred: a read snapshot, never the write lock
            try:
                with _friendly(self.path):
                    yield conn.cursor()  # type: ignore[misc]
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        with self._lock:
            conn = self._conn()
            with _friendly(self.path):
                conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
            try:
                with _friendly(self.path):
                    yield conn.cursor()  # type: ignore[misc]
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            with _friendly(self.path):
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -----------------------------------------------------------------------------------------------
    # Schema
    # -----------------------------------------------------------------------------------------------

    @staticmethod
    def _version(conn: sqlite3.Connection | Cursor) -> tuple[int | None, int]:
        """(schema version or None when there is no meta table, number of tables) — reads only."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if "meta" not in tables:
            return None, len(tables)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return (int(row[0]) if row else None), len(tables)

    def _ensure_schema(self, create: bool) -> None:
        conn = self._conn()
        version, n_tables = self._version(conn)  # a read: no lock unless something must change
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this shoprec reads "
                f"({SCHEMA_VERSION}). Fix: upgrade shoprec"
            )
        if version is None:
            if n_tables:
                raise StoreError(
                    f"store {self.path} is an SQLite database of something else (no shoprec schema). "
                    "Fix: give shoprec its own file, e.g. --store var/shoprec.db"
                )
            if not create:
                raise StoreError(f"store {self.path} is empty (no shoprec tables). {_FIX_MISSING}")
        if not self._memory and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: set once per file
        with self._write() as cur:
            version, _ = self._version(cur)  # again under the lock: another process may have done it meanwhile
            if version is None:
                new = _TABLES, _V2, _MIGRATE_2_TO_3, _MIGRATE_3_TO_4
                for statement in [s for script in new for s in _statements(script)]:
                    cur.execute(statement)
                cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version in (1, 2, 3):
                steps = _statements(_MIGRATE_1_TO_2) + _statements(_V2) if version == 1 else []
                steps += _statements(_MIGRATE_2_TO_3) if version <= 2 else []
                for statement in steps + _statements(_MIGRATE_3_TO_4):
                    cur.execute(statement)
                cur.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {version}, which this shoprec cannot migrate "
                    f"(it reads {SCHEMA_VERSION}). {_FIX_DAMAGED}"
                )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _friendly(path: str) -> Iterator[None]:
    """sqlite3's errors about the file itself -> one-line StoreErrors naming it and the fix."""
    try:
        yield
    except sqlite3.OperationalError as e:
        text = str(e)
        if "locked" in text or "busy" in text:
            raise StoreError(
                f"store {path} is busy: another process held its write lock too long ({text}). "
                "Fix: retry when the other write (an ingest?) is done"
            ) from None
        if "unable to open" in text or "readonly" in text:
            raise StoreError(f"store {path} cannot be opened or written ({text}). Fix: check the path and its "
                             "permissions") from None  # fmt: skip
        raise
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
            raise
        raise StoreError(f"store {path} is damaged ({e}). {_FIX_DAMAGED}") from None
