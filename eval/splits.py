"""Deterministic evaluation splits over time-ordered user histories, and the candidate protocols.

Splits (each returns train histories, validation cases and test cases; a model trains on `train` only):
- leave-one-out (LlamaRec, SASRec, LC-Rec convention): for each user with at least 3 events, the last item is the
  test target, the second-to-last the validation target and the rest the training history. Users with fewer events
  stay in training only (they are never evaluated).
- temporal: one global time cut-off; what happened before it is known, each user's first event after it is the
  test target (see `temporal_split`). Closer to deployment: no user's future leaks into another user's training.
- cold-items: every interaction with a seeded 10% of the items is held out, so those items are in the catalog but
  no model has seen anyone use them (new products); test users are those whose last event is one of them
  (see `cold_item_split`). Where text should matter: only content signals (BM25, dense, the LLM) can find them.

Candidate protocols (what a system ranks for a test case), named in `PROTOCOLS`:
- ``full``: every catalog item except the user's history (LlamaRec's "ranking against all items");
- ``sampled``: the target plus 19 random items the user never touched, seeded per user (LLMRank) — easy, and
  only comparable to other sampled numbers;
- ``retrieved``: the fused retrieval's top-N; a target the retrieval misses is a miss for every system (realistic).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from retrieval.types import Interaction

PROTOCOLS = ("full", "sampled", "retrieved")
SPLITS = ("loo", "temporal", "cold-items")


@dataclass(frozen=True)
class Case:
    """One evaluation case: the history a model may see (oldest first) and the held-out target item."""

    user_id: str
    history: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class Split:
    """Training histories (what models may learn from), validation cases (tuning) and test cases (reporting)."""

    train: dict[str, list[Interaction]]
    valid: list[Case]
    test: list[Case]


LeaveOneOut = Split  # the original name, kept for the callers that use it


def leave_one_out(histories: Mapping[str, Sequence[Interaction]], min_events: int = 3) -> LeaveOneOut:
    """Split time-ordered histories: train = all but the last two events, valid = 2nd-to-last, test = last.

    The validation case sees the training history; the test case sees training history + the validation item.
    Users are processed in sorted id order so the split is identical on every run.
    """
    train: dict[str, list[Interaction]] = {}
    valid: list[Case] = []
    test: list[Case] = []
    for user in sorted(histories):
        evs = list(histories[user])
        if len(evs) < min_events:
            train[user] = evs
            continue
        train[user] = evs[:-2]
        hist = tuple(e.item_id for e in evs[:-2])
        valid.append(Case(user, hist, evs[-2].item_id))
        test.append(Case(user, (*hist, evs[-2].item_id), evs[-1].item_id))
    return LeaveOneOut(train=train, valid=valid, test=test)


def temporal_split(
    histories: Mapping[str, Sequence[Interaction]],
    *,
    train_fraction: float = 0.8,
    cutoff: datetime | None = None,
) -> Split:
    """Split at one global cut-off: the past trains, each user's first event after the cut-off is the test target.

    The cut-off is `cutoff` if given, else the time below which `train_fraction` of all events fall (the event at
    index floor(fraction · n) of the sorted timestamps; events strictly before it are "past"). Per user with at
    least one past event and one event after the cut-off: test = (all past events -> the first later event); the
    last past event is the validation target (history = the past events before it) and is left out of `train`, as
    leave-one-out does, so tuning never sees a training item. Users with no past event are cold and not evaluated.

    Without timestamps on every event (e.g. LC-Rec JSON, which has positions only) there is no shared clock, so
    each user is cut on its own: the first ceil(fraction · n) events are the past. Sorted user order: deterministic.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    timed = all(e.timestamp is not None for evs in histories.values() for e in evs)
    if cutoff is None and timed:
        stamps = sorted(e.timestamp for evs in histories.values() for e in evs)  # type: ignore[type-var]
        cutoff = stamps[min(int(train_fraction * len(stamps)), len(stamps) - 1)] if stamps else None
    train: dict[str, list[Interaction]] = {}
    valid: list[Case] = []
    test: list[Case] = []
    for user in sorted(histories):
        evs = list(histories[user])
        if cutoff is not None and timed:
            past = [e for e in evs if e.timestamp < cutoff]  # type: ignore[operator]
        else:
            past = evs[: math.ceil(train_fraction * len(evs))]
        future = evs[len(past) :]
        if not past or not future:
            train[user] = past
            continue
        train[user] = past[:-1]
        if len(past) >= 2:
            valid.append(Case(user, tuple(e.item_id for e in past[:-1]), past[-1].item_id))
        test.append(Case(user, tuple(e.item_id for e in past), future[0].item_id))
    return Split(train=train, valid=valid, test=test)


