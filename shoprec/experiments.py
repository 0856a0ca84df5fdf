"""Online A/B experiments: their definition (a TOML file), who gets which variant, and the hook the service calls.

An experiment is a set of variants, each a handful of recommend-request overrides (prompt variant, adapter, mode,
diversity, category cap, LLM backend). A unit (a user id, or an anonymous session id) is assigned by hashing:

- traffic: ``bucket = sha256("<salt>:<unit>") mod 10,000``; the unit is in the experiment when
  ``bucket < traffic * 10,000``. The same unit always lands in the same bucket (across requests, restarts and
  replicas: nothing is stored), and raising `traffic` only adds buckets, so ramping up never moves anyone out;
- variant: a second, independent hash, ``sha256("<salt>:variant:<unit>") mod 10,000``, cut by the variants'
  weights. Independent of the traffic bucket, so a ramp-up keeps the split (the newly added buckets are not a
  different population per variant);
- namespaces: experiments that must not share a unit (two tests of the prompt on the same page) name one
  `namespace` and each takes its own slice `range = [lo, hi)` of the namespace's 10,000 buckets, hashed with the
  namespace's name instead of the experiment's salt. The slices may not overlap, so a unit is in at most one of them.
  The experiment's traffic is then a share of all units, taken from the start of its slice.

The file is read again when it changes on disk (one `stat` per call), so an admin update made through one replica
reaches the others; writes are atomic (temp file + rename) under a lock file.

    [[experiment]]
    id = "terse-prompt"
    traffic = 0.5                       # half of all users
    endpoints = ["recommend"]
    [[experiment.variant]]
    name = "control"                    # the first variant is the control
    [[experiment.variant]]
    name = "terse"
    overrides = { prompt = "rank_terse" }
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import re
import threading
import tomllib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shoprec.config import ConfigError, Settings

_log = logging.getLogger("shoprec.experiments")

BUCKETS = 10_000
ENDPOINTS = ("recommend", "search", "chat")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def bucket(salt: str, unit_id: str) -> int:
    """The unit's bucket in [0, 10,000): the first 8 bytes of sha256("<salt>:<unit_id>") mod 10,000.

    The modulo bias of 2^64 mod 10,000 is below 1e-15: negligible."""
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Overrides(_Frozen):
    """The recommend-request fields a variant may set; each one left out keeps the request's (or service's) value.

    Names and bounds are those of `POST /v1/recommend`'s body, so a variant can only ask for what a caller could."""

    prompt: str | None = Field(default=None, description="Prompt template variant (a prompts/ file, e.g. rank_terse).")
    adapter: str | None = Field(
        default=None, max_length=64, description="Name of an adapter the server serves (its `adapters` setting)."
    )
    mode: Literal["retrieval", "score", "generate"] | None = Field(
        default=None, description="retrieval (no LLM) | score (one pass + reasons) | generate (full list)."
    )
    diversity: float | None = Field(default=None, ge=0, le=1, description="0 = pure relevance, 1 = most diverse.")
    method: Literal["none", "mmr", "dpp"] | None = Field(default=None, description="Diversity re-ranking method.")
    max_per_category: int | None = Field(default=None, ge=1, le=20, description="Most picks from one category.")
    min_categories: int | None = Field(default=None, ge=1, le=20, description="Distinct categories the picks span.")
    llm_weight: float | None = Field(
        default=None, ge=0, le=1, description="Share of the LLM's score in the relevance blend (score mode)."
    )
    backend: str | None = Field(default=None, description="LLM backend: transformers | fake | vllm (as configured).")

    @field_validator("prompt")
    @classmethod
    def _known_prompt(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from generator.prompts import PromptLibrary  # the prompts folder is data: list it, import nothing heavy

        variants = PromptLibrary().variants()
        if v not in variants:
            raise ValueError(f"unknown prompt variant {v!r}; available: {', '.join(variants)}")
        return v

    def as_dict(self) -> dict[str, Any]:
        """Only the fields this variant sets."""
        return self.model_dump(exclude_none=True)


class Variant(_Frozen):
    """One arm of an experiment."""

    name: str = Field(description="Variant name (lower-case letters, digits, '-', '_', '.'); the first one is control.")
    weight: float = Field(default=1.0, gt=0, description="Relative share of the experiment's units (1:1 by default).")
    overrides: Overrides = Field(default_factory=Overrides, description="Recommend-request settings this arm applies.")
    description: str = Field(default="", description="What this arm changes, for the report.")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"variant name {v!r} must be lower-case letters, digits, '-', '_' or '.' (max 64)")
        return v


