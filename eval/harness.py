"""The evaluation runner: every system — retrieval baselines, their fusion and the LLM stage — in one harness.

One run = one dataset, one split, one candidate protocol, one seeded sample of test users, and one or more
system configs (`EvalConfig`). Everything a system may learn from is fitted on the split's training part only
(validation cases drive SASRec's early stopping and the fusion weights; nothing else). Each system turns every
test case into a ranked list of `k` items; the metrics of `eval.metrics` are computed per user, and reported as
means with a 95% bootstrap CI; the per-user values are kept in the result for paired tests (`eval.ab`).

How each system makes its list (`k` = GeneratorConfig.k, default 10 here):
- a retriever (popularity, itemknn, bm25, dense, sasrec) or the fusion: its scores over the protocol's
  candidates (all items but the history for ``full``), top `n_candidates`, then the same diversity step as the
  generator (`generator.diversity.diversify` with the config's method, λ and constraint) down to k — with the
  method "none" and no constraint that is simply its top k ("retrieval order");
- the LLM stage (`generator.recommender.Recommender`): candidates from the fusion's top `n_candidates` (``full``
  and ``retrieved``) or the protocol's sample (``sampled``, ordered by the fused score, as a first stage would),
  then score or generate mode exactly as served. With ``reasons = false`` (score mode only) the reasons are not
  generated — they do not change the ranking — which makes large runs affordable on a CPU.

The target's rank is its position in the list (inf when absent), so NDCG@10 etc. are the standard single-target
metrics; under ``full`` a retriever's list is its exact top k, so its NDCG@10 equals the full-ranking one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eval import datasets
from eval.metrics import (
    alpha_ndcg_at_k,
    bootstrap_ci,
    catalog_coverage,
    category_coverage_at_k,
    duplicate_rate,
    gini_exposure,
    hallucination_rate,
    intra_list_diversity,
    latency_percentiles,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    reason_grounded,
    recall_at_k,
)
from eval.splits import PROTOCOLS, SPLITS, Case, Split, make_split, sample_users, sampled_candidates
from retrieval.catalog import Catalog
from retrieval.persist import atomic_write_json, parse_json, parse_toml
from retrieval.types import Candidate, Interaction, Item, RetrievalRequest

RETRIEVERS = ("popularity", "itemknn", "bm25", "dense", "sasrec")
SYSTEMS = (*RETRIEVERS, "fusion", "llm")
RESULT_FORMAT = "shoprec-eval/1"
# What the eval config changes in the generator's defaults: a baseline is pure relevance unless a config says
# otherwise, and a list of 10 gives NDCG@10; a long time budget, because a loaded CPU must not turn into fallbacks.
GENERATOR_DEFAULTS: dict[str, Any] = {
    "k": 10,
    "n_candidates": 20,
    "diversity": 0.0,
    "diversity_method": "none",
    "constraint": {},
    "timeout_s": 600.0,
}
HEADLINE = ("ndcg@10", "recall@10", "mrr@10", "ndcg@5", "recall@5", "coverage@5", "coverage@10", "ild@5")


class ConfigError(ValueError):
    """A bad evaluation config: the message names the file, the field and the fix."""


class EvalConfig(BaseModel):
    """One system to evaluate, as a TOML/JSON file gives it. Unknown fields are errors.

    Example (TOML)::

        name = "llm-score-mmr"
        system = "llm"
        reasons = false
        [generator]            # any GeneratorConfig field; also the diversity step of the retrieval baselines
        mode = "score"
        variant = "rank"
        diversity = 0.3
        diversity_method = "mmr"
        constraint = { max_per_category = 2, level = 1 }
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="", description="Label in tables and in the JSON (default: the system name).")
    system: Literal["popularity", "itemknn", "bm25", "dense", "sasrec", "fusion", "llm"] = Field(
        description="What ranks: one retrieval signal, their fusion, or the LLM stage on top of the fusion."
    )
    signals: tuple[str, ...] = Field(
        default=RETRIEVERS, description="Signals the fusion (and so the LLM stage's retrieval) combines."
    )
    generator: dict[str, Any] = Field(
        default_factory=dict,
        description="GeneratorConfig fields (mode, variant, k, n_candidates, diversity, diversity_method, "
        "constraint, llm_weight, ...) over the eval defaults (k=10, n_candidates=20, no diversity, no constraint).",
    )
    reasons: bool = Field(default=True, description="LLM score mode: generate the reasons (slow) or rank only.")
    similarity: Literal["embedding", "category"] = Field(
        default="embedding",
        description="Item similarity of MMR/DPP: cosine of the dense embeddings, or 1 for the same category.",
    )
    backend: Literal["transformers", "fake"] = Field(default="transformers", description="LLM backend.")
    new_item_share: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Fusion and LLM stage: share of the fused list reserved for new items (no interaction in "
        "training), best content match first (retrieval.fusion.FusionConfig.new_item_share).",
    )
    model: str | None = Field(default=None, description="LLM model (default: the embedded SmolLM2-135M).")
    adapter: str | None = Field(default=None, description="A LoRA adapter folder (the 'tuned' LLM stage).")
    batch_size: int = Field(default=8, ge=1, description="LLM requests per batch.")
    max_users: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate this config on only the first N users of the run's sample (for slow settings such as "
        "generated reasons; its CIs are then wider).",
    )
    perturb: Literal["none", "reverse", "shuffle"] = Field(
        default="none",
        description="A deliberately broken variant, to check the harness: reverse or shuffle each final list "
        "of the top n_candidates (so a worse system must be detected as worse).",
    )

    @field_validator("signals")
    @classmethod
    def _known_signals(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in v if s not in RETRIEVERS]
        if bad or not v:
            raise ValueError(f"unknown signals {bad}; valid: {', '.join(RETRIEVERS)}")
        return v

    @property
    def label(self) -> str:
        return self.name or self.system

    def generator_config(self) -> Any:
        """The validated GeneratorConfig: eval defaults < the adapter's fitted blend and trained prompt settings
        (`generator.model.adapter_generator_settings`) < the config's [generator] table."""
        from generator.model import adapter_generator_settings
        from generator.recommender import GeneratorConfig

        return GeneratorConfig(**{**GENERATOR_DEFAULTS, **adapter_generator_settings(self.adapter), **self.generator})


