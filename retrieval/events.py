"""User histories: interactions grouped per user and put in time order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime

from retrieval.types import Interaction

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _order_key(ev: Interaction) -> tuple[float, int]:
    ts = ev.timestamp.timestamp() if ev.timestamp is not None else 0.0
    return (ts, ev.position if ev.position is not None else 0)


def histories(interactions: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Group interactions by user, each list sorted oldest first.

    Sorting is stable, so events with equal timestamps keep their input order (ml-100k has such ties).
    """
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for ev in interactions:
        by_user[ev.user_id].append(ev)
    return {u: sorted(evs, key=_order_key) for u, evs in by_user.items()}


def sequences(interactions: Iterable[Interaction]) -> dict[str, list[str]]:
    """Each user's item ids, oldest first."""
    return {u: [ev.item_id for ev in evs] for u, evs in histories(interactions).items()}
