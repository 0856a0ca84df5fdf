"""The chat parser's scoring (hand-computed counts) and the labelled set's shape."""

from __future__ import annotations

from eval.chat_protocol import load_set, score


def test_score_counts_by_hand():
    rows = [
        {"id": "a", "message": "m1", "shown": [], "expected": {"max_price": 50.0, "brands": ["X", "Y"]}},
        {"id": "b", "message": "m2", "shown": [], "expected": {"category": "A > B"}},
    ]
    answers = {"m1": {"max_price": 50.004, "brands": ["X", "Z"]}, "m2": {"category": "A", "min_price": 3.0}}
    out = score(rows, lambda message, shown: answers[message])
    s = out["per_slot"]
    assert (s["max_price"]["tp"], s["max_price"]["fp"], s["max_price"]["fn"]) == (1, 0, 0)
    assert (s["brands"]["tp"], s["brands"]["fp"], s["brands"]["fn"]) == (1, 1, 1)
    assert (s["category"]["tp"], s["category"]["fp"], s["category"]["fn"]) == (0, 1, 1)
    assert s["min_price"]["precision"] == 0.0 and s["cart"]["f1"] == 1.0  # never labelled nor predicted
    assert out["exact"] == 0 and len(out["errors"]) == 2


def test_labelled_set_is_large_and_split():
    rows = load_set(split="all")
    assert len(rows) >= 300
    assert {r["split"] for r in rows} == {"dev", "test"}
    assert len({r["id"] for r in rows}) == len(rows)


def test_conversations_never_name_the_title_and_the_target_satisfies_the_refinement(small_shop):
    import random
    from collections import Counter, defaultdict

    from eval.chat_protocol import constraint_violations, write_conversation
    from eval.splits import Case
    from retrieval.catalog import Catalog

    catalog = Catalog(small_shop.items)
    brands = defaultdict(Counter)
    for it in catalog.items:
        brands[" > ".join(it.category)][it.brand] += 1
    kinds = Counter()
    for n, item in enumerate(catalog.items[:150]):
        conv = write_conversation(Case("u", (), item.id), catalog, brands, random.Random(n))
        kinds[conv.refine_kind] += 1
        assert item.title.lower() not in conv.first.lower()
        assert constraint_violations(catalog, [item.id], conv.constraints) == 0
        assert constraint_violations(catalog, [item.id], conv.refine_constraints) == 0
    assert kinds["brand"] and kinds["budget"]  # both refinements occur


def test_constraint_violations_by_hand(small_shop):
    from eval.chat_protocol import constraint_violations
    from retrieval.catalog import Catalog

    catalog = Catalog(small_shop.items)
    cheap, dear = sorted((it for it in catalog.items if it.price), key=lambda it: it.price)[:: len(catalog) - 1][:2]
    ids = [cheap.id, dear.id, "not-an-item"]
    assert constraint_violations(catalog, ids, {"max_price": cheap.price}) == 1
    assert constraint_violations(catalog, ids, {"min_price": dear.price, "rejected": [dear.id]}) == 2
    assert constraint_violations(catalog, ids, {"excluded_brands": [cheap.brand, dear.brand]}) == 2
