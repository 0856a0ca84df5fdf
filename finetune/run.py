"""One fine-tuning run, end to end: dataset -> leave-one-out split -> candidate retriever -> examples -> LoRA
training with validation -> fitted fusion weight -> reason check -> exported adapter with its manifest.

What `shoprec finetune` calls. The candidate retriever is trained here on the events before each user's earliest
training target (`finetune.data.split_cases`), never on the index that serves: that one has seen the targets.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.data import build_examples, sample_cases, split_cases
from finetune.export import export
from finetune.train import TrainConfig, load_trainable, prepare_validation, train
from generator.model import DEFAULT_MODEL
from generator.reasons import ReasonContext, check_reason
from generator.recommender import GeneratorConfig, Recommender


class DataOptions(BaseModel):
    """Which data the examples come from, and how many."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(description="'demo' (the synthetic shop), 'ml-100k', 'office', or a dataset folder.")
    seed: int = Field(default=0, description="Seed of the demo shop and of case sampling.")
    positions: int = Field(default=1, ge=1, description="Training targets per user (before validation and test).")
    train_cases: int | None = Field(default=None, ge=1, description="At most this many training cases (sampled).")
    valid_cases: int = Field(default=200, ge=1, description="Validation cases for the curve and the fusion weight.")
    reasons_per_case: int = Field(default=2, ge=0, description="Reason examples per case (target first).")
    rank_examples: int | None = Field(
        default=None, ge=0, description="At most this many ranking examples (None = one per usable case)."
    )
    rank_loss: Literal["answer", "labels"] = Field(
        default="answer",
        description="'answer': ranking examples train the full answer (picks and reasons, generate mode's "
        "output); 'labels': the first pick's label only, softmax over the request's labels (LlamaRec's listwise "
        "loss; what score mode reads).",
    )
    signals: tuple[str, ...] = Field(
        default=("popularity", "itemknn", "bm25", "dense", "sasrec"), description="Retrieval signals for candidates."
    )
    sasrec_epochs: int = Field(default=30, ge=1, description="SASRec's epoch cap when it is among the signals.")
    reason_check_cases: int = Field(default=20, ge=0, description="Validation requests whose reasons are checked.")

    @field_validator("signals")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from retrieval.index import SIGNALS

        bad = [s for s in v if s not in SIGNALS]
        if bad or not v:
            raise ValueError(f"unknown retrieval signal(s) {bad or v}; valid: {', '.join(SIGNALS)}")
        return v


def _load(opts: DataOptions) -> tuple[str, list[Any], list[Any], dict[str, frozenset[str]]]:
    """(name, items, interactions, complements); complements are known for the demo shop only."""
    if opts.dataset == "demo":
        from retrieval.synthetic import SyntheticConfig, generate

        data = generate(SyntheticConfig(seed=opts.seed))
        comp = {k: frozenset(v) for k, v in data.complements.items()}
        return "demo", list(data.items), list(data.interactions), comp
    from eval.datasets import load

    name, items, interactions = load(opts.dataset, seed=opts.seed)
    return name, items, interactions, {}


