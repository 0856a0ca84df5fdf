"""The store, every case on both backends (SQLite and a real PostgreSQL server started by the suite): exact
round-trips, all-or-nothing batches, idempotent events, merging item upserts, soft deletes, change feeds, the
recommendation log, API keys, concurrent writers and readers beside a held write lock. Then the SQLite file cases:
URL forms, missing/damaged/foreign files, the migration from schema version 1, bulk speed."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from retrieval.events import histories
from retrieval.store import (
    SCHEMA_VERSION,
    ConversationConflict,
    ConversationRecord,
    RecommendationLog,
    Store,
    StoreError,
    open_store,
)
from retrieval.types import Interaction, InteractionType, Item

T0 = datetime(2024, 1, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


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
    **extra: str,
) -> Interaction:
    ts = T0 + timedelta(seconds=seconds, microseconds=7) if seconds is not None else None
    return Interaction(user_id=user, item_id=item, timestamp=ts, position=position, type=type, value=value, **extra)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store's URL on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "shop.db")
    server = request.getfixturevalue("pg_server")
    return str(server.fresh_url())


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with open_store(url) as s:
        yield s


# ---------------------------------------------------------------------------------------------------
# Both backends
# ---------------------------------------------------------------------------------------------------


def test_round_trip_is_exact(url: str) -> None:
    items = make_items()
    events = [
        ev("u1", "i0", 10, type=InteractionType.RATING, value=4.5),
        ev("u1", "i1", position=0, type=InteractionType.PURCHASE, event_id="src-1", recommendation_id="r1"),
        ev("u2", "i2", 5, position=2, type=InteractionType.CART, value=3),
    ]
    with open_store(url) as store:
        assert store.upsert_items(items).new == 3
        assert store.add_events(events).new == 3
    with open_store(url, create=False) as store:  # reopened: it was persisted
        assert store.items() == items
        assert store.item("i0") == items[0] and store.item("nope") is None
        assert store.interactions() == events
        assert store.users() == ["u1", "u2"]
        assert store.counts() == {"users": 2, "items": 3, "interactions": 3}


def test_upsert_merges_given_fields_and_keeps_order(store: Store) -> None:
    store.upsert_items(make_items())
    full = store.item("i0")
    assert full is not None
    result = store.upsert_items([Item(id="i0", title="Renamed"), Item(id="i9", title="New")])
    assert (result.new, result.updated, result.unchanged) == (1, 1, 0)
    merged = store.item("i0")
    # finding 2: a title-only update used to wipe category, brand, price...
    assert merged == full.model_copy(update={"title": "Renamed"})
    assert [it.id for it in store.items()] == ["i0", "i1", "i2", "i9"]
    again = store.upsert_items([Item(id="i0", title="Renamed"), Item(id="i9", title="New")])
    assert (again.new, again.updated, again.unchanged) == (0, 0, 2)


def test_replace_replaces_whole_items(store: Store) -> None:
    store.upsert_items(make_items())
    store.upsert_items([Item(id="i0", title="Bare")], replace=True)
    assert store.item("i0") == Item(id="i0", title="Bare")
    assert [it.id for it in store.items()] == ["i0", "i1", "i2"]  # still first


def test_same_id_twice_in_one_batch_merges_in_order(store: Store) -> None:
    r = store.upsert_items([Item(id="a", title="A", brand="B"), Item(id="a", title="A2")])
    assert (r.new, r.updated, r.unchanged) == (1, 0, 0)
    assert store.item("a") == Item(id="a", title="A2", brand="B")


def test_bad_batch_rolls_back_whole(store: Store) -> None:
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


def test_ingest_is_one_transaction_unless_chunked(store: Store) -> None:
    items = make_items()
    with pytest.raises(StoreError, match="'ghost'"):
        store.ingest(items, [ev("u1", "i0", 1), ev("u1", "ghost", 2)])
    assert store.counts() == {"users": 0, "items": 0, "interactions": 0}  # the items were rolled back too
    result = store.ingest(items, [ev("u1", "i0", 1)])
    assert (result.items.new, result.events.new) == (3, 1)
    events = [ev("u1", "i0", 1)] + [ev(f"w{k % 7}", f"i{k % 3}", k) for k in range(24)]  # one already stored
    chunked = store.ingest(iter(items), iter(events), chunk_size=4)  # lazily consumed
    assert (chunked.items.unchanged, chunked.events.new, chunked.events.duplicates) == (3, 24, 1)
    assert store.counts()["interactions"] == 25
    with pytest.raises(ValueError, match="chunk_size"):
        store.ingest([], [], chunk_size=0)


def test_events_are_idempotent(store: Store) -> None:
    """Finding 2: re-adding the same events used to append them all again."""
    store.upsert_items(make_items())
    events = [ev("u", "i0", 1), ev("u", "i1", position=3), ev("u", "i2", 2, event_id="e-1")]
    assert store.add_events(events).model_dump() == {"new": 3, "duplicates": 0}
    assert store.add_events(events).model_dump() == {"new": 0, "duplicates": 3}
    # the same source id is the same event, whatever else it says; a different id is a different event
    again = [ev("u", "i0", 99, event_id="e-1"), ev("u", "i0", 1, event_id="e-2")]
    assert store.add_events(again).model_dump() == {"new": 1, "duplicates": 1}
    # duplicates inside one batch count once; another type or time is another event
    batch = [ev("v", "i0", 5), ev("v", "i0", 5), ev("v", "i0", 5, type=InteractionType.CART), ev("v", "i0", 6)]
    assert store.add_events(batch).model_dump() == {"new": 3, "duplicates": 1}
    assert store.counts()["interactions"] == 7


def test_history_is_oldest_first_like_histories(store: Store) -> None:
    events = [
        ev("u", "i0", 30),
        ev("u", "i1", 10),
        ev("other", "i0", 5),
        ev("u", "i2", 10),  # same time as the i1 event: input order breaks the tie
        ev("p", "i0", position=2),
        ev("p", "i1", position=0),
        ev("p", "i2", position=1),
    ]
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
    # the ids-only read that recommendation requests use: the same items in the same order
    for user in ("u", "p", "other", "nobody"):
        for limit in (None, 0, 1, 2, 5):
            assert store.history_items(user, limit) == [e.item_id for e in store.history(user, limit)]
    with pytest.raises(ValueError, match="limit"):
        store.history_items("u", limit=-1)


def test_patch_delete_and_the_item_change_feed(store: Store) -> None:
    store.upsert_items(make_items())
    v0 = store.item_version()
    assert v0 >= 1 and store.item_changes_since(v0) == (v0, [], [])
    patched = store.patch_item("i1", {"price": 9.5, "in_stock": False})
    assert patched == Item(id="i1", title="Item 1", price=9.5, in_stock=False) == store.item("i1")
    assert store.delete_item("i2") is True and store.delete_item("i2") is False
    assert store.item("i2") is None and [it.id for it in store.items()] == ["i0", "i1"]
    assert store.deleted_ids() == ["i2"] and store.counts()["items"] == 2
    version, changed, deleted = store.item_changes_since(v0)
    assert version == store.item_version() > v0 and changed == [patched] and deleted == ["i2"]
    assert store.item_changes_since(0)[1:] == ([store.item("i0"), patched], ["i2"])
    # events keep pointing at a deleted item; upserting the id again brings it back as new
    store.add_events([ev("u", "i2", 1)])
    assert store.history("u")[0].item_id == "i2"
    assert store.upsert_items([Item(id="i2", title="Back")]).new == 1
    assert store.item("i2") == Item(id="i2", title="Back") and store.deleted_ids() == []
    for bad, message in [
        (("nope", {"price": 1}), "no item 'nope'"),
        (("i0", {"colour": "red"}), "unknown item field"),
        (("i0", {"price": -1}), "price"),
        (("i0", {"id": "other"}), "cannot change the id"),
    ]:
        with pytest.raises(StoreError, match=message):
            store.patch_item(*bad)  # type: ignore[arg-type]


def test_event_change_feed(store: Store) -> None:
    store.upsert_items(make_items())
    assert store.last_event_seq() == 0 and store.events_since(0) == []
    store.add_events([ev("u", "i0", k) for k in range(5)])
    mark = store.last_event_seq()
    store.add_events([ev("u", "i0", 1)])  # a duplicate: nothing new in the feed
    store.add_events([ev("w", "i1", 7), ev("w", "i2", 8)])
    feed = store.events_since(mark)
    assert [e.user_id for _, e in feed] == ["w", "w"] and feed[0][0] > mark
    assert store.last_event_seq() == feed[-1][0]
    assert len(store.events_since(0, limit=3)) == 3
    assert list(store.iter_interactions(batch_size=2)) == store.interactions()


def test_recommendation_log(store: Store) -> None:
    store.upsert_items(make_items())
    a = RecommendationLog(
        endpoint="recommend", user_id="u", unit_id="u", items=("i2", "i0"), mode="score",
        experiment="exp1", variant="B", request={"k": 2, "query": "pens"}, created_at=T0, latency_ms=12.5,
    )  # fmt: skip
    b = RecommendationLog(
        endpoint="search", items=("i1",), mode="retrieval", fallback=True, created_at=T0 + timedelta(1)
    )
    store.log_recommendation(a)
    store.log_recommendation(b)
    assert len(a.id) == 32 and store.recommendation(a.id) == a and store.recommendation("nope") is None
    assert store.recommendations() == [a, b] and store.recommendations(experiment="exp1") == [a]
    assert store.recommendations(since=T0 + timedelta(hours=1)) == [b]
    with pytest.raises(StoreError, match="already logged"):
        store.log_recommendation(a)
    click = ev("u", "i2", 3, type=InteractionType.VIEW, recommendation_id=a.id)
    store.add_events([click, ev("u", "i1", 4)])
    assert store.events_for_recommendations([a.id, b.id]) == [click]


def test_conversations_round_trip_and_refuse_a_stale_save(store: Store) -> None:
    """Two workers read version 1 of one conversation: the first save wins, the second is refused, not lost."""
    assert store.conversation("c1") is None
    state = {"wanted": "pens ☕", "max_price": 12.5, "brands": ["Inkwell"]}
    saved = store.save_conversation(ConversationRecord(id="c1", user_id="u", state=state, shown={"r1": ("a", "b")}))
    assert saved.version == 1 and store.conversation("c1") == saved
    first = store.save_conversation(saved.model_copy(update={"state": {"wanted": "cheaper pens"}}))
    with pytest.raises(ConversationConflict, match="send the message again"):
        store.save_conversation(saved.model_copy(update={"state": {"wanted": "lost turn"}}))
    assert store.conversation("c1") == first and first.version == 2 and first.state == {"wanted": "cheaper pens"}
    with pytest.raises(ConversationConflict):  # a "new" conversation under an id that exists is a conflict too
        store.save_conversation(ConversationRecord(id="c1"))


def test_idle_conversations_are_forgotten(store: Store) -> None:
    store.save_conversation(ConversationRecord(id="old"))
    time.sleep(0.05)
    fresh = store.save_conversation(ConversationRecord(id="fresh"))
    assert store.forget_conversations(timedelta(seconds=0.02)) == 1
    assert store.conversation("old") is None and store.conversation("fresh") == fresh


def test_a_version_3_store_gains_the_conversations_table(url: str) -> None:
    with open_store(url) as store:
        old = RecommendationLog(endpoint="recommend", items=("a",), mode="score", created_at=T0, latency_ms=3.0)
        store.log_recommendation(old)
        with store._write() as cur:  # back to schema 3, as a store written by the previous shoprec looks
            cur.execute("DROP TABLE conversations")
            cur.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with open_store(url, create=False) as store:
        assert store.recommendation(old.id) == old
        assert store.save_conversation(ConversationRecord(id="c")).version == 1


def test_api_keys(store: Store, url: str) -> None:
    key, secret = store.create_key("shop frontend", ["read", "write"])
    assert secret.startswith(f"sr_{key.id}_") and key.scopes == ("read", "write") and key.revoked_at is None
    assert store.verify_key(secret) == key
    for wrong in (secret + "x", secret[:-1], f"sr_{key.id}_", "nonsense", "sr__x", ""):
        assert store.verify_key(wrong) is None
    other, _ = store.create_key("admin", ["admin"])
    assert [k.id for k in store.list_keys()] == [key.id, other.id]
    assert store.revoke_key(key.id) is True and store.revoke_key(key.id) is False
    assert store.verify_key(secret) is None and store.list_keys()[0].revoked_at is not None
    with pytest.raises(StoreError, match="valid scopes: read, write, admin"):
        store.create_key("x", ["root"])
    with pytest.raises(StoreError, match="name"):
        store.create_key("  ", ["read"])
    if url.startswith("/"):  # SQLite: the secret is nowhere in the file
        store.close()
        assert secret.split("_", 2)[2].encode() not in Path(url).read_bytes()


def test_threads_share_one_store(store: Store) -> None:
    store.upsert_items(make_items())
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for k in range(20):
                store.add_events([ev(f"t{t}", "i0", k)])
                assert len(store.history(f"t{t}")) == k + 1
                store.items()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.counts()["interactions"] == 120


_WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from retrieval.store import open_store
    from retrieval.types import Interaction
    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with open_store(url) as store:
        for k in range(n):
            store.add_events([Interaction(user_id=name, item_id="i0", timestamp=t0 + timedelta(seconds=k))])
    """
)


