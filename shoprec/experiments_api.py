"""The experiments router of the HTTP service: list, read the report of, create and update online experiments.

- `GET /v1/experiments` (read): every experiment of the configured file, with whether it is running now;
- `GET /v1/experiments/{id}` (read): the report (`shoprec ab report`'s JSON): per-variant metrics with CIs, lift,
  SRM, fixed-horizon and always-valid sequential verdicts, and the sequential trace;
- `PUT /v1/experiments/{id}` (admin): create or replace one experiment (the body is the experiment; its `id`, when
  given, must match the path);
- `PATCH /v1/experiments/{id}` (admin): change traffic, start, stop or description.

A change that would move units already assigned (a ramp-down, a new salt, other variants or weights, another
namespace slice) of an experiment that has started is refused with 409 unless `?force=true`: it silently breaks the
running analysis. Writes go to the experiments file atomically; every replica reads the change on its next request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoprec.api import Principal, get_state, require_scope
from shoprec.experiments import Experiment, ExperimentRegistry, report

router = APIRouter(tags=["experiments"])


class ExperimentPatch(BaseModel):
    """The fields an admin may change on an existing experiment without redefining it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    traffic: float | None = Field(default=None, ge=0, le=1, description="New share of all units (ramp up only).")
    start: datetime | None = Field(default=None, description="New start time (UTC).")
    stop: datetime | None = Field(default=None, description="New stop time (UTC); now stops it.")
    description: str | None = Field(default=None, max_length=2000, description="New description.")


def _registry(request: Request) -> ExperimentRegistry:
    settings = get_state(request).settings
    if settings.experiments is None:
        raise HTTPException(
            404,
            'no experiments file is configured. Fix: set `experiments = "experiments.toml"` in the server\'s config '
            "(docs/experiments.md)",
        )
    from shoprec.experiments import registry_for

    reg = registry_for(settings)
    assert reg is not None
    return reg


def _find(reg: ExperimentRegistry, experiment_id: str) -> Experiment | None:
    return next((e for e in _experiments(reg) if e.id == experiment_id), None)


def _experiments(reg: ExperimentRegistry) -> tuple[Experiment, ...]:
    try:
        return reg.experiments()
    except ValueError as e:  # a hand-edited file that no longer validates: say where, do not 500
        raise HTTPException(409, f"the experiments file is invalid: {e}") from None


def _moves_units(old: Experiment, new: Experiment) -> str | None:
    """Why `new` would move units that `old` already assigned, or None."""
    if new.traffic < old.traffic:
        return f"traffic {old.traffic} -> {new.traffic} is a ramp-down"
    if new.hash_salt != old.hash_salt:
        return "a new salt reshuffles every unit"
    if [(v.name, v.weight) for v in new.variants] != [(v.name, v.weight) for v in old.variants]:
        return "other variants or weights move units between arms"
    if (new.namespace, new.range) != (old.namespace, old.range):
        return "another namespace or range moves units"
    return None


def _save(reg: ExperimentRegistry, old: Experiment | None, new: Experiment, force: bool) -> Experiment:
    if old is not None and not force and old.active(datetime.now(UTC)) and old.traffic > 0:
        why = _moves_units(old, new)
        if why:
            raise HTTPException(
                409,
                f"experiment {old.id!r} is running and {why}: the units already assigned would change arm or leave, "
                "and its report would mix them. Fix: stop it and start a new experiment id, or send ?force=true",
            )
    try:
        return reg.upsert(new)
    except ValueError as e:  # another experiment conflicts (namespace overlap, same override)
        raise HTTPException(409, str(e)) from None


def _summary(e: Experiment) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {**e.model_dump(mode="json", exclude_none=True), "running": e.active(now) and e.traffic > 0}


@router.get("/v1/experiments")
def list_experiments(request: Request, principal: Principal = Depends(require_scope("read"))) -> dict[str, Any]:
    """Every experiment of the configured file, with `running` (inside start/stop and traffic > 0)."""
    reg = _registry(request)
    return {"experiments": [_summary(e) for e in _experiments(reg)]}


@router.get("/v1/experiments/{experiment_id}")
def experiment_report(
    experiment_id: str, request: Request, look_every: int = 100, principal: Principal = Depends(require_scope("read"))
) -> dict[str, Any]:
    """The experiment's report, computed from the recommendation log and the events now."""
    if not 1 <= look_every <= 100_000:
        raise HTTPException(422, f"look_every: {look_every} is out of range; give 1..100000 users")
    reg = _registry(request)
    exp = _find(reg, experiment_id)
    if exp is None:
        known = ", ".join(e.id for e in _experiments(reg)) or "none defined"
        raise HTTPException(404, f"no experiment {experiment_id!r}; known: {known}")
    return report(get_state(request).store, exp, look_every=look_every)


@router.put("/v1/experiments/{experiment_id}")
def put_experiment(
    experiment_id: str,
    body: dict[str, Any],
    request: Request,
    force: bool = False,
    principal: Principal = Depends(require_scope("admin")),
) -> dict[str, Any]:
    """Create or replace an experiment (the body: the experiment's fields, as in the TOML file)."""
    if body.get("id", experiment_id) != experiment_id:
        raise HTTPException(422, f"id: the body says {body.get('id')!r}, the path {experiment_id!r}; make them equal")
    try:
        new = Experiment.model_validate({**body, "id": experiment_id})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise HTTPException(422, f"{where}: {err['msg']}") from None
    reg = _registry(request)
    _ensure_file(reg)
    return _summary(_save(reg, _find(reg, experiment_id), new, force))


@router.patch("/v1/experiments/{experiment_id}")
def patch_experiment(
    experiment_id: str,
    body: ExperimentPatch,
    request: Request,
    force: bool = False,
    principal: Principal = Depends(require_scope("admin")),
) -> dict[str, Any]:
    """Change traffic, start, stop or description of an existing experiment."""
    reg = _registry(request)
    old = _find(reg, experiment_id)
    if old is None:
        raise HTTPException(404, f"no experiment {experiment_id!r}; create it with PUT first")
    try:
        new = Experiment.model_validate({**old.model_dump(), **body.model_dump(exclude_unset=True)})
    except ValidationError as e:
        err = e.errors()[0]
        raise HTTPException(422, f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    return _summary(_save(reg, old, new, force))


def _ensure_file(reg: ExperimentRegistry) -> None:
    """The first PUT may create the configured file."""
    if reg.path is not None and not Path(reg.path).exists():
        from shoprec.experiments import atomic_write, dump

        atomic_write(Path(reg.path), dump([]))
