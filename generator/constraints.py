"""The category-diversity guarantee: what a K-list of picks must satisfy, whether it can, and what may come next.

A `CategoryConstraint` is a hard rule (caps per category, a minimum number of distinct categories), unlike the
diversity knob λ in `generator.diversity`, which is a preference. Three pure functions serve every stage:

- `feasible` says, before anything is generated, whether some K-subset of the candidates satisfies the rule;
- `allowed_next` is the look-ahead mask the re-rankers and the constrained LLM decoder call at every step, so that
  a list started under it can always be completed (it never dead-ends);
- `check_picks` validates a finished list (e.g. parsed model output) and names every violation.

Why the look-ahead is a simple count (the proof the code relies on). Let ``a_c = min(n_c, cap) - used_c`` be the
picks still possible in category c (n_c candidates, ``used_c`` already chosen). Choosing any item lowers exactly one
``a_c`` by one and the number of open slots ``r`` by one, so ``sum(a_c) - r`` never changes: if the capacity
suffices at the start, it suffices forever. What remains is coverage: with ``need = min_categories - covered``
categories still to open, a list can be completed iff ``need <= r`` and ``need <= uncovered categories`` (open
one slot in each of ``need`` new categories, fill the rest from any capacity). Picking an item of a NEW category
always keeps that true; picking one of an already covered category keeps it true iff ``r - 1 >= need``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

CATEGORY_SEPARATOR = " > "  # how retrieval.types.Item joins a category path (Item.category_at)


class CategoryConstraint(BaseModel):
    """A hard category-diversity rule for one list of K picks.

    Categories are compared after cutting each candidate's category path (``"Office > Pens > Gel"``) to its first
    `level` levels, so ``level=1`` means "top-level department". An uncategorised item (``""``) counts as one more
    category, named ``""``. ``None`` switches a rule off; a constraint with both rules off allows any K distinct
    candidates.

    - `max_per_category`: no category may hold more than this many of the K picks.
    - `min_categories`: the K picks must span at least this many distinct categories (so K >= min_categories).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_per_category: int | None = Field(
        default=None, ge=1, description="Most picks allowed from one category (cut at `level`); None = no cap."
    )
    min_categories: int | None = Field(
        default=None, ge=1, description="Fewest distinct categories the picks must span; None = no minimum."
    )
    level: int = Field(
        default=1, ge=1, description="Depth of the category path that defines 'the same category' (1 = top level)."
    )


def category_at_level(path: str, level: int) -> str:
    """Cut a ``' > '``-joined category path to its first `level` levels (idempotent: cutting twice is harmless)."""
    if level < 1:
        raise ValueError(f"category level must be >= 1, got {level}")
    parts = path.split(CATEGORY_SEPARATOR)
    return path if len(parts) <= level else CATEGORY_SEPARATOR.join(parts[:level])


def cut_categories(paths: Sequence[str], level: int) -> list[str]:
    """`category_at_level` over a list: the form `allowed_next` expects (it does not cut, to stay fast)."""
    return [category_at_level(p, level) for p in paths]


def feasible(constraint: CategoryConstraint, candidate_categories: Sequence[str], k: int) -> str | None:
    """None if some K-subset of the candidates satisfies `constraint`, else every reason why not, joined by '; '.

    Exact, by counting (see the module docstring): with ``a_c = min(n_c, cap)`` the most picks the caps allow is
    ``sum(a_c)``; min_categories needs that many distinct categories and ``k >= min_categories``. Those conditions
    together are also sufficient, because one pick in each of min_categories categories can always be topped up
    to K from the remaining capacity. Category paths are cut at ``constraint.level`` here.
    """
    k = _check_k(k)
    cats = cut_categories(candidate_categories, constraint.level)
    counts = Counter(cats)
    reasons: list[str] = []
    if k > len(cats):
        reasons.append(f"k={k} picks asked for but only {len(cats)} candidates")
    cap = constraint.max_per_category
    if cap is not None:
        capacity = sum(min(n, cap) for n in counts.values())
        if k > capacity and capacity < len(cats):
            per = ", ".join(f"{c!r}: {min(n, cap)} of {n}" for c, n in counts.most_common())
            reasons.append(f"at most {capacity} picks fit under max_per_category={cap} ({per}), k={k}")
    m = constraint.min_categories
    if m is not None:
        if len(counts) < m:
            reasons.append(
                f"only {len(counts)} distinct categories among the candidates (level {constraint.level}), "
                f"min_categories={m}"
            )
        if k < m:
            reasons.append(f"k={k} picks cannot span min_categories={m} categories")
    return "; ".join(reasons) if reasons else None


