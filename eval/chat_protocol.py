"""Measures the chat assistant. Part 1 (here now): the parsers' per-slot precision / recall / F1 on the labelled set.

    python -m eval.chat_protocol --parser [--split test|dev|all] [--out eval/results/chat-parser.json]

The set (eval/data/chat_requests.jsonl, written by eval/chat_requests_make.py and frozen before any measurement)
labels each message with the slots it sets. Scoring per slot:

- scalar slots (min_price, max_price, category): a prediction equal to the label (prices within 0.01) is a true
  positive; a different non-empty prediction is a false positive AND, when a label exists, a false negative;
- list slots (brands, excluded_brands, references, rejected, cart): set overlap per request, summed.

precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (1.0 for a slot never labelled nor
predicted). `dev` requests use half of each phrasing list and `test` the other half: improve on dev, report test.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parser", action="store_true", help="Score the parsers on the labelled set.")
    ap.add_argument("--split", default="test", choices=("dev", "test", "all"))
    ap.add_argument("--out", type=Path, default=None, help="Write the JSON result here.")
    ap.add_argument("--show-errors", type=int, default=0, help="Print this many wrong requests (dev only!).")
    args = ap.parse_args(argv)
    if not args.parser:
        ap.error("only --parser is implemented so far (the ranking protocol is not done yet)")
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
