"""Writes eval/data/chat_requests.jsonl: the labelled shopper messages that measure the chat parsers (run once).

Each request is built from a slot recipe (what the shopper wants, drawn from the demo shop's catalog: a category
word, brands, a budget, a card of the last answer) and one of many hand-written phrasings per slot; the labels are
the recipe, never the parser's output. Phrasings are split in two disjoint halves: `dev` requests use one half,
`test` requests the other, so the parser can be improved on dev without ever seeing a test phrasing. Frozen once
written: rerunning with the same seed rewrites the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "chat_requests.jsonl"

# {x}: the category word as a shopper writes it; {b}: a brand; {p}, {lo}, {hi}: amounts already formatted
WANT = [
    "{x}",
    "I need {x}",
    "looking for {x}",
    "show me {x}",
    "any good {x}?",
    "can you find me {x}",
    "{x} please",
    "I'd like some {x}",
    "got any {x}",
    "recommend {x}",
    "searching for {x}",
    "help me pick {x}",
]
MAX = [
    "under {p}",
    "below {p}",
    "less than {p}",
    "at most {p}",
    "no more than {p}",
    "{p} max",
    "up to {p}",
    "budget is {p}",
    "nothing over {p}",
    "{p} or less",
    "max {p}",
    "cheaper than {p}",
]
MIN = [
    "over {p}",
    "above {p}",
    "at least {p}",
    "more than {p}",
    "{p} or more",
    "starting at {p}",
    "minimum {p}",
    "{p} and up",
]
RANGE = [
    "between {lo} and {hi}",
    "from {lo} to {hi}",
    "{lo}-{hi}",
    "between {lo} and {hi} please",
    "{lo} to {hi}",
    "in the {lo} to {hi} range",
]
BRAND = ["from {b}", "by {b}", "{b} brand", "made by {b}", "preferably {b}", "{b} if possible"]
NOBRAND = [
    "no {b}",
    "not {b}",
    "without {b}",
    "anything but {b}",
    "avoid {b}",
    "except {b}",
    "I don't want {b}",
    "nothing from {b}",
    "other than {b}",
    "skip {b}",
]
REF = [
    "more like the {o} one",
    "similar to the {o} one",
    "something like the {o} one",
    "like the {o} one but different",
    "closer to the {o} one",
    "same as the {o} one",
]
REJECT = [
    "not the {o} one",
    "remove the {o} one",
    "I don't like the {o} one",
    "hide the {o} one",
    "drop the {o} one",
    "no to the {o} one",
]
CART = [
    "add the {o} one to my cart",
    "I'll take the {o} one",
    "put the {o} one in the basket",
    "buy the {o} one",
    "add the {o} one",
]
NOTBRAND_REF = ["not that brand", "not this brand", "no more of that brand", "avoid that brand"]
ORDINALS = {1: ["first", "1st"], 2: ["second", "2nd"], 3: ["third", "3rd"], 4: ["fourth"], 5: ["fifth", "last"]}
CHEAPER = ["cheaper", "something cheaper", "show me cheaper ones", "a bit cheaper please", "less expensive"]
CURRENCY = [
    lambda v: f"${v:g}",
    lambda v: f"{v:g} dollars",
    lambda v: f"{v:g}",
    lambda v: f"{v:g} euros",
    lambda v: f"€{v:g}",
    lambda v: f"{v:g}€",
    lambda v: f"{v:,.2f}".replace(",", "X").replace(".", ",").replace("X", ".") + " €",
    lambda v: f"${v:,.2f}",
    lambda v: f"{v:g} bucks",
    lambda v: f"EUR {v:g}",
]


def halves(options: list, split: str, salt: int) -> list:
    """The dev or test half of a phrasing list (disjoint, fixed by a seeded shuffle)."""
    shuffled = options[:]
    random.Random(salt).shuffle(shuffled)
    cut = len(shuffled) // 2
    return shuffled[:cut] if split == "dev" else shuffled[cut:]


def typo(word: str, rng: random.Random) -> str:
    if len(word) < 6:
        return word
    i = rng.randrange(1, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap two letters


def make(seed: int = 0, n: int = 360) -> list[dict]:
    from retrieval.synthetic import SyntheticConfig, generate

    items = generate(SyntheticConfig(seed=0)).items
    rng = random.Random(seed)
    leaves: dict[str, str] = {}
    for it in items:
        leaves.setdefault(it.category[-1], " > ".join(it.category))
    leaf_names = sorted(leaves)
    brands = sorted({it.brand for it in items if it.brand})
    out = []
    for i in range(n):
        split = "dev" if i % 3 == 0 else "test"  # a third to improve on, two thirds measured
        H = lambda opts, salt, split=split: rng.choice(halves(opts, split, salt))  # noqa: E731
        expected: dict = {}
        shown = []
        parts = []
        kind = rng.choice(["first", "first", "first", "refine", "refine"])
        if kind == "first":
            leaf = rng.choice(leaf_names)
            word = leaf.lower()
            if rng.random() < 0.15:
                word = typo(word, rng)
            parts.append(H(WANT, 1).format(x=word))
            expected["category"] = leaves[leaf]
            r = rng.random()
            money = H(CURRENCY, 2)
            if r < 0.35:
                p = float(rng.choice([15, 20, 25, 30, 40, 50, 75, 80, 100, 150, 200, 1250]))
                parts.append(H(MAX, 3).format(p=money(p)))
                expected["max_price"] = p
            elif r < 0.5:
                p = float(rng.choice([10, 20, 30, 50, 100]))
                parts.append(H(MIN, 4).format(p=money(p)))
                expected["min_price"] = p
            elif r < 0.65:
                lo, hi = rng.choice([(10, 30), (20, 50), (50, 100), (100, 250), (15, 40)])
                parts.append(H(RANGE, 5).format(lo=money(float(lo)), hi=money(float(hi))))
                expected["min_price"], expected["max_price"] = float(lo), float(hi)
            if rng.random() < 0.3:
                b = rng.choice(brands)
                parts.append(H(BRAND, 6).format(b=b if rng.random() > 0.3 else b.lower()))
                expected["brands"] = [b]
            if rng.random() < 0.3:
                b = rng.choice(brands)
                if b not in expected.get("brands", []):
                    parts.append(H(NOBRAND, 7).format(b=b))
                    expected["excluded_brands"] = [b]
        else:
            cards = rng.sample(items, 5)
            shown = [{"item_id": c.id, "price": c.price, "brand": c.brand} for c in cards]
            action = rng.choice(["ref", "reject", "cart", "notbrand", "cheaper", "nobrand", "max"])
            o = rng.choice(list(ORDINALS))
            word = rng.choice(ORDINALS[o])
            idx = o - 1
            if action == "ref":
                parts.append(H(REF, 8).format(o=word))
                expected["references"] = [cards[idx].id]
            elif action == "reject":
                parts.append(H(REJECT, 9).format(o=word))
                expected["rejected"] = [cards[idx].id]
            elif action == "cart":
                parts.append(H(CART, 10).format(o=word))
                expected["cart"] = [cards[idx].id]
            elif action == "notbrand":
                parts.append(H(NOTBRAND_REF, 11))
                expected["excluded_brands"] = [cards[0].brand]
            elif action == "cheaper":
                parts.append(H(CHEAPER, 12))
                prices = sorted(c.price for c in cards if c.price is not None)
                mid = (
                    prices[len(prices) // 2]
                    if len(prices) % 2
                    else (prices[len(prices) // 2 - 1] + prices[len(prices) // 2]) / 2
                )
                expected["max_price"] = round(mid - 0.01, 2)
            elif action == "nobrand":
                b = rng.choice(brands)
                parts.append(H(NOBRAND, 7).format(b=b))
                expected["excluded_brands"] = [b]
            else:
                p = float(rng.choice([20, 35, 60, 99, 120]))
                parts.append(H(MAX, 3).format(p=H(CURRENCY, 2)(p)))
                expected["max_price"] = p
        message = ", ".join(parts) if rng.random() < 0.6 else " ".join(parts)
        out.append({"id": f"r{i:03d}", "split": split, "message": message, "shown": shown, "expected": expected})
    return out


if __name__ == "__main__":
    rows = make()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} requests -> {OUT}")