def test_two_processes_write_while_a_reader_follows_the_feed(store: Store, url: str) -> None:
    store.upsert_items(make_items())
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, url, name, "60"], cwd=ROOT, stderr=subprocess.PIPE)
        for name in ("p1", "p2")
    ]
    seen: list[int] = []

    def follow() -> None:
        seen.extend(seq for seq, _ in store.events_since(seen[-1] if seen else 0))

    while any(p.poll() is None for p in procs):
        follow()
        time.sleep(0.01)
    follow()
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    assert len(seen) == 120 and seen == sorted(seen)  # the feed missed nothing and never went back
    assert store.counts() == {"users": 2, "items": 3, "interactions": 120}


_ACKNOWLEDGER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from retrieval.store import open_store
    from retrieval.types import Interaction
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with open_store(sys.argv[1]) as store:
        for k in range(1_000_000):
            store.add_events([Interaction(user_id="acked", item_id="i0", timestamp=t0 + timedelta(seconds=k))])
            print(k + 1, flush=True)  # acknowledged: add_events has returned
    """
)


def test_acknowledged_events_survive_sigkill(store: Store, url: str) -> None:
    """An event is stored once add_events returns: the writer is SIGKILLed mid-stream and nothing it
    acknowledged is lost (issue 14's durability requirement, at the store)."""
    store.upsert_items(make_items())
    writer = subprocess.Popen([sys.executable, "-c", _ACKNOWLEDGER, url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    try:
        assert writer.stdout is not None
        while acknowledged < 150:
            acknowledged = int(writer.stdout.readline())
    finally:
        writer.kill()  # SIGKILL: no cleanup, no final commit
        writer.wait()
    with open_store(url, create=False) as again:
        assert len(again.history("acked")) >= acknowledged


_HOLD_SQLITE = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE items SET title = 'held' WHERE id = 'i1'")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("ROLLBACK")
    """
)
_HOLD_POSTGRES = textwrap.dedent(
    """
    import sys, time
    import psycopg
    from retrieval.store_postgres import _WRITE_LOCK_KEY
    with psycopg.connect(sys.argv[1]) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
        conn.execute("UPDATE items SET title = 'held' WHERE id = 'i1'")
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        conn.rollback()
    """
)


def test_readers_run_while_another_process_holds_the_write_lock(url: str) -> None:
    """Finding 1: opening a store took the write lock, so reads failed with 'database is locked' during a write."""
    with open_store(url) as store:
        store.upsert_items(make_items())
        store.add_events([ev("u", "i0", 1), ev("u", "i1", 2)])
    script = _HOLD_POSTGRES if url.startswith("postgresql") else _HOLD_SQLITE
    holder = subprocess.Popen([sys.executable, "-c", script, url, "8"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with open_store(url, create=False) as reader:
            assert [e.item_id for e in reader.history("u")] == ["i0", "i1"]
            assert [it.id for it in reader.items()] == ["i0", "i1", "i2"] and reader.item("i1") == make_items()[1]
            assert reader.counts()["interactions"] == 2 and reader.events_since(0)[-1][0] >= 2
        assert time.perf_counter() - start < 2.0  # no waiting on the writer
    finally:
        holder.kill()
        holder.wait()


def test_a_dropped_postgresql_connection_is_one_error_then_reconnects(pg_server) -> None:
    import psycopg

    with open_store(pg_server.fresh_url()) as store:
        store.upsert_items(make_items())
        with psycopg.connect(pg_server.base_url, autocommit=True) as admin:  # what a server restart does to us
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
        with pytest.raises(StoreError, match="lost the connection.*Fix: retry"):
            store.items()
        assert [it.id for it in store.items()] == ["i0", "i1", "i2"]  # reconnected


# ---------------------------------------------------------------------------------------------------
# SQLite files
# ---------------------------------------------------------------------------------------------------


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
    with open_store(forms[form]) as store:
        store.upsert_items(make_items(1))
        assert Path(store.url).resolve() == target
    assert target.is_file()  # parent folders were created
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(SCHEMA_VERSION)


@pytest.mark.parametrize("arg", [":memory:", "sqlite:///:memory:", "sqlite://"])
def test_memory_forms(arg: str) -> None:
    with open_store(arg) as store:
        store.upsert_items(make_items(2))
        assert store.url == ":memory:" and store.counts()["items"] == 2


@pytest.mark.parametrize("arg", ["mysql://db/shop", "sqlite://host/shop.db", ""])
def test_bad_urls(arg: str) -> None:
    with pytest.raises(StoreError):
        open_store(arg)


def test_missing_store_is_not_created_by_readers(tmp_path: Path) -> None:
    """Finding 7: a read-only command with a mistyped --home created an empty database."""
    target = tmp_path / "typo" / "shoprec.db"
    with pytest.raises(StoreError, match="no store at .*typo.*shoprec ingest"):
        open_store(target, create=False)
    assert not target.exists() and not target.parent.exists()


def _damaged(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        return tmp_path
    path = tmp_path / "shop.db"
    if kind == "not-sqlite":
        path.write_text("id,title\n1,pen\n")
    elif kind == "other-sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE songs (id INTEGER)")
    elif kind == "truncated":
        with open_store(path) as store:
            store.upsert_items([Item(id=str(k), title="x" * 500) for k in range(400)])
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["directory", "not-sqlite", "other-sqlite", "truncated"])
@pytest.mark.parametrize("create", [True, False])
def test_a_file_that_is_not_a_store_is_a_one_line_error(tmp_path: Path, kind: str, create: bool) -> None:
    """Finding 5: these were tracebacks (sqlite3.DatabaseError / OperationalError)."""
    path = _damaged(tmp_path, kind)
    with pytest.raises(StoreError) as info:
        open_store(path, create=create)
    message = str(info.value)
    assert str(path) in message and "Fix:" in message and "\n" not in message


# The version-1 schema as earlier shoprec versions wrote it (retrieval/store.py before schema 2).
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id TEXT PRIMARY KEY, pos INTEGER NOT NULL UNIQUE, title TEXT NOT NULL, category TEXT NOT NULL,
    brand TEXT NOT NULL, price REAL, description TEXT NOT NULL, attributes TEXT NOT NULL, created_at TEXT,
    in_stock INTEGER NOT NULL);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL,
    item_id TEXT NOT NULL REFERENCES items(id), type TEXT NOT NULL, value REAL, timestamp INTEGER, position INTEGER);
CREATE INDEX events_user ON events (user_id);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO items VALUES ('a', 0, 'Pen', '["Office", "Pens"]', 'Inkwell', 4.5, '', '{}', NULL, 1);
INSERT INTO items VALUES ('b', 1, 'Pad', '[]', '', NULL, '', '{}', NULL, 1);
INSERT INTO events (user_id, item_id, type, value, timestamp, position) VALUES
    ('u', 'a', 'view', NULL, 1704067200000007, NULL),
    ('u', 'a', 'view', NULL, 1704067200000007, NULL),
    ('u', 'b', 'purchase', NULL, NULL, 3);
"""


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_SCHEMA)
    with open_store(path, create=False) as store:
        assert store.item("a") == Item(id="a", title="Pen", category=("Office", "Pens"), brand="Inkwell", price=4.5)
        assert store.counts() == {"users": 1, "items": 2, "interactions": 3}  # the old duplicate is kept
        assert store.item_changes_since(0)[0] >= 1 and len(store.item_changes_since(0)[1]) == 2
        same = [ev("u", "a", 0), ev("u", "b", position=3, type=InteractionType.PURCHASE)]
        assert store.add_events(same).model_dump() == {"new": 0, "duplicates": 2}
        store.log_recommendation(RecommendationLog(endpoint="search", items=("a",), mode="retrieval"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_version_2_store_gains_the_latency_column_and_keeps_its_logs(url: str) -> None:
    """Schema 2 had no recommendations.latency_ms: both backends add it in place, old rows read None."""
    with open_store(url) as store:
        old = RecommendationLog(endpoint="recommend", user_id="u", items=("a",), mode="score", created_at=T0)
        store.log_recommendation(old)
        with store._write() as cur:  # back to schema 2, as a store written by the previous shoprec looks
            cur.execute("ALTER TABLE recommendations DROP COLUMN latency_ms")
            cur.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with open_store(url, create=False) as store:
        assert store.recommendation(old.id) == old and old.latency_ms is None
        new = RecommendationLog(endpoint="recommend", items=("b",), mode="score", created_at=T0, latency_ms=80.0)
        store.log_recommendation(new)
        assert store.recommendation(new.id) == new
        with store._write() as cur:
            assert cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
                str(SCHEMA_VERSION),
            )


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "new.db").close()
    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99.*upgrade shoprec"):
        open_store(tmp_path / "new.db")


def test_bulk_load_is_not_row_by_row(tmp_path: Path) -> None:
    """50k events in one batch: seconds (executemany in one transaction), where a commit per row or a query per
    event would take minutes. The bound is loose on purpose: this box is shared, and the point is the order."""
    items = [Item(id=str(k), title=f"Item {k}") for k in range(2000)]
    events = [
        Interaction(user_id=str(k % 1000), item_id=str(k % 2000), timestamp=T0 + timedelta(seconds=k))
        for k in range(50_000)
    ]
    with open_store(tmp_path / "bulk.db") as store:
        start = time.perf_counter()
        store.upsert_items(items)
        store.add_events(events)
        elapsed = time.perf_counter() - start
        assert store.counts() == {"users": 1000, "items": 2000, "interactions": 50_000}
    assert elapsed < 20, f"bulk load took {elapsed:.1f} s"
