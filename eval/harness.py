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

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eval.config import (
    BUILTIN,
    GENERATOR_DEFAULTS,
    RETRIEVERS,
    SUITES,
    SYSTEMS,
    ConfigError,
    EvalConfig,
    load_configs,
    read_config,
    validate_config,
)
from eval.curve import curve_configs, summarise_curve
from eval.prepare import Prepared, prepare
from eval.results import code_version, machine, write_json
from eval.runners import CaseOutput, make_llm_backend, protocol_candidates, run_llm, run_retriever
from eval.scoring import case_metrics, summarise
from eval.splits import PROTOCOLS, SPLITS

if TYPE_CHECKING:
    from generator.backends.base import Backend

# The harness is the entry point; these names stay importable from it (`from eval.harness import EvalConfig`).
__all__ = [
    "BUILTIN",
    "GENERATOR_DEFAULTS",
    "PER_USER_KEYS",
    "RESULT_FORMAT",
    "RETRIEVERS",
    "SUITES",
    "SYSTEMS",
    "CaseOutput",
    "ConfigError",
    "EvalConfig",
    "Prepared",
    "code_version",
    "evaluate",
    "load_configs",
    "machine",
    "prepare",
    "protocol_candidates",
    "read_config",
    "run",
    "run_llm",
    "run_retriever",
    "validate_config",
    "write_json",
]

RESULT_FORMAT = "shoprec-eval/1"
PER_USER_KEYS = ("ndcg@10", "recall@10", "mrr@10", "coverage@5", "ild@5", "alpha_ndcg@10", "valid", "grounded")


def evaluate(
    prep: Prepared,
    configs: Sequence[EvalConfig],
    *,
    protocol: str = "full",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    backends: dict[str, Backend] | None = None,
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
    backends: dict[str, Backend] = {}
    caches: dict[str, dict[str, np.ndarray]] = {}
    result = evaluate(prep, configs, protocol=protocol, seed=seed, log=log, backends=backends, score_caches=caches)
    if curve:
        sweep = curve_configs(configs, prep.level, embeddings=prep.vectors is not None)
        if sweep:
            swept = evaluate(prep, sweep, protocol=protocol, seed=seed, log=log, backends=backends, score_caches=caches)
            result["curve"] = summarise_curve(swept["systems"])
    result["code_version"] = code_version()
    result["machine"] = machine()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
