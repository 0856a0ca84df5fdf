"""POST /v1/chat over the real service app (fake LLM backend): a 4-turn conversation, SSE stages (the first cards
sent before the ranking is done, over real HTTP), conversations kept in the store with a 409 for a concurrent
turn, click / add-to-cart events stored with their recommendation_id, and the page's escaping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoprec.config import Settings

# one module fixture builds a real index (MiniLM + every signal) for the service: ~20-60 s on 2 cores
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory, small_shop):
    from fastapi.testclient import TestClient

    from shoprec.api import create_app
    from shoprec.service import Shoprec

    home = tmp_path_factory.mktemp("chathome")
    settings = Settings(home=home, llm_backend="fake", sasrec_epochs=1, fit_fusion=False)
    core = Shoprec(settings)
    core.store.ingest(small_shop.items, small_shop.interactions)
    core.build_index(log=lambda _m: None)
    _, secret = core.store.create_key("chat-test", ["read"])
    app = create_app(settings)  # serve includes the chat router
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {secret}"
        c.shoprec_core = core  # type: ignore[attr-defined]
        yield c


def _sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_four_turn_conversation_streamed(client, small_shop):
    dept = small_shop.items[0].category[0]
    r = client.post("/v1/chat", json={"message": f"{dept} under 500", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [e for e, _ in events] == ["cards", "final"]
    first = events[-1][1]
    cid = first["conversation_id"]
    assert events[0][1]["answer"]["stage"] == "retrieval" and first["answer"]["stage"] == "ranked"
    assert first["answer"]["fallback_reason"] is None  # ranked by the model, through the service's batcher
    prices = [c["price"] for c in first["answer"]["cards"]]
    r2 = client.post("/v1/chat", json={"message": "cheaper", "conversation_id": cid, "stream": False}).json()
    assert r2["conversation_id"] == cid and max(c["price"] for c in r2["answer"]["cards"]) < max(prices)
    brand = r2["answer"]["cards"][0]["brand"]
    r3 = client.post("/v1/chat", json={"message": "not that brand", "conversation_id": cid}).json()
    assert brand in r3["answer"]["state"]["excluded_brands"]
    assert all(c["brand"] != brand for c in r3["answer"]["cards"])
    second = r3["answer"]["cards"][1]["item_id"]
    r4 = client.post("/v1/chat", json={"message": "more like the second one", "conversation_id": cid}).json()
    assert r4["answer"]["state"]["reference_items"] == [second]
    assert r4["answer"]["state"]["turns"] == 4 and r4["answer"]["kind"] == "picks"


def test_click_and_cart_are_stored_with_the_recommendation_id(client, small_shop):
    dept = small_shop.items[0].category[0]
    out = client.post("/v1/chat", json={"message": f"{dept} please"}).json()
    answer, cid = out["answer"], out["conversation_id"]
    card = answer["cards"][0]
    ev = {"conversation_id": cid, "recommendation_id": answer["recommendation_id"], "item_id": card["item_id"]}
    assert client.post("/v1/chat/events", json={**ev, "type": "click"}).status_code == 200
    assert client.post("/v1/chat/events", json={**ev, "type": "cart"}).status_code == 200
    store = client.shoprec_core.store  # type: ignore[attr-defined]
    stored = store.events_for_recommendations([answer["recommendation_id"]])
    assert {(e.item_id, e.type.value) for e in stored} == {(card["item_id"], "view"), (card["item_id"], "cart")}
    logged = store.recommendation(answer["recommendation_id"])
    assert (
        logged is not None
        and logged.endpoint == "chat"
        and list(logged.items) == [c["item_id"] for c in answer["cards"]]
    )
    # an item the conversation was not shown under that id is refused, naming the field
    bad = client.post("/v1/chat/events", json={**ev, "item_id": "nope", "type": "click"})
    assert bad.status_code == 422 and "item_id" in bad.text
    state = client.post("/v1/chat", json={"message": "cheaper", "conversation_id": cid}).json()["answer"]["state"]
    assert card["item_id"] in state["cart"]


def test_client_edited_state_replaces_the_stored_one(client, small_shop):
    dept = small_shop.items[0].category[0]
    out = client.post("/v1/chat", json={"message": f"{dept}, no {small_shop.items[0].brand}"}).json()
    state = out["answer"]["state"]
    assert state["excluded_brands"]
    edited = {**state, "excluded_brands": [], "max_price": 20.0}
    again = client.post(
        "/v1/chat", json={"message": "show me more", "conversation_id": out["conversation_id"], "state": edited}
    ).json()
    assert again["answer"]["state"]["excluded_brands"] == [] and again["answer"]["state"]["max_price"] == 20.0
    assert all(c["price"] <= 20.0 for c in again["answer"]["cards"])


def _engine(client, small_shop):
    """The app's chat engine (made by the first chat request)."""
    client.post("/v1/chat", json={"message": f"{small_shop.items[0].category[0]} please"})
    return client.app.state.chat_engine


