"""Past the model's capacity, over real HTTP: the flagged retrieval answer (`overload` 'fallback', the default) or
429 + Retry-After ('reject'), chosen by the server's setting or per request; never a 5xx.

One `shoprec serve` with the real model and a queue of one (`llm_queue_max = 1`, `llm_batch_max = 1`): of a burst
of concurrent score requests, one runs, at most one waits, the rest are past capacity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import Server, copy_home

pytestmark = pytest.mark.slow  # a server with the real model

BURST = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, api_shop_home: Path) -> Iterator[Server]:
    home = copy_home(api_shop_home, tmp_path_factory.mktemp("overload") / "home")
    srv = Server(
        home,
        config={
            "llm_backend": "transformers",
            "allow_anonymous_local": True,
            "llm_queue_max": 1,
            "llm_batch_max": 1,
            "request_budget_s": 120.0,  # the shared box: an admitted request must not run out of time
        },
    ).start()
    yield srv
    srv.stop()


def burst(server: Server, **extra: Any) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
            bodies = [{"user": f"U{i + 1:04d}", "k": 3, "mode": "score", **extra} for i in range(BURST)]
            return await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies))

    return asyncio.run(go())


def rejected_total(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("shoprec_rejected_total "))
    return float(line.split()[1])


def test_past_capacity_the_default_answers_with_the_flagged_retrieval_ranking(server: Server) -> None:
    responses = burst(server)
    assert [r.status_code for r in responses] == [200] * BURST, [r.text for r in responses]
    answers = [r.json() for r in responses]
    by_model = [a for a in answers if not a["fallback"]]
    over = [a for a in answers if a["fallback"]]
    assert by_model, "the model answered none of the burst"
    assert len(over) >= BURST - 2, "a queue of one holds at most one waiting request beside the running one"
    for a in over:
        assert a["fallback_reason"].startswith("over capacity: the model queue is full"), a["fallback_reason"]
        assert len(a["picks"]) == 3 and all(p["reason"] for p in a["picks"])  # grounded retrieval reasons


def test_reject_per_request_is_429_with_retry_after_and_counted(server: Server) -> None:
    before = rejected_total(server)
    responses = burst(server, overload="reject")
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= BURST - 2, codes
    assert any(not r.json()["fallback"] for r in responses if r.status_code == 200)
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "the model queue is full" in r.json()["detail"] and "mode 'retrieval'" in r.json()["detail"]
    assert rejected_total(server) - before == codes.count(429)
    # once the burst is served, the same request sent again gets the model's answer
    again = httpx.post(server.url + "/v1/recommend", json={"user": "U0001", "k": 3, "mode": "score"}, timeout=180)
    assert again.status_code == 200 and not again.json()["fallback"], again.text


def test_a_bad_overload_value_is_422_naming_the_field(server: Server) -> None:
    r = httpx.post(server.url + "/v1/recommend", json={"user": "U0001", "overload": "queue"}, timeout=60)
    assert r.status_code == 422 and "overload" in r.text and "'fallback' or 'reject'" in r.text, r.text