# Built-in configs, usable by name wherever a config file is expected (`--config fusion`).
BUILTIN: dict[str, dict[str, Any]] = {
    **{name: {"system": name} for name in (*RETRIEVERS, "fusion")},
    "llm-score": {"name": "llm-score", "system": "llm", "reasons": False, "generator": {"mode": "score"}},
    "llm-score-reasons": {"name": "llm-score-reasons", "system": "llm", "generator": {"mode": "score"}},
    "llm-generate": {"name": "llm-generate", "system": "llm", "generator": {"mode": "generate"}},
}
# Named groups of configs: `--config baselines` runs every baseline.
SUITES: dict[str, tuple[str, ...]] = {
    "baselines": (*RETRIEVERS, "fusion", "llm-score"),
    # the "new shop on day one" case: nothing trained on the catalog but cheap statistics; no SASRec training
    "zeroshot": ("popularity", "bm25", "zeroshot-fusion", "zeroshot-llm"),
}
BUILTIN["zeroshot-fusion"] = {
    "name": "fusion",
    "system": "fusion",
    "signals": ["popularity", "itemknn", "bm25", "dense"],
}
# The sequential signal's rows, named apart from the 4-signal zero-shot ones when both are in one README table.
BUILTIN["fusion-5"] = {"name": "fusion (5 signals)", "system": "fusion"}
BUILTIN["llm-score-5"] = {"name": "llm-score (5 signals)", "system": "llm", "reasons": False}
BUILTIN["zeroshot-llm"] = {
    "name": "llm-score",
    "system": "llm",
    "reasons": False,
    "signals": ["popularity", "itemknn", "bm25", "dense"],
}


def load_configs(specs: Sequence[str]) -> list[EvalConfig]:
    """Configs from files (TOML or JSON), built-in names or suite names; errors name the file, field and fix."""
    out: list[EvalConfig] = []
    for spec in specs:
        if spec in SUITES:
            out.extend(load_configs(SUITES[spec]))
            continue
        if spec in BUILTIN:
            out.append(EvalConfig(**BUILTIN[spec]))
            continue
        out.append(read_config(Path(spec)))
    labels = Counter(c.label for c in out)
    dup = [name for name, n in labels.items() if n > 1]
    if dup:
        raise ConfigError(f"two configs are both named {dup[0]!r}. Fix: give each a distinct `name` field.")
    return out


