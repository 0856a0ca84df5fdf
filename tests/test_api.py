"""The HTTP service over real HTTP: `shoprec serve` in a subprocess on a tiny shop (SQLite store, real MiniLM index,
real SmolLM2 for score mode), driven with httpx. One server for the module; each test makes its own keys and users.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import SHOPREC, Server, copy_home, tiny_shop

pytestmark = pytest.mark.slow  # builds an index and starts a server with the model (~30-60 s for the module)

RATE = 10  # requests/s per key (and burst): low enough for the rate-limit test to trip it quickly


@pytest.fixture(scope="module")
def shop() -> Any:
    return tiny_shop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, api_shop_home: Path) -> Path:
    return copy_home(api_shop_home, tmp_path_factory.mktemp("api") / "home")


@pytest.fixture(scope="module")
def store(home: Path) -> Iterator[Any]:
    from retrieval.store import open_store

    s = open_store(home / "shoprec.db")
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    srv = Server(
        home,
        config={
            "llm_backend": "transformers",
            "rate_limit_per_s": RATE,
            "rate_limit_burst": RATE,
            "request_budget_s": 120.0,  # the shared 2-core box: a real-model answer must not turn into a fallback
        },
    ).start()
    yield srv
    srv.stop()


def make_key(store: Any, *scopes: str) -> dict[str, str]:
    _, secret = store.create_key(f"test-{'-'.join(scopes)}", scopes)
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin(store: Any) -> dict[str, str]:
    return make_key(store, "admin")


def post(server: Server, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=180)


def picks(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [p["item_id"] for p in r.json()["picks"]]


# ------------------------------------------------------------------------------------------------ access


def test_no_key_bad_key_and_missing_scope_are_401_and_403(server: Server, store: Any) -> None:
    body = {"user": "U0001", "mode": "retrieval"}
    r = post(server, "/v1/recommend", body, {})
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    r = post(server, "/v1/recommend", body, {"Authorization": "Bearer sr_nope_nope"})
    assert r.status_code == 401 and "invalid or revoked" in r.json()["detail"]

    read = make_key(store, "read")
    assert post(server, "/v1/recommend", body, read).status_code == 200
    r = post(server, "/v1/events", {"events": [{"user_id": "U0001", "item_id": "P000001"}]}, read)
    assert r.status_code == 403 and "'write'" in r.json()["detail"]
    r = httpx.put(server.url + "/v1/items/NEW1", json={"title": "x"}, headers=read)
    assert r.status_code == 403 and "'admin'" in r.json()["detail"]

    key, secret = store.create_key("to-revoke", ["read"])
    assert store.revoke_key(key.id)
    r = post(server, "/v1/search", {"query": "kettle"}, {"X-API-Key": secret})
    assert r.status_code == 401


def test_rate_limit_answers_429_with_retry_after(server: Server, store: Any) -> None:
    key = make_key(store, "read")

    async def burst() -> list[httpx.Response]:
        # all at once: faster than the key's rate whatever the box's load (sequential requests might not be)
        async with httpx.AsyncClient(base_url=server.url, headers=key, timeout=120) as client:
            body = {"user": "U0003", "k": 3, "mode": "retrieval"}
            return await asyncio.gather(*(client.post("/v1/recommend", json=body) for _ in range(4 * RATE)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= RATE  # the burst allowance is served
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit of 10 requests/s" in limited.json()["detail"]
    # another key is not limited by this one's use
    assert post(server, "/v1/search", {"query": "tent"}, make_key(store, "read")).status_code == 200


# ------------------------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(
    ("path", "body", "field", "limit"),
    [
        ("/v1/recommend", {"user": "U0001", "k": 500}, "k", "20"),
        ("/v1/recommend", {"query": "x" * 501}, "query", "500"),
        ("/v1/recommend", {"cart": [f"P{i:06d}" for i in range(51)]}, "cart", "50"),
        ("/v1/recommend", {"user": "U0001", "mode": "dream"}, "mode", "retrieval"),
        ("/v1/recommend", {"user": "U0001", "filters": {"min_price": -1}}, "filters.min_price", "0"),
        ("/v1/recommend", {"user": "U0001", "colour": "red"}, "colour", "not permitted"),
        ("/v1/search", {"query": ""}, "query", "1"),
        ("/v1/events", {"events": []}, "events", "1"),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "P000001"}] * 1001}, "events", "1000"),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "P000001", "type": "stare"}]}, "events.0.type", "view"),
    ],
)
def test_malformed_input_is_422_naming_field_and_limit(
    server: Server, admin: dict[str, str], path: str, body: Any, field: str, limit: str
) -> None:
    r = post(server, path, body, admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{field}: "), detail
    assert limit in detail, detail


def test_bad_values_the_schema_cannot_see_are_422_too(server: Server, admin: dict[str, str]) -> None:
    r = httpx.post(
        server.url + "/v1/recommend", content=b"{not json", headers={**admin, "content-type": "application/json"}
    )
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    r = post(server, "/v1/recommend", {"cart": ["NO-SUCH-ITEM"], "mode": "retrieval"}, admin)
    assert r.status_code == 422 and r.json()["detail"].startswith("cart: unknown item id(s) NO-SUCH-ITEM")
    r = post(server, "/v1/recommend", {"user": "U0001", "adapter": "secret-lab"}, admin)
    assert r.status_code == 422 and "adapter" in r.json()["detail"]
    r = post(server, "/v1/recommend", {"user": "U0001", "filters": {"min_price": 9, "max_price": 1}}, admin)
    assert r.status_code == 422 and "min_price" in r.json()["detail"]
    r = post(server, "/v1/events", {"events": [{"user_id": "u", "item_id": "NO-SUCH-ITEM"}]}, admin)
    assert r.status_code == 422 and "NO-SUCH-ITEM" in r.json()["detail"]


def test_unknown_user_gets_the_cold_start_answer(server: Server, admin: dict[str, str]) -> None:
    r = post(server, "/v1/recommend", {"user": f"never-seen-{uuid.uuid4().hex}", "k": 4, "mode": "retrieval"}, admin)
    assert len(picks(r)) == 4
    assert all("popularity" in p["signals"] for p in r.json()["picks"])


# ------------------------------------------------------------------------------------------------ real time


def test_an_event_changes_the_next_recommendation(server: Server, admin: dict[str, str], shop: Any) -> None:
    user = f"live-{uuid.uuid4().hex[:8]}"
    body = {"user": user, "k": 5, "mode": "retrieval"}
    before = picks(post(server, "/v1/recommend", body, admin))
    # replay an existing shopper's latest items as this new user's purchases
    donor = [ev.item_id for ev in shop.interactions if ev.user_id == "U0057"][-4:]
    events = [
        {"user_id": user, "item_id": i, "type": "purchase", "event_id": f"{user}-{n}"} for n, i in enumerate(donor)
    ]
    r = post(server, "/v1/events", {"events": events}, admin)
    assert r.status_code == 200 and r.json() == {"accepted": 4, "new": 4, "duplicates": 0}
    after_resp = post(server, "/v1/recommend", body, admin)
    after = picks(after_resp)
    assert after != before
    assert not set(after) & set(donor)  # bought items are excluded from the next list at once
    used = {name for p in after_resp.json()["picks"] for name in p["signals"]}
    assert used & {"itemknn", "sasrec"}, used  # the behavioural signals now read the fresh history
    # a retried batch is not counted twice
    r = post(server, "/v1/events", {"events": events}, admin)
    assert r.json() == {"accepted": 4, "new": 0, "duplicates": 4}


def test_new_item_is_recommendable_at_once_and_a_deleted_one_is_gone(server: Server, admin: dict[str, str]) -> None:
    item = {
        "title": "Zorblax Quantum Espresso Kettle",
        "category": ["Home & Kitchen", "Kettles"],
        "brand": "Zorblax",
        "price": 42.0,
        "description": "A quantum espresso kettle by Zorblax.",
    }
    item_id = f"NEW-{uuid.uuid4().hex[:6]}"
    r = httpx.put(f"{server.url}/v1/items/{item_id}", json=item, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    search = {"query": "Zorblax quantum espresso kettle", "k": 5}
    hits = post(server, "/v1/search", search, admin).json()["results"]
    assert hits[0]["item_id"] == item_id
    rec = {"query": "Zorblax quantum espresso kettle", "k": 5, "mode": "retrieval"}
    assert item_id in picks(post(server, "/v1/recommend", rec, admin))

    r = httpx.patch(f"{server.url}/v1/items/{item_id}", json={"price": 19.5, "in_stock": False}, headers=admin)
    assert r.status_code == 200 and r.json()["price"] == 19.5
    hits = post(server, "/v1/search", search, admin).json()["results"]
    assert next(h for h in hits if h["item_id"] == item_id)["price"] == 19.5
    in_stock = {**search, "filters": {"in_stock": True}}
    assert item_id not in [h["item_id"] for h in post(server, "/v1/search", in_stock, admin).json()["results"]]

    assert httpx.delete(f"{server.url}/v1/items/{item_id}", headers=admin).status_code == 200
    assert item_id not in [h["item_id"] for h in post(server, "/v1/search", search, admin).json()["results"]]
    assert item_id not in picks(post(server, "/v1/recommend", rec, admin))
    assert httpx.delete(f"{server.url}/v1/items/{item_id}", headers=admin).status_code == 404
    r = httpx.patch(f"{server.url}/v1/items/{item_id}", json={"price": 1}, headers=admin)
    assert r.status_code == 404


def test_recommendation_id_is_stored_with_what_was_shown(server: Server, admin: dict[str, str], store: Any) -> None:
    r = post(server, "/v1/recommend", {"user": "U0002", "k": 4, "mode": "retrieval", "diversity": 0.5}, admin)
    shown = picks(r)
    rec_id = r.json()["recommendation_id"]
    logged = store.recommendation(rec_id)
    assert logged is not None
    assert list(logged.items) == shown
    assert (logged.user_id, logged.mode, logged.fallback) == ("U0002", "retrieval", False)
    assert logged.request["diversity"] == 0.5
    click = {"user_id": "U0002", "item_id": shown[0], "type": "click", "recommendation_id": rec_id}
    assert post(server, "/v1/events", {"events": [click]}, admin).status_code == 200
    attributed = store.events_for_recommendations([rec_id])
    assert [ev.item_id for ev in attributed] == [shown[0]]


def test_score_mode_with_the_real_model(server: Server, admin: dict[str, str]) -> None:
    r = post(server, "/v1/recommend", {"user": "U0057", "k": 3, "mode": "score"}, admin)
    data = r.json()
    assert r.status_code == 200, r.text
    assert data["mode"] == "score" and data["fallback"] is False, data["fallback_reason"]
    assert len(data["picks"]) == 3 and all(p["reason"] for p in data["picks"])
    assert {"retrieve", "score", "total"} <= set(data["timings_ms"])
    cats = [p["category"].split(" > ")[0] for p in data["picks"]]
    assert max(cats.count(c) for c in cats) <= 2  # the default category cap holds over HTTP too


# ------------------------------------------------------------------------------------------------ ops


def test_health_metrics_and_openapi(server: Server, admin: dict[str, str]) -> None:
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["pid"] == server.proc.pid
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    post(server, "/v1/search", {"query": "tent"}, admin)
    text = httpx.get(server.url + "/metrics").text
    for name in ("shoprec_requests_total", "shoprec_request_seconds_bucket", "shoprec_llm_queue_depth"):
        assert name in text
    assert 'route="/v1/search"' in text
    # a body over the limit is refused before it is read, naming the limit; refusals are counted by status
    from shoprec.api import MAX_BODY_BYTES

    big = b'{"events": [' + b" " * (MAX_BODY_BYTES + 1) + b"]}"
    r = httpx.post(server.url + "/v1/events", content=big, headers={**admin, "Content-Type": "application/json"})
    assert r.status_code == 413 and f"limit of {MAX_BODY_BYTES} bytes" in r.json()["detail"]
    httpx.post(server.url + "/v1/search", json={"query": "tent"})  # no key: 401
    text = httpx.get(server.url + "/metrics").text
    refused = [line for line in text.splitlines() if line.startswith("shoprec_requests_total{")]
    assert any('route="/v1/search"' in line and 'status="401"' in line for line in refused), refused
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/recommend", "/v1/search", "/v1/events", "/v1/items/{item_id}"} <= set(spec["paths"])
    assert httpx.get(server.url + "/docs").status_code == 200


def test_keys_cli_creates_a_key_the_server_accepts_and_revokes_it(server: Server, home: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SHOPREC), "--home", str(home), *args], capture_output=True, text=True, timeout=120)

    out = cli("keys", "create", "cli-test", "--scope", "read", "--json")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    headers = {"Authorization": f"Bearer {created['secret']}"}
    assert post(server, "/v1/search", {"query": "tent"}, headers).status_code == 200
    listed = cli("keys", "list", "--json")
    assert created["id"] in {k["id"] for k in json.loads(listed.stdout)}
    assert "secret" not in listed.stdout and created["secret"] not in listed.stdout
    assert cli("keys", "revoke", created["id"]).returncode == 0
    bad = cli("keys", "create", "x", "--scope", "root")
    assert bad.returncode == 2 and "valid scopes: read, write, admin" in bad.stderr
    time.sleep(5.1)  # a verified key is trusted for 5 s per process (auth._VERIFY_TTL_S)
    assert post(server, "/v1/search", {"query": "tent"}, headers).status_code == 401
