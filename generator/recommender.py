"""The recommendation pipeline: retrieve -> render -> rank with the LLM -> diversify -> justify -> validate.

Two ranking modes return the same `Recommendation`:

- ``score`` (default): LlamaRec's one-pass verbalizer. The labelled candidates are scored by the log-probability of
  their label as the first answer token, in one batched forward pass (optionally over several shuffled candidate
  orders, LLMRank's fix for position bias); that relevance is blended with the retrieval ranking, the diversity
  step (MMR / DPP / quotas) picks K under the category constraint, and only the K reasons are generated, with the
  labels forced: in parallel, one batch row per pick (each row starts with its own ``"i. (L)"`` line and writes
  only that line's reason), pooled across the requests of a batch; the lines are then assembled in rank order.
- ``generate``: the model writes the whole ranked, justified list; the constrained decoder only lets it write labels
  that are real, unused candidates keeping the category constraint satisfiable, so the list is valid by construction.

Every result is checked again (`check_picks`). Any failure — model error, timeout, unparsable output, violated
constraint — gives the retrieval ranking with the diversity step applied, marked `fallback` with the reason: never
an error page, never an invalid list. Privacy: prompts carry titles and categories only, never user ids.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from generator.backends.base import Backend, GenerationOutput
from generator.constraints import CategoryConstraint, check_picks, cut_categories, feasible
from generator.decoding import PicksController, ReasonController
from generator.diversity import category_similarity, cosine_similarity, diversify
from generator.prompts import PromptLibrary, assistant_prefix, labels
from generator.reasons import ReasonContext, distinct_choices, grounded_sentences, popular_items, prefer_fresh
from generator.spec import PicksSpec
from generator.types import CandidateView, HistoryView, Pick, PromptInput, Recommendation
from retrieval.base import Ranked, retrieve_ranked
from retrieval.catalog import Catalog
from retrieval.types import Candidate, RetrievalRequest

_NOT_LIVE = object()  # marks a retriever without live catalog/vectors (see Recommender.catalog)


log = logging.getLogger(__name__)
# Set to 1 (tests/conftest.py does) to re-raise unexpected errors instead of serving the fallback: a bug in this
# pipeline must fail a test, while the product still degrades to the retrieval list for its users.
RAISE_ENV = "SHOPREC_RAISE_MODEL_ERRORS"
_T = TypeVar("_T")


class ModelError(RuntimeError):
    """The model backend failed (out of memory, a crashed engine, ...): an expected failure, served as a fallback."""


def _model_call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call a backend method, marking whatever it raises as the model's failure (the cause keeps the traceback)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise ModelError(f"{type(e).__name__}: {e}") from e


class GeneratorConfig(BaseModel):
    """How the generator ranks, diversifies and justifies. Every field can be overridden per request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["score", "generate"] = Field(
        default="score", description="'score': one-pass label scoring + generated reasons; 'generate': full list."
    )
    variant: str = Field(default="rank", description="Prompt template variant (a file in prompts/).")
    k: int = Field(default=5, ge=1, le=20, description="How many picks to return.")
    n_candidates: int = Field(default=20, ge=1, le=52, description="Candidates shown to the model (<= 52 labels).")
    diversity: float = Field(
        default=0.3, ge=0, le=1, description="Preference for diversity: 0 = pure relevance, 1 = strongest diversity."
    )
    diversity_method: Literal["none", "mmr", "dpp"] = Field(default="mmr", description="Re-ranking method.")
    constraint: CategoryConstraint = Field(
        default_factory=lambda: CategoryConstraint(max_per_category=2, level=1),
        description="The category-diversity guarantee (never violated).",
    )
    llm_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of the LLM's score in the relevance blend (the rest is the retrieval ranking).",
    )
    shuffle_passes: int = Field(default=1, ge=1, le=8, description="Shuffled scoring passes averaged (position bias).")
    max_history: int = Field(default=10, ge=0, description="Most recent history items shown in the prompt.")
    # 20 tokens is one short sentence (~15 words); every token is one more decoding step of the whole batch.
    max_reason_tokens: int = Field(default=20, ge=4, le=64, description="Upper bound on a reason's length in tokens.")
    reason_prompt: Literal["pick", "candidates"] = Field(
        default="candidates",
        description="Score mode: what each pick's reason row reads. 'candidates': the ranking prompt the scoring "
        "pass just read (cheap on an engine that caches prefixes: the transformers backend's PrefixCache, vLLM); "
        "'pick': the prompt re-rendered with that one candidate (short: for engines without prefix caching, and "
        "for cheaper fine-tuning).",
    )
    # A 'pick' reason row prefills its own prompt, so its length is most of the reasons' cost; the latest items
    # are also the ones a reason cites ("goes with the tent you just bought").
    reason_history: int = Field(
        default=3, ge=0, description="reason_prompt='pick': most recent history items each reason row shows."
    )
    grounded_reasons: bool = Field(
        default=True,
        description="Each reason is decoded as one of the sentences generator.reasons proves true of this shopper "
        "and item (a search term, the same brand or category as a shown history item, the retriever that found "
        "it); False: free text under the loop guards.",
    )
    reason_batch: int = Field(
        default=40,
        ge=1,
        description="Score mode: most reason rows (one per pick, pooled over the requests) decoded in one batch.",
    )
    timeout_s: float = Field(default=30.0, gt=0, description="Model time budget per batch; then the fallback is used.")
    seed: int = Field(default=0, description="Seed of the candidate shuffles.")

    @property
    def reason_history_shown(self) -> int:
        """How many of the latest history items a score-mode reason row shows, and so may cite."""
        return self.max_history if self.reason_prompt == "candidates" else min(self.max_history, self.reason_history)

    @model_validator(mode="after")
    def _satisfiable(self) -> GeneratorConfig:
        c = self.constraint
        if c.min_categories is not None and c.min_categories > self.k:
            raise ValueError(f"min_categories={c.min_categories} cannot be met with k={self.k} picks; lower it")
        if c.max_per_category is not None and c.min_categories is None and c.max_per_category * 52 < self.k:
            raise ValueError(f"max_per_category={c.max_per_category} is too small for k={self.k}")
        if self.k > self.n_candidates:
            raise ValueError(f"k={self.k} picks need at least as many candidates, got n_candidates={self.n_candidates}")
        return self


