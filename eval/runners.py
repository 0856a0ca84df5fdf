"""How each system turns the test cases into ranked lists (`CaseOutput`): a retrieval signal or the fusion with
the generator's diversity step (`run_retriever`), or the LLM stage exactly as served (`run_llm`); and the
protocol's candidates every system of a run chooses from (`protocol_candidates`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eval.config import ConfigError, EvalConfig
from eval.prepare import Prepared, fusion_for
from eval.splits import Case, sampled_candidates
from retrieval.types import Candidate, RetrievalRequest

if TYPE_CHECKING:  # the generator is imported where it runs: the retrieval baselines never load it
    from generator.backends.base import Backend
    from generator.constraints import CategoryConstraint
    from generator.recommender import GeneratorConfig, Recommender
    from generator.recommender import Prepared as Request
    from generator.types import Recommendation
    from retrieval.base import Retriever
    from retrieval.catalog import Catalog


@dataclass
class CaseOutput:
    """What one system returned for one test case."""

    items: list[str]
    candidates: list[str]  # what it could choose from (for the hallucination check); empty = the whole catalog
    latency_ms: float
    reasons: list[str] | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    violations: int = 0
    infeasible: bool = False  # the constraint could not be met on this case's candidates (relaxed for it)


class FixedCandidates:
    """A retriever serving a prepared candidate list per request (keyed by user id): the sampled protocol."""

    def __init__(self, lists: Mapping[str, list[Candidate]]) -> None:
        self.lists = dict(lists)

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        return self.lists[str(request.user_id)][:k]


def protocol_candidates(prep: Prepared, protocol: str, seed: int, n: int) -> dict[str, list[str]] | None:
    """The per-user candidate ids of the protocol (None for ``full``: the whole catalog minus the history).

    ``retrieved`` uses the fusion of every fitted signal, so all systems of a run re-rank the same top n.
    """
    if protocol == "full":
        return None
    if protocol == "sampled":
        ids = prep.catalog.ids
        return {c.user_id: sampled_candidates(c, ids, seed=seed) for c in prep.cases}
    fusion = fusion_for(prep, tuple(prep.retrievers))
    return {
        c.user_id: [x.item_id for x in fusion.retrieve(RetrievalRequest(user_id=c.user_id, history=c.history), n)]
        for c in prep.cases
    }


def case_request(case: Case) -> RetrievalRequest:
    return RetrievalRequest(user_id=case.user_id, history=case.history)


def _perturb(order: list[int], how: str, rng: np.random.Generator) -> list[int]:
    if how == "reverse":
        return order[::-1]
    if how == "shuffle":
        return [order[j] for j in rng.permutation(len(order))]
    return order


def _rerank(
    cfg: EvalConfig,
    gcfg: GeneratorConfig,
    prep: Prepared,
    ids: Sequence[str],
    relevance: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[str], bool]:
    """The generator's diversity step over a relevance-ordered pool -> (k items, constraint was infeasible)."""
    from generator.constraints import cut_categories, feasible
    from generator.diversity import category_similarity, cosine_similarity, diversify

    n = gcfg.n_candidates
    constraint: CategoryConstraint | None = gcfg.constraint
    if constraint is not None and constraint.max_per_category is None and constraint.min_categories is None:
        constraint = None
    keep = list(range(min(n, len(ids))))
    if constraint is not None:
        keep = _widen(constraint, [prep.catalog[i].category_at(constraint.level) for i in ids], n, gcfg.k)
    pool = [ids[j] for j in keep]
    rel = np.asarray(relevance, dtype=np.float64)[keep]
    k = min(gcfg.k, len(pool))
    paths = [" > ".join(prep.catalog[i].category) for i in pool]
    infeasible = False
    if constraint is not None and feasible(constraint, paths, k) is not None:
        constraint, infeasible = None, True
    if gcfg.diversity_method == "none" and constraint is None:
        order = list(range(k))  # already relevance order
    else:
        sim = None
        if gcfg.diversity_method != "none":
            if cfg.similarity == "embedding" and prep.vectors is not None:
                sim = cosine_similarity(prep.vectors[prep.catalog.rows(pool)])
            else:
                level = constraint.level if constraint is not None else prep.level
                sim = category_similarity(cut_categories(paths, level))
        order = diversify(
            rel,
            k,
            method=gcfg.diversity_method,
            lam=1.0 - gcfg.diversity,
            similarity=sim,
            categories=paths,
            constraint=constraint,
        )
    if cfg.perturb != "none":  # reorder the whole pool, so the broken list really is worse, not a permutation
        order = _perturb(list(range(len(pool))), cfg.perturb, rng)[:k]
    return [pool[i] for i in order], infeasible


