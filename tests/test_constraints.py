"""The category guarantee: feasibility and the look-ahead mask checked against brute force, violations by type."""

import itertools
import time

import numpy as np
import pytest
from pydantic import ValidationError

from generator.constraints import (
    CategoryConstraint,
    allowed_next,
    category_at_level,
    check_picks,
    cut_categories,
    feasible,
)


def _valid(cats, picks, k, c):
    ids = list(range(len(cats)))
    return check_picks([ids[i] for i in picks], ids, cats, k, c) == []


def _completable(cats, chosen, k, c):
    """Brute force: does some completion of `chosen` to k distinct picks satisfy the constraint?"""
    rest = [i for i in range(len(cats)) if i not in chosen]
    return any(_valid(cats, list(chosen) + list(more), k, c) for more in itertools.combinations(rest, k - len(chosen)))


def _random_instance(rng, max_n=7, max_cats=4):
    n = int(rng.integers(1, max_n + 1))
    cats = [f"C{x}" for x in rng.integers(0, int(rng.integers(1, max_cats + 1)), n)]
    cap = None if rng.random() < 0.3 else int(rng.integers(1, 4))
    m = None if rng.random() < 0.3 else int(rng.integers(1, max_cats + 1))
    k = int(rng.integers(0, min(n, 10) + 2))
    return cats, k, CategoryConstraint(max_per_category=cap, min_categories=m)


# --- the model ---------------------------------------------------------------------------------------------------


def test_constraint_is_frozen_strict_and_documented():
    c = CategoryConstraint(max_per_category=2, min_categories=3)
    assert c.level == 1
    with pytest.raises(ValidationError):
        c.max_per_category = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        CategoryConstraint(max_per_categry=2)  # type: ignore[call-arg]
    for bad in ({"max_per_category": 0}, {"min_categories": 0}, {"level": 0}):
        with pytest.raises(ValidationError):
            CategoryConstraint(**bad)
    props = CategoryConstraint.model_json_schema()["properties"]
    assert set(props) == {"max_per_category", "min_categories", "level"}
    assert all(p.get("description") for p in props.values())


def test_category_cut_is_idempotent():
    assert category_at_level("Office > Pens > Gel", 1) == "Office"
    assert category_at_level("Office > Pens > Gel", 2) == "Office > Pens"
    assert category_at_level("Office", 3) == "Office"
    assert cut_categories(cut_categories(["A > B > C", "", "D"], 2), 2) == ["A > B", "", "D"]
    with pytest.raises(ValueError, match="level must be >= 1"):
        category_at_level("A", 0)


# --- feasible ----------------------------------------------------------------------------------------------------


def test_feasible_explains_each_reason():
    cats = ["A", "A", "A", "A", "A", "B"]
    assert feasible(CategoryConstraint(max_per_category=2), cats, 3) is None  # A:2 + B:1 = 3
    msg = feasible(CategoryConstraint(max_per_category=2), cats, 4)
    assert msg is not None and "at most 3 picks fit under max_per_category=2" in msg and "k=4" in msg
    msg = feasible(CategoryConstraint(min_categories=3), cats, 3)
    assert msg == "only 2 distinct categories among the candidates (level 1), min_categories=3"
    msg = feasible(CategoryConstraint(min_categories=2), cats, 1)
    assert msg == "k=1 picks cannot span min_categories=2 categories"
    msg = feasible(CategoryConstraint(), cats, 7)
    assert msg == "k=7 picks asked for but only 6 candidates"
    # Two reasons at once are both given.
    msg = feasible(CategoryConstraint(max_per_category=1, min_categories=3), cats, 3)
    assert msg is not None and "at most 2 picks" in msg and "only 2 distinct categories" in msg
    with pytest.raises(ValueError, match="non-negative integer"):
        feasible(CategoryConstraint(), cats, -1)


def test_feasible_cuts_paths_at_the_level():
    paths = ["Office > Pens", "Office > Paper", "Office > Paper"]
    assert feasible(CategoryConstraint(min_categories=2, level=2), paths, 2) is None
    msg = feasible(CategoryConstraint(min_categories=2, level=1), paths, 2)
    assert msg == "only 1 distinct categories among the candidates (level 1), min_categories=2"


def test_feasible_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(400):
        cats, k, c = _random_instance(rng)
        brute = k <= len(cats) and _completable(cats, [], k, c)
        assert (feasible(c, cats, k) is None) == brute, (cats, k, c)


# --- allowed_next ------------------------------------------------------------------------------------------------


def test_allowed_next_by_hand():
    cats = ["A", "A", "A", "B", "C"]
    c = CategoryConstraint(max_per_category=2, min_categories=3)
    # k=4, nothing chosen: 2 slots of slack, anything goes.
    assert allowed_next(c, cats, [], 4).tolist() == [True] * 5
    # A, A chosen: A is at its cap, and the 2 open slots must open B and C.
    assert allowed_next(c, cats, [0, 1], 4).tolist() == [False, False, False, True, True]
    # k=3, A chosen: 2 open slots, 2 categories to open: only new categories.
    assert allowed_next(c, cats, [0], 3).tolist() == [False, False, False, True, True]
    # k=4, A and B chosen: C still to open but 2 slots left, so any unchosen item is fine (A and B are under cap 2).
    assert allowed_next(c, cats, [0, 3], 4).tolist() == [False, True, True, False, True]
    # Complete list: nothing may follow.
    assert not allowed_next(c, cats, [0, 3, 4], 3).any()


