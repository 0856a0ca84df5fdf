"""One chat turn: message + state -> a new state, then picks with reasons, or ONE clarifying question.

    message --parse.py--> slots --apply--> state --hard filters + soft query--> retrieval (personalised when the
    user has a history) --first cards (retrieval order, category-diverse)--> Recommender (score mode, grounded
    reasons) --> final cards

Hard constraints (price range, excluded brands, rejected items, the category) are retrieval filters, so an item
that breaks one is never a candidate; `violations` checks every answer again and a violation is an error, not a
card. Soft wishes (the wanted text, wanted brands, attributes, items pointed at) form the search query.

A request too broad to answer well — no category, no history, candidates spread over several departments, and
the LLM not confident which one is meant — gets one question with 2-4 suggested answers (the departments the
candidates come from), asked at most once per conversation. Injected instructions and off-topic messages leave
the state as it was; only the answer's text changes.

`ChatEngine.run` yields events as they are ready (what the SSE endpoint streams): ``state``, then ``cards``
(retrieval order, no LLM yet), then ``final`` (the LLM's order and reasons); `ChatEngine.answer` returns the last.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from generator.constraints import CategoryConstraint
from generator.recommender import GeneratorConfig, Recommender
from retrieval.catalog import Catalog
from retrieval.types import Candidate, Filters, RetrievalRequest
from shoprec.chat.parse import CatalogVocab, Parsed, Parser, apply
from shoprec.chat.state import ChatState, ShownItem

HELP_TEXT = (
    "I can help with products from this shop: tell me what you are looking for, a budget, brands to avoid, "
    'or refine the last picks ("cheaper", "more like the second one").'
)


class Card(BaseModel):
    """One product shown to the shopper."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(ge=1, description="1-based position in the answer.")
    item_id: str = Field(description="Catalog id.")
    title: str = Field(description="Product title (untrusted catalog text: clients must escape it).")
    category: str = Field(description="Category path joined with ' > '.")
    brand: str = Field(default="", description="Brand, may be empty.")
    price: float | None = Field(default=None, description="Price; None when unknown.")
    reason: str = Field(default="", description="Why it is shown (grounded: true of this shopper and item).")


class ChatAnswer(BaseModel):
    """What one turn returns: the state, and either cards or one question (with suggested answers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["picks", "question", "help", "empty"] = Field(
        description="picks: cards below; question: a clarifying question; help: off-topic or injected message, "
        "nothing changed; empty: nothing matches the constraints."
    )
    text: str = Field(description="The assistant's words.")
    state: ChatState = Field(description="The conversation state after this turn (the client may edit and resend).")
    cards: tuple[Card, ...] = Field(default=(), description="The picks, in rank order.")
    suggestions: tuple[str, ...] = Field(default=(), description="Suggested answers to the question (2-4).")
    recommendation_id: str | None = Field(default=None, description="Id of this list, sent back with click events.")
    stage: Literal["retrieval", "ranked"] = Field(
        default="ranked", description="retrieval: first cards in retrieval order; ranked: the LLM's order and reasons."
    )
    fallback_reason: str | None = Field(default=None, description="Why the LLM ranking was not used, if it was not.")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage.")


class ChatConfig(BaseModel):
    """How a turn behaves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(default=5, ge=1, le=20, description="Cards per answer.")
    n_candidates: int = Field(default=20, ge=1, le=52, description="Candidates the LLM ranks.")
    use_llm: bool = Field(default=True, description="Rank with the LLM (score mode) and write grounded reasons.")
    llm_department: bool = Field(
        default=False,
        description="Let the LLM pick the department of a broad request (label scoring over the candidates' "
        "departments, rotated against position bias). Off: measured on 80 vague requests "
        "(python -m eval.chat_departments), SmolLM2-135M is right 26-38% of the time where the retrieval's "
        "majority department is right 57.5%; the turn asks the shopper instead.",
    )
    clarify: bool = Field(default=True, description="Ask one clarifying question when a request is too broad.")
    broad_departments: int = Field(
        default=3, ge=2, description="A request is broad when its candidates span at least this many departments..."
    )
    broad_top_share: float = Field(
        default=0.5, gt=0, le=1, description="...and no department holds this share of them."
    )
    min_confidence: float = Field(
        default=0.6, gt=0, le=1, description="The LLM's department choice is used only at this probability or more."
    )
    min_similarity: float = Field(
        default=0.30,
        ge=0,
        le=1,
        description="A first request with no slot (no category, price, brand, ...) whose best candidate's dense "
        "similarity is below this gets the help answer (off-topic, or nothing close in this shop). Chosen on the "
        "dev half of 80 vague shopping and 40 off-topic requests (eval/chat_departments.py --gate).",
    )