def _widen(constraint: CategoryConstraint, cats: Sequence[str], n: int, k: int) -> list[int]:
    """Indices of a pool of n from a relevance-ordered list whose categories can meet the constraint.

    As the generator does (`Recommender._retrieve_feasible`): while the top n cannot satisfy it, the best item of
    a category not yet in the pool replaces the weakest item of the most represented category. Relevance order kept.
    """
    from generator.constraints import feasible

    pool = list(range(min(n, len(cats))))
    have = {cats[j] for j in pool}
    extra = []
    for j in range(len(pool), len(cats)):
        if cats[j] not in have:
            have.add(cats[j])
            extra.append(j)
    for j in extra:
        if feasible(constraint, [cats[i] for i in pool], k) is None:
            break
        counts = Counter(cats[i] for i in pool)
        victim = max(range(len(pool)), key=lambda p: (counts[cats[pool[p]]], p))
        pool[victim] = j
    return sorted(pool)


def run_retriever(
    cfg: EvalConfig, prep: Prepared, cases: Sequence[Case], candidates: Mapping[str, list[str]] | None, seed: int
) -> list[CaseOutput]:
    """A retrieval signal or the fusion: top n_candidates over the protocol's candidates, then the diversity step."""
    from retrieval.base import top_k

    gcfg = cfg.generator_config()
    scorer = (
        fusion_for(prep, tuple(cfg.signals), cfg.new_item_share)
        if cfg.system == "fusion"
        else prep.retrievers[cfg.system]
    )
    depth = max(gcfg.n_candidates, gcfg.k)
    c = gcfg.constraint
    if c is not None and (c.max_per_category is not None or c.min_categories is not None):
        depth = max(depth * 5, 200)  # room to widen the pool for the constraint, as the generator does
    out: list[CaseOutput] = []
    for case in cases:
        t0 = time.perf_counter()
        request = case_request(case)
        mask = prep.catalog.mask(request.filters, request.history)
        cand = candidates[case.user_id] if candidates is not None else []
        if candidates is not None:
            keep = np.zeros(len(prep.catalog), dtype=bool)
            keep[prep.catalog.rows(cand)] = True
            mask &= keep
        if cfg.new_item_share and candidates is None:  # the fused list with its new-item places, as served
            got = scorer.retrieve(request, depth)
            ids = [c.item_id for c in got]
            rel = np.asarray([c.score for c in got], dtype=np.float64)
        else:
            scores = scorer.score(request)
            if scores is None:  # the signal does not apply (e.g. BM25 with nothing to match): an empty list
                rows = np.empty(0, dtype=np.int64)
            else:
                rows = top_k(scores, depth, mask)
            ids = [prep.catalog.items[r].id for r in rows]
            rel = np.asarray(scores[rows], dtype=np.float64) if scores is not None else np.empty(0)
        items, infeasible = _rerank(cfg, gcfg, prep, ids, rel, np.random.default_rng([seed, len(out)]))
        out.append(
            CaseOutput(
                items=items,
                candidates=cand,
                latency_ms=(time.perf_counter() - t0) * 1000,
                infeasible=infeasible,
            )
        )
    return out


def _recommender(
    retriever: Retriever | FixedCandidates,
    catalog: Catalog,
    backend: Backend,
    *,
    config: GeneratorConfig,
    item_vectors: np.ndarray | None,
    reasons: bool,
    score_cache: dict[str, np.ndarray] | None,
) -> Recommender:
    """A `Recommender`, optionally without the reasons step and with the label scores memoised per prompt.

    Skipping reasons: score mode exactly as served, minus the reason decoding, which never changes the ranking
    (tests/test_eval_harness.py checks the picks are identical). The memo: the one-pass scores depend only on the
    prompt (with one pass; several shuffled passes depend on the batch), so the accuracy-diversity sweep, which
    only changes the steps after scoring, costs one LLM pass per user instead of one per setting.
    """
    from generator.recommender import Recommender

    class Evaluated(Recommender):
        def _write_reasons(
            self, prepared: Sequence[Request], chosen: Sequence[Sequence[int]]
        ) -> list[tuple[list[str] | None, str, str | None]]:
            if reasons:
                return super()._write_reasons(prepared, chosen)
            return [([""] * len(idx), "", None) for idx in chosen]

        def _llm_scores(self, prepared: Sequence[Request]) -> list[np.ndarray]:
            if score_cache is None or prepared[0].config.shuffle_passes != 1:
                return super()._llm_scores(prepared)
            missing = [p for p in prepared if p.prompt not in score_cache]
            if missing:
                for p, s in zip(missing, super()._llm_scores(missing), strict=True):
                    score_cache[p.prompt] = s
            return [score_cache[p.prompt].copy() for p in prepared]

    return Evaluated(retriever, catalog, backend, config=config, item_vectors=item_vectors)


def make_llm_backend(cfg: EvalConfig) -> Backend:
    """The config's LLM backend: the deterministic fake, or transformers with its model and adapter."""
    from generator.backends import make_backend

    if cfg.backend == "fake":
        return make_backend("fake")
    from generator.model import DEFAULT_MODEL, ModelSpec

    if cfg.adapter is not None and not Path(cfg.adapter).is_dir():
        raise ConfigError(f"field `adapter`: {cfg.adapter!r} is not a folder. Fix: pass a LoRA adapter directory.")
    spec = ModelSpec(model=cfg.model or DEFAULT_MODEL, adapter=cfg.adapter)
    return make_backend("transformers", model_spec=spec)


