"""The store: the single source of truth for the catalog's items, the users' events, the served recommendations,
the API keys and the chat conversations, behind one interface with two backends.

`open_store(url)` picks the backend from the URL: a path, `sqlite:///path` or `:memory:` -> SQLite (the embedded
default, retrieval/store_sqlite.py); `postgresql://...` -> PostgreSQL (several server processes or machines on one
store, retrieval/store_postgres.py). Both run the SQL written here (portable SQL, `?` placeholders) and pass the
same tests (tests/test_store.py is parametrized over both); docs/store.md is the user's guide.

What every backend guarantees:
- Readers never take the write lock: opening a store and every read succeed while another process writes.
- Every write is one transaction and writers are serialised, so a batch lands whole or not at all, and `seq`
  (events) and `version` (items) grow in commit order: a reader that polls `events_since(seq)` never misses a row.
- Events are idempotent: one event per `event_id` when the source gives one, else per (user, item, type,
  timestamp, position). Re-sending or re-ingesting the same events adds nothing (`AddResult.duplicates`).
- Item writes merge by default (PATCH semantics): only the fields an `Item` was given (pydantic's
  `model_fields_set`) change; `replace=True` replaces whole items. Deletes are soft (events keep their item).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.types import Interaction, InteractionType, Item

__all__ = [
    "SCHEMA_VERSION",
    "AddResult",
    "ApiKey",
    "ConversationConflict",
    "ConversationRecord",
    "IngestResult",
    "RecommendationLog",
    "Store",
    "StoreError",
    "UpsertResult",
    "open_store",
]

# 1: items + events. 2: event ids, dedup keys and attribution; item versions and soft deletes; the
# recommendation log; API keys. 3: the served list's latency. 4: chat conversations (every worker and replica
# continues the same one). An older file is migrated in place when it is first opened.
SCHEMA_VERSION = 4

KEY_SCOPES = ("read", "write", "admin")
Scope = Literal["read", "write", "admin"]
Endpoint = Literal["recommend", "search", "chat"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEP = "\x1f"  # the ASCII unit separator: cannot occur in an id by accident, so keys cannot collide
_ID_CHUNK = 500  # ids per `IN (...)`: well under SQLite's and PostgreSQL's limits on bound parameters


class StoreError(ValueError):
    """A write the store refuses (nothing of the batch was written), or a store it cannot open: the message names
    the store or the id and the fix."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AddResult(_Frozen):
    """What `add_events` did with a batch."""

    new: int = Field(ge=0, description="Events written.")
    duplicates: int = Field(ge=0, description="Events skipped because the store already had them (same event id or "
                            "same user, item, type, timestamp and position).")  # fmt: skip


class UpsertResult(_Frozen):
    """What `upsert_items` did with a batch."""

    new: int = Field(ge=0, description="Items that were not in the store (or were deleted) and now are.")
    updated: int = Field(ge=0, description="Items whose stored fields changed.")
    unchanged: int = Field(ge=0, description="Items given with exactly the stored values (nothing written).")


class IngestResult(_Frozen):
    """What `ingest` did: its items and its events."""

    items: UpsertResult = Field(description="The item upserts.")
    events: AddResult = Field(description="The events.")


class RecommendationLog(_Frozen):
    """One served list, kept for attribution (events carry its id) and for online A/B analysis."""

    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=200,
        description="The recommendation id returned to the caller (uuid4 hex by default).",
    )  # fmt: skip
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When it was served (timezone-aware, UTC)."
    )
    endpoint: Endpoint = Field(description="Which endpoint served it.")
    user_id: str | None = Field(default=None, description="The shopper's user id, when the request named one.")
    unit_id: str | None = Field(
        default=None, description="The id an experiment assigned its variant by (user id, or a session id)."
    )
    items: tuple[str, ...] = Field(description="Item ids in the order shown: index 0 is position 1.")
    mode: str = Field(description="How the list was made: retrieval, score, generate, ...")
    fallback: bool = Field(default=False, description="Whether a fallback (retrieval order) served it.")
    experiment: str | None = Field(default=None, description="The experiment the request was part of, if any.")
    variant: str | None = Field(default=None, description="The experiment's variant that served it, if any.")
    request: dict[str, Any] = Field(
        default_factory=dict,
        description="The request's fields as the caller sent them (no personal data beyond what the shopper typed).",
    )
    latency_ms: float | None = Field(
        default=None, ge=0, description="Server-side time to the answer (an experiment's latency guardrail)."
    )