def read_config(path: Path) -> EvalConfig:
    if not path.is_file():
        raise ConfigError(
            f"config {str(path)!r} not found. Fix: pass a TOML/JSON file or one of: {', '.join([*BUILTIN, *SUITES])}."
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = parse_json(text) if path.suffix == ".json" else parse_toml(text)  # absurd nesting: a decode error
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected an object of fields, got a JSON {type(raw).__name__}.")
    raw.setdefault("name", path.stem)
    return validate_config(raw, str(path))


def validate_config(raw: Mapping[str, Any], where: str = "config") -> EvalConfig:
    """An EvalConfig whose generator table is checked too, or a ConfigError naming the first bad field."""
    try:
        cfg = EvalConfig(**raw)
        cfg.generator_config()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        prefix = "generator." if e.title == "GeneratorConfig" else ""
        hint = "remove it or fix its spelling" if err["type"] == "extra_forbidden" else "fix its value"
        raise ConfigError(f"{where}: field `{prefix}{loc}`: {err['msg']}. Fix: {hint}.") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.perturb != "none" and cfg.system == "llm" and cfg.generator_config().mode == "generate":
        raise ConfigError(f"{where}: field `perturb` applies to ranked lists; use it with score mode.")
    if not cfg.reasons and cfg.system == "llm" and cfg.generator_config().mode == "generate":
        raise ConfigError(f"{where}: field `reasons`: generate mode always writes reasons. Fix: drop reasons=false.")
    return cfg


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """A dataset ready to evaluate: catalog, split, sampled test cases and the fitted retrieval signals."""

    name: str
    catalog: Catalog
    split: Split
    cases: list[Case]
    retrievers: dict[str, Any]
    fusion: dict[tuple[str, ...], Any]  # signal set -> fitted FusionRetriever
    vectors: np.ndarray | None  # dense item embeddings (row-aligned with the catalog), for ILD and MMR
    level: int  # category level the diversity metrics count at
    popularity: dict[str, int]  # item -> training users who interacted with it
    n_train_users: int
    info: dict[str, Any] = field(default_factory=dict)


def metric_level(items: Sequence[Item], minimum: int = 10) -> int:
    """The category depth the diversity metrics use: the shallowest level with >= `minimum` distinct categories.

    Why: Office's top level has 9 departments, 1665 of 2420 items in one; coverage there would measure almost
    nothing, while level 2 (43 categories) does. ml-100k (one genre level, 19) and the demo shop use level 1.
    """
    depth = max((len(it.category) for it in items), default=1) or 1
    for level in range(1, depth + 1):
        if len({it.category_at(level) for it in items}) >= minimum:
            return level
    return depth


def data_hash(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]]) -> str:
    """sha256 over the catalog fingerprint and every event (user, item, time, position) in history order."""
    from retrieval.index import catalog_fingerprint

    h = hashlib.sha256(catalog_fingerprint(catalog).encode())
    for user in sorted(hist):
        for e in hist[user]:
            ts = e.timestamp.isoformat() if e.timestamp is not None else ""
            h.update(f"{user}\x00{e.item_id}\x00{ts}\x00{e.position}\x01".encode())
    return h.hexdigest()