# Retrieval evidence in words: what the prompt shows the model, and what fallback reasons are made of.
_EVIDENCE = {
    "itemknn": "often bought with your recent items",
    "sasrec": "a likely next step after your recent items",
    "bm25": "matches your search words",
    "dense": "close in content to what you are looking at",
    "popularity": "popular with other shoppers",
}


# The compact form of the same evidence (`CandidateView.signals`): a short name per retriever and its rank bucket.
_SIGNAL_NAMES = {"itemknn": "co-bought", "sasrec": "next", "dense": "similar", "bm25": "text", "popularity": "popular"}
_RANK_BUCKETS = (1, 2, 3, 5, 10, 20, 50)  # ranks beyond the last bucket are not shown: weak evidence, ~4 tokens each


def signal_summary(candidate: Candidate, same_department: bool) -> str:
    """'co-bought #1, next #5, similar #20, same dept': each retriever's rank, bucketed, strongest first.

    Buckets (1, 2, 3, 5, 10, 20, 50) instead of exact ranks: fewer distinct strings for a small model to learn, and
    the difference between rank 14 and 17 of one signal says little. A tuned model can weigh these; the untuned one
    reads them as plain words.
    """
    parts = []
    for name, ev in sorted(candidate.sources.items(), key=lambda kv: kv[1].rank):
        bucket = next((b for b in _RANK_BUCKETS if ev.rank <= b), None)
        if bucket is not None and name in _SIGNAL_NAMES:
            parts.append(f"{_SIGNAL_NAMES[name]} #{bucket}")
    if same_department:
        parts.append("same dept")
    return ", ".join(parts)


@dataclass
class Prepared:
    """One request made ready for the model: its candidates, their views, and the rendered ranking prompt.

    Public because fine-tuning builds its training examples from exactly this (finetune/data.py): same candidate
    construction, same evidence, same prompt text as serving.
    """

    request: RetrievalRequest
    candidates: list[Candidate]
    views: list[CandidateView]
    categories: list[str]  # cut at the constraint's level
    retrieval_rel: np.ndarray
    prompt: str  # chat-formatted, ending where the assistant's answer starts
    config: GeneratorConfig