class ConversationRecord(_Frozen):
    """A chat conversation as stored. The store keeps its state as an opaque JSON object: the chat layer owns it."""

    id: str = Field(min_length=1, max_length=200, description="The conversation id the client sends back.")
    user_id: str | None = Field(default=None, description="The pseudonymous user it personalises for, if any.")
    state: dict[str, Any] = Field(default_factory=dict, description="The conversation state (JSON object).")
    shown: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="recommendation_id -> item ids shown under it, oldest list first."
    )
    version: int = Field(default=0, ge=0, description="Bumped by every save; 0: never saved.")
    updated_at: datetime | None = Field(default=None, description="When it was last saved (UTC).")


class ConversationConflict(StoreError):
    """Another turn of the same conversation was saved since this one read it (another worker or replica)."""


class ApiKey(_Frozen):
    """An API key as the store knows it: never the secret, which is shown once by `create_key`."""

    id: str = Field(description="Public part of the key (`sr_<id>_<secret>`): what lists and logs show.")
    name: str = Field(description="What the key is for, e.g. 'shop frontend'.")
    scopes: tuple[Scope, ...] = Field(description="read: recommend/search; write: events; admin: items and keys.")
    created_at: datetime = Field(description="When it was created (UTC).")
    revoked_at: datetime | None = Field(default=None, description="When it was revoked; None while it is valid.")


# ---------------------------------------------------------------------------------------------------
# The database-API subset both backends speak
# ---------------------------------------------------------------------------------------------------


