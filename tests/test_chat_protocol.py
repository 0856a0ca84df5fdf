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
