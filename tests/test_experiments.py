"""Experiment definitions and assignment: sticky, ramp-up only adds, splits as configured, namespaces exclusive."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoprec.config import ConfigError, Settings
from shoprec.experiments import (
    BUCKETS,
    Experiment,
    ExperimentRegistry,
    Overrides,
    Variant,
    assign,
    bucket,
    dump,
    load,
)

ROOT = Path(__file__).resolve().parents[1]
UNITS = [f"user-{i}" for i in range(20_000)]


def _exp(id_: str = "terse", traffic: float = 1.0, **kw: Any) -> Experiment:
    variants = kw.pop("variants", None) or (
        Variant(name="control"),
        Variant(name="terse", overrides=Overrides(prompt="rank_terse")),
    )
    return Experiment.model_validate({"id": id_, "traffic": traffic, "variants": variants, **kw})


def test_bucket_is_sha256_of_salt_colon_unit_mod_10000() -> None:
    expected = int.from_bytes(hashlib.sha256(b"my-salt:U0001").digest()[:8], "big") % 10_000
    assert bucket("my-salt", "U0001") == expected
    assert bucket("my-salt", "U0001") != bucket("other-salt", "U0001") or bucket("x", "U0002") != bucket("y", "U0002")


def test_assignment_is_sticky_over_1000_calls() -> None:
    reg = ExperimentRegistry.of([_exp()])
    for unit in ("U0001", "anon-7f3a", "U0420"):
        seen = {(a.experiment, a.variant) for a in (reg.assign(unit, "recommend") for _ in range(1000)) if a}
        assert len(seen) == 1


def test_assignment_is_the_same_in_a_new_process() -> None:
    units = UNITS[:300]
    reg = ExperimentRegistry.of([_exp(traffic=0.6)])
    here = {u: (a.variant if (a := reg.assign(u, "recommend")) else None) for u in units}
    code = (
        "import json, sys\n"
        "from shoprec.experiments import Experiment, ExperimentRegistry, Variant\n"
        "e = Experiment(id='terse', traffic=0.6, variants=(Variant(name='control'), "
        "Variant(name='terse', overrides={'prompt': 'rank_terse'})))\n"
        "reg = ExperimentRegistry.of([e])\n"
        "units = json.loads(sys.stdin.read())\n"
        "print(json.dumps({u: (a.variant if (a := reg.assign(u, 'recommend')) else None) for u in units}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(units), capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == here
    assert 0 < sum(v is None for v in here.values()) < len(units)  # the 60% cut really splits this sample


def test_ramp_up_only_adds_units_and_keeps_their_variant() -> None:
    before: dict[str, str] = {}
    for traffic in (0.05, 0.1, 0.25, 0.5, 1.0):
        reg = ExperimentRegistry.of([_exp(traffic=traffic)])
        now = {u: a.variant for u in UNITS[:5000] if (a := reg.assign(u, "recommend"))}
        assert set(before) <= set(now), "ramping up moved a unit out"
        assert all(now[u] == v for u, v in before.items()), "ramping up changed a unit's variant"
        assert abs(len(now) / 5000 - traffic) < 0.03
        before = now
    assert len(before) == 5000


def test_split_proportions_follow_the_weights() -> None:
    exp = _exp(
        variants=(
            Variant(name="control", weight=2),
            Variant(name="b", overrides=Overrides(diversity=0.6)),
            Variant(name="c", overrides=Overrides(mode="retrieval")),
        )
    )
    reg = ExperimentRegistry.of([exp])
    counts = {"control": 0, "b": 0, "c": 0}
    for u in UNITS:
        a = reg.assign(u, "recommend")
        assert a is not None
        counts[a.variant] += 1
    n = len(UNITS)
    # binomial sd at n=20,000 is <= 0.36%; 1.5% is > 4 sd
    assert abs(counts["control"] / n - 0.5) < 0.015
    assert abs(counts["b"] / n - 0.25) < 0.015
    assert abs(counts["c"] / n - 0.25) < 0.015


def test_split_is_even_inside_the_ramped_slice() -> None:
    """The variant hash is independent of the traffic bucket: a 10% slice is still split 50/50."""
    reg = ExperimentRegistry.of([_exp(traffic=0.1)])
    arms = [a.variant for u in UNITS if (a := reg.assign(u, "recommend"))]
    assert abs(arms.count("control") / len(arms) - 0.5) < 0.05  # n ~ 2,000: sd 1.1%


def test_namespace_experiments_never_share_a_unit() -> None:
    a = _exp("prompt-a", traffic=0.3, namespace="home", range=(0.0, 0.5))
    b = _exp("prompt-b", traffic=0.5, namespace="home", range=(0.5, 1.0))
    reg = ExperimentRegistry.of([a, b])
    in_a = {u for u in UNITS if a.in_experiment(u)}
    in_b = {u for u in UNITS if b.in_experiment(u)}
    assert not in_a & in_b
    assert abs(len(in_a) / len(UNITS) - 0.3) < 0.015 and abs(len(in_b) / len(UNITS) - 0.5) < 0.015
    assert all(len(reg.assign_all(u, "recommend")) <= 1 for u in UNITS[:3000])


@pytest.mark.parametrize(
    ("ranges", "message"),
    [(((0.0, 0.6), (0.5, 1.0)), "overlap in namespace 'home'"), (((0.0, 0.5), None), "has no range")],
)
def test_namespace_misconfigurations_are_errors(ranges: tuple, message: str, tmp_path: Path) -> None:
    rows = []
    for i, r in enumerate(ranges):
        row = f'[[experiment]]\nid = "e{i}"\nnamespace = "home"\ntraffic = 0.1\n'
        row += f"range = [{r[0]}, {r[1]}]\n" if r else ""
        row += '[[experiment.variant]]\nname = "control"\n[[experiment.variant]]\nname = "b"\n'
        row += f"overrides = {{ diversity = 0.{i + 5} }}\n"
        rows.append(row)
    path = tmp_path / "experiments.toml"
    path.write_text("\n".join(rows))
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_experiments_outside_a_namespace_may_not_set_the_same_field() -> None:
    with pytest.raises(ValueError, match="both set prompt on recommend"):
        ExperimentRegistry.of([_exp("one"), _exp("two")])


def test_a_bad_field_is_named_with_its_experiment_and_path(tmp_path: Path) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(
        '[[experiment]]\nid = "div"\n[[experiment.variant]]\nname = "control"\n'
        '[[experiment.variant]]\nname = "wide"\noverrides = { diversity = 2.0 }\n'
    )
    with pytest.raises(ConfigError, match=r"experiment\[0\] \(id 'div'\)\.variant\[1\]\.overrides\.diversity") as ei:
        load(path)
    assert "at least 2" not in str(ei.value)  # the cause only, not its echo on the variant list
    path.write_text(
        '[[experiment]]\nid = "p"\n[[experiment.variant]]\nname = "control"\n'
        '[[experiment.variant]]\nname = "x"\noverrides = { prompt = "nope" }\n'
    )
    with pytest.raises(ConfigError, match="unknown prompt variant 'nope'; available: .*rank_terse"):
        load(path)
    path.write_text('[[experiment]]\nid = "p"\n[[experiment.variant]]\nname = "control"\n')
    with pytest.raises(ConfigError, match="at least 2"):
        load(path)
    path.write_text('[[experiment]]\nid = "p"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load(path)


def test_start_stop_and_endpoints_gate_assignment() -> None:
    exp = _exp(start=datetime(2026, 1, 1, tzinfo=UTC), stop=datetime(2026, 2, 1, tzinfo=UTC))
    reg = ExperimentRegistry.of([exp])
    assert reg.assign("U1", "recommend", now=datetime(2025, 12, 31, tzinfo=UTC)) is None
    assert reg.assign("U1", "recommend", now=datetime(2026, 1, 15, tzinfo=UTC)) is not None
    assert reg.assign("U1", "recommend", now=datetime(2026, 2, 1, tzinfo=UTC)) is None
    assert reg.assign("U1", "search", now=datetime(2026, 1, 15, tzinfo=UTC)) is None
    with pytest.raises(ValueError, match="unknown endpoint 'basket'"):
        reg.assign("U1", "basket")
    assert reg.assign("", "recommend") is None


def test_overrides_carry_only_what_the_arm_sets() -> None:
    arm_b = Variant(name="b", overrides=Overrides(mode="retrieval", diversity=0.7))
    exp = _exp(variants=(Variant(name="control"), arm_b))
    reg = ExperimentRegistry.of([exp])
    arms = {a.variant: a.overrides for u in UNITS[:50] if (a := reg.assign(u, "recommend"))}
    assert arms == {"control": {}, "b": {"mode": "retrieval", "diversity": 0.7}}


def test_file_round_trip_and_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "experiments.toml"
    first = _exp(traffic=0.2, start=datetime(2026, 1, 1, tzinfo=UTC), description="terse prompt lifts CTR")
    path.write_text(dump([first]))
    assert load(path).experiment == (first,)
    settings = Settings(experiments=path)
    served = assign(settings, "U7", "recommend")  # the registry the service uses, cached per file
    writer = ExperimentRegistry(path)  # e.g. another replica's admin API
    writer.upsert(first.model_copy(update={"traffic": 1.0}))
    wide = Variant(name="wide", overrides=Overrides(diversity=0.8))
    writer.upsert(_exp("wide", variants=(Variant(name="control"), wide)))
    reader = ExperimentRegistry(path)
    assert [e.id for e in reader.experiments()] == ["terse", "wide"]
    assert reader.get("terse").traffic == 1.0
    now_served = assign(settings, "U7", "recommend")
    assert now_served is not None  # at 100% everyone is in
    if served is not None:
        assert served.variant == now_served.variant  # a ramp-up keeps the arm
    with pytest.raises(KeyError, match="known: terse, wide"):
        reader.get("nope")


def test_settings_without_experiments_assign_nothing() -> None:
    assert assign(Settings(), "U1", "recommend") is None
    assert assign(None, "U1", "recommend") is None


def test_traffic_is_counted_in_buckets() -> None:
    exp = _exp(traffic=0.1234)
    salt, lo, hi = exp.bucket_span()
    assert (salt, lo, hi) == ("terse", 0, 1234)
    assert hi <= BUCKETS


def test_report_reads_the_store_log_and_attributes_by_id_and_window(tmp_path: Path) -> None:
    """The store path of the report, without a server: log two exposures, send events, read the report."""
    from datetime import timedelta

    from retrieval.store import RecommendationLog, open_store
    from retrieval.types import Interaction, InteractionType, Item
    from shoprec.experiments import report

    store = open_store(tmp_path / "shop.db")
    store.upsert_items(Item(id=f"P{i}", title=f"Item {i}", category=("Cat",)) for i in range(6))
    exp = _exp(traffic=1.0)
    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    arms = {}
    for n, user in enumerate(("U1", "U2", "U3", "U4")):
        arm = exp.variant_of(user).name
        arms[user] = arm
        store.log_recommendation(
            RecommendationLog(
                id=f"rec-{user}", created_at=t0 + timedelta(seconds=n), endpoint="recommend", user_id=user,
                unit_id=user, items=("P0", "P1", "P2"), mode="retrieval", experiment=exp.id, variant=arm,
                request={"k": 3}, latency_ms=100.0 * (n + 1),
            )
        )  # fmt: skip
    store.log_recommendation(  # another experiment's exposure: not in this report
        RecommendationLog(id="other", endpoint="recommend", user_id="U1", items=("P0",), mode="score")
    )
    view, cart = InteractionType.VIEW, InteractionType.CART
    store.add_events(
        [
            Interaction(user_id="U1", item_id="P0", type=view, timestamp=t0 - timedelta(hours=1)),  # before: history
            Interaction(user_id="U1", item_id="P1", type=view, timestamp=t0 + timedelta(seconds=30),
                        recommendation_id="rec-U1"),  # by id
            Interaction(user_id="U2", item_id="P2", type=cart, timestamp=t0 + timedelta(minutes=5)),  # by window
            Interaction(user_id="U3", item_id="P5", type=view, timestamp=t0 + timedelta(minutes=5)),  # not shown
            Interaction(user_id="U4", item_id="P0", type=view, timestamp=t0 + timedelta(hours=3)),  # after window
        ]
    )  # fmt: skip
    r = report(store, exp)
    assert r["exposures"] == 4 and r["users"] == 4
    assert r["attribution"] == {"by_id": 1, "by_window": 1, "item_not_shown": 0, "no_exposure": 2, "duplicate": 0}
    clicks = {arm: r["arms"][arm]["metrics"]["ctr"]["events"] for arm in ("control", "terse")}
    assert clicks[arms["U1"]] >= 1 and sum(clicks.values()) == 1
    assert sum(r["arms"][a]["metrics"]["cart_rate"]["events"] for a in ("control", "terse")) == 1
    assert r["arms"][arms["U1"]]["guardrails"]["validity_rate"] == 1.0
    # the latency guardrail reads what the service logged with each exposure
    for arm in set(arms.values()):
        served = [100.0 * (n + 1) for n, u in enumerate(arms) if arms[u] == arm]
        assert r["arms"][arm]["guardrails"]["p95_latency_ms"] == pytest.approx(np.percentile(served, 95))


def test_a_file_broken_while_serving_keeps_the_last_good_version(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(dump([_exp()]))
    reg = ExperimentRegistry(path)
    before = reg.assign("U1", "recommend")
    assert before is not None
    path.write_text(dump([_exp()]).replace("traffic = 1.0", 'traffic = "lots"'))  # a typo in a hand edit
    with caplog.at_level("ERROR", logger="shoprec.experiments"):
        for _ in range(3):
            assert reg.assign("U1", "recommend") == before  # the shop keeps being served
    assert len([r for r in caplog.records if "last good version" in r.getMessage()]) == 1  # logged once
    with pytest.raises(ConfigError, match="traffic"):  # what the admin API and the CLI show
        reg.experiments()
    path.unlink()
    assert reg.assign("U1", "recommend") == before
    fresh = ExperimentRegistry(path)  # a server started on a missing file serves no experiment, and says so
    with caplog.at_level("ERROR", logger="shoprec.experiments"):
        assert fresh.assign("U1", "recommend") is None
    assert any("serving none" in r.getMessage() for r in caplog.records)
