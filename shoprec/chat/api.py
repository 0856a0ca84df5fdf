"""The chat over HTTP: `POST /v1/chat` (SSE streaming), `POST /v1/chat/events` (clicks, add-to-cart) and the page.

`router` is included by the service (`create_app(settings, routers=[chat.api.router])`). A conversation lives
server-side under its `conversation_id`, in the service's store (SQLite or PostgreSQL: every worker and replica
continues the same conversation; deleted after `TTL_S` idle); the client may send an edited `state` with a
message, which replaces the stored one.

Streaming (`Accept: text/event-stream`, or `"stream": true`): Server-Sent Events, one per stage of the turn —
``event: cards`` (the state and the first cards, in retrieval order, as soon as retrieval has them), then
``event: final`` (the LLM's order and reasons), or one ``event: final`` for a question / help / empty answer;
each ``data:`` is a `ChatOut` JSON object. Without streaming the answer is the final `ChatOut`.

Every list shown is logged (`endpoint="chat"`) under its `recommendation_id`, which the page sends back with a
click or an add-to-cart (`/v1/chat/events`): only items the conversation was shown are accepted, so a `read` key
(the page's) can record what its shopper did without holding a `write` key.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shoprec.auth import Principal, require_scope
from shoprec.chat.state import ChatState
from shoprec.chat.turn import ChatAnswer, ChatEngine

TTL_S = 30 * 60.0  # a conversation idle this long is forgotten
MAX_SHOWN = 50  # lists remembered per conversation, for click / add-to-cart attribution
MAX_MESSAGE_CHARS = 500
WEB_DIR = Path(__file__).resolve().parent / "web"

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ChatIn(BaseModel):
    """One shopper message."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS, description="What the shopper wrote.")
    conversation_id: Id | None = Field(default=None, description="Continue this conversation; omit to start one.")
    user: Id | None = Field(default=None, description="Pseudonymous user id: personalises retrieval by history.")
    state: ChatState | None = Field(
        default=None, description="An edited state to use instead of the stored one (e.g. a brand ban removed)."
    )
    stream: bool | None = Field(default=None, description="SSE streaming; default: when Accept is text/event-stream.")


class ChatOut(BaseModel):
    """One answer (or one stage of it, when streaming)."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str = Field(description="Send it back with the next message.")
    answer: ChatAnswer = Field(description="The state, and cards or a question.")


class ChatEventIn(BaseModel):
    """A click or an add-to-cart on a card."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: Id = Field(description="The conversation whose card it was.")
    recommendation_id: Id = Field(description="The recommendation_id of the list the card was in.")
    item_id: Id = Field(description="The card's item id.")
    type: Literal["click", "cart"] = Field(description="What the shopper did.")


@dataclass
class Conversation:
    """One conversation as a turn reads it from the store and saves it back."""

    id: str
    user: str | None
    state: ChatState
    shown: dict[str, tuple[str, ...]]  # recommendation_id -> item ids shown, oldest first (at most MAX_SHOWN)
    version: int  # the stored version it was read at (0: new)


class Conversations:
    """Conversations in the service's store, so every worker and replica continues the same one.

    Turns of one conversation run one at a time in a process (a lock per id); across processes the store's
    compare-and-set refuses the later of two concurrent turns (`ConversationConflict` -> 409) instead of losing
    one. Conversations idle for `ttl_s` are deleted, at most once a minute per process."""

    def __init__(self, store: Any, ttl_s: float = TTL_S) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()
        self._swept = 0.0

    def lock(self, conversation_id: str) -> threading.Lock:
        """The lock that serialises this conversation's turns in this process (dropped when nobody holds it)."""
        with self._guard:
            lock = self._locks.get(conversation_id)
            if lock is None:
                lock = self._locks[conversation_id] = threading.Lock()
            return lock

    def get(self, conversation_id: str) -> Conversation | None:
        rec = self.store.conversation(conversation_id)
        if rec is None or self._expired(rec):
            return None
        state = ChatState.model_validate(rec.state)
        return Conversation(rec.id, rec.user_id, state, dict(rec.shown), rec.version)

    def get_or_create(self, conversation_id: str | None, user: str | None) -> Conversation:
        """The stored conversation, or a new one (under the given id when the client named one we do not know)."""
        self._sweep()
        conv = self.get(conversation_id) if conversation_id else None
        if conv is None:
            conv = Conversation(conversation_id or uuid.uuid4().hex, user, ChatState(), {}, 0)
        return conv

    def save(self, conv: Conversation) -> None:
        """Store it (raises `ConversationConflict` when another process saved a turn since `conv` was read)."""
        from retrieval.store import ConversationRecord

        shown = dict(list(conv.shown.items())[-MAX_SHOWN:])
        record = ConversationRecord(
            id=conv.id,
            user_id=conv.user,
            state=conv.state.model_dump(mode="json"),
            shown=shown,
            version=conv.version,
        )
        saved = self.store.save_conversation(record)
        conv.version, conv.shown = saved.version, shown

    def _expired(self, rec: Any) -> bool:
        return rec.updated_at is not None and (datetime.now(UTC) - rec.updated_at).total_seconds() > self.ttl_s

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < 60.0:
            return
        self._swept = now
        self.store.forget_conversations(timedelta(seconds=self.ttl_s))


