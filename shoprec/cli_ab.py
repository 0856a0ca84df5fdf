"""`shoprec ab list|report|ramp|stop`: online experiments from the command line (next to `ab offline`).

The experiments live in the TOML file named by the `experiments` setting (docs/experiments.md); `report` reads the
store's recommendation log and the events that follow, and prints per-variant metrics with CIs, the lift, the SRM
check, the fixed-horizon and the always-valid sequential verdicts. Admin commands change the file atomically; the
running service picks the change up on its next request.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()


def _settings() -> Any:
    from shoprec.cli import _settings as settings

    return settings()


def _registry() -> Any:
    from shoprec.experiments import ExperimentRegistry

    settings = _settings()
    if settings.experiments is None:
        raise ValueError(
            'no experiments file configured. Fix: set `experiments = "experiments.toml"` in shoprec.toml or '
            "SHOPREC_EXPERIMENTS=FILE (docs/experiments.md)."
        )
    return ExperimentRegistry(Path(settings.experiments))


def _get(registry: Any, experiment_id: str) -> Any:
    try:
        return registry.get(experiment_id)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}. Fix: pass one of those ids.") from None


def ab_list(as_json: bool = typer.Option(False, "--json", help="Print the experiments as JSON.")) -> None:
    """The experiments of the configured file: traffic, arms, window, endpoints."""
    exps = _registry().experiments()
    if as_json:
        sys.stdout.write(json.dumps([e.model_dump(mode="json", exclude_none=True) for e in exps], indent=2) + "\n")
        return
    now = datetime.now(UTC)
    for e in exps:
        state = "running" if e.active(now) and e.traffic > 0 else "not running"
        arms = ", ".join(f"{v.name} {v.overrides.as_dict() or '(control)'}" for v in e.variants)
        ns = f", namespace {e.namespace} {list(e.range or (0, 1))}" if e.namespace else ""
        console.print(f"{e.id}: {state}, traffic {e.traffic:.0%}{ns}, on {', '.join(e.endpoints)}", highlight=False)
        console.print(f"  arms: {arms}", highlight=False, markup=False)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def render(r: dict[str, Any]) -> str:
    """The report as text: the lines `shoprec ab report` prints (and docs/experiments.md shows)."""
    d = r["design"]
    out = [
        f"experiment {r['experiment']['id']}: {r['users']} users, {r['exposures']} exposures; primary metric "
        f"{d['primary_metric']} (per exposure, users as the unit), α={d['alpha']}",
        f"attribution: {r['attribution']}",
    ]
    head = f"  {'variant':<12}{'users':>7}{'expos.':>8}  {'CTR [95% CI]':<24}{'cart/exp':>9}{'buy/exp':>9}"
    out += [head + f"{'click/user':>11}{'fallback':>9}{'valid':>8}{'p95 ms':>8}"]
    for name, a in r["arms"].items():
        m = a["metrics"]
        ctr = m["ctr"]
        ci = f"{_pct(ctr['per_exposure'])} [{_pct(ctr['ci'][0])}, {_pct(ctr['ci'][1])}]"
        g = a["guardrails"]
        out.append(
            f"  {name:<12}{a['users']:>7}{a['exposures']:>8}  {ci:<24}{_pct(m['cart_rate']['per_exposure']):>9}"
            f"{_pct(m['purchase_rate']['per_exposure']):>9}{_pct(m['ctr']['per_user']):>11}"
            f"{_pct(g['fallback_rate']):>9}{_pct(g['validity_rate']):>8}{_ms(g['p95_latency_ms']):>8}"
        )
    s = r["srm"]
    out.append(
        f"SRM: users {s['observed']} vs shares {[round(x, 3) for x in s['expected_share']]}: chi2={s['chi2']:.2f}, "
        f"p={s['p']:.3g}" + ("  ALARM" if s["alarm"] else " (ok)")
    )
    p = r["plan"]
    if p.get("fixed_users"):
        out.append(
            f"plan: +{d['mde']:.0%} relative on a baseline of {_pct(p['baseline'])} ({p['source']}) needs "
            f"{p['fixed_users']} users for the fixed-horizon test, ~{p['sequential_users']} for the sequential one"
        )
    for c in r["comparisons"]:
        lo, hi = c["relative_ci"]
        rel = "n/a" if c["relative_lift"] is None else f"{c['relative_lift']:+.1%}"
        ci = "" if lo is None else f" [{lo:+.1%}, {hi:+.1%}]"
        seq = c["sequential"]
        out.append(
            f"{c['variant']} vs {c['control']}: lift {rel}{ci}; always-valid p={seq['p_always_valid']:.3g}"
            + (
                f", fixed-horizon MDE now {c['fixed_horizon']['mde_now_relative']:+.1%}"
                if c["fixed_horizon"].get("mde_now_relative") is not None
                else ""
            )
        )
    out.append("verdict: " + r["verdict"])
    return "\n".join(out)


def ab_report(
    experiment: str = typer.Argument(..., help="Experiment id (see `shoprec ab list`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON here (and the plot next to it)."),
    plot: bool = typer.Option(False, "--plot", help="Write the sequential evidence plot (PNG next to --out)."),
    look_every: int = typer.Option(100, "--look-every", min=1, help="Users between two points of the trace."),
) -> None:
    """Per-variant metrics with CIs, lift, SRM check, fixed-horizon and always-valid sequential verdicts."""
    from eval.online_ab import plot_sequential
    from shoprec.experiments import report
    from shoprec.service import Shoprec

    registry = _registry()
    exp = _get(registry, experiment)
    result = report(Shoprec(_settings()).store, exp, look_every=look_every)
    if plot and out is None:
        raise ValueError("--plot writes the PNG next to the JSON. Fix: add --out FILE.json.")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(out)
        if plot:
            result["plot"] = str(plot_sequential(result, out.with_suffix(".png")))
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    sys.stdout.write(render(result) + "\n")  # plain text: no wrapping at the terminal's width
    if out is not None:
        sys.stdout.write(f"written: {out}" + (f", {result['plot']}" if result.get("plot") else "") + "\n")


def ab_ramp(
    experiment: str = typer.Argument(..., help="Experiment id."),
    traffic: float = typer.Argument(..., min=0.0, max=1.0, help="New share of all units (0..1)."),
    force: bool = typer.Option(False, "--force", help="Allow a ramp-down (it drops units already assigned)."),
) -> None:
    """Change an experiment's traffic. Ramping up only adds units; a ramp-down needs --force."""
    registry = _registry()
    exp = _get(registry, experiment)
    if traffic < exp.traffic and not force:
        raise ValueError(
            f"{experiment}: traffic {traffic} is below the current {exp.traffic}; a ramp-down takes users out of the "
            "experiment mid-way. Fix: pass --force if that is intended, or use `shoprec ab stop`."
        )
    registry.upsert(exp.model_copy(update={"traffic": traffic}))
    console.print(f"{experiment}: traffic {exp.traffic:.0%} -> {traffic:.0%}", highlight=False)


def ab_stop(experiment: str = typer.Argument(..., help="Experiment id.")) -> None:
    """Stop assigning units now (the log and the report stay)."""
    registry = _registry()
    exp = _get(registry, experiment)
    registry.upsert(exp.model_validate({**exp.model_dump(), "stop": datetime.now(UTC)}))
    console.print(f"{experiment}: stopped; `shoprec ab report {experiment}` still reads it", highlight=False)


def register(app: typer.Typer, friendly_errors: Callable[[Any], Any]) -> None:
    """Add `ab list|report|ramp|stop` to the `ab` group that `shoprec.cli_eval` created (`ab offline`)."""
    from shoprec.cli_eval import ab_app

    ab_app.command("list")(friendly_errors(ab_list))
    ab_app.command("report")(friendly_errors(ab_report))
    ab_app.command("ramp")(friendly_errors(ab_ramp))
    ab_app.command("stop")(friendly_errors(ab_stop))
