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


from eval.splits import make_split, sample_users, sampled_candidates, temporal_split  # noqa: E402


def test_temporal_split_cuts_every_user_at_the_same_time():
    evs = [_ev("u1", i, t) for i, t in (("a", 1), ("b", 2), ("c", 3), ("d", 8), ("e", 9))]
    evs += [_ev("u2", i, t) for i, t in (("x", 4), ("y", 5), ("z", 6), ("w", 7))]
    evs += [_ev("u3", "late", 10)]  # only after the cut-off: cold, never evaluated
    split = temporal_split(histories(evs), train_fraction=0.6)  # 10 events -> cut-off at sorted index 6 (t=7)
    test = {c.user_id: c for c in split.test}
    assert set(test) == {"u1", "u2"}
    assert test["u1"].history == ("a", "b", "c") and test["u1"].target == "d"
    assert test["u2"].history == ("x", "y", "z") and test["u2"].target == "w"
    # the last past event is the validation target and is not trained on
    assert [e.item_id for e in split.train["u1"]] == ["a", "b"]
    assert {(c.user_id, c.target) for c in split.valid} == {("u1", "c"), ("u2", "z")}
    assert temporal_split(histories(evs), train_fraction=0.6) == split  # deterministic


def test_temporal_split_without_timestamps_cuts_each_user_by_position():
    evs = [Interaction(user_id="u", item_id=str(i), position=i) for i in range(5)]
    split = temporal_split(histories(evs), train_fraction=0.5)  # ceil(2.5) = 3 past events
    assert split.test[0].history == ("0", "1", "2") and split.test[0].target == "3"


def test_make_split_names_the_valid_splits():
    import pytest

    with pytest.raises(ValueError, match="loo, temporal"):
        make_split("random", {})


def test_sampled_candidates_are_seeded_per_user_and_exclude_the_history():
    from eval.splits import Case

    ids = [f"i{j}" for j in range(100)]
    case = Case("u7", ("i1", "i2", "i3"), "i50")
    c1 = sampled_candidates(case, ids, seed=3)
    assert len(c1) == 20 and len(set(c1)) == 20 and "i50" in c1
    assert not {"i1", "i2", "i3"} & set(c1)
    assert sampled_candidates(case, ids, seed=3) == c1
    assert sampled_candidates(case, ids, seed=4) != c1
    other = Case("u8", (), "i0")
    assert sample_users([case, other], 1, seed=0) in ([case], [other])
    assert sample_users([case, other], None, seed=0) == [case, other]


def test_cold_item_split_hides_every_event_of_the_cold_items():
    from eval.splits import cold_item_split

    evs = []
    for u in range(40):  # 40 users over 50 items; each ends on a different item
        evs += [_ev(f"u{u:02d}", f"i{(u + k) % 50:02d}", 10 * u + k) for k in range(6)]
    hist = histories(evs)
    split = cold_item_split(hist, fraction=0.1, seed=3)
    seen = {e.item_id for es in split.train.values() for e in es} | {c.target for c in split.valid}
    seen |= {i for c in split.valid for i in c.history}
    cold = {c.target for c in split.test}
    assert split.test and not cold & seen  # no model sees a cold item used, not even in validation
    for c in split.test:
        assert hist[c.user_id][-1].item_id == c.target and not set(c.history) & cold
    all_items = {e.item_id for e in evs}
    n_cold = len(all_items - seen - {i for c in split.test for i in c.history})
    assert n_cold == 5  # 10% of 50
    assert cold_item_split(hist, fraction=0.1, seed=3) == split  # deterministic by seed
    assert cold_item_split(hist, fraction=0.1, seed=4) != split
    assert make_split("cold-items", hist, seed=3) == split