class Cursor(Protocol):
    """What the shared SQL needs from a cursor; `?` placeholders (the PostgreSQL backend translates them)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def fetchone(self) -> tuple[Any, ...] | None: ...

    def fetchall(self) -> list[tuple[Any, ...]]: ...


_EVENT_COLUMNS = 'user_id, item_id, type, value, "timestamp", "position", event_id, recommendation_id'
_ITEM_COLUMNS = "id, title, category, brand, price, description, attributes, created_at, in_stock"
# Oldest first, the same order as retrieval.events.histories: timestamp, then position, then insertion order.
_OLDEST_FIRST = 'COALESCE("timestamp", 0), COALESCE("position", 0), seq'
_NEWEST_FIRST = 'COALESCE("timestamp", 0) DESC, COALESCE("position", 0) DESC, seq DESC'
_REC_COLUMNS = (
    "id, created_at, endpoint, user_id, unit_id, items, mode, fallback, experiment, variant, request, latency_ms"
)
_KEY_COLUMNS = "id, name, scopes, created_at, revoked_at"
_CONV_COLUMNS = "id, user_id, state, shown, version, updated_at"


class Store(ABC):
    """Items, events, served recommendations and API keys; `open_store(url)` opens one.

    Thread-safe: the HTTP service calls one store from many threads. Use it as a context manager or call
    `close()`. The backends implement only how to connect, read and write (`_read`, `_write`); every query is
    here, so both answer alike.
    """

    url: str  # where the store lives, for messages (a PostgreSQL URL without its password)

    # -----------------------------------------------------------------------------------------------
    # Backend hooks
    # -----------------------------------------------------------------------------------------------

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reads. Never takes the write lock; statements inside see one consistent snapshot."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[Cursor]:
        """One write transaction: committed when the block ends, rolled back on any exception. Writers (threads
        and processes) are serialised, so `seq` and `version` values become visible in the order they grow."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; the store cannot be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -----------------------------------------------------------------------------------------------
    # Items
    # -----------------------------------------------------------------------------------------------

    def upsert_items(self, items: Iterable[Item], *, replace: bool = False) -> UpsertResult:
        """Insert new items and update existing ones (same id), keeping their place, in one transaction.

        Merge by default: an existing item changes only in the fields the given `Item` was constructed with
        (`model_fields_set`), so `Item(id="a", title="New")` renames item a and keeps its category, brand, price...
        `replace=True` replaces whole items (fields not given take the `Item` defaults). A deleted id comes back
        as a new item. Items equal to what is stored are not written (`unchanged`), so re-ingesting a catalog
        bumps no versions.
        """
        batch = list(items)
        with self._write() as cur:
            return self._upsert_items(cur, batch, replace)

    def patch_item(self, item_id: str, fields: Mapping[str, Any]) -> Item:
        """Change some fields of one item (e.g. `{"price": 9.5, "in_stock": False}`) and return the new item.

        An unknown or deleted id, an unknown field, a change of `id` or an invalid value is a `StoreError`
        naming it; nothing is written then.
        """
        unknown = sorted(set(fields) - set(Item.model_fields))
        if unknown:
            raise StoreError(
                f"unknown item field(s) {', '.join(unknown)}; valid fields: {', '.join(Item.model_fields)}"
            )
        if "id" in fields and fields["id"] != item_id:
            raise StoreError(f"cannot change the id of item {item_id!r}; delete it and create a new item instead")
        with self._write() as cur:
            current = self._live_items(cur, [item_id]).get(item_id)
            if current is None:
                raise StoreError(f"no item {item_id!r} in the store. Fix: create it first (upsert_items / PUT)")
            try:
                patched = Item(**{**current.model_dump(), **fields})
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise StoreError(f"item {item_id!r}: field {where}: {err['msg']}") from None
            if patched != current:
                self._write_items(cur, [patched], self._next_version(cur))
        return patched

    def delete_item(self, item_id: str) -> bool:
        """Soft-delete an item: `items()`/`item()` stop returning it, its events stay (and keep their item id).
        Returns False when there was no such live item."""
        with self._write() as cur:
            version = self._next_version(cur)
            cur.execute("UPDATE items SET deleted = 1, version = ? WHERE id = ? AND deleted = 0", (version, item_id))
            return cur.rowcount > 0

    def items(self) -> list[Item]:
        """All live (not deleted) items, in the order they were first inserted."""
        with self._read() as cur:
            rows = cur.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted = 0 ORDER BY pos").fetchall()
        return [_item_from(r) for r in rows]

    def item(self, item_id: str) -> Item | None:
        """One live item by id; None when there is no such item or it was deleted."""
        with self._read() as cur:
            row = cur.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ? AND deleted = 0", (item_id,)).fetchone()
        return _item_from(row) if row else None

    def deleted_ids(self) -> list[str]:
        """Ids of the deleted items, in insertion order."""
        with self._read() as cur:
            return [r[0] for r in cur.execute("SELECT id FROM items WHERE deleted = 1 ORDER BY pos").fetchall()]

    def item_version(self) -> int:
        """The catalog's change counter: grows with every item write (upsert, patch, delete); 0 when empty."""
        with self._read() as cur:
            row = cur.execute("SELECT COALESCE(MAX(version), 0) FROM items").fetchone()
        return int(row[0]) if row else 0

    def item_changes_since(self, version: int) -> tuple[int, list[Item], list[str]]:
        """What changed in the catalog after `version`: (the new version, upserted items, deleted ids).

        A replica keeps the returned version and asks again with it; start from 0 for everything, or from
        `item_version()` for changes from now on.
        """
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {_ITEM_COLUMNS}, deleted, version FROM items WHERE version > ? ORDER BY version, pos",
                (version,),
            ).fetchall()
        changed = [_item_from(r[:9]) for r in rows if not r[9]]
        deleted = [r[0] for r in rows if r[9]]
        return max((int(r[10]) for r in rows), default=version), changed, deleted

    # -----------------------------------------------------------------------------------------------
    # Events
    # -----------------------------------------------------------------------------------------------

    def add_events(self, events: Iterable[Interaction]) -> AddResult:
        """Add events in one transaction, skipping the ones the store already has (idempotent).

        An event is the same as a stored one when both carry the same `event_id`, or, for events without one,
        when user, item, type, timestamp and position are all equal (every event has a timestamp or a position,
        so every event is deduplicated). If any event names an item that was never in the store, nothing is
        written and `StoreError` names the unknown ids. When this returns, the events are committed.
        """
        batch = list(events)
        with self._write() as cur:
            return self._add_events(cur, batch)

    def ingest(
        self,
        items: Iterable[Item],
        events: Iterable[Interaction],
        *,
        replace: bool = False,
        chunk_size: int | None = None,
    ) -> IngestResult:
        """Upsert items, then add events (see `upsert_items` and `add_events`).

        `chunk_size=None`: ONE transaction, all or nothing (a loaded `Dataset` lands whole). `chunk_size=N`: the
        iterables are consumed lazily and committed every N rows, so memory stays bounded whatever the input
        size and a live service's writers wait at most one chunk; a run that fails half-way leaves the chunks
        before the failure, and running it again is safe because items merge and events are deduplicated.
        """
        if chunk_size is None:
            item_batch, event_batch = list(items), list(events)
            with self._write() as cur:
                item_result = self._upsert_items(cur, item_batch, replace)
                event_result = self._add_events(cur, event_batch)
            return IngestResult(items=item_result, events=event_result)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        new = updated = unchanged = 0
        for item_chunk in _batched(items, chunk_size):
            r = self.upsert_items(item_chunk, replace=replace)
            new, updated, unchanged = new + r.new, updated + r.updated, unchanged + r.unchanged
        added = duplicates = 0
        for event_chunk in _batched(events, chunk_size):
            a = self.add_events(event_chunk)
            added, duplicates = added + a.new, duplicates + a.duplicates
        return IngestResult(
            items=UpsertResult(new=new, updated=updated, unchanged=unchanged),
            events=AddResult(new=added, duplicates=duplicates),
        )

    def interactions(self) -> list[Interaction]:
        """All events, in the order they were added."""
        with self._read() as cur:
            rows = cur.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq").fetchall()
        return [_event_from(r) for r in rows]

    def iter_interactions(self, batch_size: int = 10_000) -> Iterator[Interaction]:
        """All events in the order they were added, read `batch_size` at a time (memory bounded by the batch)."""
        seq = 0
        while True:
            page = self.events_since(seq, limit=batch_size)
            if not page:
                return
            seq = page[-1][0]
            yield from (ev for _, ev in page)

    def events_since(self, seq: int, limit: int | None = None) -> list[tuple[int, Interaction]]:
        """Events added after sequence number `seq`, oldest first, as (seq, event); at most `limit`.

        The change feed of live serving: keep the last seq seen and ask again with it (start from
        `last_event_seq()` for events from now on, or 0 for all).
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        sql = f"SELECT seq, {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq"
        params: tuple[Any, ...] = (seq,)
        if limit is not None:
            sql, params = sql + " LIMIT ?", (seq, limit)
        with self._read() as cur:
            rows = cur.execute(sql, params).fetchall()
        return [(int(r[0]), _event_from(r[1:])) for r in rows]

    def last_event_seq(self) -> int:
        """The sequence number of the newest event; 0 when there is none."""
        with self._read() as cur:
            row = cur.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0]) if row else 0

    def history(self, user_id: str, limit: int | None = None) -> list[Interaction]:
        """The user's events, oldest first; with `limit`, only the newest `limit` (still oldest first)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        select = f"SELECT {_EVENT_COLUMNS} FROM events WHERE user_id = ?"
        with self._read() as cur:
            if limit is None:
                rows = cur.execute(f"{select} ORDER BY {_OLDEST_FIRST}", (user_id,)).fetchall()
            else:  # the newest `limit`, turned back to oldest first
                rows = cur.execute(f"{select} ORDER BY {_NEWEST_FIRST} LIMIT ?", (user_id, limit)).fetchall()[::-1]
        return [_event_from(r) for r in rows]

    def history_items(self, user_id: str, limit: int | None = None) -> list[str]:
        """The item ids of `history(user_id, limit)`, oldest first: what a recommendation request reads, without
        building an `Interaction` per event (~30 per request on the demo shop)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        select = "SELECT item_id FROM events WHERE user_id = ?"
        with self._read() as cur:
            if limit is None:
                rows = cur.execute(f"{select} ORDER BY {_OLDEST_FIRST}", (user_id,)).fetchall()
            else:
                rows = cur.execute(f"{select} ORDER BY {_NEWEST_FIRST} LIMIT ?", (user_id, limit)).fetchall()[::-1]
        return [r[0] for r in rows]

    def users(self) -> list[str]:
        """Every user id with at least one event, in order of first appearance."""
        with self._read() as cur:
            rows = cur.execute("SELECT user_id FROM events GROUP BY user_id ORDER BY MIN(seq)").fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        """Distinct users, live items and events, keyed like `Dataset.summary()`."""
        with self._read() as cur:
            users = cur.execute("SELECT COUNT(DISTINCT user_id) FROM events").fetchone()
            items = cur.execute("SELECT COUNT(*) FROM items WHERE deleted = 0").fetchone()
            events = cur.execute("SELECT COUNT(*) FROM events").fetchone()
        return {"users": _one(users), "items": _one(items), "interactions": _one(events)}

    # -----------------------------------------------------------------------------------------------
    # The recommendation log
    # -----------------------------------------------------------------------------------------------

    def log_recommendation(self, entry: RecommendationLog) -> None:
        """Store a served list. Its id must be new (`StoreError` otherwise: ids are what events point at)."""
        row = (
            entry.id,
            _micros(entry.created_at),
            entry.endpoint,
            entry.user_id,
            entry.unit_id,
            json.dumps(list(entry.items)),
            entry.mode,
            int(entry.fallback),
            entry.experiment,
            entry.variant,
            json.dumps(entry.request, ensure_ascii=False, sort_keys=True, default=str),
            entry.latency_ms,
        )
        with self._write() as cur:
            if cur.execute("SELECT 1 FROM recommendations WHERE id = ?", (entry.id,)).fetchone():
                raise StoreError(f"recommendation id {entry.id!r} is already logged; ids must be unique")
            marks = ", ".join("?" * len(row))
            cur.execute(f"INSERT INTO recommendations ({_REC_COLUMNS}) VALUES ({marks})", row)

    def recommendation(self, rec_id: str) -> RecommendationLog | None:
        """One logged recommendation by id; None when unknown."""
        with self._read() as cur:
            row = cur.execute(f"SELECT {_REC_COLUMNS} FROM recommendations WHERE id = ?", (rec_id,)).fetchone()
        return _rec_from(row) if row else None

    def recommendations(self, experiment: str | None = None, since: datetime | None = None) -> list[RecommendationLog]:
        """Logged recommendations, oldest first; only `experiment`'s when given, only those at or after `since`."""
        sql, params = f"SELECT {_REC_COLUMNS} FROM recommendations WHERE 1 = 1", list[Any]()
        if experiment is not None:
            sql += " AND experiment = ?"
            params.append(experiment)
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(_micros(since))
        with self._read() as cur:
            rows = cur.execute(sql + " ORDER BY created_at, id", tuple(params)).fetchall()
        return [_rec_from(r) for r in rows]

    def events_for_recommendations(self, rec_ids: Iterable[str]) -> list[Interaction]:
        """The events that carry one of these recommendation ids, in the order they were added."""
        wanted = sorted(set(rec_ids))
        rows: list[tuple[int, tuple[Any, ...]]] = []
        with self._read() as cur:
            for chunk in _chunks(wanted, _ID_CHUNK):
                marks = ", ".join("?" * len(chunk))
                sql = f"SELECT seq, {_EVENT_COLUMNS} FROM events WHERE recommendation_id IN ({marks})"
                rows.extend((r[0], r[1:]) for r in cur.execute(sql, chunk).fetchall())
        return [_event_from(r) for _, r in sorted(rows, key=lambda x: x[0])]

    # -----------------------------------------------------------------------------------------------
    # Chat conversations
    # -----------------------------------------------------------------------------------------------

    def conversation(self, conversation_id: str) -> ConversationRecord | None:
        """One conversation by id; None when unknown or forgotten."""
        with self._read() as cur:
            row = cur.execute(f"SELECT {_CONV_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return _conv_from(row) if row else None

    def save_conversation(self, record: ConversationRecord) -> ConversationRecord:
        """Store `record` if the stored copy is still at `record.version` (0: not stored yet); returns it saved,
        one version up. Raises `ConversationConflict` when another save came first: compare-and-set, so two
        workers answering the same conversation at once cannot silently overwrite each other's turn."""
        now = datetime.now(UTC)
        state = json.dumps(record.state, ensure_ascii=False, sort_keys=True)
        shown = json.dumps({k: list(v) for k, v in record.shown.items()})
        new = record.version + 1
        with self._write() as cur:
            row = cur.execute("SELECT version FROM conversations WHERE id = ?", (record.id,)).fetchone()
            stored = int(row[0]) if row else 0
            if stored != record.version:
                raise ConversationConflict(
                    f"conversation {record.id!r} was saved by another turn meanwhile (version {stored}, this turn "
                    f"read {record.version}). Fix: send the message again"
                )
            if row is None:
                cur.execute(
                    f"INSERT INTO conversations ({_CONV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.id, record.user_id, state, shown, new, _micros(now)),
                )
            else:
                cur.execute(
                    "UPDATE conversations SET user_id = ?, state = ?, shown = ?, version = ?, updated_at = ? "
                    "WHERE id = ?",
                    (record.user_id, state, shown, new, _micros(now), record.id),
                )
        return record.model_copy(update={"version": new, "updated_at": now})

    def forget_conversations(self, idle_for: timedelta) -> int:
        """Delete the conversations not saved for `idle_for`; returns how many."""
        cutoff = _micros(datetime.now(UTC) - idle_for)
        with self._write() as cur:
            return cur.execute("DELETE FROM conversations WHERE updated_at < ?", (cutoff,)).rowcount

    # -----------------------------------------------------------------------------------------------
    # API keys
    # -----------------------------------------------------------------------------------------------

    def create_key(self, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """Create an API key; returns it and its secret `sr_<id>_<secret>`, shown this once.

        The store keeps only a salted SHA-256 of the secret: a leaked database does not leak usable keys, and a
        lost secret cannot be recovered (create a new key and revoke the old one).
        """
        name = name.strip()
        if not name:
            raise StoreError("an API key needs a name saying what it is for, e.g. 'shop frontend'")
        chosen = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
        bad = [s for s in chosen if s not in KEY_SCOPES]
        if bad or not chosen:
            raise StoreError(
                f"unknown scope(s) {', '.join(bad) or '(none given)'}; valid scopes: {', '.join(KEY_SCOPES)}"
            )
        key_id, secret_part, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
        secret = f"sr_{key_id}_{secret_part}"
        key = ApiKey(id=key_id, name=name, scopes=chosen, created_at=datetime.now(UTC))  # type: ignore[arg-type]
        with self._write() as cur:
            cur.execute(
                "INSERT INTO api_keys (id, name, scopes, created_at, revoked_at, salt, hash) "
                "VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (key_id, name, json.dumps(list(chosen)), _micros(key.created_at), salt, _key_hash(salt, secret)),
            )
        return key, secret

    def verify_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to, or None (unknown, malformed, wrong secret or revoked)."""
        parts = secret.split("_", 2)
        if len(parts) != 3 or parts[0] != "sr" or not parts[1]:
            return None
        with self._read() as cur:
            row = cur.execute(f"SELECT {_KEY_COLUMNS}, salt, hash FROM api_keys WHERE id = ?", (parts[1],)).fetchone()
        if row is None:
            return None
        key, salt, stored = _key_from(row[:5]), row[5], row[6]
        if not hmac.compare_digest(_key_hash(salt, secret), stored):  # constant time: no timing oracle
            return None
        return key if key.revoked_at is None else None

    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._read() as cur:
            rows = cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall()
        return [_key_from(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key for good; False when there is no such key or it was already revoked."""
        with self._write() as cur:
            cur.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (_micros(datetime.now(UTC)), key_id),
            )
            return cur.rowcount > 0

    # -----------------------------------------------------------------------------------------------
    # Shared write steps (inside one `_write()` transaction)
    # -----------------------------------------------------------------------------------------------

    def _upsert_items(self, cur: Cursor, batch: list[Item], replace: bool) -> UpsertResult:
        if not batch:
            return UpsertResult(new=0, updated=0, unchanged=0)
        stored = self._live_items(cur, [it.id for it in batch])
        before = dict(stored)  # what the store held before this batch, to count new vs updated
        for it in batch:  # in order: a later row of the same id merges onto the earlier one
            current = stored.get(it.id)
            if current is None or replace:
                stored[it.id] = it
            else:
                stored[it.id] = current.model_copy(update={f: getattr(it, f) for f in it.model_fields_set})
        changed = [it for item_id, it in stored.items() if before.get(item_id) != it]
        if changed:
            self._write_items(cur, changed, self._next_version(cur))
        seen = {it.id for it in batch}
        new = sum(1 for item_id in seen if item_id not in before)
        updated = sum(1 for it in changed if it.id in before)
        return UpsertResult(new=new, updated=updated, unchanged=len(seen) - new - updated)

    def _live_items(self, cur: Cursor, ids: Sequence[str]) -> dict[str, Item]:
        found: dict[str, Item] = {}
        for chunk in _chunks(sorted(set(ids)), _ID_CHUNK):
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE deleted = 0 AND id IN ({marks})"
            for row in cur.execute(sql, chunk).fetchall():
                found[row[0]] = _item_from(row)
        return found

    @staticmethod
    def _next_version(cur: Cursor) -> int:
        row = cur.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM items").fetchone()
        return _one(row)

    @staticmethod
    def _write_items(cur: Cursor, items: list[Item], version: int) -> None:
        # A new id takes the next place (pos); an existing or deleted one keeps its place and comes back to life.
        cur.executemany(
            f"""
            INSERT INTO items (pos, {_ITEM_COLUMNS}, version, deleted)
            VALUES ((SELECT COALESCE(MAX(pos), -1) + 1 FROM items), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
            ON CONFLICT (id) DO UPDATE SET
                title = excluded.title, category = excluded.category, brand = excluded.brand,
                price = excluded.price, description = excluded.description,
                attributes = excluded.attributes, created_at = excluded.created_at,
                in_stock = excluded.in_stock, version = excluded.version, deleted = 0
            """,
            [(*_item_row(it), version) for it in items],
        )

    def _add_events(self, cur: Cursor, batch: list[Interaction]) -> AddResult:
        if not batch:
            return AddResult(new=0, duplicates=0)
        wanted = {ev.item_id for ev in batch}
        unknown = wanted - self._known_ids(cur, wanted)
        if unknown:
            first = next(i for i, ev in enumerate(batch) if ev.item_id in unknown)
            shown = ", ".join(repr(i) for i in sorted(unknown)[:10])
            more = " ..." if len(unknown) > 10 else ""
            raise StoreError(
                f"{len(unknown)} item id(s) of these events are not in the store: {shown}{more} "
                f"(first at batch index {first}); nothing of this batch of {len(batch)} events was "
                "written. Fix: upsert_items() those items first, or drop the events that name them"
            )
        cur.executemany(
            f"INSERT INTO events ({_EVENT_COLUMNS}, dedup_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (dedup_key) DO NOTHING",
            [(*_event_row(ev), dedup_key(ev)) for ev in batch],
        )
        new = max(cur.rowcount, 0)
        return AddResult(new=new, duplicates=len(batch) - new)

    @staticmethod
    def _known_ids(cur: Cursor, ids: set[str]) -> set[str]:
        """Ids that are or were items (deleted ones too: an event about a deleted item still happened)."""
        found: set[str] = set()
        for chunk in _chunks(sorted(ids), _ID_CHUNK):
            marks = ", ".join("?" * len(chunk))
            found.update(r[0] for r in cur.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk).fetchall())
        return found