class Experiment(_Frozen):
    """An online experiment: who is in it, which arms it has, and how it is read."""

    id: str = Field(description="Experiment id (lower-case letters, digits, '-', '_', '.'); used in the log and URLs.")
    description: str = Field(default="", description="The hypothesis, in one sentence.")
    # `[[experiment.variant]]` in the file (one table per arm), `variants` in Python and JSON
    variants: tuple[Variant, ...] = Field(
        validation_alias=AliasChoices("variant", "variants"),
        min_length=2,
        description="Two or more arms; the first is the control.",
    )
    traffic: float = Field(default=1.0, ge=0, le=1, description="Share of all units in the experiment (ramp up only).")
    salt: str | None = Field(default=None, description="Hash salt; default the id. A new salt reshuffles everyone.")
    endpoints: tuple[Literal["recommend", "search", "chat"], ...] = Field(
        default=("recommend",), min_length=1, description="Endpoints whose responses the experiment changes."
    )
    namespace: str | None = Field(default=None, description="Experiments in one namespace never share a unit.")
    range: tuple[float, float] | None = Field(
        default=None, description="The slice [lo, hi) of the namespace's units this experiment may use (0..1)."
    )
    start: datetime | None = Field(default=None, description="No assignment before this time (UTC); None: now.")
    stop: datetime | None = Field(default=None, description="No assignment from this time on (UTC); None: open.")
    primary_metric: Literal["ctr", "cart_rate", "purchase_rate"] = Field(
        default="ctr", description="The metric the verdict is about (per exposure, users as the unit)."
    )
    mde: float = Field(default=0.10, gt=0, le=10, description="Smallest relative lift worth detecting (0.10 = +10%).")
    baseline: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Expected control rate of the primary metric, to plan the sample size "
        "before data exists; None: planned from the control arm's observed rate and variance.",
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="False-positive rate of both tests.")
    power: float = Field(default=0.8, gt=0.5, lt=1, description="Power the planned sample size is for.")
    planned_users: int | None = Field(
        default=None, ge=2, description="Users (all arms) to run the fixed-horizon test at; None: planned from the MDE."
    )
    attribution_window_s: float = Field(
        default=1800.0,
        ge=0,
        description="An event without a recommendation_id counts for the user's latest "
        "exposure that showed the item within this many seconds before it.",
    )

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"experiment id {v!r} must be lower-case letters, digits, '-', '_' or '.' (max 64)")
        return v

    @field_validator("start", "stop")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            return v.replace(tzinfo=UTC)  # a TOML local datetime is read as UTC, like every timestamp here
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [v.name for v in self.variants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"variant name(s) {', '.join(sorted(dup))} used twice; give every variant its own name")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"endpoints {list(self.endpoints)} lists one twice")
        if self.range is not None:
            lo, hi = self.range
            if self.namespace is None:
                raise ValueError("range is a slice of a namespace; set namespace too, or drop range")
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"range {list(self.range)} must be [lo, hi) with 0 <= lo < hi <= 1")
            if self.traffic > hi - lo + 1e-12:
                raise ValueError(
                    f"traffic {self.traffic} is more than the slice range {list(self.range)} holds ({hi - lo:g}); "
                    "lower traffic or widen the range"
                )
        if self.start is not None and self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop {self.stop.isoformat()} is not after start {self.start.isoformat()}")
        return self

    @property
    def control(self) -> str:
        return self.variants[0].name

    @property
    def hash_salt(self) -> str:
        return self.salt or self.id

    def bucket_span(self) -> tuple[str, int, int]:
        """(salt of the traffic hash, first bucket, end bucket): the unit is in when first <= bucket < end."""
        if self.namespace is None:
            return self.hash_salt, 0, round(self.traffic * BUCKETS)
        lo = round((self.range or (0.0, 1.0))[0] * BUCKETS)
        return f"namespace:{self.namespace}", lo, lo + round(self.traffic * BUCKETS)

    def active(self, now: datetime) -> bool:
        return (self.start is None or self.start <= now) and (self.stop is None or now < self.stop)

    def in_experiment(self, unit_id: str) -> bool:
        """Whether the unit is in the experiment's traffic (ignores start/stop and endpoints)."""
        salt, lo, hi = self.bucket_span()
        return lo <= bucket(salt, unit_id) < hi

    def variant_of(self, unit_id: str) -> Variant:
        """The arm a unit in the experiment gets: the second, independent hash cut by the weights."""
        b = bucket(f"{self.hash_salt}:variant", unit_id)
        total = sum(v.weight for v in self.variants)
        edge = 0.0
        for v in self.variants:
            edge += v.weight / total * BUCKETS
            if b < edge:
                return v
        return self.variants[-1]  # float rounding at the very top bucket


