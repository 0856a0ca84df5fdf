from datetime import UTC, datetime

from eval.splits import leave_one_out
from retrieval.events import histories
from retrieval.types import Interaction


def _ev(user: str, item: str, t: int) -> Interaction:
    return Interaction(user_id=user, item_id=item, timestamp=datetime.fromtimestamp(t, UTC))


def test_leave_one_out_uses_time_order_and_never_leaks_targets():
    evs = [_ev("u1", "c", 30), _ev("u1", "a", 10), _ev("u1", "b", 20), _ev("u1", "d", 40), _ev("u2", "x", 1)]
    split = leave_one_out(histories(evs))
    assert [e.item_id for e in split.train["u1"]] == ["a", "b"]
    assert split.valid[0].history == ("a", "b") and split.valid[0].target == "c"
    assert split.test[0].history == ("a", "b", "c") and split.test[0].target == "d"
    assert [c.user_id for c in split.test] == ["u1"]  # u2 is too short to evaluate
    assert [e.item_id for e in split.train["u2"]] == ["x"]


def test_equal_timestamps_keep_input_order():
    evs = [_ev("u", "first", 5), _ev("u", "second", 5), _ev("u", "third", 5)]
    assert [e.item_id for e in histories(evs)["u"]] == ["first", "second", "third"]
