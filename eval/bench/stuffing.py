"""Keyword stuffing, before and after: BM25 over the whole text vs over each field's distinct words.

Two measurements, with the old (`WHOLE_TEXT_TOKENIZER`) and the new (`TOKENIZER_VERSION`) BM25 documents, and the
new ones without the title weight (an ablation: `TITLE_WEIGHT` = 1):

1. **The attack.** The demo shop plus one item from an unrelated department whose description repeats
   "wireless headphones" 300 times. Reported: its rank for the search "wireless headphones" in BM25 alone and in
   the fused search the CLI serves (BM25 + dense, the default query-mode fusion), and how many of the top 10 are
   real headphones (category "Electronics > Headphones").
2. **Nothing else got worse.** On the demo shop and Amazon Office (real descriptions, when the shared data is
   there): known-item search (the query is an item's title without its brand and after its first comma, e.g.
   "Max True Wireless Earbuds"; the target is that item; MRR and Recall@10 over every item: a title query, so it
   favours title weighting), category search (the query is a leaf category's name, e.g. "Headphones"; precision@10
   = the share of the top 10 in that leaf, over every leaf: no title bias), and the BM25 signal's next-item
   quality under the retrieval benchmark's protocol (leave-one-out, full ranking, history excluded; the query is
   the last 3 history titles; Recall@20 and NDCG@10), each with the paired difference new - old and its 95%
   bootstrap CI on the same items/leaves/users.

    python -m eval.bench.stuffing --out eval/results/stuffing.json [--datasets demo,office] [--users N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import retrieval.lexical as lexical
from eval import datasets
from eval.metrics import bootstrap_ci, ndcg_at_k, rank_of, recall_at_k
from eval.splits import leave_one_out
from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.lexical import TOKENIZER_VERSION, WHOLE_TEXT_TOKENIZER, BM25Retriever
from retrieval.types import Item, RetrievalRequest

QUERY = "wireless headphones"
STUFFED_ID = "STUFFED-1"
BEFORE, ABLATION, AFTER = "before: whole text", "distinct words per field, title weight 1", "after: shipped"
SCHEMES = {BEFORE: WHOLE_TEXT_TOKENIZER, ABLATION: TOKENIZER_VERSION, AFTER: TOKENIZER_VERSION}


@contextlib.contextmanager
def _scheme(label: str) -> Iterator[str]:
    """The tokenizer of `label`, with the title weight the ablation switches off."""
    weight = lexical.TITLE_WEIGHT
    lexical.TITLE_WEIGHT = 1 if label == ABLATION else weight
    try:
        yield SCHEMES[label]
    finally:
        lexical.TITLE_WEIGHT = weight


def _bm25(catalog: Catalog, label: str) -> BM25Retriever:
    with _scheme(label) as tokenizer:
        return BM25Retriever.build(catalog, tokenizer=tokenizer)


def stuffed_shop(seed: int = 0) -> tuple[Catalog, list[Any]]:
    """The demo shop plus one stuffed item: a garden item whose description repeats the query 300 times."""
    _, items, interactions = datasets.load("demo", seed=seed)
    victim = next(it for it in items if it.category[:1] == ("Garden & Outdoor",))
    stuffed = Item(
        id=STUFFED_ID,
        title=victim.title,
        category=victim.category,
        brand=victim.brand,
        price=victim.price,
        description=victim.description + " " + " ".join([QUERY] * 300),
    )
    return Catalog([*items, stuffed]), interactions


def attack(seed: int, encoder: Any) -> dict[str, Any]:
    from retrieval.dense import DenseRetriever
    from retrieval.fusion import FusionRetriever

    catalog, _ = stuffed_shop(seed)
    dense = DenseRetriever.build(catalog, encoder)
    request = RetrievalRequest(query=QUERY)
    target = catalog.index[STUFFED_ID]
    out: dict[str, Any] = {"query": QUERY, "stuffed_item": catalog[STUFFED_ID].title, "repeats": 300}
    dense_scores = dense.score(request)
    assert dense_scores is not None
    out["dense_rank"] = int(rank_of(dense_scores, target))
    for label in SCHEMES:
        bm25 = _bm25(catalog, label)
        scores = bm25.score(request)
        assert scores is not None
        top10 = [catalog.items[r] for r in np.argsort(-scores, kind="stable")[:10]]
        fused = FusionRetriever(catalog, [bm25, dense]).retrieve(request, 100)
        out[label] = {
            "bm25_rank": int(rank_of(scores, target)),
            "bm25_top10_headphones": sum(it.category[:2] == ("Electronics", "Headphones") for it in top10),
            "fused_search_rank": next((i for i, c in enumerate(fused, start=1) if c.item_id == STUFFED_ID), None),
        }
    return out


def _short_query(item: Item) -> str:
    """The title as a shopper might type it: before the first comma, without the brand."""
    head = item.title.split(",")[0]
    if item.brand and head.lower().startswith(item.brand.lower()):
        head = head[len(item.brand) :]
    return head.strip() or item.title


def _paired(new: np.ndarray, old: np.ndarray, seed: int) -> list[float]:
    return [round(x, 5) for x in bootstrap_ci(new - old, seed=seed)]


def quality(name: str, seed: int, users: int | None) -> dict[str, Any]:
    ds_name, items, interactions = datasets.load(name, seed=seed)
    catalog = Catalog(items)
    split = leave_one_out(histories(interactions))
    test = split.test
    if users is not None and users < len(test):
        pick = np.sort(np.random.default_rng(seed).choice(len(test), size=users, replace=False))
        test = [test[i] for i in pick]
    search_rr: dict[str, np.ndarray] = {}
    search_r10: dict[str, np.ndarray] = {}
    category_p10: dict[str, np.ndarray] = {}
    next_ranks: dict[str, list[float]] = {}
    leaves = sorted({it.category for it in catalog.items if it.category})
    for label in SCHEMES:
        bm25 = _bm25(catalog, label)
        p10 = []
        for leaf in leaves:
            scores = bm25.score(RetrievalRequest(query=leaf[-1]))
            top = [] if scores is None else [r for r in np.argsort(-scores, kind="stable")[:10] if scores[r] > -np.inf]
            p10.append(sum(catalog.items[r].category == leaf for r in top) / 10)
        category_p10[label] = np.asarray(p10)
        ranks = []
        for row, item in enumerate(catalog.items):
            scores = bm25.score(RetrievalRequest(query=_short_query(item)))
            ranks.append(np.inf if scores is None else rank_of(scores, row))
        r = np.asarray(ranks, dtype=np.float64)
        search_rr[label] = np.where(np.isfinite(r), 1.0 / r, 0.0)
        search_r10[label] = (r <= 10).astype(np.float64)
        next_ranks[label] = []
        for case in test:
            request = RetrievalRequest(user_id=case.user_id, history=case.history)
            scores = bm25.score(request)
            mask = catalog.mask(request.filters, request.history)
            target = catalog.index[case.target]
            next_ranks[label].append(np.inf if scores is None else rank_of(scores, target, mask))
    before, after = BEFORE, AFTER
    result: dict[str, Any] = {"dataset": ds_name, "items": len(catalog), "leaves": len(leaves), "test_users": len(test)}
    for label in SCHEMES:
        result[label] = {
            "search_mrr": [round(x, 5) for x in bootstrap_ci(search_rr[label], seed=seed)],
            "search_recall@10": [round(x, 5) for x in bootstrap_ci(search_r10[label], seed=seed)],
            "category_p@10": [round(x, 5) for x in bootstrap_ci(category_p10[label], seed=seed)],
            "next_item_recall@20": [round(x, 5) for x in bootstrap_ci(recall_at_k(next_ranks[label], 20), seed=seed)],
            "next_item_ndcg@10": [round(x, 5) for x in bootstrap_ci(ndcg_at_k(next_ranks[label], 10), seed=seed)],
        }
    result["after_minus_before_paired"] = {
        "search_mrr": _paired(search_rr[after], search_rr[before], seed),
        "search_recall@10": _paired(search_r10[after], search_r10[before], seed),
        "category_p@10": _paired(category_p10[after], category_p10[before], seed),
        "next_item_recall@20": _paired(recall_at_k(next_ranks[after], 20), recall_at_k(next_ranks[before], 20), seed),
        "next_item_ndcg@10": _paired(ndcg_at_k(next_ranks[after], 10), ndcg_at_k(next_ranks[before], 10), seed),
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/stuffing.json"))
    ap.add_argument("--datasets", default="demo,office", help="Comma-separated; unavailable ones are skipped.")
    ap.add_argument("--users", type=int, default=None, help="Test users per dataset for the next-item metric.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from retrieval.embed import Encoder

    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "what": "BM25 keyword stuffing: whole-text BM25 vs distinct words per field (retrieval/lexical.py)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "attack": attack(args.seed, Encoder()),
        "quality": [],
    }
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        try:
            datasets.resolve(name)
        except FileNotFoundError as e:
            print(f"skipping {name}: {e}")
            continue
        report["quality"].append(quality(name, args.seed, args.users))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