# ---------------------------------------------------------------------------------------------------
# Opening a store
# ---------------------------------------------------------------------------------------------------


def open_store(url: str | Path, *, create: bool = True) -> Store:
    """Open the store at `url`: a path, `sqlite:///path`, `:memory:` (SQLite) or `postgresql://...`.

    `create=False` is for commands that only read: a store that does not exist is a `StoreError` naming it and
    the fix (`shoprec ingest`, or check --home / --store) instead of a new empty store. Anything that is not a
    shoprec store (a directory, another kind of file, a truncated file) is a one-line `StoreError`. An older
    schema is migrated in place on first open.
    """
    target = str(url)
    if target.startswith(("postgresql://", "postgres://")):
        from retrieval.store_postgres import PostgresStore

        return PostgresStore(target, create=create)
    from retrieval.store_sqlite import SQLiteStore

    return SQLiteStore(target, create=create)


# ---------------------------------------------------------------------------------------------------
# Row <-> model
# ---------------------------------------------------------------------------------------------------


def dedup_key(ev: Interaction) -> str:
    """The identity of an event: its source id when it has one, else user, item, type, timestamp and position."""
    if ev.event_id is not None:
        return f"e{_SEP}{ev.event_id}"
    ts = "" if ev.timestamp is None else str(_micros(ev.timestamp))
    pos = "" if ev.position is None else str(ev.position)
    return _SEP.join(("k", ev.user_id, ev.item_id, ev.type.value, ts, pos))


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