class Assignment(_Frozen):
    """Which experiment and arm a unit is in, and the request overrides that arm applies."""

    experiment: str = Field(description="Experiment id.")
    variant: str = Field(description="Variant name.")
    overrides: dict[str, Any] = Field(description="Recommend-request fields to apply (only those the arm sets).")
    unit_id: str = Field(description="The unit that was assigned (user id or anonymous session id).")


class ExperimentsFile(_Frozen):
    """The whole experiments file: `[[experiment]]` tables."""

    experiment: tuple[Experiment, ...] = Field(default=(), description="Every experiment, in file order.")

    @model_validator(mode="after")
    def _exclusive(self) -> ExperimentsFile:
        ids = [e.id for e in self.experiment]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"experiment id(s) {', '.join(dup)} defined twice; ids must be unique")
        by_ns: dict[str, list[Experiment]] = {}
        for e in self.experiment:
            if e.namespace is not None:
                by_ns.setdefault(e.namespace, []).append(e)
        for ns, exps in by_ns.items():
            if len(exps) > 1 and any(e.range is None for e in exps):
                missing = next(e.id for e in exps if e.range is None)
                raise ValueError(
                    f"namespace {ns!r} holds {len(exps)} experiments but {missing!r} has no range; give each one "
                    f"its own slice, e.g. range = [0.0, 0.5] and range = [0.5, 1.0]"
                )
            spans = sorted((e.range or (0.0, 1.0), e.id) for e in exps)
            for (r1, id1), (r2, id2) in zip(spans, spans[1:], strict=False):
                if r2[0] < r1[1] - 1e-12:
                    raise ValueError(
                        f"experiments {id1!r} {list(r1)} and {id2!r} {list(r2)} overlap in namespace {ns!r}; "
                        "their ranges must not overlap"
                    )
        # Two experiments that can share a unit must not set the same request field on the same endpoint: the
        # served value would depend on which one wins, and both reports would be wrong.
        for i, a in enumerate(self.experiment):
            for b in self.experiment[i + 1 :]:
                if a.namespace is not None and a.namespace == b.namespace:
                    continue
                common = set(a.endpoints) & set(b.endpoints)
                fields = {k for v in a.variants for k in v.overrides.as_dict()} & {
                    k for v in b.variants for k in v.overrides.as_dict()
                }
                if common and fields:
                    raise ValueError(
                        f"experiments {a.id!r} and {b.id!r} both set {', '.join(sorted(fields))} on "
                        f"{', '.join(sorted(common))} and can share users; put them in one namespace with "
                        "separate ranges"
                    )
        return self


