"""Unit tests of the serving logic without a server: the micro-batcher's grouping, bounds and deadlines, the rate
limiter, scopes, and the 422 messages. A scripted `run_batch` stands in for the model (the real model is driven
over HTTP in tests/test_api.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import pytest

from generator.recommender import GeneratorConfig
from generator.types import Pick, Recommendation
from retrieval.base import Ranked
from retrieval.types import RetrievalRequest
from shoprec.auth import LOCAL_DEV, Principal, TokenBucket, validate_scopes
from shoprec.serving import Batcher, BudgetExceeded, Overloaded


class ScriptedModel:
    """Records every batch it is given; answers after `delay_s`; fails on a request whose user is 'boom'."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[Hashable, list[str], float]] = []
        self.lock = threading.Lock()

    def __call__(
        self, key: Hashable, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig
    ) -> list[Recommendation]:
        with self.lock:
            self.batches.append((key, [str(r.user_id) for r in requests], cfg.timeout_s))
        time.sleep(self.delay_s)
        if any(r.user_id == "boom" for r in requests):
            raise ValueError("boom")
        return [
            Recommendation(
                picks=(Pick(item_id=str(r.user_id), rank=1, reason="r", category="c", score=1.0),), mode="score"
            )
            for r in requests
        ]


@contextlib.contextmanager
def started(batcher: Batcher) -> Iterator[Batcher]:
    """The batcher's worker running for the block, stopped after it whatever happens."""
    batcher.start()
    try:
        yield batcher
    finally:
        batcher.stop()


def run(batcher: Batcher, users: Sequence[str], *, key: Hashable = "k", budget_s: float = 5.0) -> list[object]:
    return timed_run(batcher, users, key=key, budget_s=budget_s)[0]


def timed_run(
    batcher: Batcher, users: Sequence[str], *, key: Hashable = "k", budget_s: float = 5.0
) -> tuple[list[object], list[float]]:
    """Submits one request per user at once; each one's outcome and the seconds to it."""
    t0 = time.monotonic()
    took = [0.0] * len(users)

    async def one(i: int, user: str) -> Recommendation:
        try:
            return await batcher.submit(RetrievalRequest(user_id=user), GeneratorConfig(), key=key, budget_s=budget_s)
        finally:
            took[i] = time.monotonic() - t0

    async def go() -> list[object]:
        return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(users)), return_exceptions=True))

    return asyncio.run(go()), took


@pytest.fixture
def model() -> ScriptedModel:
    return ScriptedModel()


def test_concurrent_requests_become_one_batch_and_each_gets_its_own_answer(model: ScriptedModel) -> None:
    b = Batcher(model, max_queue=64, max_batch=16, wait_s=0.05)
    with started(b):
        run(b, ["learn"])
        out = run(b, [f"u{i}" for i in range(10)])
    assert [r.picks[0].item_id for r in out] == [f"u{i}" for i in range(10)]  # type: ignore[attr-defined]
    assert len(model.batches) == 2 and len(model.batches[1][1]) == 10


def test_while_nothing_is_known_a_call_holds_one_request() -> None:
    # a cold server's first call teaches the costs: on the 2-core box a first batch of 9 score requests took 23 s,
    # past every member's 10 s budget (all 9 model answers wasted); one request first, then batches sized to fit
    model = ScriptedModel(delay_s=0.1)
    b = Batcher(model, max_queue=64, max_batch=16, wait_s=0.05)
    with started(b):
        out = run(b, [f"u{i}" for i in range(6)])
    assert all(isinstance(r, Recommendation) for r in out)
    assert [len(users) for _, users, _ in model.batches] == [1, 5]


