"""The chat over HTTP: `POST /v1/chat` (SSE streaming), `POST /v1/chat/events` (clicks, add-to-cart) and the page.

`router` is included by the service (`create_app(settings, routers=[chat.api.router])`). A conversation lives
server-side under its `conversation_id`, in a bounded store (least recently used out past `MAX_CONVERSATIONS`,
expired after `TTL_S` idle); the client may send an edited `state` with a message, which replaces the stored one.

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
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shoprec.auth import Principal, require_scope
from shoprec.chat.state import ChatState
from shoprec.chat.turn import ChatAnswer, ChatEngine

MAX_CONVERSATIONS = 1000  # ~ a few KB each: bounded memory whatever the traffic
TTL_S = 30 * 60.0  # a conversation idle this long is forgotten
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


class _Conversation:
    def __init__(self, user: str | None) -> None:
        self.user = user
        self.state = ChatState()
        self.shown: dict[str, tuple[str, ...]] = {}  # recommendation_id -> item ids shown
        self.touched = time.monotonic()
        self.lock = threading.Lock()  # one turn at a time per conversation


class Conversations:
    """A bounded, expiring map of conversation id -> conversation (thread-safe)."""

    def __init__(self, size: int = MAX_CONVERSATIONS, ttl_s: float = TTL_S) -> None:
        self.size, self.ttl_s = size, ttl_s
        self._items: OrderedDict[str, _Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_create(self, conversation_id: str | None, user: str | None) -> tuple[str, _Conversation]:
        now = time.monotonic()
        with self._lock:
            for cid in [c for c, conv in self._items.items() if now - conv.touched > self.ttl_s]:
                del self._items[cid]
            conv = self._items.get(conversation_id) if conversation_id else None
            if conv is None:
                conversation_id = conversation_id or uuid.uuid4().hex
                conv = _Conversation(user)
                self._items[conversation_id] = conv
            assert conversation_id is not None
            conv.touched = now
            self._items.move_to_end(conversation_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return conversation_id, conv

    def get(self, conversation_id: str) -> _Conversation | None:
        with self._lock:
            return self._items.get(conversation_id)

    def __len__(self) -> int:
        return len(self._items)


router = APIRouter(tags=["chat"])


def _chat_parts(request: Request) -> tuple[ChatEngine, Conversations, Any]:
    """The engine over the live catalog (rebuilt when the catalog object changes) and the conversation store."""
    from shoprec.api import get_state

    state = get_state(request)
    app_state = request.app.state
    if not hasattr(app_state, "chat_conversations"):
        app_state.chat_conversations = Conversations()
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


@router.post("/v1/chat", response_model=ChatOut)
def chat(body: ChatIn, request: Request, principal: Principal = Depends(require_scope("read"))) -> Any:
    """One turn of the conversation: the new state and picks (or one clarifying question)."""
    engine, conversations, app_state = _chat_parts(request)
    conv_id, conv = conversations.get_or_create(body.conversation_id, body.user)
    user = body.user or conv.user
    if body.state is not None:
        conv.state = body.state
    stream = body.stream if body.stream is not None else "text/event-stream" in request.headers.get("accept", "")

    def turns() -> Iterator[ChatOut]:
        with conv.lock:
            last: ChatAnswer | None = None
            for answer in engine.run(body.message, conv.state, user):
                last = answer
                yield ChatOut(conversation_id=conv_id, answer=answer)
            assert last is not None
            conv.state = last.state
            if last.recommendation_id is not None:
                conv.shown[last.recommendation_id] = tuple(c.item_id for c in last.cards)
                while len(conv.shown) > 50:
                    conv.shown.pop(next(iter(conv.shown)))
                _log(app_state, last, conv_id, user, body.message)

    if not stream:
        outs = list(turns())
        return outs[-1]

    def sse() -> Iterator[str]:
        outs = turns()
        pending: ChatOut | None = None
        for out in outs:  # every stage but the last is "cards"; the last is "final"
            if pending is not None:
                yield f"event: cards\ndata: {pending.model_dump_json()}\n\n"
            pending = out
        if pending is not None:
            yield f"event: final\ndata: {pending.model_dump_json()}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/v1/chat/events")
def chat_event(body: ChatEventIn, request: Request, principal: Principal = Depends(require_scope("read"))) -> Any:
    """A click or add-to-cart on a card the conversation was shown, stored as an event with its recommendation_id."""
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
        with conv.lock:
            conv.state = conv.state.model_copy(update={"cart": tuple(dict.fromkeys([*conv.state.cart, body.item_id]))})
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