def _where(loc: Sequence[Any], data: dict[str, Any]) -> str:
    """'experiment[1] (id 'terse').variant[0].overrides.diversity' from a pydantic error location."""
    parts: list[str] = []
    node: Any = data
    for i, key in enumerate(loc):
        if isinstance(key, int):
            parts[-1] += f"[{key}]"
            row = node[key] if isinstance(node, list) and _has(node, key) else None
            if i == 1 and isinstance(row, dict) and "id" in row:
                parts[-1] += f" (id {row['id']!r})"
        else:
            parts.append(str(key))
        node = node[key] if isinstance(node, dict | list) and _has(node, key) else None
    return ".".join(parts)


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, dict):
        return key in node
    return isinstance(key, int) and 0 <= key < len(node)


def parse(data: dict[str, Any], source: str) -> ExperimentsFile:
    """Validate the TOML data of an experiments file; errors name the source, the experiment and the field."""
    unknown = set(data) - {"experiment"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}. Fix: define each experiment under "
            "[[experiment]] (docs/experiments.md)."
        )
    try:
        return ExperimentsFile(**data)
    except ValidationError as e:
        # a failed variant also makes its list "too short": report the cause, not that echo
        locs = [tuple(err["loc"]) for err in e.errors()]
        errors = [
            err
            for err, loc in zip(e.errors(), locs, strict=True)
            if not any(other[: len(loc)] == loc and other != loc for other in locs)
        ]
        shown = "; ".join(f"{_where(err['loc'], data)}: {err['msg']}" for err in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ConfigError(f"{source}: {shown}{more}. See docs/experiments.md for every field.") from None


def load(path: Path) -> ExperimentsFile:
    """Read and validate an experiments TOML file; a missing file is an error naming it and the fix."""
    if not path.is_file():
        raise ConfigError(
            f"experiments file {path} does not exist. Fix: create it (docs/experiments.md) or unset `experiments`."
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix the syntax at the position given.") from e
    return parse(data, str(path))


def dump(experiments: Iterable[Experiment]) -> str:
    """The experiments as TOML text that `load` reads back to the same objects."""
    import tomli_w

    rows = []
    for e in experiments:
        row = e.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        row["variant"] = [{k: v for k, v in var.items() if k != "overrides" or v} for var in row.pop("variants")]
        for var in row["variant"]:
            if "overrides" in var:
                var["overrides"] = {k: v for k, v in var["overrides"].items() if v is not None}
        for key in ("start", "stop"):  # TOML has a datetime type: keep it one
            if getattr(e, key) is not None:
                row[key] = getattr(e, key)
        rows.append(row)
    head = "# shoprec online experiments (docs/experiments.md). Written by `shoprec ab` / the admin API.\n"
    return head + tomli_w.dumps({"experiment": rows})


class ExperimentRegistry:
    """The experiments of one file (or of a fixed list), re-read when the file changes; thread-safe.

    `ExperimentRegistry(path)` for the service; `ExperimentRegistry.of([...])` for a list held in memory (tests)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._file = ExperimentsFile()
        self._broken = ""  # the last load error logged, so a broken file is logged once, not per request

    @classmethod
    def of(cls, experiments: Iterable[Experiment]) -> ExperimentRegistry:
        reg = cls(None)
        reg._file = ExperimentsFile(experiment=tuple(experiments))
        return reg

    def _current(self) -> ExperimentsFile:
        """The file's experiments, re-read when it changed; a missing or invalid file raises ConfigError."""
        if self.path is None:
            return self._file
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"experiments file {self.path} does not exist. Fix: create it (docs/experiments.md), or unset "
                "`experiments` in the config."
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._file = load(self.path)
                self._stamp = stamp
            return self._file

    def _serving(self) -> ExperimentsFile:
        """What requests are assigned by: like `_current`, but a file broken while serving (a typo in a hand edit,
        a deleted file) must not fail the shop's requests: the last good version keeps serving (before any good
        version: no experiments, everyone gets the default) and the error is logged once per change. The admin
        API and the CLI read `_current` and show the error."""
        try:
            return self._current()
        except ConfigError as e:
            with self._lock:
                if str(e) != self._broken:
                    self._broken = str(e)
                    kept = f"serving its last good version ({len(self._file.experiment)} experiments)"
                    _log.error("experiments: %s; %s until it is fixed", e, kept if self._stamp else "serving none")
                return self._file

    def experiments(self) -> tuple[Experiment, ...]:
        return self._current().experiment

    def get(self, experiment_id: str) -> Experiment:
        for e in self.experiments():
            if e.id == experiment_id:
                return e
        known = ", ".join(e.id for e in self.experiments()) or "none defined"
        raise KeyError(f"no experiment {experiment_id!r}; known: {known}")

    def assign_all(self, unit_id: str, endpoint: str, now: datetime | None = None) -> list[Assignment]:
        """Every running experiment on this endpoint that the unit is in (at most one per namespace)."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; valid: {', '.join(ENDPOINTS)}")
        if not unit_id:
            return []
        when = now or datetime.now(UTC)
        out = []
        for e in self._serving().experiment:
            if endpoint in e.endpoints and e.active(when) and e.in_experiment(unit_id):
                v = e.variant_of(unit_id)
                arm = Assignment(experiment=e.id, variant=v.name, overrides=v.overrides.as_dict(), unit_id=unit_id)
                out.append(arm)
        return out

    def assign(self, unit_id: str, endpoint: str, now: datetime | None = None) -> Assignment | None:
        """The unit's arm in the first running experiment on this endpoint that holds it, or None."""
        found = self.assign_all(unit_id, endpoint, now)
        return found[0] if found else None

    def upsert(self, experiment: Experiment) -> Experiment:
        """Create or replace an experiment in the file (atomically, under a lock file); returns it.

        A ramp-down, a new salt or changed variants of a running experiment are allowed but reshuffle or drop
        units: the caller (admin API, CLI) decides; this only keeps the file valid."""
        if self.path is None:
            with self._lock:
                self._file = _validated(_replaced(self._file.experiment, experiment))
            return experiment
        with _file_lock(self.path):
            current = load(self.path).experiment if self.path.is_file() else ()
            checked = _validated(_replaced(current, experiment))
            atomic_write(self.path, dump(checked.experiment))
        return experiment


def _replaced(current: Sequence[Experiment], experiment: Experiment) -> list[Experiment]:
    """`current` with `experiment` in place of the one with its id, or appended when it is new."""
    if any(e.id == experiment.id for e in current):
        return [experiment if e.id == experiment.id else e for e in current]
    return [*current, experiment]


def _validated(experiments: list[Experiment]) -> ExperimentsFile:
    try:
        return ExperimentsFile(experiment=tuple(experiments))
    except ValidationError as e:
        raise ConfigError(f"experiments: {e.errors()[0]['msg']}") from None


class _file_lock:
    """An exclusive advisory lock on '<file>.lock' (fcntl): one writer at a time across processes."""

    def __init__(self, path: Path) -> None:
        self.lock_path = path.with_name(path.name + ".lock")

    def __enter__(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_REGISTRIES: dict[Path, ExperimentRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()


def registry_for(settings: Settings) -> ExperimentRegistry | None:
    """The (cached, self-reloading) registry of the settings' experiments file; None when none is configured."""
    path = settings.experiments
    if path is None:
        return None
    key = Path(path).resolve()
    with _REGISTRIES_LOCK:
        if key not in _REGISTRIES:
            _REGISTRIES[key] = ExperimentRegistry(key)
        return _REGISTRIES[key]


def assign(
    settings_or_registry: Settings | ExperimentRegistry | None,
    unit_id: str | None,
    endpoint: str,
    now: datetime | None = None,
) -> Assignment | None:
    """The service's hook: the arm this unit gets on this endpoint, or None (no experiment, not in one, no unit).

    Call it once per request with the user id (or the anonymous session id) before applying the request's
    settings; apply `assignment.overrides` on top of them, and log the exposure with `experiment` and `variant`."""
    if settings_or_registry is None or not unit_id:
        return None
    reg = registry_for(settings_or_registry) if isinstance(settings_or_registry, Settings) else settings_or_registry
    return reg.assign(unit_id, endpoint, now) if reg is not None else None


# ------------------------------------------------------------------------------------------------------------------
# The report: the store's recommendation log and events -> eval.online_ab
# ------------------------------------------------------------------------------------------------------------------


def design_of(experiment: Experiment) -> Any:
    """The analysis design (eval.online_ab.Design) of an experiment's config."""
    from eval.online_ab import Design

    return Design(
        variants=tuple(v.name for v in experiment.variants),
        weights=tuple(v.weight for v in experiment.variants),
        primary_metric=experiment.primary_metric,
        alpha=experiment.alpha,
        power=experiment.power,
        mde=experiment.mde,
        baseline=experiment.baseline,
        planned_users=experiment.planned_users,
        attribution_window_s=experiment.attribution_window_s,
    )


def _valid(log: Any) -> bool:
    """A served list is valid when it holds the k distinct items asked for (a fallback list counts when it does)."""
    items = tuple(log.items)
    k = (log.request or {}).get("k")
    return len(set(items)) == len(items) and (k is None or len(items) == k)


def report(store: Any, experiment: Experiment, *, look_every: int = 100) -> dict[str, Any]:
    """Read the experiment's exposures and the events that follow them from the store; analyse them.

    Exposures: `store.recommendations(experiment=id)`. Events: those carrying one of these recommendation ids
    (`store.events_for_recommendations`), plus each exposed user's events without one (their history), which
    the attribution window may credit."""
    from eval.online_ab import Exposure, Outcome, analyse

    logs = store.recommendations(experiment=experiment.id)
    exposures = [
        Exposure(
            rec_id=log.id,
            user_id=log.user_id or log.unit_id or log.id,  # events name the user: attribution by window
            variant=log.variant or "?",
            ts=log.created_at.timestamp(),
            items=tuple(log.items),
            latency_ms=log.latency_ms,
            fallback=bool(log.fallback),
            valid=_valid(log),
        )
        for log in logs
    ]
    ids = {e.rec_id for e in exposures}
    outcomes: list[Any] = []
    for ev in store.events_for_recommendations(ids):
        ts = ev.timestamp.timestamp() if ev.timestamp else None
        outcomes.append(Outcome(ev.user_id, ev.item_id, str(ev.type), ts, ev.recommendation_id))
    if experiment.attribution_window_s > 0:
        first: dict[str, float] = {}
        for log in logs:
            if log.user_id:
                first[log.user_id] = min(first.get(log.user_id, math.inf), log.created_at.timestamp())
        for user, since in sorted(first.items()):
            for ev in store.history(user):  # only what followed the user's first exposure can be credited
                if ev.recommendation_id is None and ev.timestamp is not None and ev.timestamp.timestamp() >= since:
                    outcomes.append(Outcome(ev.user_id, ev.item_id, str(ev.type), ev.timestamp.timestamp(), None))
    result = analyse(design_of(experiment), exposures, outcomes, look_every=look_every)
    result["experiment"] = experiment.model_dump(mode="json", exclude_none=True)
    result["generated_at"] = datetime.now(UTC).isoformat()
    return result
