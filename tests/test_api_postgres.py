"""Two `shoprec serve` replicas on one PostgreSQL store (a real server the suite starts, tests/pg.py) and one index
folder: a write to either replica is served by the other within a sync interval, without a rebuild."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import Server, copy_index, tiny_shop

pytestmark = pytest.mark.slow  # a PostgreSQL server and two service processes


@pytest.fixture(scope="module")
def pg_store(pg_server: Any) -> Iterator[tuple[str, Any]]:
    from retrieval.store import open_store

    url = pg_server.fresh_url()
    shop = tiny_shop()
    store = open_store(url)
    store.ingest(shop.items, shop.interactions)
    yield url, store
    store.close()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, api_shop_home: Path, pg_store: tuple[str, Any]
) -> Iterator[tuple[Server, Server]]:
    url, _ = pg_store
    home = tmp_path_factory.mktemp("pg") / "home"
    home.mkdir()
    copy_index(api_shop_home, home)  # the same catalog and events as the SQLite shop the index was built from
    config = {"llm_backend": "none", "sync_interval_s": 0.3, "allow_anonymous_local": True}
    a = Server(home, store=url, config=config).start()
    try:
        b = Server(home, store=url, config=config).start()
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Poll `check` until it holds; returns how long it took (fails after `seconds`)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > seconds:
            pytest.fail(f"not true within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def search_ids(server: Server, query: str) -> list[str]:
    r = httpx.post(server.url + "/v1/search", json={"query": query, "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    return [h["item_id"] for h in r.json()["results"]]


def rec_ids(server: Server, body: dict[str, Any]) -> list[str]:
    r = httpx.post(server.url + "/v1/recommend", json={**body, "mode": "retrieval"}, timeout=60)
    assert r.status_code == 200, r.text
    return [p["item_id"] for p in r.json()["picks"]]


def test_an_item_written_on_one_replica_is_served_by_the_other(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    item_id = f"PG-{uuid.uuid4().hex[:6]}"
    body = {"title": "Vexmoor Glacier Trekking Poles", "category": ["Sports", "Hiking"], "price": 55.0}
    assert httpx.put(f"{a.url}/v1/items/{item_id}", json=body).status_code == 200
    assert search_ids(a, "Vexmoor glacier trekking poles")[0] == item_id  # the writer: at once
    took = within(3.0, lambda: search_ids(b, "Vexmoor glacier trekking poles")[:1] == [item_id])
    assert took < 3.0
    assert item_id in rec_ids(b, {"query": "Vexmoor trekking poles", "k": 5})

    assert httpx.delete(f"{b.url}/v1/items/{item_id}").status_code == 200
    within(3.0, lambda: item_id not in search_ids(a, "Vexmoor glacier trekking poles"))


def test_events_on_one_replica_change_the_others_next_recommendation(
    replicas: tuple[Server, Server], pg_store: tuple[str, Any]
) -> None:
    a, b = replicas
    _, store = pg_store
    user = f"pg-{uuid.uuid4().hex[:6]}"
    before = rec_ids(b, {"user": user, "k": 5})
    bought = before[:2]
    events = [{"user_id": user, "item_id": i, "type": "purchase"} for i in bought]
    r = httpx.post(a.url + "/v1/events", json={"events": events})
    assert r.status_code == 200 and r.json()["new"] == 2
    assert [ev.item_id for ev in store.history(user)] == bought  # durable in PostgreSQL when acknowledged
    # b reads the history from the shared store: the bought items leave its very next list
    after = rec_ids(b, {"user": user, "k": 5})
    assert not set(after) & set(bought)


def test_recommendation_log_and_keys_live_in_postgresql(
    replicas: tuple[Server, Server], pg_store: tuple[str, Any]
) -> None:
    a, b = replicas
    _, store = pg_store
    r = httpx.post(b.url + "/v1/recommend", json={"user": "U0005", "k": 3, "mode": "retrieval"}, timeout=60)
    rec = r.json()
    logged = store.recommendation(rec["recommendation_id"])
    assert logged is not None and list(logged.items) == [p["item_id"] for p in rec["picks"]]
    _, secret = store.create_key("pg-reader", ["read"])
    headers = {"Authorization": f"Bearer {secret}"}
    r = httpx.post(a.url + "/v1/events", json={"events": [{"user_id": "u", "item_id": "P000001"}]}, headers=headers)
    assert r.status_code == 403  # a key made by one process is checked by every replica against the shared store


def test_a_conversation_started_on_one_replica_continues_on_the_other(
    replicas: tuple[Server, Server], pg_store: tuple[str, Any]
) -> None:
    """Conversations live in the shared store: "cheaper" on replica b reads the budget and cards a shown."""
    a, b = replicas
    _, store = pg_store
    dept = tiny_shop().items[0].category[0]
    first = httpx.post(a.url + "/v1/chat", json={"message": f"{dept} under 500"}, timeout=60).json()
    cid, answer = first["conversation_id"], first["answer"]
    assert answer["kind"] == "picks" and store.conversation(cid) is not None
    second = httpx.post(b.url + "/v1/chat", json={"message": "cheaper", "conversation_id": cid}, timeout=60).json()
    state = second["answer"]["state"]
    assert second["conversation_id"] == cid and state["turns"] == 2 and state["max_price"] < 500
    assert max(c["price"] for c in second["answer"]["cards"]) < max(c["price"] for c in answer["cards"])
    # a click on a card a showed, sent to b: b knows what the conversation was shown
    card = answer["cards"][0]["item_id"]
    ev = {"conversation_id": cid, "recommendation_id": answer["recommendation_id"], "item_id": card, "type": "cart"}
    assert httpx.post(b.url + "/v1/chat/events", json=ev, timeout=60).status_code == 200
    third = httpx.post(a.url + "/v1/chat", json={"message": "show me more", "conversation_id": cid}, timeout=60)
    assert card in third.json()["answer"]["state"]["cart"] and third.json()["answer"]["state"]["turns"] == 3
