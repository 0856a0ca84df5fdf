"""Measures the chat assistant: the parsers on a labelled set, and whole conversations on held-out items.

    python -m eval.chat_protocol --parser [--split test|dev|all] [--out eval/results/chat-parser.json]
    python -m eval.chat_protocol --dataset demo|ml-100k|office [--users 200] [--out eval/results/chat-demo.json]

**Parsers.** The set (eval/data/chat_requests.jsonl, written by eval/chat_requests_make.py and frozen before any
measurement) labels each message with the slots it sets. Scoring per slot:

- scalar slots (min_price, max_price, category): a prediction equal to the label (prices within 0.01) is a true
  positive; a different non-empty prediction is a false positive AND, when a label exists, a false negative;
- list slots (brands, excluded_brands, references, rejected, cart): set overlap per request, summed.

precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (1.0 for a slot never labelled nor
predicted). `dev` requests use half of each phrasing list and `test` the other half: improve on dev, report test.

**Conversations.** Leave-one-out: each sampled test user's last item is the target (users whose target is already in
their history — repeat purchases — are left out: the assistant finds new products); every signal is fitted on the
training part only. A seeded template writes the first message from the TARGET's attributes (its leaf or parent
category words, sometimes its brand, a price band around its price where the catalog has prices; never its
title), and a refinement the target still satisfies: a competitor brand excluded, a lower budget still above the
target's price, or else one shown non-target card rejected (a simulated shopper who knows what they want). A
clarifying question is answered by the simulated shopper with the target's department when it is offered, else
by repeating the request. Systems, same users, same messages:

- ``bm25-raw`` / ``dense-raw``: the raw text (both turns joined for turn 2) as a search query, nothing parsed;
- ``parsed``: the chat state (parsers only) as filters + query over the fused retriever, no LLM;
- ``full``: the whole turn (parsers, LLM department choice when broad, LLM score-mode ranking);
- ``full-no-history``: the same for a shopper without history.

Per turn: NDCG@10 and HR@10 with 95% bootstrap CIs; each system's paired NDCG@10 difference to the raw baselines
with its CI; constraint violations (an item over the asked budget, of an excluded brand or a rejected card: must
be 0 for the chat systems); RecLM-eval's error rates: candidate (an id not in the catalog), duplicate, history
(an item the shopper already has). The LLM ranks without writing reasons (they never change the order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SET = Path(__file__).resolve().parent / "data" / "chat_requests.jsonl"
SCALARS = ("min_price", "max_price", "category")
LISTS = ("brands", "excluded_brands", "references", "rejected", "cart")


def load_set(path: Path = SET, split: str = "test") -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e}). Fix the line.") from None
        if split == "all" or row["split"] == split:
            rows.append(row)
    return rows


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return abs(float(a) - float(b)) <= 0.011
    return bool(a == b)


def score(rows: list[dict[str, Any]], parse: Any) -> dict[str, Any]:
    """Per-slot TP/FP/FN, precision, recall, F1; `parse(message, shown) -> slots dict`."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    errors = []
    for row in rows:
        got = parse(row["message"], row["shown"])
        want = row["expected"]
        wrong = False
        for slot in SCALARS:
            g, w = got.get(slot), want.get(slot)
            c = counts[slot]
            if g is not None and w is not None and _same(g, w):
                c[0] += 1
            else:
                if g is not None:
                    c[1] += 1
                    wrong = True
                if w is not None:
                    c[2] += 1
                    wrong = True
        for slot in LISTS:
            g, w = set(got.get(slot) or ()), set(want.get(slot) or ())
            c = counts[slot]
            c[0] += len(g & w)
            c[1] += len(g - w)
            c[2] += len(w - g)
            wrong = wrong or g != w
        if wrong:
            errors.append({"id": row["id"], "message": row["message"], "expected": want, "got": got})
    per_slot = {}
    for slot in (*SCALARS, *LISTS):
        tp, fp, fn = counts[slot]
        p = tp / (tp + fp) if tp + fp else 1.0
        r = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_slot[slot] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": round(p, 4),
            "recall": round(r, 4),
            "f1": round(f1, 4),
        }
    tp, fp, fn = (sum(counts[s][i] for s in counts) for i in range(3))
    micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {
        "requests": len(rows),
        "exact": len(rows) - len(errors),
        "micro_f1": round(micro, 4),
        "per_slot": per_slot,
        "errors": errors,
    }


def parser_for_demo() -> Any:
    """The deterministic parser over the demo shop's catalog (the set's vocabulary), as `score` wants it."""
    from retrieval.synthetic import SyntheticConfig, generate
    from shoprec.chat.parse import CatalogVocab, Parser
    from shoprec.chat.state import ChatState, ShownItem

    parser = Parser(CatalogVocab(generate(SyntheticConfig(seed=0)).items))

    def parse(message: str, shown: list[dict[str, Any]]) -> dict[str, Any]:
        state = ChatState(shown=tuple(ShownItem(**s) for s in shown))
        return parser.parse(message, state).slots()

    return parse


# ---------------------------------------------------------------------------------------------- conversations

FIRST = [
    "I'm looking for {c}",
    "{c} please",
    "show me some {c}",
    "any {c} you'd recommend?",
    "I need new {c}",
    "what {c} do you have",
    "help me find {c}",
    "recommend me {c}",
    "I want to buy {c}",
    "got any good {c}?",
    "searching for {c}",
    "{c}, something good",
    "a gift idea: {c}",
    "can you suggest {c}",
]
WITH_BRAND = [" from {b}", " by {b}", ", ideally {b}", ", {b} if you have it", " made by {b}"]
BUDGET = [" under ${p}", ", less than {p} dollars", " for at most {p}€", ", budget {p}", " below ${p}"]
BAND = [" between {lo} and {hi} dollars", " from ${lo} to ${hi}", ", {lo}-{hi} euros"]
NO_BRAND = ["no {b} please", "not {b}", "anything but {b}", "without {b}", "skip {b}"]
LOWER = ["cheaper, under ${p}", "make it under {p} dollars", "less than ${p} please", "max {p}"]
REJECT = ["not the {o} one", "I don't like the {o} one", "remove the {o} one"]
ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth"]


def _nice_above(x: float) -> int:
    """The next round amount above x (a budget a shopper would say)."""
    for step in (5, 10, 25, 50, 100, 250, 500, 1000):
        if x < step * 10:
            return int((x // step + 1) * step)
    return int(x) + 1


@dataclass
class Conversation:
    """One simulated shopper: the target, its turns' texts (the refinement may depend on what was shown)."""

    case: Any
    first: str
    constraints: dict[str, Any]  # what the shopper asked for in turn 1: max_price, min_price
    refine_kind: str  # "brand" | "budget" | "reject"
    refine: str = ""  # the text, for "brand" and "budget"
    refine_constraints: dict[str, Any] = field(default_factory=dict)


def write_conversation(case: Any, catalog: Any, brands_by_leaf: dict[str, Counter], rng: random.Random) -> Conversation:
    t = catalog[case.target]
    path = t.category
    level = len(path) if (rng.random() < 0.6 or len(path) == 1) else len(path) - 1
    word = path[level - 1]
    word = word.lower() if rng.random() < 0.5 else word
    text = rng.choice(FIRST).format(c=word)
    constraints: dict[str, Any] = {}
    if t.brand and rng.random() < 0.4:
        text += rng.choice(WITH_BRAND).format(b=t.brand)
    if t.price is not None and rng.random() < 0.7:
        if rng.random() < 0.6:
            budget = _nice_above(t.price * 1.15)
            text += rng.choice(BUDGET).format(p=budget)
            constraints["max_price"] = float(budget)
        else:
            lo, hi = int(t.price * 0.7), _nice_above(t.price * 1.2)
            text += rng.choice(BAND).format(lo=lo, hi=hi)
            constraints.update(min_price=float(lo), max_price=float(hi))
    conv = Conversation(case=case, first=text, constraints=constraints, refine_kind="reject")
    leaf = " > ".join(path)
    rivals = [b for b, _ in brands_by_leaf.get(leaf, Counter()).most_common(5) if b and b != t.brand]
    options = []
    if rivals:
        options.append("brand")
    if t.price is not None and "max_price" in constraints and constraints["max_price"] > _nice_above(t.price):
        options.append("budget")
    kind = rng.choice(options) if options else "reject"
    conv.refine_kind = kind
    if kind == "brand":
        b = rng.choice(rivals[:3])
        conv.refine = rng.choice(NO_BRAND).format(b=b)
        conv.refine_constraints = {**constraints, "excluded_brands": [b]}
    elif kind == "budget":
        p = _nice_above(t.price)  # type: ignore[arg-type]
        conv.refine = rng.choice(LOWER).format(p=p)
        conv.refine_constraints = {**constraints, "max_price": float(p)}
    else:
        conv.refine_constraints = dict(constraints)
    return conv


def reject_text(shown: Sequence[str], target: str, rng: random.Random) -> tuple[str, str | None]:
    """'not the second one' for the first shown card that is not the target (the shopper knows what they want)."""
    for i, item_id in enumerate(shown[: len(ORDINAL_WORDS)]):
        if item_id != target:
            return rng.choice(REJECT).format(o=ORDINAL_WORDS[i]), item_id
    return "show me more", None


def constraint_violations(catalog: Any, ids: Sequence[str], constraints: Mapping[str, Any]) -> int:
    """Items of one list that break what the shopper asked (budget, excluded brands, rejected cards)."""
    bad = 0
    for i in ids:
        if i not in catalog:
            continue  # counted as a candidate error instead
        it = catalog[i]
        hi, lo = constraints.get("max_price"), constraints.get("min_price")
        over = hi is not None and (it.price is None or it.price > hi + 1e-9)
        under = lo is not None and (it.price is None or it.price < lo - 1e-9)
        banned = bool(it.brand) and it.brand in constraints.get("excluded_brands", ())
        bad += int(over or under or banned or i in constraints.get("rejected", ()))
    return bad


def _signals(dataset: str, catalog: Any, train: Mapping[str, Sequence[Any]], log: Any) -> dict[str, Any]:
    """popularity, item-kNN, BM25 (fitted on the training part) and dense (content only, cached per catalog)."""
    from retrieval.dense import DenseRetriever
    from retrieval.embed import Encoder
    from retrieval.index import fit_signals

    out = fit_signals(catalog, train, ("popularity", "itemknn", "bm25"), log=log)
    cache = Path(os.environ.get("SHOPREC_CHAT_CACHE", "/tmp/shoprec-chat-protocol")) / dataset / "dense"
    encoder = Encoder()
    try:
        out["dense"] = DenseRetriever.load(cache, catalog, encoder)
        log(f"dense: loaded from {cache}")
    except (FileNotFoundError, ValueError, OSError):
        t0 = time.perf_counter()
        dense = DenseRetriever.build(catalog, encoder, progress=False)
        dense.save(cache)
        out["dense"] = dense
        log(f"dense: built in {time.perf_counter() - t0:.0f}s (cached in {cache})")
    return out


def run_conversations(
    dataset: str,
    n_users: int,
    seed: int = 0,
    backend_name: str = "transformers",
    log: Any = print,
    out: Path | None = None,
) -> dict[str, Any]:
    from eval.datasets import load
    from eval.metrics import bootstrap_ci, hit_rate_at_k, ndcg_at_k
    from eval.splits import leave_one_out, sample_users
    from generator.backends import make_backend
    from generator.recommender import Recommender
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.fusion import FusionRetriever
    from retrieval.types import RetrievalRequest
    from shoprec.chat.state import ChatState
    from shoprec.chat.turn import ChatConfig, ChatEngine

    t_start = time.perf_counter()
    name, items, interactions = load(dataset, seed=seed)
    catalog = Catalog(items)
    split = leave_one_out(histories(interactions))
    # a shopper asks the assistant for something NEW: a target already in the history (a repeat purchase, 48% of
    # the demo shop's, none of ml-100k's or Office's) is filtered out by every system's history exclusion, and
    # recommending it would count as a history error
    fresh = [c for c in split.test if c.target not in set(c.history)]
    cases = sample_users(fresh, n_users, seed)
    log(f"{name}: {len(catalog)} items, {len(split.test)} test users ({len(fresh)} with a new target)")
    signals = _signals(name, catalog, split.train, log)
    fused = FusionRetriever(catalog, list(signals.values()))
    raw = {n: FusionRetriever(catalog, [signals[n]]) for n in ("bm25", "dense")}
    backend = make_backend("fake") if backend_name == "fake" else make_backend("transformers")

    class NoReasons(Recommender):  # the ranking exactly as served, minus the reason decoding (never moves it)
        def _write_reasons(self, prepared: Any, chosen: Any) -> Any:
            return [([""] * len(idx), "", None) for idx in chosen]

    vectors = signals["dense"].vectors
    hist = {c.user_id: c.history for c in cases}
    k = 10
    engines = {
        "parsed": ChatEngine(catalog, Recommender(fused, catalog, None, item_vectors=vectors),
                             history=lambda u: hist.get(u, ()), config=ChatConfig(k=k, use_llm=False)),
        "full": ChatEngine(catalog, NoReasons(fused, catalog, backend, item_vectors=vectors),
                           history=lambda u: hist.get(u, ()), config=ChatConfig(k=k)),
    }  # fmt: skip
    engines["full-no-history"] = engines["full"]
    brands_by_leaf: dict[str, Counter] = defaultdict(Counter)
    for it in catalog.items:
        brands_by_leaf[" > ".join(it.category)][it.brand] += 1
    systems = ("bm25-raw", "dense-raw", "parsed", "full", "full-no-history")
    ranks: dict[str, list[list[float]]] = {s: [[], []] for s in systems}
    errors: dict[str, Counter] = {s: Counter() for s in systems}
    questions: Counter = Counter()
    examples: list[dict[str, Any]] = []
    lat: dict[str, list[float]] = defaultdict(list)

    def rank(ids: Sequence[str], target: str) -> float:
        return float(ids.index(target) + 1) if target in ids else math.inf

    def tally(system: str, turn: int, ids: Sequence[str], case: Any, constraints: Mapping[str, Any]) -> None:
        ranks[system][turn].append(rank(ids, case.target))
        e = errors[system]
        e[f"lists_t{turn + 1}"] += 1
        e["items"] += len(ids)
        e["candidate"] += sum(i not in catalog for i in ids)
        e["duplicate"] += len(ids) - len(set(ids))
        e["history"] += sum(i in set(case.history) for i in ids)
        e["violations"] += constraint_violations(catalog, ids, constraints)

    def summarise(done: int) -> dict[str, Any]:
        result: dict[str, Any] = {
            "dataset": name,
            "users": done,
            "repeat_targets_skipped": len(split.test) - len(fresh),
            "k": k,
            "seed": seed,
            "backend": backend_name,
            "systems": {},
        }
        for system in systems:
            row: dict[str, Any] = {}
            for turn in (0, 1):
                r = ranks[system][turn]
                row[f"turn{turn + 1}"] = {
                    "ndcg@10": bootstrap_ci(ndcg_at_k(r, k)),
                    "hr@10": bootstrap_ci(hit_rate_at_k(r, k)),
                    "ndcg@10_per_user": [round(float(x), 4) for x in ndcg_at_k(r, k)],
                }
            e = errors[system]
            row["constraint_violations"] = int(e["violations"])
            row["error_rates"] = {x: round(e[x] / max(e["items"], 1), 4) for x in ("candidate", "duplicate", "history")}
            row["questions_asked"] = int(questions[system])
            if lat[system]:
                row["first_turn_ms_p50"] = round(float(np.percentile(lat[system], 50)), 1)
            result["systems"][system] = row
        result["paired"] = {}
        for system in ("parsed", "full", "full-no-history"):
            for base in ("bm25-raw", "dense-raw"):
                for tn in ("turn1", "turn2"):
                    a = np.array(result["systems"][system][tn]["ndcg@10_per_user"])
                    b = np.array(result["systems"][base][tn]["ndcg@10_per_user"])
                    mean, lo, hi = bootstrap_ci(a - b)
                    rel = (a.mean() / b.mean() - 1) if b.mean() > 0 else math.inf
                    result["paired"][f"{system} vs {base} {tn}"] = {
                        "diff": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "relative": round(float(rel), 4)
                    }  # fmt: skip
        result["examples"] = examples
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        result["partial"] = done < len(cases)
        return result

    for n, case in enumerate(cases, start=1):
        rng = random.Random(f"{seed}-{case.user_id}")
        conv = write_conversation(case, catalog, brands_by_leaf, rng)
        dept = catalog[case.target].category_at(1)
        for system in systems:
            srng = random.Random(f"{seed}-{case.user_id}-refine")  # same wording for every system
            if system.endswith("-raw"):
                ret = raw[system.split("-")[0]]
                req = RetrievalRequest(user_id=case.user_id, history=case.history, query=conv.first)
                first_ids = [c.item_id for c in ret.retrieve(req, k)]
                tally(system, 0, first_ids, case, conv.constraints)
                second, rejected = _refinement(conv, first_ids, case.target, srng)
                cons = {**conv.refine_constraints, "rejected": [rejected] if rejected else []}
                req2 = RetrievalRequest(user_id=case.user_id, history=case.history, query=f"{conv.first}. {second}")
                tally(system, 1, [c.item_id for c in ret.retrieve(req2, k)], case, cons)
                continue
            engine = engines[system]
            user = None if system == "full-no-history" else case.user_id
            t0 = time.perf_counter()
            answer = engine.answer(conv.first, ChatState(), user)
            if answer.kind == "question":
                questions[system] += 1
                reply = dept if dept in answer.suggestions else conv.first
                answer = engine.answer(reply, answer.state, user)
            lat[system].append((time.perf_counter() - t0) * 1000)
            first_ids = [c.item_id for c in answer.cards]
            tally(system, 0, first_ids, case, conv.constraints)
            second, rejected = _refinement(conv, first_ids, case.target, srng)
            cons = {**conv.refine_constraints, "rejected": [rejected] if rejected else []}
            answer2 = engine.answer(second, answer.state, user)
            tally(system, 1, [c.item_id for c in answer2.cards], case, cons)
            if system == "full" and len(examples) < 8:
                examples.append({"user": case.user_id, "target": case.target, "turns": [conv.first, second],
                                 "state": answer2.state.model_dump(mode="json", exclude={"shown"}),
                                 "turn1": first_ids, "turn2": [c.item_id for c in answer2.cards]})  # fmt: skip
        if n % 10 == 0 or n == len(cases):
            nd = {s: float(np.mean(ndcg_at_k(ranks[s][0], k))) for s in systems}
            log(f"  {n}/{len(cases)} users, {time.perf_counter() - t_start:.0f}s; turn-1 NDCG@10 "
                + ", ".join(f"{s} {v:.3f}" for s, v in nd.items()))  # fmt: skip
            if out is not None:  # a long run on a shared box leaves a usable (flagged) result if it is stopped
                write_result(out, summarise(n))
    return summarise(len(cases))


def _refinement(conv: Conversation, shown: Sequence[str], target: str, rng: random.Random) -> tuple[str, str | None]:
    if conv.refine_kind == "reject":
        return reject_text(shown, target, rng)
    return conv.refine, None


def print_conversations(result: Mapping[str, Any]) -> None:
    print(f"{result['dataset']}: {result['users']} users, k={result['k']}, {result.get('seconds', '?')} s")
    for system, s in result["systems"].items():
        cells = []
        for turn in ("turn1", "turn2"):
            m, lo, hi = s[turn]["ndcg@10"]
            h = s[turn]["hr@10"][0]
            cells.append(f"{turn} NDCG@10 {m:.3f} [{lo:.3f}, {hi:.3f}] HR@10 {h:.3f}")
        er = s["error_rates"]
        print(f"  {system:16s} " + " | ".join(cells) + f" | violations {s['constraint_violations']}"
              f" | dup {er['duplicate']:.3f} hist {er['history']:.3f} cand {er['candidate']:.3f}"
              f" | questions {s['questions_asked']}")  # fmt: skip
    for key, v in result["paired"].items():
        print(f"  {key}: {v['diff']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}] ({v['relative']:+.1%})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parser", action="store_true", help="Score the parsers on the labelled set.")
    ap.add_argument("--split", default="test", choices=("dev", "test", "all"))
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON result here.")
    ap.add_argument("--show-errors", type=int, default=0, help="Print this many wrong requests (dev only!).")
    ap.add_argument("--dataset", default=None, help="Run the conversations on demo | ml-100k | office | a folder.")
    ap.add_argument("--users", type=int, default=200, help="Test users sampled (seeded).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="transformers", choices=("transformers", "fake"))
    args = ap.parse_args(argv)
    if args.dataset:
        conv = run_conversations(args.dataset, args.users, args.seed, args.backend, out=args.out)
        print_conversations(conv)
        if args.out:
            write_result(args.out, conv)
        return 0
    if not args.parser:
        ap.error("pass --parser (the labelled set) or --dataset NAME (the conversations)")
    result = score(load_set(split=args.split), parser_for_demo())
    result["split"] = args.split
    for slot, s in result["per_slot"].items():
        counts = f"(tp {s['tp']}, fp {s['fp']}, fn {s['fn']})"
        print(f"{slot:16s} P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}  {counts}")
    n, exact = result["requests"], result["exact"]
    print(f"{args.split}: {n} requests, {exact} fully right, micro-F1 {result['micro_f1']:.3f}")
    for e in result["errors"][: args.show_errors]:
        print(json.dumps(e))
    if args.out:
        write_result(args.out, result)
    return 0


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    """Atomically: a crash never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