def run_llm(
    cfg: EvalConfig,
    prep: Prepared,
    cases: Sequence[Case],
    candidates: Mapping[str, list[str]] | None,
    backend: Backend,
    log: Callable[[str], None] = lambda _: None,
    score_cache: dict[str, np.ndarray] | None = None,
) -> list[CaseOutput]:
    """The LLM stage on the protocol's candidates, in batches; every output checked against its own candidates.

    Latency is the batch's wall time divided by its size (batches of `batch_size`), retrieval excluded: the
    fused candidate lists are computed once up front, so the generator's widening step never re-scores.
    """
    from generator.constraints import check_picks

    gcfg = cfg.generator_config()
    fusion = fusion_for(prep, tuple(cfg.signals), cfg.new_item_share)
    lists: dict[str, list[Candidate]] = {}
    for case in cases:
        request = case_request(case)
        if candidates is None:  # the fusion's own list, deep enough for the generator's category widening
            lists[case.user_id] = fusion.retrieve(request, max(gcfg.n_candidates * 5, 200))
            continue
        # the protocol's candidates ordered by the fused score, as a first stage would hand them over
        s = fusion.score(request)
        ids = candidates[case.user_id]
        rows = prep.catalog.rows(ids)
        key = np.nan_to_num(s[rows], neginf=-1e18) if s is not None else np.zeros(len(rows))
        order = np.lexsort((np.arange(len(rows)), -key))
        lists[case.user_id] = [Candidate(item_id=ids[j], score=float(key[j])) for j in order]
    writes_reasons = cfg.reasons or gcfg.mode == "generate"
    rec = _recommender(
        FixedCandidates(lists),
        prep.catalog,
        backend,
        config=gcfg,
        item_vectors=_llm_vectors(cfg, prep),
        reasons=writes_reasons,
        score_cache=score_cache,
    )
    out: list[CaseOutput] = []
    for start in range(0, len(cases), cfg.batch_size):
        batch = cases[start : start + cfg.batch_size]
        requests = [case_request(c) for c in batch]
        results: dict[int, tuple[Recommendation, bool, list[str], float]] = {}
        for idxs, use_cfg, infeasible in _by_feasibility(rec, requests, gcfg):
            t0 = time.perf_counter()
            recs = rec.recommend_batch([requests[i] for i in idxs], use_cfg)
            per = (time.perf_counter() - t0) * 1000 / max(len(idxs), 1)
            for i, r in zip(idxs, recs, strict=True):
                cands = [c.item_id for c in rec._retrieve_feasible(requests[i], use_cfg)]
                results[i] = (r, infeasible, cands, per)
        for i, _case in enumerate(batch):
            r, infeasible, cands, per = results[i]
            ids = [p.item_id for p in r.picks]
            cats = [" > ".join(prep.catalog[c].category) if c in prep.catalog else "" for c in cands]
            problems = check_picks(ids, cands, cats, min(gcfg.k, len(cands)), None if infeasible else gcfg.constraint)
            rng = np.random.default_rng([start, i])
            if cfg.perturb != "none":  # the broken variant: reorder the candidates, ignoring the model
                ids = [cands[j] for j in _perturb(list(range(len(cands))), cfg.perturb, rng)][: gcfg.k]
            out.append(
                CaseOutput(
                    items=ids,
                    candidates=cands,
                    latency_ms=per,
                    reasons=[p.reason for p in r.picks] if writes_reasons else None,
                    fallback=r.fallback,
                    fallback_reason=r.fallback_reason,
                    violations=sum("max_per_category" in p or "min_categories" in p for p in problems),
                    infeasible=infeasible,
                )
            )
        log(f"  {cfg.label}: {len(out)}/{len(cases)} users")
    return out


def _llm_vectors(cfg: EvalConfig, prep: Prepared) -> np.ndarray | None:
    return prep.vectors if cfg.similarity == "embedding" else None


def _by_feasibility(
    rec: Recommender, requests: Sequence[RetrievalRequest], gcfg: GeneratorConfig
) -> list[tuple[list[int], GeneratorConfig, bool]]:
    """Split a batch into the requests whose constraint can be met and those where it is relaxed (counted)."""
    from generator.constraints import CategoryConstraint

    ok, bad = [], []
    for i, r in enumerate(requests):
        try:
            rec._retrieve_feasible(r, gcfg)
            ok.append(i)
        except ValueError:
            bad.append(i)
    groups = [(ok, gcfg, False)] if ok else []
    if bad:
        groups.append((bad, gcfg.model_copy(update={"constraint": CategoryConstraint()}), True))
    return groups