def prepare(
    dataset: str,
    configs: Sequence[EvalConfig],
    *,
    split: str = "loo",
    users: int | None = None,
    seed: int = 0,
    encoder: Any = None,
    fusion_fit_users: int = 1000,
    log: Callable[[str], None] = lambda _: None,
) -> Prepared:
    """Load the dataset, split it, sample the users and fit every signal the configs need (on training data only)."""
    from retrieval.events import histories
    from retrieval.index import fit_signals
    from retrieval.sequential import SASRecConfig

    name, items, interactions = datasets.load(dataset, seed=seed)
    if not items or not interactions:
        raise ValueError(f"dataset {dataset!r} has no items or no events. Fix: check the folder's files.")
    catalog = Catalog(items)
    hist = histories(interactions)
    sp = make_split(split, hist, seed=seed)
    cases = sample_users(sp.test, users, seed)
    if not cases:
        raise ValueError(f"dataset {dataset!r}: no user has enough events to evaluate under the {split!r} split.")
    needed = _needed_signals(configs)
    log(f"[{name}] {len(catalog)} items, {len(hist)} users, {len(cases)} test users; fitting {', '.join(needed)}")
    if "dense" in needed and encoder is None:
        from retrieval.embed import Encoder

        encoder = Encoder()
    t0 = time.perf_counter()
    fitted = fit_signals(
        catalog,
        sp.train,
        needed,
        log=lambda m: log(f"[{name}] {m}"),
        encoder=encoder,
        sasrec_config=SASRecConfig(seed=seed, progress=False),
        # as in eval/bench/retrieval.py: SASRec early-stops on half of the validation users, the fusion is fitted
        # on the other half, so the fusion does not over-weight the signal whose epoch was picked on its cases
        sasrec_validation=[(c.history, c.target) for c in sp.valid[0::2]],
        progress=False,
    )
    retrievers = {n: _Memo(r) for n, r in fitted.items()}
    fit_s = time.perf_counter() - t0
    fusion_cases = sample_users(sp.valid[1::2], fusion_fit_users, seed)
    fusions = {}
    for sigs in {tuple(c.signals) for c in configs if c.system in ("fusion", "llm")}:
        fusions[sigs] = _fit_fusion(catalog, [retrievers[s] for s in sigs], fusion_cases)
    dense = fitted.get("dense")
    vectors = getattr(dense, "vectors", None)
    popularity: Counter[str] = Counter()
    for evs in sp.train.values():
        popularity.update({e.item_id for e in evs})
    return Prepared(
        name=name,
        catalog=catalog,
        split=sp,
        cases=cases,
        retrievers=retrievers,
        fusion=fusions,
        vectors=None if vectors is None else np.asarray(vectors),
        level=metric_level(items),
        popularity=dict(popularity),
        n_train_users=sum(1 for evs in sp.train.values() if evs),
        info={
            "dataset": name,
            "source": dataset,
            "data_hash": data_hash(catalog, hist),
            "items": len(catalog),
            "users": len(hist),
            "events": len(interactions),
            "split": split,
            "test_users_total": len(sp.test),
            "test_users": len(cases),
            "fusion_fit_users": len(fusion_cases),
            "fit_seconds": round(fit_s, 1),
        },
    )


def _needed_signals(configs: Sequence[EvalConfig]) -> tuple[str, ...]:
    need: set[str] = set()
    for c in configs:
        need |= set(c.signals) if c.system in ("fusion", "llm") else {c.system}
    if any(c.similarity == "embedding" for c in configs):
        need.add("dense")  # ILD and embedding-MMR need the item embeddings
    return tuple(s for s in RETRIEVERS if s in need)  # cheap ones first, as retrieval.index builds them


class _Memo:
    """A retriever wrapper that remembers the scores of the last request: the fusion and the single signal reuse
    them within one case instead of scoring twice (SASRec and dense are the costly ones)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.catalog = inner.catalog
        self._key: Any = None
        self._scores: np.ndarray | None = None

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        key = (request.user_id, request.history, request.query, request.cart)
        if key != self._key:
            self._key, self._scores = key, self.inner.score(request)
        return self._scores

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        return list(self.inner.retrieve(request, k))

    def __getattr__(self, name: str) -> Any:  # the rest of the signal (e.g. popularity's counts) as is
        if name == "inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _fit_fusion(catalog: Catalog, retrievers: Sequence[Any], cases: Sequence[Case]) -> Any:
    """A FusionRetriever whose user-mode rule and weights are fitted on validation cases (hand defaults if < 30)."""
    from retrieval.fusion import DEFAULT_WEIGHTS, FusionConfig, FusionRetriever, fit_weights

    fusion = FusionRetriever(catalog, list(retrievers))
    if len(cases) < 30 or len(retrievers) < 2:
        return fusion
    prepared = []
    for c in cases:
        if c.target in catalog.index:
            lists = fusion.signal_lists(
                RetrievalRequest(user_id=c.user_id, history=c.history), names=list(fusion.retrievers)
            )
            prepared.append((lists, catalog.index[c.target]))
    weights, rrf_k, _, method = fit_weights(prepared, list(fusion.retrievers), len(catalog), k=20)
    fusion.config = FusionConfig(
        weights={**json.loads(json.dumps(DEFAULT_WEIGHTS)), "user": weights}, rrf_k=rrf_k, method=method
    )
    return fusion


# ---------------------------------------------------------------------------------------------------- running


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
    fusion = _fusion_for(prep, tuple(prep.retrievers))
    return {
        c.user_id: [x.item_id for x in fusion.retrieve(RetrievalRequest(user_id=c.user_id, history=c.history), n)]
        for c in prep.cases
    }


def _fusion_for(prep: Prepared, signals: tuple[str, ...], new_item_share: float = 0.0) -> Any:
    if signals not in prep.fusion:
        prep.fusion[signals] = _fit_fusion(
            prep.catalog, [prep.retrievers[s] for s in signals], sample_users(prep.split.valid[1::2], 1000, 0)
        )
    fitted = prep.fusion[signals]
    if not new_item_share:
        return fitted
    from retrieval.fusion import FusionRetriever

    config = dataclasses.replace(fitted.config, new_item_share=new_item_share)  # the same fitted weights
    return FusionRetriever(prep.catalog, list(fitted.retrievers.values()), config)


def _request(case: Case) -> RetrievalRequest:
    return RetrievalRequest(user_id=case.user_id, history=case.history)


def _perturb(order: list[int], how: str, rng: np.random.Generator) -> list[int]:
    if how == "reverse":
        return order[::-1]
    if how == "shuffle":
        return [order[j] for j in rng.permutation(len(order))]
    return order


def _rerank(
    cfg: EvalConfig,
    gcfg: Any,
    prep: Prepared,
    ids: Sequence[str],
    relevance: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[str], bool]:
    """The generator's diversity step over a relevance-ordered pool -> (k items, constraint was infeasible)."""
    from generator.constraints import CategoryConstraint, cut_categories, feasible
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


