"""Generator benchmark: validity under random requests, latency and memory, and position bias of one-pass ranking.

Three sections, each written to the JSON as soon as it is done (a long run leaves partial results):

- validity: `--requests` random requests over `--datasets` (demo, ml-100k, office), in groups of `--group-size`
  with one random config per group (mode score/generate, k 2..8, 10..30 candidates, a random category constraint at
  level 1 or 2, diversity method and λ, prompt variant) and, per request, a random user and a random candidate set
  (the fused top list shuffled, or a subsample of the top 3n). Every output is checked independently against THIS
  request's candidates with `generator.constraints.check_picks`; counted: parse failures, ids outside the
  candidates, duplicates, wrong lengths, constraint violations, empty reasons, and every fallback with its reason.
- latency (demo catalog, 20 candidates, k=5, one request at a time): one-pass ranking, the 5 reasons, score mode
  end to end, generate mode (the model writes the whole list) end to end; throughput at batch 8; peak RSS. With
  `--threads auto`, 1 and 2 torch threads are compared first and the faster is used for everything else.
- bias (ml-100k, else demo): LLMRank's test. Per user, the held-out item plus 19 random negatives, the target
  placed first or last, ranked by the LLM alone (llm_weight=1) with shuffle_passes=1 and 3: mean rank, NDCG@10,
  HR@1 of the target and how often the item listed first wins.

Retrieval is the cheap part of the stack only (popularity + item-kNN + BM25, RRF-fused): the point is the generator.

    python -m eval.bench.generator --out eval/results/generator.json [--requests 1000] [--latency-requests 30]
        [--bias-users 100] [--datasets demo,ml-100k,office] [--backend transformers|fake] [--threads auto|1|2]
    python -m eval.bench.generator --quick --backend fake   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval import datasets
from eval.metrics import bootstrap_ci, ndcg_at_k, rank_of
from eval.splits import leave_one_out
from generator.backends import Backend, make_backend
from generator.constraints import CategoryConstraint, check_picks, feasible
from generator.recommender import GeneratorConfig, Recommender
from generator.types import Recommendation
from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.fusion import FusionRetriever
from retrieval.index import fit_signals
from retrieval.persist import atomic_write, atomic_write_json
from retrieval.types import Candidate, Interaction, RetrievalRequest

SIGNALS = ("popularity", "itemknn", "bm25")
POOL = 200  # fused candidates per request from which the random candidate sets are drawn
QUICK = {"requests": 24, "latency_requests": 2, "bias_users": 4, "datasets": "demo", "group_size": 8}
DEFAULTS = {"requests": 1000, "latency_requests": 30, "bias_users": 100, "datasets": "demo,ml-100k,office"}
NO_RULES = CategoryConstraint()  # no cap, no minimum: the candidates stay exactly as given


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Shop:
    """One dataset with the cheap retrieval stack fitted on it."""

    name: str
    catalog: Catalog
    events: dict[str, list[Interaction]]  # user -> events, oldest first
    histories: dict[str, list[str]]  # user -> item ids, oldest first
    retriever: FusionRetriever
    max_depth: int  # deepest category path


def build_shop(name: str, seed: int) -> Shop:
    ds_name, items, interactions = datasets.load(name, seed=seed)
    catalog = Catalog(items)
    hist = histories(interactions)
    signals = fit_signals(catalog, hist, SIGNALS)
    return Shop(
        name=ds_name,
        catalog=catalog,
        events=hist,
        histories={u: [e.item_id for e in evs] for u, evs in hist.items() if evs},
        retriever=FusionRetriever(catalog, list(signals.values())),
        max_depth=max(len(it.category) for it in items),
    )


class FixedCandidates:
    """A retriever that serves a prepared candidate list per request (keyed by `user_id`, unique per request).

    The Recommender takes the first `n_candidates` of it; the rest is there only for its widening step, which a
    feasible list never reaches. So the candidates the model sees are exactly the ones this benchmark checks against.
    """

    def __init__(self) -> None:
        self.lists: dict[str, list[Candidate]] = {}

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        if request.user_id not in self.lists:
            raise KeyError(f"no candidate list prepared for request {request.user_id!r}")
        return self.lists[request.user_id][:k]


def _category_path(shop: Shop, item_id: str) -> str:
    return " > ".join(shop.catalog[item_id].category)


# ---------------------------------------------------------------------------------------------------- validity


def _random_config(
    rng: np.random.Generator, shop: Shop, variants: Sequence[str], reason_tokens: int
) -> GeneratorConfig:
    k = int(rng.integers(2, 9))
    rule = str(rng.choice(["cap", "min", "both"]))
    cap = int(rng.integers(1, 4)) if rule in ("cap", "both") else None
    minimum = int(rng.integers(1, min(k, 4) + 1)) if rule in ("min", "both") else None
    level = int(rng.integers(1, min(2, shop.max_depth) + 1))
    return GeneratorConfig(
        mode=str(rng.choice(["score", "generate"])),  # type: ignore[arg-type]
        variant=str(rng.choice(list(variants))),
        k=k,
        n_candidates=int(rng.integers(10, 31)),
        diversity=round(float(rng.random()), 3),
        diversity_method=str(rng.choice(["none", "mmr", "dpp"])),  # type: ignore[arg-type]
        constraint=CategoryConstraint(max_per_category=cap, min_categories=minimum, level=level),
        llm_weight=round(float(rng.random()), 3),
        shuffle_passes=int(rng.choice([1, 1, 1, 2])),
        max_history=int(rng.integers(2, 11)),
        max_reason_tokens=reason_tokens,
        reason_prompt="candidates" if rng.random() < 0.125 else "pick",  # the costly path (K full prompts): 1 in 8
        timeout_s=3600.0,  # validity, not speed: no request may fall back for lack of time
        seed=int(rng.integers(0, 2**31)),
    )


def _candidate_set(
    rng: np.random.Generator, shop: Shop, pool: list[Candidate], cfg: GeneratorConfig
) -> list[Candidate] | None:
    """A random, feasible candidate set of n_candidates from `pool`: the top n shuffled, or n of the top 3n."""
    n = cfg.n_candidates
    if len(pool) < n:
        return None
    for attempt in range(20):
        if attempt == 0 and rng.random() < 0.5:
            chosen = [pool[i] for i in rng.permutation(n)]
        else:
            width = len(pool) if attempt >= 10 else min(len(pool), 3 * n)
            chosen = [pool[i] for i in rng.choice(width, size=n, replace=False)]
        cats = [_category_path(shop, c.item_id) for c in chosen]
        if feasible(cfg.constraint, cats, cfg.k) is None:
            return chosen
    return None


def verify(
    rec: Recommendation, candidate_ids: Sequence[str], categories: Sequence[str], cfg: GeneratorConfig
) -> dict[str, int]:
    """Independent checks of one output against its request; each counter is 0 for a valid output."""
    ids = [p.item_id for p in rec.picks]
    allowed = set(candidate_ids)
    problems = check_picks(ids, candidate_ids, categories, cfg.k, cfg.constraint)
    return {
        "out_of_candidates": sum(i not in allowed for i in ids),
        "duplicates": len(ids) - len(set(ids)),
        "wrong_length": int(len(ids) != cfg.k),
        "constraint_violations": int(any("max_per_category" in p or "min_categories" in p for p in problems)),
        "bad_ranks": int([p.rank for p in rec.picks] != list(range(1, len(ids) + 1))),
        "empty_reasons": sum(not any(ch.isalpha() for ch in p.reason) for p in rec.picks),
    }


def _fallback_kind(reason: str | None) -> str:
    text = reason or ""
    for kind in ("unparsable", "timeout", "model error", "invalid output"):
        if text.startswith(kind):
            return kind
    return text[:60] or "unknown"


@dataclass
class _ShopRun:
    """One dataset's progress through the validity section."""

    shop: Shop
    quota: int
    rec: Recommender
    stats: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: {"score": 0.0, "generate": 0.0})
    done: int = 0
    misses: int = 0

    @property
    def users(self) -> list[str]:
        return sorted(self.shop.histories)