class ConstraintViolation(AssertionError):
    """An answer broke a hard constraint of the state: a bug, never shown to the shopper."""


def violations(state: ChatState, catalog: Catalog, item_ids: Sequence[str]) -> list[str]:
    """Every way the given items break the state's hard constraints (empty = none)."""
    problems = []
    for item_id in item_ids:
        item = catalog[item_id]
        path = " > ".join(item.category)
        if state.max_price is not None and (item.price is None or item.price > state.max_price):
            problems.append(f"{item_id}: price {item.price} above the budget {state.max_price}")
        if state.min_price is not None and (item.price is None or item.price < state.min_price):
            problems.append(f"{item_id}: price {item.price} below the minimum {state.min_price}")
        if item.brand and item.brand in state.excluded_brands:
            problems.append(f"{item_id}: brand {item.brand} is excluded")
        if item_id in state.rejected:
            problems.append(f"{item_id}: rejected earlier")
        if state.category and not (path == state.category or path.startswith(state.category + " > ")):
            problems.append(f"{item_id}: category {path} is outside {state.category}")
    return problems


class ChatEngine:
    """The turn logic over one shop. `history(user)` gives a known user's item ids, oldest first."""

    def __init__(
        self,
        catalog: Catalog,
        recommender: Recommender,
        *,
        history: Callable[[str], Sequence[str]] | None = None,
        config: ChatConfig | None = None,
        vocab: CatalogVocab | None = None,
        rank: Callable[[RetrievalRequest, GeneratorConfig], Any] | None = None,
    ) -> None:
        """`rank(request, config) -> Recommendation`: how the LLM stage runs (default `recommender.recommend`; the
        service passes its micro-batcher, so chat and /v1/recommend share the model's queue and time budget)."""
        self.rank = rank
        self.catalog = catalog
        self.recommender = recommender
        self.history = history or (lambda _user: ())
        self.config = config or ChatConfig()
        self.vocab = vocab or CatalogVocab(catalog.items)
        self.parser = Parser(self.vocab)
        # the first cards: the same pipeline without the model (retrieval order + the diversity step)
        self._retrieval_only = Recommender(
            recommender.retriever,
            catalog,
            None,
            prompts=recommender.prompts,
            config=recommender.config,
            item_vectors=recommender.item_vectors,
            complements=recommender.complements,
        )
        self._ids_by_brand: dict[str, list[str]] = {}
        for it in catalog.items:
            if it.brand:
                self._ids_by_brand.setdefault(it.brand, []).append(it.id)

    # -------------------------------------------------------------------------------- understanding
    def understand(self, message: str, state: ChatState) -> tuple[ChatState, Parsed]:
        """The state after `message` (deterministic parsers only; the LLM fills open slots later, in `run`)."""
        parsed = self.parser.parse(message, state)
        return apply(state, parsed), parsed

    def request_for(self, state: ChatState, user: str | None) -> RetrievalRequest:
        """The state as a retrieval request: hard filters + the soft query (+ the user's history)."""
        banned = [i for b in state.excluded_brands for i in self._ids_by_brand.get(b, ())]
        query_parts = [state.query()]
        query_parts += [self.catalog[i].title for i in state.reference_items if i in self.catalog]
        query = " ".join(p for p in query_parts if p).strip() or None
        filters = Filters(
            categories=(state.category,) if state.category else (),
            min_price=state.min_price,
            max_price=state.max_price,
            exclude=tuple(dict.fromkeys([*state.rejected, *banned, *state.reference_items, *state.cart])),
        )
        history = tuple(i for i in self.history(user) if i in self.catalog) if user else ()
        return RetrievalRequest(user_id=user, history=history, query=query, cart=(), filters=filters)

    # -------------------------------------------------------------------------------- one turn
    def answer(self, message: str, state: ChatState | None = None, user: str | None = None) -> ChatAnswer:
        """The final answer of one turn (the last event of `run`)."""
        last: ChatAnswer | None = None
        for event in self.run(message, state, user):
            last = event
        assert last is not None
        return last

    @property
    def ranks(self) -> bool:
        """Whether a `retrieval`-stage answer is followed by the LLM's (`ranked`) one."""
        return self.config.use_llm and self.recommender.backend is not None

    def run(self, message: str, state: ChatState | None = None, user: str | None = None) -> Iterator[ChatAnswer]:
        """Yield the answer as it improves: first cards in retrieval order, then the LLM's order and reasons."""
        t0 = time.perf_counter()
        before = state or ChatState()
        state, parsed = self.understand(message, before)
        timings = {"understand": _ms(t0)}
        if parsed.injection or parsed.off_topic:
            yield ChatAnswer(kind="help", text=HELP_TEXT, state=state, timings_ms=timings)
            return
        cfg = self.config
        request = self.request_for(state, user)
        t1 = time.perf_counter()
        probe = list(self.recommender.retriever.retrieve(request, cfg.n_candidates))  # type: ignore[attr-defined]
        timings["retrieve"] = _ms(t1)
        if self._unrelated(before, parsed, probe):
            unchanged = before.model_copy(update={"turns": before.turns + 1})
            yield ChatAnswer(kind="help", text=HELP_TEXT, state=unchanged, timings_ms=timings)
            return
        if not probe:
            yield ChatAnswer(kind="empty", text=_empty_text(state), state=state, timings_ms=timings)
            return
        if state.category is None and not state.reference_items:
            departments = Counter(self.catalog[c.item_id].category_at(1) for c in probe)
            broad = len(departments) >= cfg.broad_departments and departments.most_common(1)[0][
                1
            ] < cfg.broad_top_share * len(probe)
            backend = self.recommender.backend
            if broad and cfg.llm_department and cfg.use_llm and backend is not None and request.query:
                from shoprec.chat.understand import choose

                t2 = time.perf_counter()
                options = [d for d, _ in departments.most_common(8)]
                choice = choose(backend, request.query, options, rotations=len(options))
                timings["understand_llm"] = _ms(t2)
                if choice is not None and choice.confidence >= cfg.min_confidence:
                    state = state.model_copy(update={"category": choice.value})
                    request = self.request_for(state, user)
                    broad = False
            if broad and cfg.clarify and not request.history and not state.asked:
                suggestions = tuple(d for d, _ in departments.most_common(4))
                state = state.model_copy(update={"asked": True})
                text = "Which kind of product do you mean?" + (f' (for "{request.query}")' if request.query else "")
                yield ChatAnswer(kind="question", text=text, state=state, suggestions=suggestions, timings_ms=timings)
                return
        rec_id = uuid.uuid4().hex
        gen_cfg = self._generator_config(state)
        t3 = time.perf_counter()
        first, gen_cfg = self._recommend(request, gen_cfg, use_llm=False)
        timings["first_cards"] = _ms(t3)
        if first is None:
            yield ChatAnswer(kind="empty", text=_empty_text(state), state=state, timings_ms=timings)
            return
        state_first = self._shown(state, first)
        yield self._answer(state_first, first, rec_id, "retrieval", timings, None)
        if not self.ranks:
            return
        t4 = time.perf_counter()
        if self.rank is None:
            final, _ = self._recommend(request, gen_cfg, use_llm=True)
        else:
            final = self.rank(request, gen_cfg)  # the same config the first cards were feasible under
        timings["rank_and_reasons"] = _ms(t4)
        timings["total"] = _ms(t0)
        assert final is not None
        yield self._answer(self._shown(state, final), final, rec_id, "ranked", timings, final.fallback_reason)

    # -------------------------------------------------------------------------------- helpers
    def _unrelated(self, before: ChatState, parsed: Parsed, probe: Sequence[Candidate]) -> bool:
        """A request that no product answers: off-topic ("how tall is mount everest") or foreign to this shop.

        A message that starts the request (nothing wished yet) and sets no slot: the best candidate's dense
        similarity to it must reach `min_similarity`. In a conversation under way the probe answers the whole
        state, not the message, so there (and without a dense signal) the parsers' hint decides: none of the
        message's words is in the catalog."""
        if parsed.anchored:
            return False
        if before.wanted or before.category or before.brands or before.reference_items:
            return parsed.unknown_words
        sims = [c.sources["dense"].score for c in probe if "dense" in c.sources]
        if not sims:
            return parsed.unknown_words
        return max(sims) < self.config.min_similarity

    def _generator_config(self, state: ChatState) -> GeneratorConfig:
        """Score mode on the chat prompt; the diversity cap one level below the chosen category."""
        level = state.category.count(" > ") + 2 if state.category else 1
        return self.recommender.config.model_copy(
            update={
                "k": self.config.k,
                "n_candidates": max(self.config.n_candidates, self.config.k),
                "variant": "chat" if "chat" in self.recommender.prompts.variants() else self.recommender.config.variant,
                "mode": "score",
                "constraint": CategoryConstraint(max_per_category=2, level=level),
            }
        )

    def _recommend(self, request: RetrievalRequest, cfg: GeneratorConfig, *, use_llm: bool) -> tuple[Any, Any]:
        """Recommend, relaxing the diversity cap, then K, when the filtered candidates cannot meet them."""
        rec = self.recommender if use_llm else self._retrieval_only
        attempts = [cfg, cfg.model_copy(update={"constraint": CategoryConstraint()})]
        for attempt in attempts:
            for k in range(attempt.k, 0, -1):
                c = attempt.model_copy(update={"k": k})
                try:
                    result = rec.recommend(request, c)
                except ValueError as e:
                    if "fewer than k" in str(e) and k > 1:
                        continue
                    if "category constraint" in str(e):
                        break
                    if "fewer than k" in str(e):
                        return None, c
                    raise
                problems = violations(self._state_of(request), self.catalog, [p.item_id for p in result.picks])
                if problems:
                    raise ConstraintViolation("; ".join(problems))
                return result, c
        return None, cfg

    def _state_of(self, request: RetrievalRequest) -> ChatState:
        """The hard constraints of a request, as a state (for the violation check)."""
        f = request.filters
        return ChatState(
            category=f.categories[0] if f.categories else None,
            min_price=f.min_price,
            max_price=f.max_price,
            rejected=f.exclude,
        )

    def _shown(self, state: ChatState, rec: Any) -> ChatState:
        shown = tuple(
            ShownItem(
                item_id=p.item_id,
                price=self.catalog[p.item_id].price,
                brand=self.catalog[p.item_id].brand,
                category=" > ".join(self.catalog[p.item_id].category),
            )
            for p in rec.picks
        )
        return state.model_copy(update={"shown": shown})

    def _answer(
        self,
        state: ChatState,
        rec: Any,
        rec_id: str,
        stage: Literal["retrieval", "ranked"],
        timings: dict[str, float],
        fallback: str | None,
    ) -> ChatAnswer:
        cards = tuple(
            Card(
                rank=p.rank,
                item_id=p.item_id,
                title=self.catalog[p.item_id].title,
                category=" > ".join(self.catalog[p.item_id].category),
                brand=self.catalog[p.item_id].brand,
                price=self.catalog[p.item_id].price,
                reason=p.reason,
            )
            for p in rec.picks
        )
        violated = violations(state, self.catalog, [c.item_id for c in cards])
        if violated:  # the last line of defence: a card that breaks the shopper's constraints is a bug
            raise ConstraintViolation("; ".join(violated))
        return ChatAnswer(
            kind="picks",
            text=_picks_text(state, len(cards), self.catalog),
            state=state,
            cards=cards,
            recommendation_id=rec_id,
            stage=stage,
            fallback_reason=fallback,
            timings_ms=dict(timings),
        )


