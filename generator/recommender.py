"""The recommendation pipeline: retrieve -> render -> rank with the LLM -> diversify -> justify -> validate.

Two ranking modes return the same `Recommendation`:

- ``score`` (default): LlamaRec's one-pass verbalizer. The labelled candidates are scored by the log-probability of
  their label as the first answer token, in one batched forward pass (optionally over several shuffled candidate
  orders, LLMRank's fix for position bias); that relevance is blended with the retrieval ranking, the diversity
  step (MMR / DPP / quotas) picks K under the category constraint, and only the K reasons are generated, with the
  labels forced.
- ``generate``: the model writes the whole ranked, justified list; the constrained decoder only lets it write labels
  that are real, unused candidates keeping the category constraint satisfiable, so the list is valid by construction.

Every result is checked again (`check_picks`). Any failure — model error, timeout, unparsable output, violated
constraint — gives the retrieval ranking with the diversity step applied, marked `fallback` with the reason: never
an error page, never an invalid list. Privacy: prompts carry titles and categories only, never user ids.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from generator.backends.base import Backend
from generator.constraints import CategoryConstraint, allowed_next, check_picks, cut_categories, feasible
from generator.decoding import PicksController, ReasonController
from generator.diversity import category_similarity, cosine_similarity, diversify
from generator.prompts import PromptLibrary, assistant_prefix, labels
from generator.types import CandidateView, HistoryView, Pick, PromptInput, Recommendation
from retrieval.catalog import Catalog
from retrieval.types import Candidate, RetrievalRequest


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
    max_reason_tokens: int = Field(default=28, ge=4, le=64, description="Upper bound on a reason's length in tokens.")
    timeout_s: float = Field(default=30.0, gt=0, description="Model time budget per batch; then the fallback is used.")
    seed: int = Field(default=0, description="Seed of the candidate shuffles.")

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


@dataclass
class _Prepared:
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
    ) -> None:
        self.retriever = retriever
        self.catalog = catalog
        self.backend = backend
        self.prompts = prompts or PromptLibrary()
        self.config = config or GeneratorConfig()
        if self.config.variant not in self.prompts.variants():
            raise ValueError(f"unknown prompt variant {self.config.variant!r}; available: {self.prompts.variants()}")
        self.item_vectors = item_vectors

    # ---------------------------------------------------------------- public API
    def recommend(self, request: RetrievalRequest, config: GeneratorConfig | None = None) -> Recommendation:
        return self.recommend_batch([request], config)[0]

    def recommend_batch(
        self, requests: Sequence[RetrievalRequest], config: GeneratorConfig | None = None
    ) -> list[Recommendation]:
        cfg = config or self.config
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
        except Exception as e:  # the guarantee: any model failure degrades to a valid retrieval list
            return [self._fallback(p, f"model error: {type(e).__name__}: {e}") for p in prepared]
        return [
            r.model_copy(update={"timings_ms": {"retrieve": round(t_retrieve, 1), **r.timings_ms}}) for r in results
        ]

    # ---------------------------------------------------------------- preparation
    def _prepare(self, request: RetrievalRequest, cfg: GeneratorConfig) -> _Prepared:
        cands = self._retrieve_feasible(request, cfg)
        paths = [" > ".join(self.catalog[c.item_id].category) for c in cands]
        cats = cut_categories(paths, cfg.constraint.level)
        labs = labels(len(cands))
        recent = {self.catalog[i].category_at(1) for i in request.history[-3:] if i in self.catalog}
        views = []
        for lab, c, cat in zip(labs, cands, cats, strict=True):
            item = self.catalog[c.item_id]
            evidence = [_EVIDENCE[s] for s in sorted(c.sources, key=lambda s: c.sources[s].rank) if s in _EVIDENCE]
            if item.category_at(1) in recent:
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
        return _Prepared(request, cands, views, cats, retrieval_rel, prompt, cfg)

    def _retrieve_feasible(self, request: RetrievalRequest, cfg: GeneratorConfig) -> list[Candidate]:
        """The top n_candidates, widened with the best items of missing categories when the constraint needs it."""
        wide = list(self.retriever.retrieve(request, cfg.n_candidates * 5))  # type: ignore[attr-defined]
        if len(wide) < cfg.k:
            raise ValueError(
                f"only {len(wide)} candidates match this request, fewer than k={cfg.k}. Fix: relax the filters "
                f"or ask for fewer picks."
            )
        top = wide[: cfg.n_candidates]
        level = cfg.constraint.level

        def cats(cs: Sequence[Candidate]) -> list[str]:
            return [self.catalog[c.item_id].category_at(level) for c in cs]

        if feasible(cfg.constraint, cats(top), cfg.k) is None:
            return top
        # swap in the best candidate of each unseen category, replacing the weakest of over-represented ones
        wide = list(self.retriever.retrieve(request, max(cfg.n_candidates * 5, 200)))  # type: ignore[attr-defined]
        have = set(cats(top))
        extra = [c for c in wide[cfg.n_candidates :] if self.catalog[c.item_id].category_at(level) not in have]
        seen_extra: dict[str, Candidate] = {}
        for c in extra:
            seen_extra.setdefault(self.catalog[c.item_id].category_at(level), c)
        picked = list(top)
        for c in seen_extra.values():
            if feasible(cfg.constraint, cats(picked), cfg.k) is None:
                break
            counts: dict[str, int] = {}
            for cat in cats(picked):
                counts[cat] = counts.get(cat, 0) + 1
            victim = max((i for i in range(len(picked) - 1, -1, -1)), key=lambda i: (counts[cats([picked[i]])[0]], i))
            picked[victim] = c
        why = feasible(cfg.constraint, cats(picked), cfg.k)
        if why is not None:
            raise ValueError(f"the category constraint cannot be met for this request: {why}. Fix: relax it.")
        return picked

    # ---------------------------------------------------------------- score mode
    def _score_mode(self, prepared: Sequence[_Prepared]) -> list[Recommendation]:
        assert self.backend is not None
        t0 = time.perf_counter()
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
            scores = self.backend.label_logprobs(prompts, label_sets)
            for i, (s, order) in enumerate(zip(scores, orders, strict=True)):
                s = np.asarray(s, dtype=np.float64)
                s = s - np.logaddexp.reduce(s)  # normalise over this request's labels
                llm[i][order] += s / cfg0.shuffle_passes
        t_score = (time.perf_counter() - t0) * 1000 / len(prepared)

        chosen: list[list[int]] = []
        for p, s in zip(prepared, llm, strict=True):
            rel = _blend(s, p.retrieval_rel, p.config.llm_weight)
            chosen.append(self._diversify(p, rel))

        t1 = time.perf_counter()
        controllers = []
        reason_prompts = []
        for p, idx in zip(prepared, chosen, strict=True):
            labs = [p.views[i].label for i in idx]
            controllers.append(
                ReasonController(self.backend.tokenizer, labs, max_reason_tokens=p.config.max_reason_tokens)
            )
            reason_prompts.append(p.prompt)
        max_new = max(c.max_new_tokens for c in controllers)
        outs = self.backend.generate(reason_prompts, controllers, max_new_tokens=max_new, timeout_s=cfg0.timeout_s)
        t_reason = (time.perf_counter() - t1) * 1000 / len(prepared)

        results = []
        for p, idx, s, ctrl, out in zip(prepared, chosen, llm, controllers, outs, strict=True):
            if out.finish_reason == "timeout":
                results.append(self._fallback(p, "timeout while generating reasons", raw=out.text))
                continue
            try:
                parsed = ctrl.parse(out.token_ids)
            except ValueError as e:
                results.append(self._fallback(p, f"unparsable reasons: {e}", raw=out.text))
                continue
            rel = _blend(s, p.retrieval_rel, p.config.llm_weight)
            picks = [(i, pp.reason) for i, pp in zip(idx, parsed, strict=True)]
            results.append(
                self._finish(
                    p, picks, rel, "score", out.text, {"score": round(t_score, 1), "reasons": round(t_reason, 1)}
                )
            )
        return results

    def _render_order(self, p: _Prepared, order: np.ndarray) -> str:
        """The prompt with the candidates in `order`; labels follow positions, so they are re-assigned."""
        assert self.backend is not None
        labs = labels(len(p.views))
        views = [p.views[j].model_copy(update={"label": labs[pos]}) for pos, j in enumerate(order)]
        rendered = self.prompts.render(p.config.variant, self._prompt_input(p.request, views, p.config))
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
    def _generate_mode(self, prepared: Sequence[_Prepared]) -> list[Recommendation]:
        assert self.backend is not None
        t0 = time.perf_counter()
        controllers = []
        for p in prepared:
            k = min(p.config.k, len(p.views))
            allowed = functools.partial(allowed_next, p.config.constraint, p.categories, k=k)
            controllers.append(
                PicksController(
                    self.backend.tokenizer,
                    [v.label for v in p.views],
                    k,
                    lambda chosen, f=allowed: f(chosen),  # type: ignore[misc]
                    max_reason_tokens=p.config.max_reason_tokens,
                )
            )
        max_new = max(c.max_new_tokens for c in controllers)
        outs = self.backend.generate(
            [p.prompt for p in prepared], controllers, max_new_tokens=max_new, timeout_s=prepared[0].config.timeout_s
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
    def _similarity(self, p: _Prepared) -> np.ndarray:
        if self.item_vectors is not None:
            rows = [self.catalog.index[c.item_id] for c in p.candidates]
            return cosine_similarity(self.item_vectors[rows])
        return category_similarity(p.categories)

    def _diversify(self, p: _Prepared, relevance: np.ndarray) -> list[int]:
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
        p: _Prepared,
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
        p: _Prepared,
        reason: str,
        raw: str | None = None,
        mode: Literal["score", "generate", "retrieval"] | None = None,
    ) -> Recommendation:
        idx = self._diversify(p, p.retrieval_rel)
        picks = tuple(
            Pick(
                item_id=p.candidates[i].item_id,
                rank=r,
                reason=_evidence_reason(p.views[i]),
                category=p.categories[i],
                score=_finite(p.retrieval_rel[i]),
            )
            for r, i in enumerate(idx, start=1)
        )
        return Recommendation(
            picks=picks,
            mode=mode or "retrieval",
            fallback=mode is None,
            fallback_reason=None if mode is not None else reason,
            raw_text=raw,
        )


def _blend(llm: np.ndarray, retrieval: np.ndarray, w: float) -> np.ndarray:
    """w * z(llm) + (1 - w) * z(retrieval): both standardised over the candidates so the weight means a share."""

    def z(x: np.ndarray) -> np.ndarray:
        sd = float(x.std())
        return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)

    return w * z(llm) + (1 - w) * z(retrieval)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else -1e9


def _evidence_reason(view: CandidateView) -> str:
    """A plain sentence from the retrieval evidence (used when the model is unavailable)."""
    if view.evidence:
        text = view.evidence[0]
        return text[0].upper() + text[1:] + "."
    return f"A well-rated pick in {view.category}."