def _item_from(r: Sequence[Any]) -> Item:
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
    """Microseconds since the epoch, UTC: exact and sortable (a float of seconds would round)."""
    if ts.tzinfo is None:  # the data types document timestamps as UTC; a naive one is taken to be UTC
        ts = ts.replace(tzinfo=UTC)
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=int(us))


def _when(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _event_row(ev: Interaction) -> tuple[Any, ...]:
    ts = _micros(ev.timestamp) if ev.timestamp is not None else None
    return (ev.user_id, ev.item_id, ev.type.value, ev.value, ts, ev.position, ev.event_id, ev.recommendation_id)


def _event_from(r: Sequence[Any]) -> Interaction:
    user_id, item_id, type_, value, ts, position, event_id, recommendation_id = r
    return Interaction(
        user_id=user_id,
        item_id=item_id,
        type=InteractionType(type_),
        value=value,
        timestamp=_from_micros(ts),
        position=position,
        event_id=event_id,
        recommendation_id=recommendation_id,
    )


def _rec_from(r: Sequence[Any]) -> RecommendationLog:
    rec_id, created, endpoint, user_id, unit_id, items, mode, fallback, experiment, variant, request, latency_ms = r
    return RecommendationLog(
        id=rec_id,
        created_at=_when(created),
        endpoint=endpoint,
        user_id=user_id,
        unit_id=unit_id,
        items=tuple(json.loads(items)),
        mode=mode,
        fallback=bool(fallback),
        experiment=experiment,
        variant=variant,
        request=json.loads(request),
        latency_ms=latency_ms,
    )


def _conv_from(r: Sequence[Any]) -> ConversationRecord:
    conv_id, user_id, state, shown, version, updated = r
    return ConversationRecord(
        id=conv_id,
        user_id=user_id,
        state=json.loads(state),
        shown={k: tuple(v) for k, v in json.loads(shown).items()},
        version=version,
        updated_at=_when(updated),
    )


def _key_from(r: Sequence[Any]) -> ApiKey:
    key_id, name, scopes, created, revoked = r
    return ApiKey(
        id=key_id,
        name=name,
        scopes=tuple(json.loads(scopes)),
        created_at=_when(created),
        revoked_at=_from_micros(revoked),
    )


def _key_hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}{_SEP}{secret}".encode()).hexdigest()


def _one(row: tuple[Any, ...] | None) -> int:
    return int(row[0]) if row else 0


def _chunks(seq: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(seq), size):
        yield list(seq[start : start + size])


def _batched(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk
