"""Vague shopping requests: does the LLM find their department, and does the turn answer them at all?

    python -m eval.chat_departments --home var/demo [--out eval/results/chat-departments.json]
    python -m eval.chat_departments --gate --home var/demo [--out eval/results/chat-gate.json]

The set (eval/data/chat_broad_requests.jsonl, 80 requests written for the demo shop, 4 per department, before any
measurement) describes a need without the catalog's category words ("we just adopted a puppy", "training for my
first marathon"). For each request, the chat turn's probe (the fused retrieval of the message, 20 candidates, no
user) gives the candidate departments, and each system names one department:

- ``retrieval-top1``: the department of the first candidate;
- ``retrieval-majority``: the most frequent department among the 20 candidates;
- ``llm``: the model's pick among the candidates' departments (at most 8, most frequent first), by one-pass
  label scoring (shoprec/chat/understand.py: it can only answer one of the options), with and without the
  served adapter; its confidence decides in the turn (>= 0.6 takes the department, else the turn may ask).

Reported: accuracy (95% bootstrap CI) of each, the paired difference llm - retrieval-majority, the share of
requests whose department is among the options at all (the ceiling of every system here), the LLM's
precision and coverage at the turn's confidence threshold, and what the deterministic parsers make of each
request (a category, "off-topic", or nothing: the cases where the turn relies on retrieval and the LLM).

``--gate``: the turn's off-topic decision. A first message with no slot gets the help answer when its best
candidate's dense similarity is below `ChatConfig.min_similarity`. Measured on the 80 vague shopping requests
(must be answered) and 40 off-topic ones (eval/data/chat_offtopic_requests.jsonl, written for the project: must
get the help answer), each set split by line parity: the threshold is chosen on the even lines (dev) as the
one that answers the most shopping requests while refusing at least 80% of the off-topic ones, then measured
once on the odd lines (test), against the parsers' vocabulary rule the turn used before.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.persist import atomic_write_json

SET = Path(__file__).resolve().parent / "data" / "chat_broad_requests.jsonl"
OFF_TOPIC = Path(__file__).resolve().parent / "data" / "chat_offtopic_requests.jsonl"
THRESHOLDS = (0.0, 0.2, 0.22, 0.24, 0.26, 0.28, 0.3, 0.32, 0.34, 0.36, 0.38, 0.4)


def load_set(path: Path = SET) -> list[dict[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("message") or not row.get("department"):
            raise ValueError(f"{path}:{n}: each line needs 'message' and 'department'. Fix: add the missing field")
        rows.append(row)
    return rows


def run(home: Path, threads: int = 2, log: Any = print) -> dict[str, Any]:
    import torch

    from eval.metrics import bootstrap_ci
    from retrieval.types import RetrievalRequest
    from shoprec.chat.parse import CatalogVocab, Parser
    from shoprec.chat.turn import ChatConfig
    from shoprec.chat.understand import choose
    from shoprec.config import Settings
    from shoprec.demo import demo_adapter
    from shoprec.service import Shoprec

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    svc = Shoprec(Settings(home=home))
    catalog, retriever = svc.catalog, svc.recommender(use_llm=False).retriever
    parser = Parser(CatalogVocab(catalog.items))
    cfg = ChatConfig()
    adapter = demo_adapter()
    backends: dict[str, Any] = {"llm": svc.backend_for(None)}
    if adapter is not None:
        backends["llm-adapter"] = svc.backend_for(str(adapter))
    rows = load_set()
    departments = sorted({it.category_at(1) for it in catalog.items})
    unknown = sorted({r["department"] for r in rows} - set(departments))
    if unknown:
        raise ValueError(f"{SET}: departments {unknown} are not in the catalog at {home}. Fix: use {departments}")
    results = []
    for n, row in enumerate(rows, start=1):
        msg, gold = row["message"], row["department"]
        parsed = parser.parse(msg)
        parse_outcome = "category" if parsed.category else ("off-topic" if parsed.off_topic else "none")
        probe = retriever.retrieve(RetrievalRequest(query=msg), cfg.n_candidates)
        counts = Counter(catalog[c.item_id].category_at(1) for c in probe)
        options = [d for d, _ in counts.most_common(8)]
        out: dict[str, Any] = {
            "message": msg,
            "department": gold,
            "parser": parse_outcome,
            "parser_category": parsed.category,
            "options": options,
            "in_options": gold in options,
            "retrieval-top1": catalog[probe[0].item_id].category_at(1) if probe else None,
            "retrieval-majority": options[0] if options else None,
        }
        for name, backend in backends.items():
            for suffix, rotations in (("", 1), ("-rotated", len(options))):
                choice = choose(backend, msg, options, rotations=rotations) if len(options) >= 2 else None
                out[name + suffix] = choice.value if choice else (options[0] if options else None)
                out[f"{name}{suffix}_confidence"] = round(choice.confidence, 4) if choice else 1.0
        results.append(out)
        if n % 20 == 0:
            log(f"  {n}/{len(rows)} requests, {time.perf_counter() - t0:.0f}s")
    llms = [name + suffix for name in backends for suffix in ("", "-rotated")]
    systems = ["retrieval-top1", "retrieval-majority", *llms]
    correct = {s: np.array([float(r[s] == r["department"]) for r in results]) for s in systems}
    summary: dict[str, Any] = {
        "home": str(home),
        "requests": len(results),
        "departments": len(departments),
        "adapter": str(adapter) if adapter else None,
        "in_options": round(float(np.mean([r["in_options"] for r in results])), 4),
        "parser": dict(Counter(r["parser"] for r in results)),
        "parser_category_right": sum(
            1 for r in results if r["parser_category"] and r["parser_category"].split(" > ")[0] == r["department"]
        ),
        "accuracy": {s: [round(x, 4) for x in bootstrap_ci(correct[s])] for s in systems},
        "paired_vs_majority": {
            s: [round(x, 4) for x in bootstrap_ci(correct[s] - correct["retrieval-majority"])] for s in llms
        },
        "at_threshold": {},
        "seconds": round(time.perf_counter() - t0, 1),
        "per_request": results,
    }
    for name in llms:
        conf = np.array([r[f"{name}_confidence"] for r in results])
        sure = conf >= cfg.min_confidence
        summary["at_threshold"][name] = {
            "threshold": cfg.min_confidence,
            "coverage": round(float(sure.mean()), 4),
            "precision": round(float(correct[name][sure].mean()), 4) if sure.any() else None,
            "majority_precision_same_requests": round(float(correct["retrieval-majority"][sure].mean()), 4)
            if sure.any()
            else None,
        }
    return summary


def run_gate(home: Path, log: Any = print) -> dict[str, Any]:
    from shoprec.chat.state import ChatState
    from shoprec.chat.turn import ChatConfig, ChatEngine
    from shoprec.config import Settings
    from shoprec.service import Shoprec

    t0 = time.perf_counter()
    svc = Shoprec(Settings(home=home))
    rec = svc.recommender(use_llm=False)
    shopping = [r["message"] for r in load_set()]
    off_topic = [json.loads(line)["message"] for line in OFF_TOPIC.read_text(encoding="utf-8").splitlines() if line]

    engine = ChatEngine(svc.catalog, rec, config=ChatConfig(use_llm=False))

    def answered(messages: list[str], tau: float | None) -> list[bool]:
        if tau is None:  # the rule before: the parsers alone (none of the words in the catalog = off-topic)
            return [not (p.off_topic or p.unknown_words or p.injection) for p in map(engine.parser.parse, messages)]
        engine.config = ChatConfig(use_llm=False, min_similarity=tau)
        return [engine.answer(m, ChatState()).kind != "help" for m in messages]

    def rates(split: int, tau: float | None) -> dict[str, float]:
        shop = [m for n, m in enumerate(shopping) if n % 2 == split]
        off = [m for n, m in enumerate(off_topic) if n % 2 == split]
        return {
            "shopping_answered": round(float(np.mean(answered(shop, tau))), 4),
            "off_topic_refused": round(float(np.mean([not a for a in answered(off, tau)])), 4),
            "n_shopping": len(shop),
            "n_off_topic": len(off),
        }

    dev = {tau: rates(0, tau) for tau in THRESHOLDS}
    ok = [t for t in THRESHOLDS if dev[t]["off_topic_refused"] >= 0.8]
    chosen = max(ok, key=lambda t: (dev[t]["shopping_answered"], -t)) if ok else max(THRESHOLDS)
    log(f"chosen on dev: min_similarity {chosen}")
    return {
        "home": str(home),
        "rule": "help when no slot and the best candidate's dense similarity < threshold",
        "dev": {str(t): r for t, r in dev.items()},
        "dev_vocabulary_rule": rates(0, None),
        "chosen_threshold": chosen,
        "test": rates(1, chosen),
        "test_vocabulary_rule": rates(1, None),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path("var/demo"), help="A built demo home (shoprec demo).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gate", action="store_true", help="Measure the turn's off-topic gate instead.")
    ap.add_argument("--out", type=Path, default=None, help="Result JSON (default eval/results/chat-departments.json "
                    "or chat-gate.json).")  # fmt: skip
    args = ap.parse_args(argv)
    args.out = args.out or Path("eval/results") / ("chat-gate.json" if args.gate else "chat-departments.json")
    result = run_gate(args.home) if args.gate else run(args.home, args.threads)
    print(json.dumps({k: v for k, v in result.items() if k != "per_request"}, indent=2))
    atomic_write_json(args.out, result)  # a stopped run never leaves half a result file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