def cold_item_split(
    histories: Mapping[str, Sequence[Interaction]], *, fraction: float = 0.1, seed: int = 0, min_events: int = 3
) -> Split:
    """Hold out ALL interactions of a seeded `fraction` of the items; test on users whose last event is one of them.

    Cold items: `fraction` of the distinct items that occur in `histories`, drawn by `seed` from their sorted ids.
    Train and validation are leave-one-out over the warm events only (cold events removed from every history), so
    no model, retriever or fusion weight has seen a cold item used. Test case per user whose last event is a cold
    item: the history is the user's warm events before it (what a shop knows), the target is that cold item.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    items = sorted({e.item_id for evs in histories.values() for e in evs})
    n_cold = max(1, round(fraction * len(items))) if items else 0
    cold = {items[i] for i in np.random.default_rng(seed).choice(len(items), size=n_cold, replace=False)}
    warm = {u: [e for e in evs if e.item_id not in cold] for u, evs in histories.items()}
    base = leave_one_out(warm, min_events=min_events)
    test = []
    for user in sorted(histories):
        evs = list(histories[user])
        if evs and evs[-1].item_id in cold:
            history = tuple(e.item_id for e in evs[:-1] if e.item_id not in cold)
            if history:
                test.append(Case(user, history, evs[-1].item_id))
    return Split(train=base.train, valid=base.valid, test=test)


def make_split(name: str, histories: Mapping[str, Sequence[Interaction]], seed: int = 0) -> Split:
    """The split called `name` (one of SPLITS); ValueError naming the valid ones otherwise."""
    if name == "loo":
        return leave_one_out(histories)
    if name == "temporal":
        return temporal_split(histories)
    if name == "cold-items":
        return cold_item_split(histories, seed=seed)
    raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")


def case_rng(seed: int, user_id: str) -> np.random.Generator:
    """A generator seeded by (seed, user): a user's draws do not depend on which other users are evaluated."""
    return np.random.default_rng([seed, zlib.crc32(user_id.encode())])


def sampled_candidates(case: Case, item_ids: Sequence[str], *, n_negatives: int = 19, seed: int = 0) -> list[str]:
    """LLMRank's candidate set: the target plus `n_negatives` random items outside the user's history, shuffled.

    Deterministic for (seed, user). Fewer negatives only when the catalog has fewer unseen items.
    """
    rng = case_rng(seed, case.user_id)
    seen = set(case.history) | {case.target}
    pool = [i for i in item_ids if i not in seen]
    take = min(n_negatives, len(pool))
    picked = [pool[j] for j in rng.choice(len(pool), size=take, replace=False)] if take else []
    out = [case.target, *picked]
    return [out[j] for j in rng.permutation(len(out))]


def sample_users(cases: Sequence[Case], n: int | None, seed: int) -> list[Case]:
    """A seeded sample of n cases, kept in their original (sorted user) order; all of them when n is None."""
    if n is None or n >= len(cases):
        return list(cases)
    if n < 1:
        raise ValueError(f"the number of users must be >= 1, got {n}")
    pick = np.sort(np.random.default_rng(seed).choice(len(cases), size=n, replace=False))
    return [cases[i] for i in pick]