def test_batches_hold_one_key_and_at_most_max_batch(model: ScriptedModel) -> None:
    b = Batcher(model, max_queue=64, max_batch=4, wait_s=0.05)

    async def go() -> None:
        cfg = GeneratorConfig()
        jobs = [
            b.submit(RetrievalRequest(user_id=f"u{i}"), cfg, key=("score" if i % 2 else "generate"), budget_s=5)
            for i in range(12)
        ]
        await asyncio.gather(*jobs)

    with started(b):
        asyncio.run(go())
    assert all(len(users) <= 4 for _, users, _ in model.batches)
    for key, users, _ in model.batches:
        assert all((int(u[1:]) % 2 == 1) == (key == "score") for u in users)
    assert sum(len(users) for _, users, _ in model.batches) == 12


def test_a_full_queue_raises_overloaded_at_once() -> None:
    slow = ScriptedModel(delay_s=0.5)
    b = Batcher(slow, max_queue=2, max_batch=1, wait_s=0.0)
    with started(b):
        t0 = time.monotonic()
        out = run(b, [f"u{i}" for i in range(6)])
        took = time.monotonic() - t0
    overloaded = [r for r in out if isinstance(r, Overloaded)]
    assert overloaded and all(r.retry_after_s >= 1.0 for r in overloaded)
    assert any(isinstance(r, Recommendation) for r in out)
    assert took < 3.0  # nobody waited for the whole queue to drain


def test_the_budget_bounds_the_wait_and_the_model_gets_the_time_left() -> None:
    slow = ScriptedModel(delay_s=1.0)
    b = Batcher(slow, max_queue=8, max_batch=1, wait_s=0.0)
    with started(b):
        t0 = time.monotonic()
        out = run(b, ["first", "second"], budget_s=0.6)
        took = time.monotonic() - t0
    assert all(isinstance(r, BudgetExceeded) for r in out)
    assert took < 0.9  # the caller stops waiting at its deadline, whatever the worker does
    assert slow.batches[0][2] <= 0.6  # the model call was given the budget as its timeout


def test_a_request_that_cannot_make_its_budget_is_refused_at_once() -> None:
    slow = ScriptedModel(delay_s=0.5)
    b = Batcher(slow, max_queue=8, max_batch=1, wait_s=0.0)
    with started(b):
        run(b, ["learn"])  # the first batch teaches the batcher how long a batch takes
        out, took = timed_run(b, ["a", "b", "c"], budget_s=0.8)  # one fits (0.5 s), the ones behind it cannot
    assert isinstance(out[0], Recommendation)
    assert all(isinstance(r, Overloaded) and "busy" in str(r) for r in out[1:])
    # refused at once: long before the admitted one's 0.5 s of model time, not after waiting out the budget
    assert max(took[1:]) < 0.25 < took[0]
    assert len(slow.batches) == 2  # the refused ones cost the model nothing


class LinearModel(ScriptedModel):
    """A CPU's cost: a batch takes `per_request_s` per request in it (prefill is compute-bound)."""

    def __init__(self, per_request_s: float) -> None:
        super().__init__()
        self.per_request_s = per_request_s

    def __call__(
        self, key: Hashable, requests: Sequence[RetrievalRequest], cfg: GeneratorConfig
    ) -> list[Recommendation]:
        self.delay_s = self.per_request_s * len(requests)
        return super().__call__(key, requests, cfg)


def test_when_a_batch_costs_its_size_admission_and_batches_fit_the_budget() -> None:
    """On a CPU a batch of n costs ~n requests. Estimating every batch at one batch's time admitted 8 requests
    into one 0.8 s call with a 0.55 s budget: all 8 timed out, the model's work wasted. Now the requests that
    cannot fit are refused at once and the ones admitted are answered."""
    cpu = LinearModel(per_request_s=0.1)
    b = Batcher(cpu, max_queue=32, max_batch=16, wait_s=0.02)
    with started(b):
        run(b, ["learn"])  # one request: 0.1 s
        out = run(b, [f"u{i}" for i in range(8)], budget_s=0.55)
    answered = [r for r in out if isinstance(r, Recommendation)]
    refused = [r for r in out if isinstance(r, Overloaded)]
    assert len(answered) >= 2 and len(refused) >= 3, out
    assert all(len(users) <= 5 for _, users, _ in cpu.batches)  # no batch longer than the budget allows