def run(
    opts: DataOptions,
    cfg: TrainConfig,
    out: Path,
    *,
    generator: GeneratorConfig | None = None,
    base_model: str = DEFAULT_MODEL,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    merged: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run it all and write the adapter to `out`; returns the manifest."""
    from generator.model import ModelSpec, resolve_model_path
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.fusion import FusionRetriever
    from retrieval.index import fit_fusion, fit_signals

    t0 = time.perf_counter()
    # Reason examples read the short one-pick prompt: a full ranking prompt per reason example would make training
    # ~4x longer on a CPU. The manifest records it, and serving renders the same (adapter_generator_settings).
    gen = generator or GeneratorConfig(reason_prompt="pick")
    out = Path(out)
    # keyed by the whole output path: two runs writing adapters named alike (".../ml-100k/adapter",
    # ".../office/adapter") from one folder must not share, and overwrite, each other's checkpoint
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]
    ckpt = checkpoint_dir or Path("var") / "checkpoints" / f"{out.name}-{key}"
    name, items, interactions, complements = _load(opts)
    catalog = Catalog(items)
    split = split_cases(histories(interactions), positions=opts.positions)
    log(f"{name}: {len(items)} items, {len(interactions)} events; {len(split.train)} training cases, "
        f"{len(split.valid)} validation, {len(split.test)} test (never trained on)")  # fmt: skip

    extra: dict[str, Any] = {}
    if "dense" in opts.signals:
        from retrieval.embed import Encoder

        extra["encoder"] = Encoder()
        extra["progress"] = False
    if "sasrec" in opts.signals:
        from retrieval.sequential import SASRecConfig

        extra["sasrec_config"] = SASRecConfig(
            seed=opts.seed, epochs=opts.sasrec_epochs, num_threads=cfg.num_threads, progress=False
        )
    signals = fit_signals(catalog, split.retriever_histories, opts.signals, log=log, **extra)
    fusion = FusionRetriever(catalog, list(signals.values()))
    train_cases = sample_cases(split.train, opts.train_cases, opts.seed)
    fit = fit_fusion(fusion, [(c.history, c.target) for c in train_cases])  # out-of-sample for this retriever
    log(f"retrieval fusion fitted on {fit['cases']} training cases: Recall@20 {fit['fitted_recall']:.3f}")

    from generator.backends.transformers_backend import TransformersBackend  # torch: only once the data is there

    base_path = resolve_model_path(ModelSpec(model=base_model), dtype=cfg.dtype)
    model, tok = load_trainable(base_path, cfg)
    backend = TransformersBackend.from_loaded(model, tok)
    recommender = Recommender(fusion, catalog, backend, config=gen, complements=complements)

    t1 = time.perf_counter()
    examples, stats = build_examples(
        recommender,
        train_cases,
        reasons_per_case=opts.reasons_per_case,
        rank_examples=opts.rank_examples,
        complements=complements,
        rank_loss=opts.rank_loss,
    )
    valid_cases = sample_cases(split.valid, opts.valid_cases, opts.seed + 1)
    valid = prepare_validation(recommender, valid_cases)
    log(
        f"{len(examples)} examples from {stats.used} of {stats.cases} cases ({stats.not_retrieved} targets not "
        f"among the {gen.n_candidates} candidates); {len(valid.prepared)} validation requests "
        f"({time.perf_counter() - t1:.0f}s)"
    )
    result = train(recommender, model, tok, examples, valid, cfg, ckpt, resume=resume, log=log)
    w = result.best_eval["llm_weight"]

    reasons = check_reasons(recommender, valid_cases[: opts.reason_check_cases], gen, w, complements)
    log(f"reasons: {reasons['confirmed']}/{reasons['checked']} cite evidence the checker confirms")
    manifest = {
        "base_model": base_model,
        "peft": {"rank": cfg.rank, "alpha": cfg.alpha, "target_modules": cfg.target_modules, "dropout": cfg.dropout},
        "data": {
            "dataset": name,
            "items": len(items),
            "events": len(interactions),
            "split": "leave-one-out: test = last event, validation = second-to-last, training = the `positions` "
            "events before; candidates from a retriever trained on the events before the first training target",
            "options": opts.model_dump(mode="json"),
            "examples": {**stats.__dict__, **result.stats},
        },
        "train_config": cfg.model_dump(mode="json"),
        "generator_config": gen.model_dump(mode="json"),
        "fusion": {"llm_weight": w, "grid_ndcg@10": result.best_eval["ndcg_by_weight"]},
        "validation": {
            "untuned": result.untuned_eval,
            "best": {
                k: result.best_eval[k]
                for k in ("step", "retrieval", "llm", "fused", "llm_weight", "cases", "retrieved")
                if k in result.best_eval  # "step": absent from a checkpoint of an older version
            },
        },
        "reasons": reasons,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "device": str(next(model.parameters()).device),
            "threads": cfg.num_threads,
        },
        "command": " ".join(["shoprec", *sys.argv[1:]]) if sys.argv and "shoprec" in sys.argv[0] else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    export(result.model, out, manifest, curve=result.curve, merged=merged)
    shutil.rmtree(ckpt, ignore_errors=True)  # the run finished: nothing left to resume
    chosen = result.best_eval.get("step")
    log(
        f"adapter written to {out} (weights of step {chosen}{' = the untuned model' if chosen == 0 else ''}; "
        f"fused weight {w:g}; {result.steps} steps, {result.seconds:.0f}s training)"
    )
    return manifest


def check_reasons(
    recommender: Recommender,
    cases: Sequence[Any],
    gen: GeneratorConfig,
    llm_weight: float,
    complements: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    """Recommend for `cases` through the full pipeline (score mode) and check every reason against the catalog."""
    from retrieval.types import RetrievalRequest

    if not cases:
        return {"checked": 0, "confirmed": 0, "rate": None, "fallbacks": 0, "examples": []}
    cfg = gen.model_copy(update={"llm_weight": llm_weight, "mode": "score", "timeout_s": 600.0})
    requests = [RetrievalRequest(history=c.history) for c in cases]
    recs = recommender.recommend_batch(requests, cfg)
    shown = cfg.reason_history_shown
    checked = confirmed = fallbacks = 0
    by_kind: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    for request, rec in zip(requests, recs, strict=True):
        if rec.fallback:
            fallbacks += 1
            continue
        p = recommender.prepare(request, cfg)
        by_id = {c.item_id: c for c in p.candidates}
        history = request.history[-shown:] if shown else ()
        ctx = ReasonContext(recommender.catalog, history, complements=complements, popular=recommender.popular_items())
        for pick in rec.picks:
            kind = check_reason(pick.reason, recommender.catalog[pick.item_id], ctx, by_id.get(pick.item_id))
            checked += 1
            confirmed += kind is not None
            by_kind[kind or "unconfirmed"] += 1
            if len(samples) < 10:
                samples.append(
                    {"item": recommender.catalog[pick.item_id].title, "reason": pick.reason, "evidence": kind}
                )
    return {
        "checked": checked,
        "confirmed": confirmed,
        "rate": round(confirmed / checked, 4) if checked else None,
        # "explore" (a department new to the shopper: the diversity picks' reason) is reported apart from the
        # personal evidence (history, query, cart) and the retrievers' evidence
        "by_kind": dict(sorted(by_kind.items())),
        "fallbacks": fallbacks,
        "examples": samples,
    }
