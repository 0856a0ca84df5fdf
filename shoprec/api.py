"""The HTTP service: `create_app(settings)` -> a FastAPI app serving recommend, search, events, items and keys.

`shoprec serve` runs it under uvicorn (shoprec/cli_serve.py); docs/service.md shows every endpoint with real output.

The pieces, for whoever adds a router (the chat page, A/B experiments):
- `AppState` (one per process, `get_state(request)`): the `Shoprec` core (store, settings), the live index, the
  recommenders and the LLM batcher, the metrics and the rate limiter.
- `require_scope("read" | "write" | "admin")`: the auth dependency; it returns the calling `Principal`.
- `apply_experiment(...)`: where an experiment assignment overrides a recommend request's generator settings; its
  decision is stored in the recommendation log with what was shown.
- `create_app(settings, routers=[...])` includes extra routers, so a feature plugs in without editing this file.

Request bodies are strict pydantic models with bounds; a bad field gets one 422 message naming the field and the
limit. Capacity never shows as a 5xx: past the LLM queue's bound or the time budget a recommend request gets the
retrieval ranking flagged `fallback`, or, with `overload = "reject"` (a setting, or per request), 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from generator.recommender import GeneratorConfig
from generator.types import Recommendation
from retrieval.base import Ranked, retrieve_ranked
from retrieval.types import Candidate, Filters, Interaction, Item, RetrievalRequest
from shoprec.auth import KeyVerifier, Principal, TokenBucket, require_scope, validate_scopes
from shoprec.config import Settings
from shoprec.metrics import Metrics
from shoprec.service import RequestError, Shoprec
from shoprec.serving import Batcher, BudgetExceeded, Overloaded

_T = TypeVar("_T")

__all__ = ["AppState", "Principal", "apply_experiment", "create_app", "get_state", "require_scope"]

log = logging.getLogger("shoprec.api")

# Bounds of a request: each is the limit a 422 names. Generous for a shop, small enough that one request cannot
# take a CPU for seconds or a batch of events cannot take the writer for long.
MAX_ID_CHARS = 128
MAX_QUERY_CHARS = 500
MAX_CART = 50
MAX_HISTORY = 200  # newest events of a user read per request (the prompt shows ~10)
MAX_EVENTS_PER_BATCH = 1000
MAX_SEARCH_K = 100
MAX_BODY_BYTES = 2_000_000
# Time kept back from the budget for what follows the model's answer (the log write, the response).
_FALLBACK_RESERVE_S = 0.05

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------------------------------------------
# Request and response bodies
# ----------------------------------------------------------------------------------------------------------------


class FiltersIn(_Strict):
    """Hard filters: an item that fails one never appears."""

    categories: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=20, description="Keep items under one of these category prefixes."
    )
    min_price: float | None = Field(default=None, ge=0, description="Keep items priced at least this.")
    max_price: float | None = Field(default=None, ge=0, description="Keep items priced at most this.")
    in_stock: bool = Field(default=False, description="Only items in stock.")
    include_seen: bool = Field(default=False, description="Also return items already in the user's history.")

    def to_filters(self) -> Filters:
        try:
            return Filters(
                categories=tuple(self.categories),
                min_price=self.min_price,
                max_price=self.max_price,
                in_stock_only=self.in_stock,
                exclude_history=not self.include_seen,
            )
        except ValueError as e:
            raise RequestError(f"filters: {_first_message(e)}") from None


class RecommendIn(_Strict):
    """A recommendation request: for a user (history from the store), a query and/or a cart."""

    user: Id | None = Field(default=None, description="User id; unknown users get the cold-start answer.")
    session: Id | None = Field(
        default=None,
        description="An anonymous shopper's session id (opaque, no personal data): experiments assign by it when no "
        "user is given, so the shopper sees one variant for the whole session.",
    )
    query: str | None = Field(default=None, max_length=MAX_QUERY_CHARS, description="What the shopper asked for.")
    cart: list[Id] = Field(default_factory=list, max_length=MAX_CART, description="Item ids in the cart.")
    filters: FiltersIn = Field(default_factory=FiltersIn, description="Hard filters.")
    k: int = Field(default=5, ge=1, le=20, description="How many picks.")
    mode: Literal["retrieval", "score", "generate"] = Field(
        default="score",
        description="'retrieval': fused retrieval + diversity, no model (fastest); 'score': one LLM scoring pass + "
        "reasons; 'generate': the LLM writes the list.",
    )
    diversity: float = Field(default=0.3, ge=0, le=1, description="0 = pure relevance, 1 = most diverse.")
    diversity_method: Literal["none", "mmr", "dpp"] = Field(default="mmr", description="Diversity re-ranking.")
    max_per_category: int | None = Field(default=2, ge=1, le=20, description="At most this many per category.")
    min_categories: int | None = Field(default=None, ge=1, le=20, description="At least this many categories.")
    category_level: int = Field(default=1, ge=1, le=5, description="Category depth the caps count at.")
    adapter: str | None = Field(
        default=None, max_length=64, description="Name of a configured adapter (settings `adapters`); none: default."
    )
    overload: Literal["fallback", "reject"] | None = Field(
        default=None,
        description="Past the model's capacity, in 'score' and 'generate' modes: 'fallback' answers at once with the "
        "retrieval ranking flagged `fallback`; 'reject' answers 429 with Retry-After (when the model should have "
        "room), for a client that would rather wait for the model. Default: the server's `overload` setting.",
    )


class SearchIn(_Strict):
    """Product search, optionally personalised with the user's history."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="What the shopper typed.")
    user: Id | None = Field(default=None, description="Personalise with this user's history.")
    k: int = Field(default=10, ge=1, le=MAX_SEARCH_K, description="How many results.")
    filters: FiltersIn = Field(default_factory=FiltersIn, description="Hard filters.")