def _widen(constraint: Any, cats: Sequence[str], n: int, k: int) -> list[int]:
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
        _fusion_for(prep, tuple(cfg.signals), cfg.new_item_share)
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
        request = _request(case)
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


def _recommender(*args: Any, reasons: bool, score_cache: dict[str, np.ndarray] | None, **kwargs: Any) -> Any:
    """A `Recommender`, optionally without the reasons step and with the label scores memoised per prompt.

    Skipping reasons: score mode exactly as served, minus the reason decoding, which never changes the ranking
    (tests/test_eval_harness.py checks the picks are identical). The memo: the one-pass scores depend only on the
    prompt (with one pass; several shuffled passes depend on the batch), so the accuracy-diversity sweep, which
    only changes the steps after scoring, costs one LLM pass per user instead of one per setting.
    """
    from generator.recommender import Recommender

    class Evaluated(Recommender):
        def _write_reasons(self, prepared: Any, chosen: Any) -> list[tuple[list[str] | None, str, str | None]]:
            if reasons:
                return super()._write_reasons(prepared, chosen)
            return [([""] * len(idx), "", None) for idx in chosen]

        def _llm_scores(self, prepared: Any) -> list[np.ndarray]:
            if score_cache is None or prepared[0].config.shuffle_passes != 1:
                return super()._llm_scores(prepared)
            missing = [p for p in prepared if p.prompt not in score_cache]
            if missing:
                for p, s in zip(missing, super()._llm_scores(missing), strict=True):
                    score_cache[p.prompt] = s
            return [score_cache[p.prompt].copy() for p in prepared]

    return Evaluated(*args, **kwargs)


def make_llm_backend(cfg: EvalConfig) -> Any:
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
    backend: Any,
    log: Callable[[str], None] = lambda _: None,
    score_cache: dict[str, np.ndarray] | None = None,
) -> list[CaseOutput]:
    """The LLM stage on the protocol's candidates, in batches; every output checked against its own candidates.

    Latency is the batch's wall time divided by its size (batches of `batch_size`), retrieval excluded: the
    fused candidate lists are computed once up front, so the generator's widening step never re-scores.
    """
    from generator.constraints import check_picks

    gcfg = cfg.generator_config()
    fusion = _fusion_for(prep, tuple(cfg.signals), cfg.new_item_share)
    lists: dict[str, list[Candidate]] = {}
    for case in cases:
        request = _request(case)
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
        requests = [_request(c) for c in batch]
        results: dict[int, tuple[Any, bool, list[str], float]] = {}
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


def _by_feasibility(rec: Any, requests: Sequence[RetrievalRequest], gcfg: Any) -> list[tuple[list[int], Any, bool]]:
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


# ---------------------------------------------------------------------------------------------------- metrics


