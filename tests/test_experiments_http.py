"""End to end over HTTP: two prompt variants served by the real `shoprec serve` to simulated shoppers.

Assignment is sticky (1,000 requests of one user, and every shopper across a server restart), every served response
is in the recommendation log with its arm, the shoppers' clicks reach the right arm through their recommendation_id,
and `shoprec ab report` prints the report. The LLM is the fake backend (the real one would take minutes), in score
mode: its label scores depend on the rendered prompt, so the two prompt variants really serve different lists.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from eval.shoppers import ShopperModel, browse_http, make_shoppers
from tests.api_server import SHOPREC, Server, build_home, tiny_shop

pytestmark = pytest.mark.slow

EXPERIMENTS = """
[[experiment]]
id = "prompt-terse"
description = "The terse ranking prompt vs the default one"
[[experiment.variant]]
name = "control"
overrides = { prompt = "rank" }
[[experiment.variant]]
name = "terse"
overrides = { prompt = "rank_terse" }
"""


def _cli(home: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(SHOPREC), "--home", str(home), "--config", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_two_prompt_variants_end_to_end(tmp_path: Path) -> None:
    shop = tiny_shop()
    home = tmp_path / "home"
    build_home(home, shop)
    experiments = home / "experiments.toml"
    experiments.write_text(EXPERIMENTS, encoding="utf-8")
    config = {"experiments": str(experiments), "allow_anonymous_local": True, "llm_backend": "fake"}
    catalog = {it.id: it for it in shop.items}
    # eager shoppers (CTR ~30% per list) so a small test has clicks to attribute
    model = ShopperModel(base_click=0.2)
    shoppers = make_shoppers(shop.items, 30, seed=1, model=model)
    served = 0

    server = Server(home, config=config).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            score = {"mode": "score"}
            visits = browse_http(client, shoppers, catalog, visits_per_shopper=4, model=model, request=score)
            served += len(visits)
            arm_of: dict[str, str] = {}
            for v in visits:
                assert v.variant is not None, "every shopper is in the experiment (traffic 1.0)"
                assert arm_of.setdefault(v.shopper, v.variant) == v.variant, "a shopper changed arm between visits"
            assert set(arm_of.values()) == {"control", "terse"}
            # the arms really serve different lists: these shoppers are all new (no history), so within one arm
            # they all get the same list, and only the prompt differs between the arms
            lists = {arm: {tuple(v.items) for v in visits if v.variant == arm} for arm in ("control", "terse")}
            assert lists["control"] != lists["terse"]

            def ask(_: int) -> str:
                r = client.post("/v1/recommend", json={"user": "sticky-user", "k": 5, "mode": "retrieval"})
                assert r.status_code == 200, r.text
                return str(r.json()["experiment"]["variant"])

            with ThreadPoolExecutor(4) as pool:  # one more user, who asks 1,000 times and never clicks
                arms = Counter(pool.map(ask, range(1000)))
            served += 1000
            assert len(arms) == 1 and sum(arms.values()) == 1000
            arm_of["sticky-user"] = next(iter(arms))

            # anonymous shoppers: no user id, a session id; each session keeps its arm, and sessions split
            session_arm: dict[str, str] = {}
            for n in range(20):
                for _ in range(3):
                    body = {"session": f"anon-{n}", "k": 5, "mode": "retrieval"}
                    r = client.post("/v1/recommend", json=body)
                    assert r.status_code == 200, r.text
                    got = r.json()["experiment"]["variant"]
                    assert session_arm.setdefault(f"anon-{n}", got) == got, "a session changed arm"
            served += 60
            assert set(session_arm.values()) == {"control", "terse"}

            over_http = client.get("/v1/experiments/prompt-terse").json()
    finally:
        server.stop()

    server = Server(home, config=config).start()  # a restart: nothing about assignment is kept in memory
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for user in arm_of:
                r = client.post("/v1/recommend", json={"user": user, "k": 5, "mode": "retrieval"})
                assert r.json()["experiment"] == {"experiment": "prompt-terse", "variant": arm_of[user]}
            served += len(arm_of)
    finally:
        server.stop()

    cfg = server.config_path
    rep = _cli(home, cfg, "ab", "report", "prompt-terse", "--json")
    assert rep.returncode == 0, rep.stderr
    report: dict[str, Any] = json.loads(rep.stdout)
    assert report["exposures"] == served, "every served response is in the recommendation log"
    assert report["users"] == len(shoppers) + 1 + len(session_arm)
    assert report["users_in_two_arms"] == 0 and report["unknown_variants"] == []
    sent = {(v.recommendation_id, item, kind) for v in visits for item, kind in v.events}
    assert sent, "the shoppers clicked something"
    assert report["attribution"]["by_id"] == len(sent)
    for arm in ("control", "terse"):
        clicks = sum(kind == "click" for v in visits if v.variant == arm for _, kind in v.events)
        assert report["arms"][arm]["metrics"]["ctr"]["events"] == clicks
        units = [*arm_of.values(), *session_arm.values()]
        assert report["arms"][arm]["users"] == sum(a == arm for a in units)
        assert 0 < report["arms"][arm]["guardrails"]["p95_latency_ms"] < 60_000  # logged with every exposure
    assert (
        over_http["arms"]["control"]["metrics"]["ctr"]["events"]
        <= report["arms"]["control"]["metrics"]["ctr"]["events"]
    )

    text = _cli(home, cfg, "ab", "report", "prompt-terse", "--out", str(tmp_path / "report.json"), "--plot")
    assert text.returncode == 0, text.stderr
    print(text.stdout)  # the report, as `shoprec ab report` prints it
    assert "verdict:" in text.stdout and "SRM:" in text.stdout
    assert (tmp_path / "report.png").stat().st_size > 1000