class EventIn(_Strict):
    """One shopper event."""

    user_id: Id = Field(description="Pseudonymous user id.")
    item_id: Id = Field(description="Id of an item in the catalog.")
    type: Literal["view", "click", "cart", "purchase", "rating"] = Field(
        default="view", description="What the user did ('click' is stored as a view)."
    )
    value: float | None = Field(default=None, description="Rating value or quantity.")
    timestamp: datetime | None = Field(default=None, description="When it happened (ISO 8601); default: now.")
    event_id: Id | None = Field(
        default=None, description="The client's id for this event: a retried batch is not counted twice."
    )
    recommendation_id: Id | None = Field(
        default=None, description="The recommendation_id this event follows from (attribution)."
    )


class EventsIn(_Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH, description="The batch.")


class EventsOut(_Strict):
    accepted: int = Field(description="Events in the batch, all durably stored.")
    new: int = Field(description="Events stored for the first time.")
    duplicates: int = Field(description="Events whose event_id was already stored (not counted again).")


class ItemIn(_Strict):
    """A product, as PUT /v1/items/{id} creates or replaces it."""

    title: str = Field(min_length=1, max_length=500, description="Product title.")
    category: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=10, description="Category path, root to leaf."
    )
    brand: str = Field(default="", max_length=200, description="Brand; empty when unknown.")
    price: float | None = Field(default=None, ge=0, description="Price; none when unknown.")
    description: str = Field(default="", max_length=10_000, description="Free-text description.")
    attributes: dict[str, str] = Field(default_factory=dict, max_length=50, description="Extra facts.")
    in_stock: bool = Field(default=True, description="Whether it can be sold now.")
    created_at: datetime | None = Field(default=None, description="When it entered the catalog.")


class ItemPatch(_Strict):
    """Fields to change on an existing product; the others keep their values."""

    title: str | None = Field(default=None, min_length=1, max_length=500, description="Product title.")
    category: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=10, description="Category path, root to leaf."
    )
    brand: str | None = Field(default=None, max_length=200, description="Brand.")
    price: float | None = Field(default=None, ge=0, description="Price.")
    description: str | None = Field(default=None, max_length=10_000, description="Description.")
    attributes: dict[str, str] | None = Field(default=None, max_length=50, description="Extra facts.")
    in_stock: bool | None = Field(default=None, description="Whether it can be sold now.")


class KeyIn(_Strict):
    name: str = Field(min_length=1, max_length=100, description="Who the key is for.")
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1, max_length=3, description="Its scopes.")


class Signal(_Strict):
    rank: int = Field(description="The item's rank in this retriever's list.")
    score: float = Field(description="The retriever's raw score.")


class PickOut(_Strict):
    rank: int = Field(description="1-based position.")
    item_id: str = Field(description="Catalog id.")
    title: str = Field(description="Product title.")
    category: str = Field(description="Category path.")
    price: float | None = Field(description="Price.")
    score: float = Field(description="Ranking score (higher is better).")
    reason: str = Field(description="Why this item, grounded in the shopper's data.")
    signals: dict[str, Signal] = Field(description="The retrievers that found it, with their rank and score.")


class RecommendOut(_Strict):
    recommendation_id: str = Field(description="Send it back with the events that follow (attribution).")
    mode: str = Field(description="How the ranking was produced: retrieval | score | generate.")
    fallback: bool = Field(description="True when the model could not answer and the retrieval ranking served.")
    fallback_reason: str | None = Field(description="Why the fallback served.")
    picks: list[PickOut] = Field(description="The picks in rank order.")
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage, and 'total'.")
    experiment: dict[str, Any] | None = Field(default=None, description="The experiment arm that served, if any.")


class SearchHit(_Strict):
    rank: int
    item_id: str
    title: str
    category: str
    brand: str
    price: float | None
    in_stock: bool
    score: float
    signals: dict[str, Signal]


class SearchOut(_Strict):
    query: str
    user: str | None
    results: list[SearchHit]
    timings_ms: dict[str, float]