def test_allowed_next_rejects_bad_states():
    cats = ["A", "A", "A", "B"]
    c = CategoryConstraint(max_per_category=2, min_categories=2)
    for chosen, k, msg in [
        ([0, 0], 3, "distinct"),
        ([7], 3, "out of range"),
        ([0, 3, 1], 2, "already chosen but k=2"),
        ([0, 1, 2], 4, "exceed max_per_category=2"),
        ([0, 1], 2, "1 more categories needed for min_categories=2 but only 0 picks left"),
        ([], 4, "only 3 remain possible under the caps"),
    ]:
        with pytest.raises(ValueError, match=msg):
            allowed_next(c, cats, chosen, k)
    with pytest.raises(ValueError, match="but only 0 remain"):
        allowed_next(CategoryConstraint(min_categories=3), cats, [0, 3], 4)


def test_allowed_next_is_exact_against_brute_force():
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(300):
        cats, k, c = _random_instance(rng)
        if feasible(c, cats, k) is not None:
            continue
        chosen: list[int] = []
        while len(chosen) < k:
            mask = allowed_next(c, cats, chosen, k)
            for i in range(len(cats)):
                expect = i not in chosen and _completable(cats, [*chosen, i], k, c)
                assert mask[i] == expect, (cats, k, c, chosen, i)
            checked += 1
            chosen.append(int(rng.choice(np.flatnonzero(mask))))
    assert checked > 200


def test_allowed_next_never_dead_ends():
    """Random walks on larger instances: every state reached has a move, and every finished list is valid."""
    rng = np.random.default_rng(3)
    walks = 0
    for _ in range(300):
        cats, k, c = _random_instance(rng, max_n=40, max_cats=8)
        if feasible(c, cats, k) is not None:
            continue
        chosen: list[int] = []
        while len(chosen) < k:
            mask = allowed_next(c, cats, chosen, k)
            assert mask.any(), (cats, k, c, chosen)
            chosen.append(int(rng.choice(np.flatnonzero(mask))))
        assert not allowed_next(c, cats, chosen, k).any()
        assert _valid(cats, chosen, k, c)
        walks += 1
    assert walks > 100


def test_allowed_next_is_fast():
    """The decoder calls it at every step: aim ≤ 50 µs for 50 candidates (min of repeats, robust to a busy box)."""
    rng = np.random.default_rng(4)
    cats = [f"Dept{x}" for x in rng.integers(0, 8, 50)]
    c = CategoryConstraint(max_per_category=2, min_categories=3)
    chosen = [int(i) for i in rng.choice(50, 3, replace=False)]
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            allowed_next(c, cats, chosen, 5)
        per_call.append((time.perf_counter() - t0) / 200)
    assert min(per_call) < 100e-6, f"allowed_next took {min(per_call) * 1e6:.0f} µs per call"


# --- check_picks -------------------------------------------------------------------------------------------------


def test_check_picks_names_every_violation():
    ids = ["p1", "p2", "p3", "p4", "p5"]
    cats = ["Office > Pens", "Office > Paper", "Office > Ink", "Toys > Cars", "Books"]
    c = CategoryConstraint(max_per_category=2, min_categories=3)
    assert check_picks(["p1", "p4", "p5"], ids, cats, 3, c) == []
    assert check_picks(["p1", "p4", "p5"], ids, cats, 3, None) == []
    assert check_picks(["p1", "zz", "p5"], ids, cats, 3, None) == ["pick 'zz' (position 1) is not among the candidates"]
    assert check_picks(["p1", "p4", "p1"], ids, cats, 3, None) == ["duplicate pick 'p1' (positions 0 and 2)"]
    assert check_picks(["p1", "p4"], ids, cats, 3, None) == ["expected k=3 picks, got 2"]
    assert check_picks(["p1", "p2", "p3"], ids, cats, 3, CategoryConstraint(max_per_category=2)) == [
        "category 'Office' has 3 picks, max_per_category=2"
    ]
    assert check_picks(["p1", "p2", "p4"], ids, cats, 3, CategoryConstraint(min_categories=3)) == [
        "picks span only 2 distinct categories, min_categories=3"
    ]
    # At level 2 the three Office items are different categories.
    assert check_picks(["p1", "p2", "p3"], ids, cats, 3, CategoryConstraint(max_per_category=1, level=2)) == []
    # Everything at once.
    assert check_picks(["p1", "p2", "p3", "p3", "x"], ids, cats, 3, c) == [
        "duplicate pick 'p3' (positions 2 and 3)",
        "pick 'x' (position 4) is not among the candidates",
        "expected k=3 picks, got 5",
        "category 'Office' has 3 picks, max_per_category=2",
        "picks span only 1 distinct categories, min_categories=3",
    ]


def test_check_picks_rejects_inconsistent_candidates():
    with pytest.raises(ValueError, match="same length"):
        check_picks([], ["a", "b"], ["A"], 0, None)
    with pytest.raises(ValueError, match="distinct, repeated: \\['a'\\]"):
        check_picks([], ["a", "a"], ["A", "B"], 0, None)