def allowed_next(
    constraint: CategoryConstraint, categories: Sequence[str], chosen: Sequence[int], k: int
) -> npt.NDArray[np.bool_]:
    """Mask of the candidates that may be picked next so the list can still be completed to K valid picks.

    `categories` are the candidates' categories ALREADY cut at ``constraint.level`` (use `cut_categories`; not
    cut here, because the decoder calls this at every step). `chosen` holds the candidate indices picked so far.
    The mask is exact (see the module docstring): it excludes chosen indices (no duplicates), categories at
    their cap, and, when the open slots are exactly those needed to reach min_categories, every category
    already covered. It is all False once K picks are made. If the state itself cannot be completed (bad index,
    duplicate, too many picks, a cap already exceeded, too few categories left), raises ValueError saying why;
    so an all-False mask with picks still to make never occurs.
    """
    n = len(categories)
    r = k - len(chosen)  # open slots
    chosen_set = set(chosen)
    if len(chosen_set) != len(chosen):
        raise ValueError(f"chosen indices must be distinct, got {list(chosen)}")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"chosen indices {bad} are out of range for {n} candidates")
    if r < 0:
        raise ValueError(f"{len(chosen)} picks already chosen but k={k}")

    total = Counter(categories)
    used = Counter(categories[i] for i in chosen)
    cap = constraint.max_per_category
    m = constraint.min_categories or 0
    need = max(0, m - len(used))  # categories still to open
    uncovered = len(total) - len(used)
    # sum_c min(n_c, cap) - used_c: the picks the caps still allow (invariant minus r under any pick).
    capacity = n - len(chosen) if cap is None else sum(min(c, cap) for c in total.values()) - len(chosen)
    if cap is not None:
        over = {c: u for c, u in used.items() if u > cap}
        if over:
            raise ValueError(f"chosen picks exceed max_per_category={cap}: {over}")
    if capacity < r:
        raise ValueError(f"{r} picks still to make but only {capacity} remain possible under the caps")
    if need > r:
        raise ValueError(f"{need} more categories needed for min_categories={m} but only {r} picks left")
    if need > uncovered:
        raise ValueError(f"{need} more categories needed for min_categories={m} but only {uncovered} remain")

    mask = np.zeros(n, dtype=bool)
    if r == 0:
        return mask
    # Categories that may not receive the next pick: those at their cap, and (when every open slot must
    # open a new category) every covered one. Uncovered categories are never blocked (see module docstring).
    if r <= need:
        blocked = set(used)
    elif cap is not None:
        blocked = {c for c, u in used.items() if u >= cap}
    else:
        blocked = set()
    if blocked:
        mask[[i for i, c in enumerate(categories) if c not in blocked]] = True
    else:
        mask[:] = True
    if chosen_set:
        mask[list(chosen_set)] = False
    return mask


def check_picks(
    pick_ids: Sequence[Hashable],
    candidate_ids: Sequence[Hashable],
    candidate_categories: Sequence[str],
    k: int,
    constraint: CategoryConstraint | None,
) -> list[str]:
    """Every way `pick_ids` breaks the request, as readable strings; an empty list means the picks are valid.

    Checked: each pick is one of `candidate_ids`, no pick repeats, exactly `k` picks, and (if `constraint`)
    no category above max_per_category and at least min_categories categories. Category rules count each valid
    candidate once (duplicates and unknown ids are reported on their own). Categories are cut at
    ``constraint.level`` here. Inconsistent candidate inputs (lengths differ, repeated candidate ids) raise
    ValueError: they are the caller's bug, not the picks'.
    """
    if len(candidate_ids) != len(candidate_categories):
        raise ValueError(
            f"candidate_ids ({len(candidate_ids)}) and candidate_categories ({len(candidate_categories)}) "
            "must have the same length"
        )
    index = {cid: i for i, cid in enumerate(candidate_ids)}
    if len(index) != len(candidate_ids):
        repeated = [cid for cid, n in Counter(candidate_ids).items() if n > 1]
        raise ValueError(f"candidate_ids must be distinct, repeated: {repeated}")

    problems: list[str] = []
    seen: dict[Hashable, int] = {}
    for pos, pid in enumerate(pick_ids):
        if pid not in index:
            problems.append(f"pick {pid!r} (position {pos}) is not among the candidates")
        elif pid in seen:
            problems.append(f"duplicate pick {pid!r} (positions {seen[pid]} and {pos})")
        else:
            seen[pid] = pos
    if len(pick_ids) != k:
        problems.append(f"expected k={k} picks, got {len(pick_ids)}")
    if constraint is not None:
        cats = Counter(category_at_level(candidate_categories[index[pid]], constraint.level) for pid in seen)
        cap = constraint.max_per_category
        if cap is not None:
            for cat, n in cats.most_common():
                if n > cap:
                    problems.append(f"category {cat!r} has {n} picks, max_per_category={cap}")
        m = constraint.min_categories
        if m is not None and len(cats) < m:
            problems.append(f"picks span only {len(cats)} distinct categories, min_categories={m}")
    return problems


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    return int(k)