def test_the_model_is_busy_from_the_moment_a_batch_leaves_the_queue() -> None:
    # A request arriving between the worker taking a batch off the queue and running it must not see an idle
    # model (it would be admitted past its budget). The depth callback runs in that hand-over, under the lock.
    seen: list[bool] = []
    b: Batcher

    def on_depth(depth: int) -> None:
        if threading.current_thread().name == "shoprec-llm-batcher":
            seen.append(b.idle)

    b = Batcher(ScriptedModel(delay_s=0.05), max_queue=8, max_batch=1, wait_s=0.0, on_depth=on_depth)
    with started(b):
        run(b, ["a", "b"])
    assert seen and not any(seen)
    assert b.idle


def test_an_idle_model_is_tried_even_when_batches_were_slower_than_the_budget() -> None:
    slow = ScriptedModel(delay_s=0.4)
    b = Batcher(slow, max_queue=8, max_batch=1, wait_s=0.0)
    with started(b):
        run(b, ["learn"])  # batches take 0.4 s
        out = run(b, ["probe"], budget_s=0.3)  # over budget by the estimate, but the model is idle: try it
    assert isinstance(out[0], BudgetExceeded)  # it did not make it this time...
    assert [users for _, users, _ in slow.batches] == [["learn"], ["probe"]]  # ...but the model was asked


def test_the_cost_model_fits_a_cpu_a_gpu_and_one_size() -> None:
    from shoprec.serving import CostModel

    cpu, gpu, one = CostModel(), CostModel(), CostModel()
    assert not cpu.known
    for n in (1, 3, 2, 4, 1, 3):
        cpu.observe(n, 2.5 * n)  # each request costs its share: prefill is compute-bound
        gpu.observe(n, 1.0 + 0.01 * n)  # about one call's time whatever the size
        one.observe(1, 2.4)
    assert cpu.cost(1) == pytest.approx(2.5) and cpu.cost(4) == pytest.approx(10.0)
    assert cpu.most_within(6.0) == 2 and cpu.most_within(1.0) == 1  # at least one
    assert gpu.cost(1) == pytest.approx(1.01) and gpu.cost(16) == pytest.approx(1.16)
    assert gpu.most_within(2.0) > 16
    # one batch size only: nothing to fit, the cost is taken as proportional (never one request at a batch's time)
    assert one.cost(1) == pytest.approx(2.4) and one.cost(3) == pytest.approx(7.2)
    big = CostModel()
    for _ in range(5):
        big.observe(4, 9.6)
    assert big.cost(1) == pytest.approx(2.4)  # the old estimate said 9.6 s: max(a batch's time, ...)


def test_admission_keeps_a_share_of_the_budget_in_hand() -> None:
    # model calls vary: a request expected to finish at 90% of its budget would miss it often, and its model call
    # would be wasted; admission asks for room within ADMIT_SHARE of the budget
    slow = ScriptedModel(delay_s=0.5)
    b = Batcher(slow, max_queue=8, max_batch=1, wait_s=0.0)
    with started(b):
        run(b, ["learn"])
        out = run(b, ["a", "b"], budget_s=1.1)  # b: ~1.0 s of work ahead and its own, > 0.8 x 1.1 s
    assert isinstance(out[0], Recommendation)
    assert isinstance(out[1], Overloaded) and out[1].retry_after_s >= 1.0
    assert [users for _, users, _ in slow.batches] == [["learn"], ["a"]]


def test_a_request_that_can_no_longer_make_it_leaves_without_a_model_call() -> None:
    # the estimates said 0.2 s, then a call took 1.0 s: the request queued behind it has 0.2 s left, less than a
    # call takes, and gets its fallback at once instead of a model call whose answer would come too late
    model = ScriptedModel(delay_s=0.2)
    b = Batcher(model, max_queue=8, max_batch=1, wait_s=0.0)
    with started(b):
        run(b, ["learn"])
        model.delay_s = 1.0
        out = run(b, ["a", "b"], budget_s=1.2)
    assert isinstance(out[0], Recommendation)
    assert isinstance(out[1], BudgetExceeded) and "would run out" in str(out[1])
    assert [users for _, users, _ in model.batches] == [["learn"], ["a"]]