def _money(x: float) -> str:
    return f"${x:,.2f}".replace(".00", "")


def describe(state: ChatState, catalog: Catalog | None = None) -> str:
    """The state in words: 'Headphones, under $50, not Sony' (+ 'like <item>' for a reference, given the catalog)."""
    parts = []
    if state.wanted:
        parts.append(f'"{state.wanted}"')
    if state.category:
        parts.append(state.category.split(" > ")[-1])
    if state.brands:
        parts.append("from " + ", ".join(state.brands))
    if state.min_price is not None and state.max_price is not None:
        parts.append(f"{_money(state.min_price)}-{_money(state.max_price)}")
    elif state.max_price is not None:
        parts.append(f"up to {_money(state.max_price)}")
    elif state.min_price is not None:
        parts.append(f"from {_money(state.min_price)}")
    if state.excluded_brands:
        parts.append("not " + ", ".join(state.excluded_brands))
    if state.attributes:
        parts.append(", ".join(state.attributes.values()))
    if catalog is not None:
        titles = [catalog[i].title.split(",")[0] for i in state.reference_items if i in catalog]
        if titles:
            parts.append("like " + " and ".join(titles))
    return ", ".join(parts)


def _picks_text(state: ChatState, n: int, catalog: Catalog | None = None) -> str:
    what = describe(state, catalog)
    return f"Here {'is' if n == 1 else 'are'} {n} pick{'' if n == 1 else 's'}" + (f" for {what}." if what else ".")


def _empty_text(state: ChatState) -> str:
    return f"Nothing in the shop matches {describe(state) or 'that'}. Try a wider budget or fewer exclusions."


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)