def case_metrics(prep: Prepared, cases: Sequence[Case], outputs: Sequence[CaseOutput]) -> dict[str, np.ndarray]:
    """Per-user metric vectors (aligned with `cases`); NaN where a metric does not apply to a user."""
    cat = prep.catalog
    level = prep.level

    def cats(ids: Sequence[str]) -> list[str]:
        return [cat[i].category_at(level) if i in cat else "" for i in ids]

    ranks = []
    per: dict[str, list[float]] = {k: [] for k in ("coverage@5", "coverage@10", "ild@5", "ild@10", "alpha_ndcg@10")}
    per.update({k: [] for k in ("novelty@10", "hallucination", "duplicates", "violation", "latency_ms")})
    per.update({k: [] for k in ("valid", "fallback", "grounded", "infeasible")})
    for case, o in zip(cases, outputs, strict=True):
        ranks.append(float(o.items.index(case.target) + 1) if case.target in o.items else math.inf)
        c = cats(o.items)
        per["coverage@5"].append(category_coverage_at_k(c, 5))
        per["coverage@10"].append(category_coverage_at_k(c, 10))
        for k in (5, 10):
            rows = cat.rows(o.items[:k])
            per[f"ild@{k}"].append(intra_list_diversity(prep.vectors[rows]) if prep.vectors is not None else math.nan)
        intents = set(cats([case.target, *case.history[-10:]]))
        per["alpha_ndcg@10"].append(alpha_ndcg_at_k(c, intents, 10))
        per["novelty@10"].append(novelty(o.items[:10], prep.popularity, prep.n_train_users))
        allowed = o.candidates or cat.ids
        per["hallucination"].append(hallucination_rate(o.items, set(allowed)))
        per["duplicates"].append(duplicate_rate(o.items))
        per["violation"].append(float(o.violations > 0))
        per["latency_ms"].append(o.latency_ms)
        valid = not o.fallback and per["hallucination"][-1] == 0 and per["duplicates"][-1] == 0 and not o.violations
        per["valid"].append(float(valid))
        per["fallback"].append(float(o.fallback))
        per["infeasible"].append(float(o.infeasible))
        per["grounded"].append(_grounded_share(prep, case, o))
    out = {
        "ndcg@10": ndcg_at_k(ranks, 10),
        "recall@10": recall_at_k(ranks, 10),
        "mrr@10": mrr_at_k(ranks, 10),
        "ndcg@5": ndcg_at_k(ranks, 5),
        "recall@5": recall_at_k(ranks, 5),
    }
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in per.items()})
    return out


def _grounded_share(prep: Prepared, case: Case, o: CaseOutput) -> float:
    if o.reasons is None or not o.reasons:
        return math.nan
    cat = prep.catalog
    hist = [cat[i] for i in case.history[-10:] if i in cat]
    hist_cats = [it.category_at(lv) for it in hist for lv in range(1, len(it.category) + 1)]
    ok = 0
    for item_id, reason in zip(o.items, o.reasons, strict=False):
        if item_id not in cat:
            continue
        it = cat[item_id]
        ok += reason_grounded(
            reason,
            pick_title=it.title,
            pick_categories=[it.category_at(lv) for lv in range(1, len(it.category) + 1)],
            pick_brand=it.brand,
            history_titles=[h.title for h in hist],
            history_categories=hist_cats,
            history_brands=[h.brand for h in hist],
        )
    return ok / len(o.reasons)