# ----------------------------------------------------------------------------------------------------------------
# Application state
# ----------------------------------------------------------------------------------------------------------------


_WIDE_K = 200  # the recommender's widest retrieval (generator.recommender: _retrieve_feasible)
_Evidence = tuple[tuple[str, int, float], ...]  # a candidate's (signal, rank, score) per signal


class _RememberingRetriever:
    """The live index, remembering what recent requests retrieved: a pick's `signals` come from it.

    The recommender returns picks without the retrieval evidence; asking the index again would double the work.
    What is kept per request is the `Ranked` list (arrays and ids, a handful of objects; the picks' evidence is
    built from it when asked, once: `evidence` removes it). A bounded map of recent requests' Candidate objects
    (2,048 x 200 candidates, ~3M objects) once made every full GC pass take 0.5 s with the GIL held, and stalled
    every request in flight (the load benchmark's p99 at 16 clients).
    """

    def __init__(self, index: Any, size: int = 256) -> None:
        self.index = index
        self._seen: OrderedDict[RetrievalRequest, Ranked] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def catalog(self) -> Any:
        return self.index.catalog

    @property
    def item_vectors(self) -> Any:
        return getattr(self.index, "item_vectors", None)

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        return self.ranked(request, k).candidates()

    def ranked(self, request: RetrievalRequest, k: int) -> Ranked:
        # A chat turn probes the top n_candidates, then the recommender asks for 200 (its widening list): fetch the
        # wider list once and cut it for the other call of the SAME request object (same thread, a moment later:
        # never stale). Exact only while a top-k is a prefix of a wider top-k, i.e. without reserved new-item places.
        last = getattr(self._local, "last", None)
        if last is not None and last[0] is request and k <= last[1]:
            out: Ranked = last[2].head(k)
        else:
            fusion_config = getattr(getattr(self.index, "fusion", None), "config", None)
            prefix_safe = not getattr(fusion_config, "new_item_share", 1)
            fetch = max(k, _WIDE_K) if prefix_safe else k
            out = retrieve_ranked(self.index, request, fetch)
            if prefix_safe:
                self._local.last = (request, fetch, out)
                out = out.head(k)
        with self._lock:
            kept = self._seen.get(request)
            if kept is None or len(kept) <= len(out):  # the longest list asked for: the picks may come from its tail
                self._seen[request] = out
            self._seen.move_to_end(request)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return out

    def evidence(self, request: RetrievalRequest, item_ids: Sequence[str]) -> dict[str, _Evidence]:
        """item id -> (signal, rank, score) per signal, for those of `item_ids` that `request` retrieved; read once."""
        with self._lock:
            got = self._seen.pop(request, None)
        return got.evidence(item_ids) if got is not None else {}


@dataclass
class AppState:
    """Everything one server process holds; `get_state(request)` returns it inside an endpoint."""

    settings: Settings
    core: Shoprec
    metrics: Metrics
    limiter: TokenBucket
    verifier: KeyVerifier
    live: Any = None  # retrieval.live.LiveIndex once loaded
    retriever: _RememberingRetriever | None = None
    batcher: Batcher | None = None
    cpu: Any = None  # anyio.CapacityLimiter(settings.cpu_threads), made in the lifespan (it needs the event loop)
    ready: bool = False
    started_at: float = field(default_factory=time.time)
    _recommenders: dict[tuple[str | None, bool], Any] = field(default_factory=dict)
    _rec_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self) -> Any:
        return self.core.store

    @property
    def catalog(self) -> Any:
        return self.live.catalog

    def adapter_path(self, name: str | None) -> str | None:
        """A request's adapter name -> its folder; only configured adapters are loadable."""
        if name is None:
            return self.settings.adapter
        if name not in self.settings.adapters:
            valid = ", ".join(sorted(self.settings.adapters)) or "none configured"
            raise RequestError(f"adapter: unknown adapter {name!r}; configured adapters: {valid}")
        return self.settings.adapters[name]

    def recommender(self, adapter: str | None, use_llm: bool) -> Any:
        """The pipeline over the live index (one per adapter), its catalog and vectors kept current."""
        use_llm = use_llm and self.settings.llm_backend != "none"  # 'none': retrieval answers every mode
        key = (adapter, use_llm)
        with self._rec_lock:
            rec = self._recommenders.get(key)
            if rec is None:
                rec = self.core.recommender(use_llm=use_llm, retriever=self.retriever, adapter=adapter)
                self._recommenders[key] = rec
        # new items reach the pipeline without a rebuild: the live index swaps its catalog and vectors
        rec.catalog = self.live.catalog
        vectors = getattr(self.live, "item_vectors", None)
        if vectors is not None:
            rec.item_vectors = vectors
        return rec

    def run_batch(
        self, key: Hashable, requests: Sequence[RetrievalRequest], config: GeneratorConfig
    ) -> list[Recommendation]:
        adapter = key[0] if isinstance(key, tuple) else None
        return self.recommender(adapter, use_llm=True).recommend_batch(requests, config)  # type: ignore[no-any-return]

    def observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.llm_seconds.observe(seconds)
        self.metrics.llm_batch_size.observe(size)

    def sync(self) -> None:
        """Pull writes made by other processes (replicas, workers) from the store into the live index."""
        sync = getattr(self.live, "sync", None)
        if sync is not None:
            sync(self.store)