def test_first_cards_are_streamed_before_the_ranking_is_done(client, small_shop, monkeypatch):
    """Over real HTTP (uvicorn on loopback; TestClient buffers a streamed body): the LLM stage is held until the
    client has read the `cards` event, so the test fails if the server sends the stages together."""
    import threading

    import httpx

    from tests.api_server import serve_in_thread

    engine = _engine(client, small_shop)
    cards_read, rank = threading.Event(), engine.rank

    def held_rank(request, config):
        assert cards_read.wait(30), "the cards event never reached the client while the ranking waited"
        return rank(request, config)

    monkeypatch.setattr(engine, "rank", held_rank)
    base, server = serve_in_thread(client.app)
    try:
        body = {"message": f"{small_shop.items[0].category[0]} under 500", "stream": True}
        headers = dict(client.headers)
        events = []
        with httpx.stream("POST", base + "/v1/chat", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    cards_read.set()
        assert events == ["cards", "final"]
    finally:
        server.should_exit = True


def test_a_turn_answered_meanwhile_elsewhere_is_a_409_not_a_lost_turn(client, small_shop, monkeypatch):
    """Another worker saves a turn of this conversation while this one ranks: this turn is refused (409, and an
    `error` event when streaming); the stored state is the other worker's."""
    from retrieval.store import ConversationRecord

    engine = _engine(client, small_shop)
    dept = small_shop.items[0].category[0]
    cid = client.post("/v1/chat", json={"message": f"{dept} under 500"}).json()["conversation_id"]
    store, rank = client.shoprec_core.store, engine.rank  # type: ignore[attr-defined]

    def elsewhere(request, config):
        rec = store.conversation(cid)
        store.save_conversation(rec.model_copy(update={"state": {**rec.state, "wanted": "other worker"}}))
        return rank(request, config)

    monkeypatch.setattr(engine, "rank", elsewhere)
    r = client.post("/v1/chat", json={"message": "cheaper", "conversation_id": cid, "stream": False})
    assert r.status_code == 409 and "conversation_id" in r.json()["detail"] and "again" in r.json()["detail"]
    assert store.conversation(cid).state["wanted"] == "other worker"
    streamed = _sse(client.post("/v1/chat", json={"message": "cheaper", "conversation_id": cid, "stream": True}).text)
    assert [e for e, _ in streamed] == ["cards", "error"] and streamed[-1][1]["status"] == 409
    assert isinstance(store.conversation(cid), ConversationRecord)


def test_bad_requests_name_the_field(client):
    r = client.post("/v1/chat", json={"message": ""})
    assert r.status_code == 422 and "message" in r.text
    r = client.post("/v1/chat", json={"message": "hi", "state": {"min_price": 50, "max_price": 10}})
    assert r.status_code == 422 and "min_price" in r.text
    r = client.post("/v1/chat/events", json={"conversation_id": "x", "recommendation_id": "y", "item_id": "z",
                                              "type": "click"})  # fmt: skip
    assert r.status_code == 404 and "conversation_id" in r.text


def test_page_is_served_and_escapes_catalog_text(client):
    page = client.get("/chat")
    assert page.status_code == 200 and '<form id="ask">' in page.text
    js = client.get("/chat/chat.js").text
    assert "innerHTML" not in js and "textContent" in js
    assert client.get("/chat/secret.py").status_code == 404


def test_web_files_exist():
    web = Path(__file__).resolve().parents[1] / "shoprec" / "chat" / "web"
    assert {p.name for p in web.iterdir()} >= {"index.html", "chat.js", "chat.css"}


def test_a_process_running_the_model_switches_threads_faster_and_restores_the_interval(client) -> None:
    """The model thread takes the GIL back between its tensor ops: a serving process that runs the model uses
    `gil_switch_ms` instead of Python's 5 ms, and an app started inside another process leaves it as it found it."""
    import sys

    from fastapi.testclient import TestClient

    from shoprec.api import create_app

    settings = client.shoprec_core.settings.model_copy(update={"gil_switch_ms": 0.25})
    before = sys.getswitchinterval()
    with TestClient(create_app(settings)):
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    assert sys.getswitchinterval() == before