class Recommender:
    """The pipeline object: `recommend(request)` / `recommend_batch(requests)`.

    `retriever` is anything with `retrieve(request, k)` (normally the fused retriever of `retrieval.index`);
    `backend` is an LLM backend, or None for retrieval + diversity only (mode 'retrieval').
    """

    def __init__(
        self,
        retriever: object,
        catalog: Catalog,
        backend: Backend | None,
        *,
        prompts: PromptLibrary | None = None,
        config: GeneratorConfig | None = None,
        item_vectors: np.ndarray | None = None,
        complements: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.retriever = retriever
        self._catalog = catalog
        self.backend = backend
        self.prompts = prompts or PromptLibrary()
        self.config = config or GeneratorConfig()
        self._check_variant(self.config)
        self._item_vectors = item_vectors
        # The catalog owner's complement relations (leaf category path -> complementary leaf paths), if known:
        # they let a grounded reason say "Goes with your <history item>" (generator.reasons).
        self.complements: Mapping[str, frozenset[str]] = complements or {}

    # A live retriever (retrieval.live.LiveIndex: it has `item_vectors`) grows its catalog as items are added and
    # deleted without a rebuild: read its current catalog and vectors instead of the ones given at construction.
    @property
    def catalog(self) -> Catalog:
        live = getattr(self.retriever, "item_vectors", _NOT_LIVE) is not _NOT_LIVE
        return self.retriever.catalog if live else self._catalog  # type: ignore[attr-defined,no-any-return]

    @catalog.setter
    def catalog(self, catalog: Catalog) -> None:
        self._catalog = catalog

    @property
    def item_vectors(self) -> np.ndarray | None:
        vectors = getattr(self.retriever, "item_vectors", _NOT_LIVE)
        return self._item_vectors if vectors is _NOT_LIVE else vectors  # type: ignore[return-value]

    @item_vectors.setter
    def item_vectors(self, vectors: np.ndarray | None) -> None:
        self._item_vectors = vectors

    def _check_variant(self, cfg: GeneratorConfig) -> None:
        if cfg.variant not in self.prompts.variants():
            raise ValueError(
                f"unknown prompt variant {cfg.variant!r}. Fix: use one of: {', '.join(self.prompts.variants())}."
            )

    # ---------------------------------------------------------------- public API
    def recommend(self, request: RetrievalRequest, config: GeneratorConfig | None = None) -> Recommendation:
        return self.recommend_batch([request], config)[0]

    def recommend_batch(
        self, requests: Sequence[RetrievalRequest], config: GeneratorConfig | None = None
    ) -> list[Recommendation]:
        cfg = config or self.config
        self._check_variant(cfg)  # also without a backend: a bad variant is the caller's error, not a fallback
        t0 = time.perf_counter()
        prepared = [self._prepare(r, cfg) for r in requests]
        t_retrieve = (time.perf_counter() - t0) * 1000 / max(len(requests), 1)
        if self.backend is None:
            return [self._fallback(p, "no LLM backend configured", mode="retrieval") for p in prepared]
        try:
            if cfg.mode == "score":
                results = self._score_mode(prepared)
            else:
                results = self._generate_mode(prepared)
        except ModelError as e:  # the guarantee: a model failure degrades to a valid retrieval list
            cause = e.__cause__ or e
            log.warning("model failure, serving the retrieval fallback: %s", e, exc_info=cause)
            return [self._fallback(p, f"model error: {type(cause).__name__}: {cause}") for p in prepared]
        except Exception as e:  # not the model's failure: a bug in this pipeline
            log.exception("unexpected error in the generator; serving the retrieval fallback")
            if os.environ.get(RAISE_ENV) == "1":  # tests: our own bugs must fail loudly, not become fallbacks
                raise
            return [self._fallback(p, f"internal error: {type(e).__name__}: {e}") for p in prepared]
        return [
            r.model_copy(update={"timings_ms": {"retrieve": round(t_retrieve, 1), **r.timings_ms}}) for r in results
        ]

    # ---------------------------------------------------------------- preparation
    def prepare(self, request: RetrievalRequest, config: GeneratorConfig | None = None) -> Prepared:
        """Retrieve, label and render one request (no model call): what every mode, and fine-tuning, starts from."""
        return self._prepare(request, config or self.config)

    def _prepare(self, request: RetrievalRequest, cfg: GeneratorConfig) -> Prepared:
        cands = self._retrieve_feasible(request, cfg)
        catalog = self.catalog  # read once: on a live index the property resolves the current catalog each time
        paths = [" > ".join(catalog[c.item_id].category) for c in cands]
        cats = cut_categories(paths, cfg.constraint.level)
        labs = labels(len(cands))
        recent = {catalog[i].category_at(1) for i in request.history[-3:] if i in catalog}
        views = []
        for lab, c, cat in zip(labs, cands, cats, strict=True):
            item = catalog[c.item_id]
            evidence = [_EVIDENCE[s] for s in sorted(c.sources, key=lambda s: c.sources[s].rank) if s in _EVIDENCE]
            same_department = item.category_at(1) in recent
            if same_department:
                evidence.insert(0, f"same department as your recent {item.category_at(1)} items")
            views.append(
                CandidateView(
                    label=lab,
                    item_id=c.item_id,
                    title=item.title,
                    category=cat,
                    brand=item.brand,
                    price=item.price,
                    evidence=tuple(evidence[:2]),
                    signals=signal_summary(c, same_department),
                )
            )
        data = self._prompt_input(request, views, cfg)
        prompt = ""
        if self.backend is not None:
            rendered = self.prompts.render(cfg.variant, data)
            prompt = self.backend.tokenizer.chat_template(
                [{"role": "system", "content": rendered.system}, {"role": "user", "content": rendered.user}]
            )
        # the retrieval ranking as a relevance signal: log(1 / rank), a smooth prior the LLM score is blended with
        retrieval_rel = -np.log(np.arange(1, len(cands) + 1, dtype=np.float64))
        return Prepared(request, cands, views, cats, retrieval_rel, prompt, cfg)

    def _retrieve_feasible(self, request: RetrievalRequest, cfg: GeneratorConfig) -> list[Candidate]:
        """The top n_candidates, widened with the best items of missing categories when the constraint needs it."""
        # one retrieval, wide enough for the widening below: retrieving again would score every signal again
        wide_k = max(cfg.n_candidates * 5, 200)
        wide = retrieve_ranked(self.retriever, request, wide_k)
        if len(wide) < cfg.k:
            raise ValueError(
                f"only {len(wide)} candidates match this request, fewer than k={cfg.k}. Fix: relax the filters "
                f"or ask for fewer picks."
            )
        top = list(range(min(cfg.n_candidates, len(wide))))
        picked, why = self._widened(wide, top, cfg)
        if why is not None and len(wide) >= wide_k:
            # rare: a category the rule needs is not among the widest list's items (one category per pick on a
            # shop with few categories): look through every item the signals rank, once, before saying no
            wide = retrieve_ranked(self.retriever, request, len(self.catalog))
            picked, why = self._widened(wide, top, cfg)
        if why is not None:
            raise ValueError(f"the category constraint cannot be met for this request: {why}. Fix: relax it.")
        # Candidate objects (with their signals' evidence) only for the entries kept
        return wide.candidates(picked)

    def _category(self, level: int) -> Callable[[str], str]:
        """item id -> its category at `level` (the catalog computes each level's categories once)."""
        catalog = self.catalog  # read once: on a live index the property resolves the current catalog each time
        categories, index = catalog.categories_at(level), catalog.index
        return lambda item_id: categories[index[item_id]]

    def _widened(self, wide: Ranked, top: list[int], cfg: GeneratorConfig) -> tuple[list[int], str | None]:
        """Indices into `wide` of the widened candidate list (see `_widen`), and why it still cannot meet the
        category rule (None: it can)."""
        category = self._category(cfg.constraint.level)
        picked = _widen(wide.ids, top, category, cfg)
        return picked, feasible(cfg.constraint, [category(wide.ids[i]) for i in picked], cfg.k)

    # ---------------------------------------------------------------- score mode
    def score_candidates(
        self, requests: Sequence[RetrievalRequest], config: GeneratorConfig | None = None
    ) -> list[tuple[list[Candidate], np.ndarray]]:
        """Each request's candidates and the LLM's score of each: the one-pass ranking alone, for evaluation.

        The score is log P(label) normalised over the request's labels and averaged over `shuffle_passes`
        shuffled orders: what score mode blends with the retrieval ranking, before diversity and reasons.
        """
        cfg = config or self.config
        if self.backend is None:
            raise ValueError("score_candidates needs an LLM backend; this Recommender was built with backend=None")
        prepared = [self._prepare(r, cfg) for r in requests]
        return [(p.candidates, s) for p, s in zip(prepared, self._llm_scores(prepared), strict=True)]

    def score_prepared(self, prepared: Sequence[Prepared]) -> list[np.ndarray]:
        """The LLM's normalised label scores for already prepared requests (one batch per shuffled pass).

        Fine-tuning validation prepares its requests once (the retrieval does not change while the model trains)
        and scores them with the current weights through this, the same code as score mode."""
        return self._llm_scores(prepared) if prepared else []

    def _llm_scores(self, prepared: Sequence[Prepared]) -> list[np.ndarray]:
        """Label log-probabilities, normalised per request, averaged over the shuffled passes (one batch each)."""
        assert self.backend is not None
        cfg0 = prepared[0].config
        rng = np.random.default_rng(cfg0.seed)
        llm = [np.zeros(len(p.views)) for p in prepared]
        for _ in range(cfg0.shuffle_passes):
            prompts, label_sets, orders = [], [], []
            for p in prepared:
                order = np.arange(len(p.views)) if cfg0.shuffle_passes == 1 else rng.permutation(len(p.views))
                orders.append(order)
                if cfg0.shuffle_passes == 1:
                    prompt = p.prompt
                else:  # re-render with the candidates in this pass's order (labels follow positions)
                    prompt = self._render_order(p, order)
                prompts.append(prompt + assistant_prefix(p.config.k))
                label_sets.append(labels(len(p.views)))
            scores = _model_call(self.backend.label_logprobs, prompts, label_sets)
            for i, (s, order) in enumerate(zip(scores, orders, strict=True)):
                s = np.asarray(s, dtype=np.float64)
                s = s - np.logaddexp.reduce(s)  # normalise over this request's labels
                llm[i][order] += s / cfg0.shuffle_passes
        return llm

    def _score_mode(self, prepared: Sequence[Prepared]) -> list[Recommendation]:
        t0 = time.perf_counter()
        llm = self._llm_scores(prepared)
        t_score = (time.perf_counter() - t0) * 1000 / len(prepared)

        rels = [blend_scores(s, p.retrieval_rel, p.config.llm_weight) for p, s in zip(prepared, llm, strict=True)]
        chosen = [self._diversify(p, rel) for p, rel in zip(prepared, rels, strict=True)]

        t1 = time.perf_counter()
        written = self._write_reasons(prepared, chosen)
        t_reason = (time.perf_counter() - t1) * 1000 / len(prepared)

        results = []
        for p, idx, rel, (reasons, raw, problem) in zip(prepared, chosen, rels, written, strict=True):
            if reasons is None:
                results.append(self._fallback(p, problem or "no reasons", raw=raw))
                continue
            picks = list(zip(idx, reasons, strict=True))
            timings = {"score": round(t_score, 1), "reasons": round(t_reason, 1)}
            results.append(self._finish(p, picks, rel, "score", raw, timings))
        return results

    def _write_reasons(
        self, prepared: Sequence[Prepared], chosen: Sequence[Sequence[int]]
    ) -> list[tuple[list[str] | None, str, str | None]]:
        """The reasons of every request's chosen picks, as (reasons, raw text, problem); reasons None on failure.

        One row per pick: the reason prompt followed by that pick's answer line ``"i. (L)"`` (a prefilled
        `ReasonController` writes only the reason). The rows of all requests are decoded together, in batches of
        rows of similar length (left padding wastes less); `timeout_s` bounds the whole step. Why rows and not one
        sequence writing K lines: a decoding step costs about the same for 1 row as for K rows on this CPU, so K
        rows take ~1/K of the sequential steps. With `reason_prompt='candidates'` every row starts with the ranking
        prompt the scoring pass just read, so an engine with prefix caching computes only its few new tokens; with
        'pick' each row prefills its own short one-candidate prompt. A grounded reason's first token picks its
        sentence and the rest is forced, which the transformers backend appends without decoding (jump-forward):
        5 reasons took 0.06 s after a 1.3 s scoring pass (was 0.8 s; the 2-core box, one thread).
        """
        assert self.backend is not None
        cfg0 = prepared[0].config
        owners: list[int] = []
        prompts: list[str] = []
        controllers: list[ReasonController] = []
        for r, (p, idx) in enumerate(zip(prepared, chosen, strict=True)):
            # The rows are decoded in parallel, so a later pick cannot see what an earlier one said: it avoids every
            # sentence an earlier pick may say, while another true sentence of its own remains.
            offered: list[str] = []
            for line, i in enumerate(idx, start=1):
                choices = self.reason_choices(p, i, avoid=offered) if p.config.grounded_reasons else None
                offered.extend(choices or ())
                prompt, ctrl = self.reason_prompt(p, i, line, choices=choices)
                owners.append(r)
                prompts.append(prompt)
                controllers.append(ctrl)

        outs: list[GenerationOutput | None] = [None] * len(prompts)
        deadline = time.monotonic() + cfg0.timeout_s
        by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(by_length), cfg0.reason_batch):
            rows = by_length[start : start + cfg0.reason_batch]
            left = deadline - time.monotonic()
            if left <= 0:
                break  # the rows left stay None: their requests fall back ("timeout")
            got = _model_call(
                self.backend.generate,
                [prompts[i] for i in rows],
                [controllers[i] for i in rows],
                max_new_tokens=max(controllers[i].max_new_tokens for i in rows),
                timeout_s=left,
            )
            for i, out in zip(rows, got, strict=True):
                outs[i] = out

        per_request: list[list[tuple[ReasonController, GenerationOutput | None]]] = [[] for _ in prepared]
        for r, ctrl, maybe in zip(owners, controllers, outs, strict=True):
            per_request[r].append((ctrl, maybe))
        return [_assemble_reasons(rows) for rows in per_request]

    def reason_prompt(
        self, p: Prepared, index: int, line: int = 1, choices: Sequence[str] | None = None
    ) -> tuple[str, ReasonController]:
        """The prompt of the reason row for candidate `index` shown as pick number `line`, and its controller.

        The prompt ends with the prefilled ``"{i}. ({label})"``; the controller constrains the rest (the reason,
        the newline, then EOS) to `choices` (default: `reason_choices`) when reasons are grounded. Fine-tuning
        targets the same text after the same prompt (finetune/data.py).
        """
        assert self.backend is not None, "reason prompts need a backend (its tokenizer and chat template)"
        view = p.views[index]
        shared = p.config.reason_prompt == "candidates"
        if choices is None and p.config.grounded_reasons:
            choices = self.reason_choices(p, index)
        ctrl = ReasonController(
            self.backend.tokenizer,
            [view.label],
            first_number=line if shared else 1,  # a one-candidate prompt asks for one pick: "1. (L)"
            max_reason_tokens=p.config.max_reason_tokens,
            prefilled=True,
            reason_choices={0: list(choices)} if p.config.grounded_reasons and choices is not None else None,
        )
        base = p.prompt if shared else self._chat_prompt(p, [view], single=True)
        return base + ctrl.prompt_suffix, ctrl

    def reason_choices(self, p: Prepared, index: int, avoid: Sequence[str] = ()) -> list[str]:
        """The sentences the reason row of candidate `index` may write: those true of it (generator.reasons) within
        the token budget, without the ones in `avoid` (what earlier picks of the list lead with) when others hold."""
        return prefer_fresh(self._true_reasons(p, index, p.config.reason_history_shown), avoid)

    def reason_context(self, request: RetrievalRequest, history_shown: int) -> ReasonContext:
        """What a reason about `request` may rest on: its `history_shown` latest history items, cart, query, the
        complements, and the catalog's best sellers. Fine-tuning and the reason checks build it here too."""
        return ReasonContext(
            catalog=self.catalog,
            history=tuple(request.history[-history_shown:]) if history_shown else (),
            cart=request.cart,
            query=request.query,
            complements=self.complements,
            popular=self.popular_items(),
        )

    def popular_items(self) -> Mapping[str, int]:
        """The catalog's best sellers (id -> rank) by the retriever's popularity model (generator.reasons.
        popular_items); none without one. Cached until the counts change (a live index counts events in place)."""
        model = getattr(self.retriever, "retrievers", {}).get("popularity")
        counts = getattr(model, "counts", None)
        if counts is None:
            return {}
        key = (id(model), len(counts), float(np.sum(counts)))
        cached = self.__dict__.get("_popular")
        if cached is None or cached[0] != key:
            cached = (key, popular_items(getattr(model, "catalog", self.catalog), counts))
            self.__dict__["_popular"] = cached
        return cached[1]

    def _true_reasons(self, p: Prepared, index: int, history_shown: int, budget: bool = True) -> list[str]:
        """The sentences that hold for candidate `index` of `p`, citing only the `history_shown` latest items;
        with `budget`, only those within `max_reason_tokens` (possibly none). Without, never empty."""
        ctx = self.reason_context(p.request, history_shown)
        candidate = p.candidates[index]
        if self.backend is None or not budget:  # nothing is decoded: no token budget to respect
            return grounded_sentences(self.catalog[candidate.item_id], ctx, candidate)
        tok, limit = self.backend.tokenizer, p.config.max_reason_tokens
        return grounded_sentences(
            self.catalog[candidate.item_id], ctx, candidate, fits=lambda t: len(tok.encode(" " + t)) <= limit
        )

    def _render_order(self, p: Prepared, order: np.ndarray) -> str:
        """The prompt with the candidates in `order`; labels follow positions, so they are re-assigned."""
        labs = labels(len(p.views))
        return self._chat_prompt(p, [p.views[j].model_copy(update={"label": labs[pos]}) for pos, j in enumerate(order)])

    def _chat_prompt(self, p: Prepared, views: Sequence[CandidateView], single: bool = False) -> str:
        """The chat-formatted prompt of `p`'s request showing only `views` (e.g. reordered, or just the picks)."""
        assert self.backend is not None
        cfg = p.config
        if single:  # one candidate to justify: the picking rules do not apply, the latest history is enough
            cfg = cfg.model_copy(update={"max_history": min(cfg.max_history, cfg.reason_history)})
        data = self._prompt_input(p.request, views, cfg)
        if single:
            data = data.model_copy(update={"k": 1, "max_per_category": None, "min_categories": None})
        rendered = self.prompts.render(p.config.variant, data)
        return self.backend.tokenizer.chat_template(
            [{"role": "system", "content": rendered.system}, {"role": "user", "content": rendered.user}]
        )

    def _prompt_input(
        self, request: RetrievalRequest, views: Sequence[CandidateView], cfg: GeneratorConfig
    ) -> PromptInput:
        history = []
        for item_id in request.history[-cfg.max_history :] if cfg.max_history else ():
            if item_id in self.catalog:
                it = self.catalog[item_id]
                history.append(HistoryView(title=it.title, category=" > ".join(it.category), action="seen"))
        return PromptInput(
            history=tuple(history),
            query=request.query,
            cart=tuple(self.catalog[i].title for i in request.cart if i in self.catalog),
            candidates=tuple(views),
            k=min(cfg.k, len(views)),
            max_per_category=cfg.constraint.max_per_category,
            min_categories=cfg.constraint.min_categories,
        )

    # ---------------------------------------------------------------- generate mode
    def _generate_mode(self, prepared: Sequence[Prepared]) -> list[Recommendation]:
        assert self.backend is not None
        t0 = time.perf_counter()
        controllers = []
        for p in prepared:
            k = min(p.config.k, len(p.views))
            # The constraint as data (generator.spec): an engine in another process (vLLM) rebuilds the same
            # controller from it; here it is built in place.
            spec = PicksSpec(
                labels=tuple(v.label for v in p.views),
                k=k,
                categories=tuple(p.categories),
                constraint=p.config.constraint,
                max_reason_tokens=p.config.max_reason_tokens,
                reason_choices=(
                    {j: tuple(self._true_reasons(p, j, p.config.max_history)) for j in range(len(p.views))}
                    if p.config.grounded_reasons
                    else None
                ),
            )
            controllers.append(PicksController.from_spec(self.backend.tokenizer, spec))
        max_new = max(c.max_new_tokens for c in controllers)
        outs = _model_call(
            self.backend.generate,
            [p.prompt for p in prepared],
            controllers,
            max_new_tokens=max_new,
            timeout_s=prepared[0].config.timeout_s,
        )
        t_gen = (time.perf_counter() - t0) * 1000 / len(prepared)
        results = []
        for p, ctrl, out in zip(prepared, controllers, outs, strict=True):
            if out.finish_reason == "timeout":
                results.append(self._fallback(p, "timeout while generating", raw=out.text))
                continue
            try:
                parsed = ctrl.parse(out.token_ids)
            except ValueError as e:
                results.append(self._fallback(p, f"unparsable output: {e}", raw=out.text))
                continue
            # the model's order is the ranking; expose it as a descending score
            rel = np.full(len(p.views), -np.inf)
            for rank, pp in enumerate(parsed):
                rel[pp.index] = -float(rank)
            picks = [(pp.index, pp.reason) for pp in parsed]
            results.append(self._finish(p, picks, rel, "generate", out.text, {"generate": round(t_gen, 1)}))
        return results

    # ---------------------------------------------------------------- shared steps
    def _similarity(self, p: Prepared) -> np.ndarray:
        lookup = getattr(self.retriever, "vectors_for", None)  # a live index: catalog and vectors of one snapshot
        if lookup is not None:
            vectors = lookup([c.item_id for c in p.candidates])
            if vectors is not None:
                return cosine_similarity(vectors)
        elif self.item_vectors is not None:
            rows = [self.catalog.index[c.item_id] for c in p.candidates]
            return cosine_similarity(self.item_vectors[rows])
        return category_similarity(p.categories)

    def _diversify(self, p: Prepared, relevance: np.ndarray) -> list[int]:
        cfg = p.config
        k = min(cfg.k, len(p.views))
        return diversify(
            relevance,
            k,
            method=cfg.diversity_method,
            lam=1.0 - cfg.diversity,
            similarity=self._similarity(p) if cfg.diversity_method != "none" else None,
            categories=p.categories,
            constraint=cfg.constraint,
        )

    def _finish(
        self,
        p: Prepared,
        picks: Sequence[tuple[int, str]],
        relevance: np.ndarray,
        mode: Literal["score", "generate"],
        raw: str,
        timings: dict[str, float],
    ) -> Recommendation:
        ids = [p.candidates[i].item_id for i, _ in picks]
        k = min(p.config.k, len(p.views))
        problems = check_picks(ids, [c.item_id for c in p.candidates], p.categories, k, p.config.constraint)
        if problems:  # cannot happen with the constrained decoder; kept as the last line of defence
            return self._fallback(p, "invalid output: " + "; ".join(problems), raw=raw)
        return Recommendation(
            picks=tuple(
                Pick(
                    item_id=p.candidates[i].item_id,
                    rank=r,
                    reason=reason,
                    category=p.categories[i],
                    score=_finite(relevance[i]),
                )
                for r, (i, reason) in enumerate(picks, start=1)
            ),
            mode=mode,
            raw_text=raw,
            timings_ms=timings,
        )

    def _fallback(
        self,
        p: Prepared,
        reason: str,
        raw: str | None = None,
        mode: Literal["score", "generate", "retrieval"] | None = None,
    ) -> Recommendation:
        idx = self._diversify(p, p.retrieval_rel)
        # the strongest sentence that holds, unlike the earlier picks' where the evidence differs: a fallback says
        # nothing the model could not have said
        shown = min(p.config.max_history, p.config.reason_history)
        reasons = distinct_choices([self._true_reasons(p, i, shown, budget=False) for i in idx])
        picks = tuple(
            Pick(
                item_id=p.candidates[i].item_id,
                rank=r,
                reason=choices[0],
                category=p.categories[i],
                score=_finite(p.retrieval_rel[i]),
            )
            for r, (i, choices) in enumerate(zip(idx, reasons, strict=True), start=1)
        )
        return Recommendation(
            picks=picks,
            mode=mode or "retrieval",
            fallback=mode is None,
            fallback_reason=None if mode is not None else reason,
            raw_text=raw,
        )