router = APIRouter(tags=["chat"])
_SETUP_LOCK = threading.Lock()


def _chat_parts(request: Request) -> tuple[ChatEngine, Conversations, Any]:
    """The engine over the live catalog (rebuilt when the catalog object changes) and the conversation store."""
    from shoprec.api import get_state

    state = get_state(request)
    app_state = request.app.state
    with _SETUP_LOCK:
        if not hasattr(app_state, "chat_conversations"):
            app_state.chat_conversations = Conversations(state.store)
            app_state.chat_lock = threading.Lock()
    with app_state.chat_lock:
        adapter = state.adapter_path(None)  # the served adapter: the same recommender (and model) as /v1/recommend
        rec = state.recommender(adapter, use_llm=True)
        engine: ChatEngine | None = getattr(app_state, "chat_engine", None)
        if engine is None or engine.catalog is not state.catalog:
            store = state.store
            engine = ChatEngine(
                state.catalog,
                rec,
                history=lambda u: [e.item_id for e in store.history(u, limit=200)],
                rank=functools.partial(_rank_through_batcher, state, adapter),
            )
            app_state.chat_engine = engine
    return engine, app_state.chat_conversations, state


def _rank_through_batcher(state: Any, adapter: str | None, request: Any, config: Any) -> Any:
    """The LLM stage through the service's micro-batcher (one model queue, one time budget for every endpoint).

    Called from the worker thread that streams the answer; past the queue's bound or the budget, the retrieval
    ranking answers, marked with the reason (as /v1/recommend does)."""
    import anyio.from_thread

    if state.batcher is None:
        return state.recommender(adapter, use_llm=True).recommend(request, config)
    submit = functools.partial(
        state.batcher.submit, request, config, key=(adapter, "score", config), budget_s=state.settings.request_budget_s
    )
    try:
        return anyio.from_thread.run(submit)
    except Exception as e:  # Overloaded, BudgetExceeded: the retrieval ranking, flagged
        rec = state.recommender(adapter, use_llm=False).recommend(request, config)
        return rec.model_copy(update={"fallback": True, "fallback_reason": f"{type(e).__name__}: {e}"})


def _log(app_state: Any, answer: ChatAnswer, conv_id: str, user: str | None, message: str) -> None:
    log_fn = getattr(app_state.store, "log_recommendation", None)
    if log_fn is None or answer.recommendation_id is None:
        return
    from retrieval.store import RecommendationLog

    log_fn(
        RecommendationLog(
            id=answer.recommendation_id,
            endpoint="chat",
            user_id=user,
            unit_id=conv_id,
            items=tuple(c.item_id for c in answer.cards),
            mode="chat-" + answer.stage,
            fallback=answer.fallback_reason is not None,
            request={"message": message, "state": answer.state.model_dump(mode="json", exclude={"shown"})},
            created_at=datetime.now(UTC),
        )
    )


_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "Another turn of this conversation was answered meanwhile: send it again."}
}