def get_state(request: Request) -> AppState:
    """The process's AppState (a FastAPI dependency: `state: AppState = Depends(get_state)`)."""
    state: AppState = request.app.state.shoprec
    return state


# ----------------------------------------------------------------------------------------------------------------
# The experiment hook
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentDecision:
    """What an experiment assignment decided for one request; `info` goes into the recommendation log."""

    mode: str
    config: GeneratorConfig
    adapter: str | None
    info: dict[str, Any] | None


# experiments.Overrides names (the recommend body's) -> GeneratorConfig fields
_OVERRIDE_FIELDS = {
    "prompt": "variant",
    "diversity": "diversity",
    "method": "diversity_method",
    "llm_weight": "llm_weight",
}
_CONSTRAINT_FIELDS = {"max_per_category": "max_per_category", "min_categories": "min_categories"}


def apply_experiment(
    settings: Settings, *, unit_id: str, endpoint: str, mode: str, config: GeneratorConfig, adapter: str | None
) -> ExperimentDecision:
    """Let an online experiment override a request's generator settings.

    When `shoprec.experiments` exists, `experiments.assign(settings, unit_id, endpoint)` returns None (no
    experiment) or an assignment with `experiment` (id), `variant` (arm name) and `overrides` (the recommend body's
    names: mode, adapter, prompt, diversity, method, max_per_category, min_categories, llm_weight). The overrides
    replace the request's values; `{"experiment", "variant"}` is stored in the recommendation log and returned in
    the response. A `backend` override is not served by this process (one backend per deployment): refused.
    """
    try:
        from shoprec import experiments
    except ImportError:
        return ExperimentDecision(mode, config, adapter, None)
    assignment = experiments.assign(settings, unit_id, endpoint)
    if assignment is None:
        return ExperimentDecision(mode, config, adapter, None)
    overrides = dict(getattr(assignment, "overrides", None) or {})
    backend = overrides.pop("backend", None)
    if backend is not None and backend != settings.llm_backend:
        raise RequestError(
            f"experiment {assignment.experiment!r} variant {assignment.variant!r} asks for backend {backend!r}; this "
            f"server runs {settings.llm_backend!r}. Fix: serve that arm from a deployment with that backend"
        )
    mode = str(overrides.pop("mode", mode))
    adapter = overrides.pop("adapter", adapter)
    update = {field: overrides[name] for name, field in _OVERRIDE_FIELDS.items() if name in overrides}
    constraint = {field: overrides[name] for name, field in _CONSTRAINT_FIELDS.items() if name in overrides}
    if update or constraint:
        merged = {**config.model_dump(), **update}
        merged["constraint"] = {**merged["constraint"], **constraint}
        try:
            config = GeneratorConfig.model_validate(merged)
        except ValueError as e:
            raise RequestError(f"experiment {assignment.experiment!r}: {_first_message(e)}") from None
    info = {"experiment": assignment.experiment, "variant": assignment.variant}
    return ExperimentDecision(mode, config, adapter, info)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def _first_message(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            return str(errs[0].get("msg", e)).removeprefix("Value error, ")
    return str(e)


def _describe_error(err: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic error -> {field, message}: the field path without the 'body' prefix, and the limit."""
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # where FastAPI found it, not part of the name
        loc = loc[1:]
    name = ".".join(loc) or "body"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    got = err.get("input")
    if err.get("type") in ("string_too_long", "too_long") and isinstance(got, str | list | dict):
        msg += f" (got {len(got)})"
    elif err.get("type") == "json_invalid":
        msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    elif isinstance(got, int | float | str) and not isinstance(got, bool) and len(str(got)) <= 40:
        msg += f" (got {got!r})"
    return {"field": name, "message": msg}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_describe_error(e) for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


# ----------------------------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------------------------

router = APIRouter()


def _pick_rows(state: AppState, request: RetrievalRequest, rec: Recommendation) -> list[PickOut]:
    catalog = state.catalog
    ids = [p.item_id for p in rec.picks]
    evidence = state.retriever.evidence(request, ids) if state.retriever is not None else {}
    rows = []
    for p in rec.picks:
        item = catalog[p.item_id]
        signals = {n: Signal(rank=rank, score=round(score, 6)) for n, rank, score in evidence.get(p.item_id, ())}
        rows.append(
            PickOut(
                rank=p.rank,
                item_id=p.item_id,
                title=item.title,
                category=" > ".join(item.category),
                price=item.price,
                score=round(p.score, 6),
                reason=p.reason,
                signals=signals,
            )
        )
    return rows


def _generator_config(state: AppState, body: RecommendIn, adapter: str | None) -> GeneratorConfig:
    """The request's generator settings on top of the adapter's (its fitted blend and prompt settings)."""
    base = state.recommender(adapter, use_llm=False).config
    try:
        return GeneratorConfig.model_validate(
            {
                **base.model_dump(exclude={"constraint"}),
                "mode": body.mode if body.mode != "retrieval" else "score",
                "k": body.k,
                "diversity": body.diversity,
                "diversity_method": body.diversity_method,
                "constraint": {
                    "max_per_category": body.max_per_category,
                    "min_categories": body.min_categories,
                    "level": body.category_level,
                },
                "timeout_s": state.settings.request_budget_s,
            }
        )
    except ValueError as e:
        raise RequestError(f"recommend settings: {_first_message(e)}") from None


async def _recommend(
    state: AppState,
    request: RetrievalRequest,
    cfg: GeneratorConfig,
    mode: str,
    adapter: str | None,
    t0: float,
    overload: str,
) -> Recommendation:
    """An LLM mode's answer, through the batcher, with the fallback past capacity or budget (retrieval mode is
    answered by `recommend` itself, in one hop to a CPU thread).

    The retrieval answer (with its grounded reasons) is computed first: it is the fallback, ready
    the moment the queue refuses the request or its budget runs out, so a fallback never adds to the latency
    (on a starved CPU a second retrieval pass after the budget could take seconds). It costs one retrieval pass,
    a few per cent of a model call.

    `overload` 'reject' refuses at admission (429 + Retry-After) without that retrieval pass. A request the queue
    admitted but the model answered too late still gets the fallback: after waiting its budget, a refusal would
    only make the client wait again."""
    retrieval = state.recommender(adapter, use_llm=False)
    base: Recommendation | None = None
    if overload == "fallback":  # 'reject' refuses without this work
        base = await _on_cpu(state, retrieval.recommend, request, cfg)
    assert state.batcher is not None
    budget = state.settings.request_budget_s - (time.monotonic() - t0) - _FALLBACK_RESERVE_S
    if budget <= 0:
        cause, reason = "budget", "time budget: spent before the model was asked"
    else:
        try:
            rec = await state.batcher.submit(
                request, cfg.model_copy(update={"mode": mode}), key=(adapter, mode, cfg), budget_s=budget
            )
            if rec.fallback:
                state.metrics.fallbacks.labels(cause="model").inc()
            return rec
        except Overloaded as e:
            if overload == "reject":
                state.metrics.rejected.inc()
                # 429, not 503: the request was fine and the server is up; the client is asked to come back later
                # (clients such as urllib3's Retry honour Retry-After on 429)
                raise HTTPException(
                    429,
                    f"{e}; retry later or ask for mode 'retrieval'",
                    headers={"Retry-After": str(max(1, round(e.retry_after_s)))},
                ) from None
            cause, reason = "overload", f"over capacity: {e}"
        except BudgetExceeded as e:
            cause, reason = "budget", f"time budget: {e}"
    state.metrics.fallbacks.labels(cause=cause).inc()
    if base is None:  # 'reject' mode, past the budget
        base = await _on_cpu(state, retrieval.recommend, request, cfg)
    assert base is not None
    return base.model_copy(update={"fallback": True, "fallback_reason": reason})


async def _on_cpu(state: AppState, fn: Callable[..., _T], *args: Any) -> _T:
    """Run a request's CPU work (retrieval, fusion, logging) on the process's `cpu_threads` threads.

    Why not the default pool (40 threads): CPU-bound Python threads only take turns at the GIL, and 16 of them
    thrash (switches, cache misses) where 2 queue in the event loop and finish sooner: on the 2-core box at 16
    clients, 40 threads gave 56 requests/s (p50 227 ms), 2 threads 71 (p50 155 ms; eval/results/load-*.json)."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=state.cpu)


def _log_recommendation(
    state: AppState,
    rec_id: str,
    body: RecommendIn,
    principal: Principal,
    rec: Recommendation,
    experiment: dict[str, Any] | None,
    unit_id: str,
    latency_ms: float,
) -> None:
    """Store what was shown under the recommendation_id (the events that follow name it: attribution, A/B)."""
    from retrieval.store import RecommendationLog

    state.store.log_recommendation(
        RecommendationLog(
            id=rec_id,
            endpoint="recommend",
            user_id=body.user,
            unit_id=unit_id,
            items=tuple(p.item_id for p in rec.picks),
            mode=rec.mode,
            fallback=rec.fallback,
            experiment=experiment.get("experiment") if experiment else None,
            variant=experiment.get("variant") if experiment else None,
            request=body.model_dump(mode="json", exclude_defaults=True),
            latency_ms=latency_ms,
        )
    )


@router.post("/v1/recommend", response_model=RecommendOut, tags=["recommend"])
async def recommend(
    body: RecommendIn, request: Request, principal: Principal = Depends(require_scope("read"))
) -> RecommendOut:
    """Ranked, justified, diverse picks for a user, a query and/or a cart."""
    state = get_state(request)
    t0 = time.monotonic()
    adapter_path = state.adapter_path(body.adapter)
    cfg = _generator_config(state, body, adapter_path)
    # the experiment unit: the user, else the anonymous session, else the API key (a key without sessions is one unit)
    unit_id = body.user or body.session or principal.id
    decision = apply_experiment(
        state.settings,
        unit_id=unit_id,
        endpoint="recommend",
        mode=body.mode,
        config=cfg,
        adapter=adapter_path,
    )
    make_request = functools.partial(
        state.core.request,
        user=body.user,
        query=body.query,
        cart=body.cart,
        filters=body.filters.to_filters(),
        catalog=state.catalog,
        history_limit=MAX_HISTORY,
    )

    def answer(retrieval_request: RetrievalRequest, rec: Recommendation) -> RecommendOut:
        """Store what is shown under a new recommendation_id, and the response (CPU work: on a CPU thread)."""
        rec_id = uuid.uuid4().hex
        total_ms = round((time.monotonic() - t0) * 1000, 1)
        _log_recommendation(state, rec_id, body, principal, rec, decision.info, unit_id, total_ms)
        return RecommendOut(
            recommendation_id=rec_id,
            mode=rec.mode,
            fallback=rec.fallback,
            fallback_reason=rec.fallback_reason,
            picks=_pick_rows(state, retrieval_request, rec),
            timings_ms={**rec.timings_ms, "total": total_ms},
            experiment=decision.info,
        )

    def retrieval_answer() -> RecommendOut:
        retrieval_request = make_request()
        try:
            rec = state.recommender(decision.adapter, use_llm=False).recommend(retrieval_request, decision.config)
        except ValueError as e:  # e.g. fewer candidates match the filters than k
            raise RequestError(str(e)) from None
        return answer(retrieval_request, rec)

    if decision.mode == "retrieval":
        # the whole answer in ONE hop to a CPU thread: each hop is an event-loop wake-up and two GIL hand-offs;
        # three hops -> one took 16 clients from 225 to 244 answers/s (one process, eval/bench/load.py)
        out = await _on_cpu(state, retrieval_answer)
    else:
        retrieval_request = await _on_cpu(state, make_request)
        try:
            overload = body.overload or state.settings.overload
            rec = await _recommend(
                state, retrieval_request, decision.config, decision.mode, decision.adapter, t0, overload
            )
        except ValueError as e:
            raise RequestError(str(e)) from None
        out = await _on_cpu(state, answer, retrieval_request, rec)
    state.metrics.recommendations.labels(mode=decision.mode).inc()
    return out


@router.post("/v1/search", response_model=SearchOut, tags=["recommend"])
async def search(body: SearchIn, request: Request, principal: Principal = Depends(require_scope("read"))) -> SearchOut:
    """Product search (BM25 + dense, fused), personalised when a user is given."""
    state = get_state(request)
    return await _on_cpu(state, _search, state, body)


def _search(state: AppState, body: SearchIn) -> SearchOut:
    t0 = time.monotonic()
    req = state.core.request(
        user=body.user,
        query=body.query,
        filters=body.filters.to_filters(),
        catalog=state.catalog,
        history_limit=MAX_HISTORY,
    )
    catalog = state.catalog
    hits = []
    for rank, c in enumerate(state.live.retrieve(req, body.k), start=1):
        item = catalog[c.item_id]
        hits.append(
            SearchHit(
                rank=rank,
                item_id=c.item_id,
                title=item.title,
                category=" > ".join(item.category),
                brand=item.brand,
                price=item.price,
                in_stock=item.in_stock,
                score=round(c.score, 6),
                signals={n: Signal(rank=e.rank, score=round(e.score, 6)) for n, e in c.sources.items()},
            )
        )
    return SearchOut(
        query=body.query, user=body.user, results=hits, timings_ms={"total": round((time.monotonic() - t0) * 1000, 1)}
    )


def _interaction(ev: EventIn, now: datetime) -> Interaction:
    fields: dict[str, Any] = {
        "user_id": ev.user_id,
        "item_id": ev.item_id,
        "type": "view" if ev.type == "click" else ev.type,
        "value": ev.value,
        "timestamp": ev.timestamp or now,
    }
    return Interaction(**fields, event_id=ev.event_id, recommendation_id=ev.recommendation_id)


@router.post("/v1/events", response_model=EventsOut, tags=["events"])
def events(body: EventsIn, request: Request, principal: Principal = Depends(require_scope("write"))) -> EventsOut:
    """A batch of shopper events: stored durably (one transaction) before the answer; the next recommendation
    sees them."""
    state = get_state(request)
    now = datetime.now(UTC)
    try:
        # events without a timestamp get 'now', one microsecond apart: the batch's order is kept, and two equal
        # events in one batch stay two events (the store dedupes on user, item, type and time)
        batch = [_interaction(ev, now + timedelta(microseconds=i)) for i, ev in enumerate(body.events)]
    except ValueError as e:
        raise RequestError(f"events: {_first_message(e)}") from None
    result = state.store.add_events(batch)
    new = int(getattr(result, "new", result))
    duplicates = int(getattr(result, "duplicates", 0))
    state.metrics.events.labels(kind="new").inc(new)
    state.metrics.events.labels(kind="duplicate").inc(duplicates)
    _apply_events(state, batch)
    return EventsOut(accepted=len(batch), new=new, duplicates=duplicates)


def _apply_events(state: AppState, batch: list[Interaction]) -> None:
    """Make the write visible to this process's next request (other processes pull it on their next sync)."""
    if hasattr(state.live, "sync"):
        state.sync()
    elif hasattr(state.live, "apply_events"):
        state.live.apply_events(batch)


def _item_out(item: Item) -> dict[str, Any]:
    return item.model_dump(mode="json")


@router.put("/v1/items/{item_id}", tags=["items"])
def put_item(
    item_id: Id, body: ItemIn, request: Request, principal: Principal = Depends(require_scope("admin"))
) -> dict[str, Any]:
    """Create or replace a product; it is searchable and recommendable at once."""
    state = get_state(request)
    try:
        item = Item(id=item_id, **body.model_dump())
    except ValueError as e:
        raise RequestError(f"item: {_first_message(e)}") from None
    state.store.upsert_items([item])
    state.sync()
    return _item_out(item)


@router.patch("/v1/items/{item_id}", tags=["items"])
def patch_item(
    item_id: Id, body: ItemPatch, request: Request, principal: Principal = Depends(require_scope("admin"))
) -> dict[str, Any]:
    """Change some fields of a product (price, stock, ...)."""
    state = get_state(request)
    fields = body.model_dump(exclude_unset=True)
    if not fields:
        raise RequestError("body: give at least one field to change (e.g. price, in_stock)")
    if "category" in fields:
        fields["category"] = tuple(fields["category"])
    if state.store.item(item_id) is None:
        raise HTTPException(404, f"no item {item_id!r}; create it with PUT /v1/items/{item_id}")
    item = state.store.patch_item(item_id, fields)
    state.sync()
    return _item_out(item)


@router.delete("/v1/items/{item_id}", tags=["items"])
def delete_item(
    item_id: Id, request: Request, principal: Principal = Depends(require_scope("admin"))
) -> dict[str, Any]:
    """Remove a product: it is never recommended or found again."""
    state = get_state(request)
    if not state.store.delete_item(item_id):
        raise HTTPException(404, f"no item {item_id!r}")
    state.sync()
    return {"deleted": item_id}


@router.post("/v1/keys", tags=["keys"])
def create_key(body: KeyIn, request: Request, principal: Principal = Depends(require_scope("admin"))) -> dict[str, Any]:
    """Create an API key; its secret is shown once."""
    key, secret = get_state(request).store.create_key(body.name, validate_scopes(body.scopes))
    return {"id": key.id, "name": key.name, "scopes": list(key.scopes), "secret": secret}


@router.get("/v1/keys", tags=["keys"])
def list_keys(request: Request, principal: Principal = Depends(require_scope("admin"))) -> list[dict[str, Any]]:
    """Every key (never the secrets)."""
    return [json.loads(k.model_dump_json()) for k in get_state(request).store.list_keys()]


@router.delete("/v1/keys/{key_id}", tags=["keys"])
def revoke_key(key_id: Id, request: Request, principal: Principal = Depends(require_scope("admin"))) -> dict[str, Any]:
    """Revoke a key (within a few seconds on every replica)."""
    if not get_state(request).store.revoke_key(key_id):
        raise HTTPException(404, f"no active key {key_id!r}")
    return {"revoked": key_id}


@router.get("/healthz", tags=["ops"])
def healthz() -> dict[str, Any]:
    """The process is up; `pid` tells a server's worker processes apart (`shoprec serve --workers N`)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz", tags=["ops"])
def readyz(request: Request) -> JSONResponse:
    """The index is loaded and the store answers: the load balancer may send traffic."""
    state = get_state(request)
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    try:
        state.store.item(state.catalog.ids[0]) if len(state.catalog) else None
    except Exception as e:  # a store that does not answer: not ready, and say why
        return JSONResponse({"status": f"store unavailable: {e}"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "items": len(state.catalog)})


@router.get("/metrics", tags=["ops"])
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latencies, fallbacks, LLM time and queue depth."""
    state = get_state(request)
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def _load(state: AppState) -> None:
    """Open the store, load the index and the model (the slow part of startup)."""
    core = state.core
    state.live = core.live
    state.retriever = _RememberingRetriever(state.live)
    if state.settings.llm_backend != "none":
        state.recommender(state.settings.adapter, use_llm=True)  # load the model now, not on the first request
    state.recommender(state.settings.adapter, use_llm=False)
    state.batcher = Batcher(
        state.run_batch,
        max_queue=state.settings.llm_queue_max,
        max_batch=state.settings.llm_batch_max,
        wait_s=state.settings.llm_batch_wait_ms / 1000,
        on_batch=state.observe_batch,
        on_depth=state.metrics.queue_depth.set,
    )
    state.batcher.start()
    # Everything loaded so far (catalog, indexes, model: ~500k objects on the demo shop) lives as long as the
    # process: move it out of the collector's reach, or every full collection rescans it with the GIL held
    # (~300 ms on 2 cores, a latency spike for every request in flight).
    gc.collect()
    gc.freeze()
    state.ready = True


async def _sync_loop(state: AppState) -> None:
    """Every `sync_interval_s`: pull other processes' writes, so every replica serves the same shop."""
    while True:
        await asyncio.sleep(state.settings.sync_interval_s)
        try:
            await run_in_threadpool(state.sync)
        except Exception:  # a failed sync is retried next tick; the process keeps serving what it has
            log.exception("live index sync failed")


def create_app(settings: Settings, *, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app for `settings`; `routers` are included after the built-in ones (chat, experiments, ...)."""
    core = Shoprec(settings)
    state = AppState(
        settings=settings,
        core=core,
        metrics=Metrics(),
        limiter=TokenBucket(settings.rate_limit_per_s, settings.rate_limit_burst),
        verifier=KeyVerifier(core.store),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_load, state)
        state.cpu = anyio.CapacityLimiter(settings.cpu_threads)
        syncer = asyncio.create_task(_sync_loop(state))
        switch = sys.getswitchinterval()
        if settings.llm_backend in ("transformers", "fake"):  # the model runs in this process
            # Past capacity, with fallbacks to serve, 16 clients: 0.59 -> 0.89-0.91 model answers/s at 0.5 ms (the
            # model thread takes the GIL back between its tensor ops). Shortening it only during model calls did not
            # help (eval/results/load-score-fallback-gil-scoped.json): why is not settled, so it holds for the life
            # of the app.
            sys.setswitchinterval(settings.gil_switch_ms / 1000)
        try:
            yield
        finally:
            sys.setswitchinterval(switch)  # process-wide: an app started inside another process leaves it as found
            syncer.cancel()
            if state.batcher is not None:
                await run_in_threadpool(state.batcher.stop)
            gc.unfreeze()  # what `_load` froze is collectable again (an app started and stopped inside a process)

    app = FastAPI(
        title="shoprec",
        description="A prompt-driven generative recommender for e-commerce: recommend, search, events, items.",
        version="0.1",
        lifespan=lifespan,
    )
    app.state.shoprec = state
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestError, _request_error)
    try:
        from retrieval.store import StoreError

        app.add_exception_handler(StoreError, _request_error)
    except ImportError:
        pass

    app.add_middleware(_Observe, metrics=state.metrics)

    app.include_router(router)
    for extra in (*_extra_routers(), *routers):
        app.include_router(extra)
    return app


class _Observe:
    """The body-size limit and the request metrics (latency per route template, count per status), as a plain
    ASGI middleware: Starlette's `@app.middleware("http")` wraps every request in a task and memory streams,
    work the GIL pays for at ~100 requests/s on 2 cores. A streamed answer (chat SSE) is timed to its end."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            detail = f"body: {int(length)} bytes is over the limit of {MAX_BODY_BYTES} bytes; send smaller batches"
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client gets when the app fails before it starts an answer

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route=name, method=scope["method"], status=str(status)).inc()


def _extra_routers() -> list[APIRouter]:
    """The routers of other features that `shoprec serve` always includes: one line each, imported lazily."""
    found: list[APIRouter] = []
    # e.g.: from shoprec.chat.api import router as chat_router; found.append(chat_router)
    from shoprec.experiments_api import router as experiments_router  # GET/PUT/PATCH /v1/experiments

    found.append(experiments_router)
    from shoprec.chat.api import router as chat_router  # POST /v1/chat (SSE), /v1/chat/events, the page at /chat

    found.append(chat_router)
    return found


SETTINGS_ENV = "SHOPREC_SERVE_SETTINGS"


def app_from_env() -> FastAPI:
    """uvicorn's factory for `shoprec serve --workers N`: each worker process rebuilds the app from the Settings
    the CLI resolved (passed as JSON in $SHOPREC_SERVE_SETTINGS)."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"${SETTINGS_ENV} is not set; start the service with `shoprec serve`")
    return create_app(Settings.model_validate_json(raw))