def _assemble_reasons(
    rows: Sequence[tuple[ReasonController, GenerationOutput | None]],
) -> tuple[list[str] | None, str, str | None]:
    """One request's reason rows, in rank order -> (reasons, the K lines as one raw text, problem)."""
    raw = "".join(
        f"{n}." + ctrl.prompt_suffix[len(f"{ctrl.first_number}.") :] + (out.text if out is not None else "")
        for n, (ctrl, out) in enumerate(rows, start=1)
    )
    reasons = []
    for n, (ctrl, out) in enumerate(rows, start=1):
        if out is None or out.finish_reason == "timeout":  # None: the time budget ran out before its batch
            return None, raw, "timeout while generating reasons"
        try:
            (parsed,) = ctrl.parse(out.token_ids)
        except ValueError as e:
            return None, raw, f"unparsable reasons: line {n}: {e}"
        reasons.append(parsed.reason)
    return reasons, raw, None


def blend_scores(llm: np.ndarray, retrieval: np.ndarray, w: float) -> np.ndarray:
    """w * z(llm) + (1 - w) * z(retrieval): both standardised over the candidates so the weight means a share."""

    def z(x: np.ndarray) -> np.ndarray:
        sd = float(x.std())
        return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)

    return w * z(llm) + (1 - w) * z(retrieval)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else -1e9


def _widen(ids: Sequence[str], top: Sequence[int], category: Callable[[str], str], cfg: GeneratorConfig) -> list[int]:
    """`top` (indices into `ids`, best first) with the best candidate of each category it lacks (from the rest,
    best first) swapped in for the weakest of its most represented category, until the category rule can be met
    (or the rest has no new category left)."""
    picked = list(top)
    if feasible(cfg.constraint, [category(ids[i]) for i in picked], cfg.k) is None:
        return picked  # most requests: nothing to widen, and the rest's categories are never read
    have = {category(ids[i]) for i in picked}
    taken = set(picked)
    seen_extra: dict[str, int] = {}
    for i in range(len(ids)):
        if i not in taken:
            cat = category(ids[i])
            if cat not in have:
                seen_extra.setdefault(cat, i)
    for i in seen_extra.values():
        picked_cats = [category(ids[j]) for j in picked]
        if feasible(cfg.constraint, picked_cats, cfg.k) is None:
            break
        counts: dict[str, int] = {}
        for cat in picked_cats:
            counts[cat] = counts.get(cat, 0) + 1
        victim = max(range(len(picked)), key=lambda j: (counts[picked_cats[j]], j))
        picked[victim] = i
    return picked