def test_one_failing_request_does_not_fail_its_batch(model: ScriptedModel) -> None:
    b = Batcher(model, max_queue=8, max_batch=8, wait_s=0.05)
    with started(b):
        out = run(b, ["a", "boom", "c"])
    assert isinstance(out[1], ValueError)
    assert [r.picks[0].item_id for r in (out[0], out[2])] == ["a", "c"]  # type: ignore[attr-defined]


def test_token_bucket_allows_the_burst_then_says_when_to_retry() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("k") == pytest.approx(0.5)
    assert bucket.take("other") == 0.0  # per key
    now[0] = 0.5
    assert bucket.take("k") == 0.0


def test_scopes_imply_the_lesser_ones_and_unknown_ones_are_named() -> None:
    admin = Principal(id="1", name="a", scopes=frozenset({"admin"}))
    read = Principal(id="2", name="r", scopes=frozenset({"read"}))
    assert admin.allows("read") and admin.allows("write") and admin.allows("admin")
    assert read.allows("read") and not read.allows("write")
    assert LOCAL_DEV.allows("admin")
    with pytest.raises(ValueError, match="unknown scope.*root.*valid scopes: read, write, admin"):
        validate_scopes(["read", "root"])


class _Index:
    """200 candidates with evidence from two signals for any request, as arrays, like the live index."""

    catalog = None

    def ranked(self, request: RetrievalRequest, k: int) -> Ranked:
        rows = np.arange(k)
        lists = {"bm25": (rows, np.full(k, 2.0)), "dense": (rows[::-1].copy(), np.full(k, 0.5))}
        return Ranked([f"i{j}" for j in range(k)], [1.0 / (j + 1) for j in range(k)], rows, [lists])


def _tracked_objects_under(root: object) -> int:
    """How many objects the garbage collector tracks that `root` reaches (itself included; classes, modules and
    functions are shared, not held: not followed)."""
    import gc
    import types

    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return len(seen)


def test_pick_evidence_is_handed_over_once_and_holds_few_objects_for_the_gc() -> None:
    """The service remembers each request's retrieval until its picks are built. It once kept the last 2,048
    requests' Candidate objects (~3M objects): every full GC pass then took ~0.5 s with the GIL held and stalled
    all requests in flight. Now: read once (then gone), bounded, and a few objects per request (arrays and ids),
    the evidence built for the picks only."""
    from shoprec.api import _RememberingRetriever

    remembering = _RememberingRetriever(_Index(), size=8)
    requests = [RetrievalRequest(user_id=f"u{n}") for n in range(20)]
    for r in requests:
        remembering.ranked(r, 200)
    assert len(remembering._seen) == 8  # bounded
    assert remembering.evidence(requests[0], ["i0"]) == {}  # the oldest fell out of the bound
    got = remembering.evidence(requests[-1], ["i0", "i199", "nope"])
    assert got == {"i0": (("bm25", 1, 2.0), ("dense", 200, 0.5)), "i199": (("bm25", 200, 2.0), ("dense", 1, 0.5))}
    assert remembering.evidence(requests[-1], ["i0"]) == {}  # handed over once
    again = RetrievalRequest(user_id="again")
    remembering.ranked(again, 200)
    remembering.ranked(again, 20)  # a shorter list for the same request does not hide the longer one's tail
    assert set(remembering.evidence(again, ["i150"])) == {"i150"}
    # 7 requests x 200 candidates remembered: as Candidate objects with their evidence that was ~7 x 1,000
    # tracked objects; as arrays and id lists a handful each
    assert _tracked_objects_under(list(remembering._seen.values())) < 7 * 30
