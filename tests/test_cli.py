"""The `shoprec` CLI end to end on the small synthetic shop: ingest -> index -> candidates/search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from shoprec.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory, shop_dir, monkeypatch_module):
    h = tmp_path_factory.mktemp("home")
    cfg = h / "shoprec.toml"
    cfg.write_text(f'home = "{h}"\nsasrec_epochs = 2\n')
    monkeypatch_module.setenv("SHOPREC_CONFIG", str(cfg))
    r = runner.invoke(app, ["ingest", str(shop_dir), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["index", "--json"])
    assert r.exit_code == 0, r.output
    return h


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "shoprec.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("ingest", "index", "candidates", "search", "demo"):
        assert cmd in out
    r = runner.invoke(app, ["candidates", "--help"])
    assert "--user" in r.output and "--cart" in r.output and "--json" in r.output


def test_candidates_json_for_a_user(home, small_shop):
    user = small_shop.interactions[0].user_id
    r = runner.invoke(app, ["candidates", "--user", user, "--k", "7", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["mode"] == "user" and len(data["candidates"]) == 7
    seen = {ev.item_id for ev in small_shop.interactions if ev.user_id == user}
    assert not seen & {c["item_id"] for c in data["candidates"]}
    assert all(c["signals"] for c in data["candidates"])


def test_human_output_and_search(home, small_shop):
    title = small_shop.items[10].title
    r = runner.invoke(app, ["search", title, "--k", "3"])
    assert r.exit_code == 0, r.output
    assert small_shop.items[10].id in r.output
    r = runner.invoke(app, ["search", title, "--k", "3", "--json"])
    assert json.loads(r.stdout)["results"][0]["item_id"] == small_shop.items[10].id


def test_cart_and_bad_cart_item(home, small_shop):
    r = runner.invoke(app, ["candidates", "--cart", small_shop.items[0].id, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "cart"
    r = runner.invoke(app, ["candidates", "--cart", "NOPE-1"])
    assert r.exit_code == 2
    assert "cart: unknown item id(s) NOPE-1" in r.output
    assert "Traceback" not in r.output


def test_bad_filter_flags_are_a_clear_error(home):
    r = runner.invoke(app, ["candidates", "--min-price", "50", "--max-price", "10"])
    assert r.exit_code == 2 and "min_price 50.0 is above max_price 10.0" in r.output


def test_ingest_bad_row_strict_and_lenient(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("SHOPREC_CONFIG", raising=False)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "items.jsonl").write_text(
        '{"id": "a", "title": "Good"}\n{"id": "b", "title": "Bad", "price": "abc"}\n', encoding="utf-8"
    )
    r = runner.invoke(app, ["ingest", str(d)])
    assert r.exit_code == 2
    assert "items.jsonl:2" in r.output and "price" in r.output and "Traceback" not in r.output
    report = tmp_path / "rej.jsonl"
    r = runner.invoke(app, ["ingest", str(d), "--lenient", "--report", str(report), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["items"] == 1 and out["rejected"] == 1
    assert json.loads(report.read_text().splitlines()[0])["field"] == "price"


def test_candidates_without_an_index_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_HOME", str(tmp_path))
    monkeypatch.delenv("SHOPREC_CONFIG", raising=False)
    r = runner.invoke(app, ["candidates", "--user", "u"])
    assert r.exit_code == 2 and "shoprec" in r.output and "Traceback" not in r.output


def test_recommend_with_constraints(home, small_shop, monkeypatch):
    monkeypatch.setenv("SHOPREC_LLM_BACKEND", "fake")
    user = small_shop.interactions[0].user_id
    r = runner.invoke(app, ["recommend", "--user", user, "--k", "4", "--max-per-category", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["picks"]) == 4 and not data["fallback"]
    assert len({p["category"] for p in data["picks"]}) == 4
    r = runner.invoke(app, ["recommend", "--user", user, "--no-llm", "--mode", "generate"])
    assert r.exit_code == 0 and "retrieval mode" in r.output
    r = runner.invoke(app, ["recommend", "--user", user, "--k", "3", "--min-categories", "5"])
    assert r.exit_code == 2 and "min_categories=5 cannot be met with k=3" in r.output
    r = runner.invoke(app, ["recommend", "--user", user, "--mode", "poetry"])
    assert r.exit_code == 2 and "mode" in r.output and "Traceback" not in r.output