@router.post("/v1/chat", response_model=ChatOut, responses=_CONFLICT)
def chat(body: ChatIn, request: Request, principal: Principal = Depends(require_scope("read"))) -> Any:
    """One turn of the conversation: the new state and picks (or one clarifying question)."""
    from retrieval.store import ConversationConflict

    engine, conversations, app_state = _chat_parts(request)
    stream = body.stream if body.stream is not None else "text/event-stream" in request.headers.get("accept", "")

    def turns() -> Iterator[tuple[bool, ChatOut]]:
        """(final?, answer) per stage, each as soon as the engine has it; the state is saved before the final."""
        with conversations.lock(body.conversation_id) if body.conversation_id else nullcontext():
            conv = conversations.get_or_create(body.conversation_id, body.user)
            conv.user = body.user or conv.user
            if body.state is not None:
                conv.state = body.state
            for answer in engine.run(body.message, conv.state, conv.user):
                if answer.stage == "retrieval" and engine.ranks:  # the first cards: the LLM's answer follows
                    yield False, ChatOut(conversation_id=conv.id, answer=answer)
                    continue
                conv.state = answer.state
                if answer.recommendation_id is not None:
                    conv.shown[answer.recommendation_id] = tuple(c.item_id for c in answer.cards)
                conversations.save(conv)  # before the final answer goes out: an answer means its state is stored
                if answer.recommendation_id is not None:
                    _log(app_state, answer, conv.id, conv.user, body.message)
                yield True, ChatOut(conversation_id=conv.id, answer=answer)
                return

    if not stream:
        try:
            return [out for final, out in turns() if final][-1]
        except ConversationConflict as e:
            raise HTTPException(409, f"conversation_id: {e}") from None

    def sse() -> Iterator[str]:
        try:
            for final, out in turns():  # each event is written as soon as its stage is ready
                yield f"event: {'final' if final else 'cards'}\ndata: {out.model_dump_json()}\n\n"
        except ConversationConflict as e:
            detail = json.dumps({"status": 409, "detail": f"conversation_id: {e}"})
            yield f"event: error\ndata: {detail}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/v1/chat/events")
def chat_event(body: ChatEventIn, request: Request, principal: Principal = Depends(require_scope("read"))) -> Any:
    """A click or add-to-cart on a card the conversation was shown, stored as an event with its recommendation_id."""
    from retrieval.store import ConversationConflict
    from retrieval.types import Interaction, InteractionType

    _, conversations, app_state = _chat_parts(request)
    conv = conversations.get(body.conversation_id)
    if conv is None:
        raise HTTPException(404, f"conversation_id: no conversation {body.conversation_id!r} (expired or unknown)")
    shown = conv.shown.get(body.recommendation_id)
    if shown is None or body.item_id not in shown:
        raise HTTPException(
            422, f"item_id: {body.item_id!r} was not shown under recommendation_id {body.recommendation_id!r}"
        )
    user = conv.user or f"chat-{body.conversation_id}"
    kind = InteractionType.CART if body.type == "cart" else InteractionType.VIEW
    fields: dict[str, Any] = {"user_id": user, "item_id": body.item_id, "type": kind, "timestamp": datetime.now(UTC)}
    if "recommendation_id" in Interaction.model_fields:  # attribution, where the store keeps it
        fields["recommendation_id"] = body.recommendation_id
    event = Interaction(**fields)
    result = app_state.store.add_events([event])
    live = app_state.live  # the next answer sees the event (the service's own events endpoint does the same)
    if hasattr(live, "sync"):
        app_state.sync()
    elif hasattr(live, "apply_events"):
        live.apply_events([event])
    if body.type == "cart":
        with conversations.lock(conv.id):
            for _ in range(3):  # adding to the cart commutes with any turn: re-read and retry on a conflict
                fresh = conversations.get(conv.id) or conv
                cart = tuple(dict.fromkeys([*fresh.state.cart, body.item_id]))
                fresh.state = fresh.state.model_copy(update={"cart": cart})
                try:
                    conversations.save(fresh)
                    break
                except ConversationConflict:
                    continue
            else:
                raise HTTPException(409, "conversation_id: the conversation changed three times meanwhile; retry")
    return {"stored": int(getattr(result, "new", 1)), "user": user, "item_id": body.item_id, "type": body.type}


@router.get("/chat", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.get("/chat/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    files = {"chat.js": "text/javascript", "chat.css": "text/css"}
    if name not in files:
        raise HTTPException(404, f"no such file: {name}")
    return FileResponse(WEB_DIR / name, media_type=files[name])


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/chat")
