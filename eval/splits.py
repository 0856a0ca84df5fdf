"""Deterministic evaluation splits over time-ordered user histories.

Leave-one-out (LlamaRec, SASRec, LC-Rec convention): for each user with at least 3 events, the last item is the
test target, the second-to-last the validation target and the rest the training history. Users with fewer events
stay in training only (they are never evaluated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from retrieval.types import Interaction


@dataclass(frozen=True)
class Case:
    """One evaluation case: the history a model may see (oldest first) and the held-out target item."""

    user_id: str
    history: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class LeaveOneOut:
    train: dict[str, list[Interaction]]
    valid: list[Case]
    test: list[Case]


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