def run_validity(
    shops: Sequence[Shop],
    backend: Backend,
    n_requests: int,
    group_size: int,
    reason_tokens: int,
    seed: int,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """`n_requests` random requests, split evenly over `shops`; the shops take turns group by group, so that a run
    stopped early (`on_progress` receives the counts so far after every group) still covers every dataset."""
    rng = np.random.default_rng(seed)
    fixed = FixedCandidates()
    per_shop = [n_requests // len(shops) + (i < n_requests % len(shops)) for i in range(len(shops))]
    fallbacks: Counter[str] = Counter()
    fallback_examples: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    serial = itertools.count()
    t_start = time.perf_counter()
    states = [
        _ShopRun(shop, quota, Recommender(fixed, shop.catalog, backend))
        for shop, quota in zip(shops, per_shop, strict=True)
    ]

    def summary(finished: bool) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        by_dataset: dict[str, Any] = {}
        for st in states:
            by_dataset[st.shop.name] = {
                **dict(sorted(st.stats.items())),
                "seconds": {k: round(v, 1) for k, v in st.seconds.items()},
            }
            totals.update(st.stats)
        counters = ("parse_failures", "out_of_candidates", "duplicates", "wrong_length", "constraint_violations")
        invalid = {k: totals[k] for k in (*counters, "bad_ranks", "empty_reasons")}
        n = totals["requests"]
        return {
            "requests": n,
            "requests_planned": n_requests,
            "finished": finished,
            "parsed_share": round((n - totals["parse_failures"]) / n, 5) if n else None,
            "invalid": invalid,
            "all_valid": n > 0 and all(v == 0 for v in invalid.values()),
            "fallbacks": totals["fallbacks"],
            "fallback_reasons": dict(fallbacks),
            "fallback_examples": fallback_examples,
            "by_dataset": by_dataset,
            "max_reason_tokens": reason_tokens,
            "group_size": group_size,
            "seconds": round(time.perf_counter() - t_start, 1),
            "examples": examples,
        }

    bar = tqdm(total=n_requests, desc="validity", unit="req")
    while any(st.done < st.quota for st in states):
        for st in states:
            if st.done >= st.quota:
                continue
            shop, rec, users, stats = st.shop, st.rec, st.users, st.stats
            size = min(group_size, st.quota - st.done)
            cfg = _random_config(rng, shop, rec.prompts.variants(), reason_tokens)
            requests: list[RetrievalRequest] = []
            cand_lists: list[list[str]] = []
            tries = 0
            while len(requests) < size and tries < 20 * size:
                tries += 1
                user = users[int(rng.integers(len(users)))]
                base = RetrievalRequest(user_id=user, history=tuple(shop.histories[user]))
                pool = shop.retriever.retrieve(base, POOL)
                chosen = _candidate_set(rng, shop, pool, cfg)
                if chosen is None:
                    stats["redrawn_infeasible"] += 1
                    continue
                tag = f"{shop.name}/{user}/{next(serial)}"  # unique: the key of this request's candidate list
                keep = {c.item_id for c in chosen}
                fixed.lists[tag] = chosen + [c for c in pool if c.item_id not in keep]
                requests.append(base.model_copy(update={"user_id": tag}))
                cand_lists.append([c.item_id for c in chosen])
            if not requests:  # this constraint fits no candidate pool: draw another config
                stats["configs_redrawn"] += 1
                st.misses += 1
                if st.misses > 100:
                    raise RuntimeError(f"{shop.name}: 100 random configs in a row fit no candidate set")
                continue
            st.misses = 0
            t0 = time.perf_counter()
            outs = rec.recommend_batch(requests, cfg)
            st.seconds[cfg.mode] += time.perf_counter() - t0
            for request, cands, out in zip(requests, cand_lists, outs, strict=True):
                checks = verify(out, cands, [_category_path(shop, i) for i in cands], cfg)
                stats.update({k: v for k, v in checks.items()})
                stats["requests"] += 1
                stats[f"mode_{cfg.mode}"] += 1
                stats[f"level_{cfg.constraint.level}"] += 1
                if cfg.mode == "score":
                    stats[f"reason_prompt_{cfg.reason_prompt}"] += 1
                if out.fallback:
                    kind = _fallback_kind(out.fallback_reason)
                    fallbacks[kind] += 1
                    stats["fallbacks"] += 1
                    stats["parse_failures"] += int(kind == "unparsable")
                    if len(fallback_examples) < 5:
                        fallback_examples.append(
                            {"dataset": shop.name, "reason": out.fallback_reason, "raw": (out.raw_text or "")[:400]}
                        )
                elif not any(e["dataset"] == shop.name and e["mode"] == out.mode for e in examples):
                    examples.append(_example(shop, request, out, cfg))
                fixed.lists.pop(request.user_id or "", None)
            st.done += len(requests)
            bar.update(len(requests))
            if on_progress is not None:
                on_progress(summary(finished=False))
    bar.close()
    return summary(finished=True)


def _example(shop: Shop, request: RetrievalRequest, out: Recommendation, cfg: GeneratorConfig) -> dict[str, Any]:
    last = request.history[-1] if request.history else None
    return {
        "dataset": shop.name,
        "mode": out.mode,
        "k": cfg.k,
        "constraint": cfg.constraint.model_dump(exclude_none=True),
        "most_recent": shop.catalog[last].title if last else None,
        "picks": [f"{p.rank}. {shop.catalog[p.item_id].title} [{p.category}] - {p.reason}" for p in out.picks],
    }


# ---------------------------------------------------------------------------------------------------- latency


def _stats(values_ms: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {}
    return {
        "p50": round(float(np.percentile(v, 50)), 1),
        "p95": round(float(np.percentile(v, 95)), 1),
        "mean": round(float(v.mean()), 1),
        "n": int(v.size),
    }


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _latency_requests(shop: Shop, n: int, seed: int) -> list[RetrievalRequest]:
    rng = np.random.default_rng(seed)
    users = sorted(shop.histories)
    pick = rng.choice(len(users), size=min(n, len(users)), replace=False)
    return [RetrievalRequest(user_id=users[i], history=tuple(shop.histories[users[i]])) for i in pick]


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _single_and_batch(
    rec: Recommender, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig, batch: int
) -> dict[str, Any]:
    """p50 of single score-mode requests, and requests/s of one batch: the thread-count comparison."""
    singles = []
    for r in requests:
        t0 = time.perf_counter()
        rec.recommend(r, cfg)
        singles.append(_ms_since(t0))
    t0 = time.perf_counter()
    rec.recommend_batch(list(requests[:batch]), cfg)
    ms = _ms_since(t0)
    return {"single_e2e_ms": _stats(singles), "batch": batch, "batch_requests_per_s": round(batch * 1000 / ms, 3)}


def compare_threads(rec: Recommender, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rec.recommend(requests[0], cfg)  # warm-up at this thread count
        out[str(threads)] = {**_single_and_batch(rec, requests[:3], cfg, 8), "load_avg_after": _loadavg()}
    one, two = out["1"], out["2"]
    # Faster = lower single-request p50; batch throughput decides only when the two are within 5%.
    p1, p2 = one["single_e2e_ms"]["p50"], two["single_e2e_ms"]["p50"]
    if abs(p1 - p2) <= 0.05 * min(p1, p2):
        chosen = 1 if one["batch_requests_per_s"] >= two["batch_requests_per_s"] else 2
    else:
        chosen = 1 if p1 < p2 else 2
    out["chosen"] = chosen
    torch.set_num_threads(chosen)
    return out


def _cold(rec: Recommender) -> None:
    """Forget the backend's cached prompts: each timed request is a new shopper (no earlier prompt to reuse)."""
    cache = getattr(rec.backend, "prefix_cache", None)
    if cache is not None:
        cache.clear()


def run_latency(rec: Recommender, requests: Sequence[RetrievalRequest], batch: int) -> dict[str, Any]:
    score_cfg = GeneratorConfig(mode="score", k=5, n_candidates=20, timeout_s=600)
    # Variants, on the first 10 requests: the short prompt (titles only, no evidence) and the one-pick reason rows.
    variants = {
        "terse": score_cfg.model_copy(update={"variant": "rank_terse"}),
        "pick": score_cfg.model_copy(update={"reason_prompt": "pick"}),
    }
    gen_cfg = score_cfg.model_copy(update={"mode": "generate"})
    for cfg in (score_cfg, gen_cfg, *variants.values()):  # warm-up: vocabulary tables, first-call allocations
        rec.recommend(requests[0], cfg)
    parts: dict[str, list[float]] = {k: [] for k in ("retrieve", "one_pass_ranking", "reasons", "score_e2e")}
    parts.update({k: [] for k in ("generate", "generate_e2e", "one_pass_ranking_terse", "score_e2e_terse")})
    parts["reasons_pick_prompt"] = []
    tokens: dict[str, list[int]] = {"rank": [], "rank_terse": []}
    fallbacks = 0
    assert rec.backend is not None
    for i, r in enumerate(tqdm(requests, desc="latency", unit="req")):
        _cold(rec)
        t0 = time.perf_counter()
        out = rec.recommend(r, score_cfg)
        parts["score_e2e"].append(_ms_since(t0))
        fallbacks += out.fallback
        parts["retrieve"].append(out.timings_ms.get("retrieve", math.nan))
        parts["one_pass_ranking"].append(out.timings_ms.get("score", math.nan))
        parts["reasons"].append(out.timings_ms.get("reasons", math.nan))
        _cold(rec)
        t0 = time.perf_counter()
        out = rec.recommend(r, gen_cfg)
        parts["generate_e2e"].append(_ms_since(t0))
        fallbacks += out.fallback
        parts["generate"].append(out.timings_ms.get("generate", math.nan))
        if i < 10:
            for name, cfg in variants.items():
                _cold(rec)
                t0 = time.perf_counter()
                out = rec.recommend(r, cfg)
                fallbacks += out.fallback
                if name == "terse":
                    parts["score_e2e_terse"].append(_ms_since(t0))
                    parts["one_pass_ranking_terse"].append(out.timings_ms.get("score", math.nan))
                else:
                    parts["reasons_pick_prompt"].append(out.timings_ms.get("reasons", math.nan))
            for variant in tokens:
                prompt = rec.prepare(r, score_cfg.model_copy(update={"variant": variant})).prompt
                tokens[variant].append(len(rec.backend.tokenizer.encode(prompt)))
    throughput: dict[str, Any] = {"batch": batch}
    for name, cfg in (("score", score_cfg), ("generate", gen_cfg)):
        rates = []
        for start in range(0, max(len(requests) - batch + 1, 1), batch):
            chunk = list(requests[start : start + batch])
            _cold(rec)
            t0 = time.perf_counter()
            outs = rec.recommend_batch(chunk, cfg)
            rates.append(len(chunk) * 1000 / _ms_since(t0))
            fallbacks += sum(o.fallback for o in outs)
        throughput[f"{name}_requests_per_s"] = round(float(np.median(rates)), 3)
        throughput[f"{name}_batches"] = len(rates)
    return {
        "setup": "demo catalog, 20 candidates, k=5, default config (max_per_category=2, MMR 0.3, reason rows reading "
        "the ranking prompt through the prefix cache), one request at a time after warm-up, the prompt cache "
        "emptied before each (every request a new shopper); *_terse: the rank_terse prompt; reasons_pick_prompt: "
        "one-pick reason rows (reason_prompt='pick'); variants on the first 10 requests; throughput: "
        "recommend_batch of `batch` requests, median over batches",
        "max_reason_tokens": score_cfg.max_reason_tokens,
        "reason_prompt": score_cfg.reason_prompt,
        "prompt_tokens_mean": {k: round(float(np.mean(v)), 1) for k, v in tokens.items() if v},
        "ms": {k: _stats([x for x in v if math.isfinite(x)]) for k, v in parts.items()},
        "raw_ms": {k: [round(x, 1) for x in v] for k, v in parts.items()},
        "throughput": throughput,
        "fallbacks": fallbacks,
        "targets": {
            "one_pass_ranking_p50_ms<=250": _stats(parts["one_pass_ranking"]).get("p50", math.inf) <= 250,
            "one_pass_plus_5_reasons_p50_ms<=3000": _stats(parts["score_e2e"]).get("p50", math.inf) <= 3000,
        },
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------------- bias


def run_bias(shop: Shop, backend: Backend, n_users: int, seed: int, batch: int = 8) -> dict[str, Any]:
    """LLMRank's position-bias test: target + 19 random negatives, target first vs last, 1 vs 3 shuffled passes."""
    rng = np.random.default_rng(seed)
    cases = leave_one_out(shop.events).test
    cases = [cases[i] for i in sorted(rng.choice(len(cases), size=min(n_users, len(cases)), replace=False))]
    all_ids = shop.catalog.ids
    fixed = FixedCandidates()
    rec = Recommender(fixed, shop.catalog, backend)
    lists: dict[str, dict[str, list[Candidate]]] = {"first": {}, "last": {}}
    for case in cases:
        seen = set(case.history) | {case.target}
        negatives: list[str] = []
        while len(negatives) < 19:
            item = all_ids[int(rng.integers(len(all_ids)))]
            if item not in seen:
                seen.add(item)
                negatives.append(item)
        cands = [Candidate(item_id=i, score=0.0) for i in negatives]
        target = Candidate(item_id=case.target, score=0.0)
        lists["first"][case.user_id] = [target, *cands]
        lists["last"][case.user_id] = [*cands, target]
    requests = [RetrievalRequest(user_id=c.user_id, history=c.history) for c in cases]
    out: dict[str, Any] = {
        "dataset": shop.name,
        "users": len(cases),
        "protocol": "target + 19 random negatives (not in the history), target at position 1 or 20; one-pass label "
        "scoring only (llm_weight=1, no diversity, no constraint); shuffle_passes=3 averages 3 random orders",
        "random_ranker_ndcg@10": round(sum(1 / math.log2(r + 1) for r in range(1, 11)) / 20, 4),
        "conditions": {},
    }
    for passes in (1, 3):
        cfg = GeneratorConfig(
            k=10, n_candidates=20, llm_weight=1.0, diversity_method="none", constraint=NO_RULES, shuffle_passes=passes
        )
        for place in ("first", "last"):
            fixed.lists = lists[place]
            ranks, first_wins = [], 0
            for start in tqdm(range(0, len(requests), batch), desc=f"bias {place} x{passes}", unit="batch"):
                for cands, scores in rec.score_candidates(requests[start : start + batch], cfg):
                    t = 0 if place == "first" else len(cands) - 1
                    ranks.append(rank_of(np.asarray(scores), t))
                    first_wins += int(np.argmax(scores) == 0)  # the item listed first
            ndcg = bootstrap_ci(ndcg_at_k(ranks, 10), seed=seed)
            out["conditions"][f"{place}_passes{passes}"] = {
                "target_position": 1 if place == "first" else 20,
                "shuffle_passes": passes,
                "mean_rank": round(float(np.mean(ranks)), 3),
                "ndcg@10": [round(x, 4) for x in ndcg],
                "hr@1": round(float(np.mean(np.asarray(ranks) <= 1)), 4),
                "first_listed_wins": round(first_wins / max(len(ranks), 1), 4),
            }
    return out


# ---------------------------------------------------------------------------------------------------- report


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(backend_name: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": backend_name,
    }
    if backend_name == "transformers":
        import torch

        facts.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    return facts


def _write(path: Path, report: dict[str, Any]) -> None:
    atomic_write_json(path, report, indent=2)


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency distributions (left) and the position-bias NDCG@10 bars (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lat = report.get("latency", {}).get("raw_ms", {})
    names = [n for n in ("one_pass_ranking", "reasons", "score_e2e", "generate_e2e") if lat.get(n)]
    if names:
        ax1.boxplot([[x / 1000 for x in lat[n]] for n in names], showfliers=True)
        ax1.set_xticks(range(1, len(names) + 1), [n.replace("_", "\n") for n in names])
        ax1.axhline(3.0, ls="--", c="grey", lw=0.8)
        ax1.set_ylabel("seconds per request")
        ax1.set_title("latency: demo, 20 candidates, k=5")
    conds = report.get("bias", {}).get("conditions", {})
    if conds:
        keys = list(conds)
        mean, low, high = (np.array([conds[k]["ndcg@10"][j] for k in keys]) for j in range(3))
        errs = np.vstack([mean - low, high - mean])
        ax2.bar(range(len(keys)), mean, yerr=errs, color=["C0", "C1", "C0", "C1"][: len(keys)], capsize=3)
        ax2.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys])
        ax2.axhline(report["bias"]["random_ranker_ndcg@10"], ls="--", c="grey", lw=0.8, label="random ranker")
        ax2.set_ylabel("NDCG@10 of the target")
        ax2.set_title(f"position bias ({report['bias']['dataset']}, {report['bias']['users']} users)")
        ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip("."), dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Run the benchmark; `backend` (tests) replaces the one --backend would load."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("eval/results/generator.json"))
    p.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    p.add_argument("--requests", type=int, default=None, help=f"validity requests (default {DEFAULTS['requests']})")
    p.add_argument("--latency-requests", type=int, default=None, help="timed requests (default 30)")
    p.add_argument("--bias-users", type=int, default=None, help="users of the position-bias test (default 100)")
    p.add_argument("--datasets", default=None, help=f"validity datasets (default {DEFAULTS['datasets']})")
    p.add_argument("--sections", default="validity,latency,bias", help="which sections to run")
    p.add_argument("--backend", choices=["transformers", "fake"], default="transformers")
    p.add_argument("--threads", default="auto", help="torch threads: 1, 2, or auto (compare both, keep the faster)")
    p.add_argument("--group-size", type=int, default=None, help="validity requests per recommend_batch (16)")
    p.add_argument("--reason-tokens", type=int, default=12, help="max_reason_tokens in the validity section")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (with --backend fake)")
    p.add_argument("--update", action="store_true", help="keep the sections of an existing --out not run now")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else {**DEFAULTS, "group_size": 16}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sections = set(args.sections.split(","))
    unknown = sections - {"validity", "latency", "bias"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; valid: validity, latency, bias")

    t0 = time.perf_counter()
    if backend is None:
        backend = make_backend("fake", seed=args.seed) if args.backend == "fake" else make_backend("transformers")
    load_s = round(time.perf_counter() - t0, 2)
    import psutil

    rss_after_load = round(psutil.Process().memory_info().rss / 2**20, 1)
    report: dict[str, Any] = {}
    if args.update and args.out.exists():  # keep the sections not run now (e.g. validity run earlier, under load)
        report = json.loads(args.out.read_text(encoding="utf-8"))
    report.update(
        {
            "benchmark": "generator",
            "seed": args.seed,
            "quick": args.quick,
            "machine": machine(args.backend),
            "model_load_s": load_s,
            "rss_after_load_mb": rss_after_load,
        }
    )
    names = [n for n in args.datasets.split(",") if n]
    shops: dict[str, Shop] = {}
    skipped: dict[str, str] = {}

    def shop(name: str) -> Shop | None:
        if name not in shops and name not in skipped:
            try:
                shops[name] = build_shop(name, args.seed)
            except FileNotFoundError as e:  # shared data absent: say so, run the rest
                skipped[name] = str(e)
        return shops.get(name)

    def record(name: str, run: Callable[[], dict[str, Any]]) -> None:
        """Run one section, with the conditions it ran under, and save the report so far."""
        before, t_section = _loadavg(), time.perf_counter()
        result = run()
        threads = machine(args.backend).get("torch_threads")
        report[name] = {
            **result,
            "torch_threads": threads,
            "load_avg_before": before,
            "load_avg_after": _loadavg(),
            "section_seconds": round(time.perf_counter() - t_section, 1),
            "peak_rss_mb_so_far": _peak_rss_mb(),
        }
        _write(args.out, report)

    if args.backend == "transformers" and args.threads != "auto":
        import torch

        torch.set_num_threads(int(args.threads))
    if "latency" in sections and args.latency_requests > 0:
        demo = shop("demo")
        assert demo is not None
        rec = Recommender(demo.retriever, demo.catalog, backend)
        requests = _latency_requests(demo, max(args.latency_requests, args.batch), args.seed)
        if args.backend == "transformers" and args.threads == "auto":
            cfg = GeneratorConfig(k=5, n_candidates=20, timeout_s=600)
            record("threads", lambda: compare_threads(rec, requests[: args.batch], cfg))
        record("latency", lambda: run_latency(rec, requests[: args.latency_requests], args.batch))

    if "validity" in sections and args.requests > 0:
        valid_shops = [s for s in (shop(n) for n in names) if s is not None]

        def partial(result: dict[str, Any]) -> None:  # a long run leaves its counts so far in --out
            report["validity"] = {**result, "datasets_skipped": dict(skipped), "load_avg_now": _loadavg()}
            _write(args.out, report)

        record(
            "validity",
            lambda: {
                **run_validity(
                    valid_shops, backend, args.requests, args.group_size, args.reason_tokens, args.seed, partial
                ),
                "datasets_skipped": dict(skipped),
            },
        )

    if "bias" in sections and args.bias_users > 0:
        target = shop("ml-100k") if not args.quick else None
        target = target or shop("demo")
        assert target is not None
        record("bias", lambda: run_bias(target, backend, args.bias_users, args.seed))

    report["machine"] = machine(args.backend)
    report["peak_rss_mb"] = _peak_rss_mb()
    _write(args.out, report)
    plot(report, args.plot or args.out.with_suffix(".png"))
    print(format_summary(report))
    return report


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"generator benchmark ({report['machine'].get('backend')})"]
    v = report.get("validity")
    if v:
        lines.append(
            f"validity: {v['requests']} requests, parsed {v['parsed_share']}, invalid {v['invalid']}, "
            f"fallbacks {v['fallbacks']} {v['fallback_reasons']}"
        )
    lat = report.get("latency")
    if lat:
        for name, s in lat["ms"].items():
            if s:
                lines.append(f"  {name:18s} p50 {s['p50']:8.1f} ms   p95 {s['p95']:8.1f} ms")
        lines.append(f"  throughput {lat['throughput']}, peak RSS {lat['peak_rss_mb']} MB")
    b = report.get("bias")
    if b:
        for name, c in b["conditions"].items():
            lines.append(
                f"  bias {name:14s} mean rank {c['mean_rank']:6.2f}  NDCG@10 {c['ndcg@10'][0]:.3f}  "
                f"first listed wins {c['first_listed_wins']:.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