def summarise(
    prep: Prepared, cases: Sequence[Case], outputs: Sequence[CaseOutput], values: Mapping[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """Means with 95% bootstrap CIs per metric, and the list-set metrics (catalog coverage, Gini, latency)."""
    metrics: dict[str, list[float] | None] = {}
    for name, v in values.items():
        finite = v[~np.isnan(v)]
        metrics[name] = [round(x, 5) for x in bootstrap_ci(finite, seed=seed)] if finite.size else None
    lists10 = [o.items[:10] for o in outputs]
    return {
        "metrics": metrics,
        "aggregate": {
            "catalog_coverage@10": round(catalog_coverage(lists10, len(prep.catalog)), 5),
            "gini@10": round(gini_exposure(lists10, prep.catalog.ids), 5),
            "latency_ms": {k: round(v, 2) for k, v in latency_percentiles([o.latency_ms for o in outputs]).items()},
            "fallback_reasons": dict(Counter((o.fallback_reason or "")[:60] for o in outputs if o.fallback)),
        },
    }


# ---------------------------------------------------------------------------------------------------- one run


PER_USER_KEYS = ("ndcg@10", "recall@10", "mrr@10", "coverage@5", "ild@5", "alpha_ndcg@10", "valid", "grounded")


def evaluate(
    prep: Prepared,
    configs: Sequence[EvalConfig],
    *,
    protocol: str = "full",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    backends: dict[str, Any] | None = None,
    score_caches: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Run every config on the prepared data under `protocol`; the result dict the JSON file holds.

    `backends` and `score_caches` (keyed by backend+model+adapter) may be shared between calls on the same data,
    so a second set of configs reuses the loaded model and its one-pass scores.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    n_cands = max((c.generator_config().n_candidates for c in configs), default=20)
    candidates = protocol_candidates(prep, protocol, seed, n_cands)
    backends = backends if backends is not None else {}
    score_caches = score_caches if score_caches is not None else {}
    systems: dict[str, Any] = {}
    for cfg in configs:
        t0 = time.perf_counter()
        cases = prep.cases[: cfg.max_users] if cfg.max_users else prep.cases
        if cfg.system == "llm":
            key = f"{cfg.backend}|{cfg.model}|{cfg.adapter}"
            if key not in backends:
                backends[key] = make_llm_backend(cfg)
            outputs = run_llm(cfg, prep, cases, candidates, backends[key], log, score_caches.setdefault(key, {}))
        else:
            outputs = run_retriever(cfg, prep, cases, candidates, seed)
        values = case_metrics(prep, cases, outputs)
        summary = summarise(prep, cases, outputs, values, seed)
        systems[cfg.label] = {
            "config": cfg.model_dump(mode="json"),
            "generator": cfg.generator_config().model_dump(mode="json"),
            **summary,
            "users": len(cases),
            "per_user": {k: [round(float(x), 5) for x in values[k]] for k in PER_USER_KEYS},
            "seconds": round(time.perf_counter() - t0, 1),
            "examples": _examples(prep, outputs[:2]),
        }
        m = summary["metrics"]
        log(f"[{prep.name}] {cfg.label}: NDCG@10 {_fmt(m['ndcg@10'])}  coverage@5 {_fmt(m['coverage@5'])}")
    return {
        "format": RESULT_FORMAT,
        "protocol": protocol,
        "seed": seed,
        "category_level": prep.level,
        **prep.info,
        "user_ids": [c.user_id for c in prep.cases],
        "systems": systems,
    }


def _fmt(m: list[float] | None) -> str:
    return "n/a" if m is None else f"{m[0]:.4f} [{m[1]:.3f}, {m[2]:.3f}]"


def _examples(prep: Prepared, outputs: Iterable[CaseOutput]) -> list[dict[str, Any]]:
    ex = []
    for o in outputs:
        ex.append(
            {
                "items": [f"{i} {prep.catalog[i].title}" if i in prep.catalog else i for i in o.items[:5]],
                "reasons": (o.reasons or [])[:5],
            }
        )
    return ex


def code_version() -> str:
    """The git commit of the code (with '+dirty' when tracked files differ); outside a checkout (a copy exported
    with `git archive` so that edits cannot reach a long run), $SHOPREC_CODE_VERSION, else 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return os.environ.get("SHOPREC_CODE_VERSION", "unknown")
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def run(
    dataset: str,
    config_specs: Sequence[str],
    *,
    protocol: str = "full",
    split: str = "loo",
    users: int | None = None,
    seed: int = 0,
    curve: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Everything `shoprec eval` does short of writing files: configs -> prepared data -> results (+ the curve)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}. Fix: use one of {', '.join(PROTOCOLS)}.")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}. Fix: use one of {', '.join(SPLITS)}.")
    configs = load_configs(config_specs)
    t0 = time.perf_counter()
    prep = prepare(dataset, configs, split=split, users=users, seed=seed, log=log)
    backends: dict[str, Any] = {}
    caches: dict[str, dict[str, np.ndarray]] = {}
    result = evaluate(prep, configs, protocol=protocol, seed=seed, log=log, backends=backends, score_caches=caches)
    if curve:
        from eval.curve import curve_configs, summarise_curve

        sweep = curve_configs(configs, prep.level, embeddings=prep.vectors is not None)
        if sweep:
            swept = evaluate(prep, sweep, protocol=protocol, seed=seed, log=log, backends=backends, score_caches=caches)
            result["curve"] = summarise_curve(swept["systems"])
    result["code_version"] = code_version()
    result["machine"] = machine()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic write (a crash never leaves half a result)."""
    atomic_write_json(path, data, indent=1, sort_keys=True, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
