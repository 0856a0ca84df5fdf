"""The experiments router in-process: list, report, admin create/update, and the refusals (scope, running changes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shoprec.config import Settings

EXPERIMENT = {
    "description": "the terse prompt lifts CTR",
    "traffic": 0.2,
    "variants": [{"name": "control"}, {"name": "terse", "overrides": {"prompt": "rank_terse"}}],
}


@pytest.fixture()
def api(tmp_path: Path) -> tuple[TestClient, dict[str, str], dict[str, str], Path]:
    from shoprec.api import create_app
    from shoprec.service import Shoprec

    path = tmp_path / "experiments.toml"
    settings = Settings(home=tmp_path, experiments=path)
    store = Shoprec(settings).store
    _, read = store.create_key("shop", ["read"])
    _, admin = store.create_key("ops", ["admin"])
    client = TestClient(create_app(settings))  # no lifespan: these routes need no index or model
    return client, {"Authorization": f"Bearer {read}"}, {"Authorization": f"Bearer {admin}"}, path


def test_create_list_report_and_ramp(api: Any) -> None:
    client, read, admin, path = api
    r = client.put("/v1/experiments/terse", json=EXPERIMENT, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["running"] is True and path.is_file()
    listed = client.get("/v1/experiments", headers=read).json()["experiments"]
    assert [e["id"] for e in listed] == ["terse"]
    rep = client.get("/v1/experiments/terse", headers=read)
    assert rep.status_code == 200
    assert rep.json()["users"] == 0 and rep.json()["verdict"] == "no exposures logged yet."
    r = client.patch("/v1/experiments/terse", json={"traffic": 0.5}, headers=admin)
    assert r.status_code == 200 and r.json()["traffic"] == 0.5
    from shoprec.experiments import load

    assert load(path).experiment[0].traffic == 0.5  # written to the file every replica reads


def test_running_changes_that_move_units_need_force(api: Any) -> None:
    client, _, admin, _ = api
    client.put("/v1/experiments/terse", json=EXPERIMENT, headers=admin)
    r = client.patch("/v1/experiments/terse", json={"traffic": 0.1}, headers=admin)
    assert r.status_code == 409 and "ramp-down" in r.json()["detail"]
    changed = {**EXPERIMENT, "salt": "new"}
    r = client.put("/v1/experiments/terse", json=changed, headers=admin)
    assert r.status_code == 409 and "salt" in r.json()["detail"]
    r = client.patch("/v1/experiments/terse?force=true", json={"traffic": 0.1}, headers=admin)
    assert r.status_code == 200 and r.json()["traffic"] == 0.1
    stop = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert client.patch("/v1/experiments/terse", json={"stop": stop}, headers=admin).json()["running"] is False


def test_refusals_name_the_problem(api: Any) -> None:
    client, read, admin, _ = api
    assert client.put("/v1/experiments/terse", json=EXPERIMENT, headers=read).status_code == 403
    assert client.get("/v1/experiments").status_code == 401
    bad = {**EXPERIMENT, "variants": [{"name": "control"}, {"name": "b", "overrides": {"diversity": 3}}]}
    r = client.put("/v1/experiments/terse", json=bad, headers=admin)
    assert r.status_code == 422 and "diversity" in r.json()["detail"]
    r = client.put("/v1/experiments/terse", json={**EXPERIMENT, "id": "other"}, headers=admin)
    assert r.status_code == 422 and "id" in r.json()["detail"]
    client.put("/v1/experiments/terse", json=EXPERIMENT, headers=admin)
    r = client.get("/v1/experiments/nope", headers=read)
    assert r.status_code == 404 and "known: terse" in r.json()["detail"]
    r = client.put("/v1/experiments/clash", json=EXPERIMENT, headers=admin)  # same field, same endpoint
    assert r.status_code == 409 and "namespace" in r.json()["detail"]


def test_no_experiments_file_configured_is_a_404_with_the_fix(tmp_path: Path) -> None:
    from shoprec.api import create_app
    from shoprec.service import Shoprec

    settings = Settings(home=tmp_path)
    _, key = Shoprec(settings).store.create_key("ops", ["admin"])
    client = TestClient(create_app(settings))
    r = client.get("/v1/experiments", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 404 and "experiments" in r.json()["detail"]
