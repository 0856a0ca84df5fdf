"""Serving the LLM under concurrency: micro-batching, a bounded queue and a per-request time budget.

Concurrent recommend requests that need the model wait in one queue. A single worker thread (the model is one
CPU- or GPU-bound resource) takes the oldest request, waits `wait_s` for others with the same key (same adapter and
generator settings) to arrive, and runs them as ONE `Recommender.recommend_batch` call: the backend scores and
decodes them together. On a GPU that makes 16 concurrent shoppers cost about one call; on a CPU a call costs close
to its size (prefill is compute-bound), and the queue's job is mostly to keep the model busy without waste.

Bounds, so that nothing hangs, nothing queues forever and the model's work is not wasted:
- the queue holds at most `max_queue` requests; one more raises `Overloaded` at once (the caller answers with the
  retrieval fallback or 429 + Retry-After); so does a request that could not be answered within `ADMIT_SHARE` of
  its budget given the work queued ahead of it (a `CostModel` fitted on the calls so far), instead of waiting out
  its whole budget;
- a batch is cut to what can finish before its most urgent member's deadline (with the same margin), and a queued
  request that can no longer be answered in time even alone leaves with `BudgetExceeded` before a model call is
  spent on it; while nothing is known yet, a call holds one request;
- every request carries a deadline; the model call of a batch gets the time left to its most urgent request as its
  `timeout_s` (the recommender then falls back by itself), and the caller stops waiting at the deadline whatever
  the worker is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from generator.recommender import GeneratorConfig
from generator.types import Recommendation
from retrieval.types import RetrievalRequest

# What the worker calls: (batch key, requests, config with the batch's timeout) -> one Recommendation per request.
RunBatch = Callable[[Hashable, Sequence[RetrievalRequest], GeneratorConfig], list[Recommendation]]

# The model never gets less than this: below it a batch cannot even prefill, and would only waste its slot.
_MIN_MODEL_S = 0.05

# Admission keeps a share of each request's budget in hand. Model calls vary (2.1-2.7 s for one score request on
# the 2-core box under load), and requests admitted to finish at up to 100% of their budget missed it about one
# time in three under 8 closed-loop clients (eval/bench/load.py, one process): each miss a model call wasted.
ADMIT_SHARE = 0.8


class Overloaded(Exception):
    """The LLM queue is full; `retry_after_s` estimates when a slot frees up."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CostModel:
    """Seconds of a model call on n requests, `fixed + n * per_request`, fitted over recent calls.

    Exponentially weighted least squares (the last ~10 calls count): on a GPU a call costs about the same whatever
    its size (`per_request` ~0), on a CPU close to n times one request (`fixed` ~0: prefill is compute-bound). Why
    a fit: the previous estimate, max(a recent call's time, n x a recent request's share), priced ONE request at a
    whole batch's time on a CPU (7 s where one takes 2.5 s), so requests that could still have been answered alone
    were sent to their fallback. While recent calls all had about the same size there is nothing to fit: the cost
    is then taken as proportional to n (a CPU's; on a GPU it over-estimates big batches until sizes vary)."""

    DECAY = 0.9

    def __init__(self) -> None:
        self._w = self._n = self._nn = self._y = self._ny = 0.0

    @property
    def known(self) -> bool:
        return self._w > 0

    def observe(self, n: int, seconds: float) -> None:
        d = self.DECAY
        self._w, self._n, self._nn = d * self._w + 1, d * self._n + n, d * self._nn + n * n
        self._y, self._ny = d * self._y + seconds, d * self._ny + n * seconds

    def terms(self) -> tuple[float, float]:
        """(fixed, per_request) seconds, both >= 0."""
        mean_n, mean_y = self._n / self._w, self._y / self._w
        var = self._nn / self._w - mean_n * mean_n
        if var < 0.25:  # about one size: proportional
            return 0.0, mean_y / max(mean_n, 1e-9)
        per = max(0.0, (self._ny / self._w - mean_n * mean_y) / var)
        fixed = mean_y - per * mean_n
        if fixed < 0:  # the best line through the origin instead
            return 0.0, self._ny / self._nn
        return fixed, per

    def cost(self, n: int) -> float:
        fixed, per = self.terms()
        return fixed + n * per

    def most_within(self, seconds: float) -> int:
        """The most requests one call can hold and still finish within `seconds` (at least 1)."""
        fixed, per = self.terms()
        if per <= 0:
            return 1 << 30
        return max(1, int((seconds - fixed) / per))


class BudgetExceeded(Exception):
    """The request's time budget ran out before the model answered."""


@dataclass
class _Job:
    request: RetrievalRequest
    config: GeneratorConfig
    key: Hashable
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Recommendation]
    enqueued: float = field(default_factory=time.monotonic)
    probe: bool = False  # admitted only because the model was idle: run it whatever the estimates say

    def settle(self, result: Recommendation | None = None, error: BaseException | None = None) -> None:
        """Hand the answer to the waiting coroutine (thread-safe; ignored when it stopped waiting)."""

        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed (shutdown): nobody is waiting
            self.loop.call_soon_threadsafe(_set)


class Batcher:
    """Micro-batches LLM requests into `run_batch` calls on one worker thread.

    `await batcher.submit(request, config, key=..., budget_s=...)` returns the Recommendation, or raises
    `Overloaded` (queue full), `BudgetExceeded` (deadline passed) or the batch's own exception.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_queue: int,
        max_batch: int,
        wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_queue, self.max_batch, self.wait_s = max_queue, max_batch, wait_s
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # What a call costs, fitted over recent calls: what admission, the batch size and Retry-After estimate from.
        # `_busy_since`/`_busy_n`: when the running batch started and its size (None/0 while idle).
        self.costs = CostModel()
        self._busy_since: float | None = None
        self._busy_n = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="shoprec-llm-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        return not self._pending and self._busy_since is None

    # ---------------------------------------------------------------- the caller's side
    async def submit(
        self, request: RetrievalRequest, config: GeneratorConfig, *, key: Hashable, budget_s: float
    ) -> Recommendation:
        loop = asyncio.get_running_loop()
        job = _Job(request, config, key, time.monotonic() + budget_s, loop, loop.create_future())
        with self._cond:
            depth = len(self._pending)
            expected = self.expected_wait_s(depth)
            if depth >= self.max_queue:
                raise Overloaded(f"the model queue is full ({depth} requests waiting)", max(1.0, expected))
            idle = self.idle
            # an idle model is always tried: that is how the estimate recovers when the box gets faster again
            if expected > ADMIT_SHARE * budget_s and not idle:
                # admission control: a request that cannot be answered within its budget does not queue, so the
                # caller's fallback is immediate instead of after the whole budget
                raise Overloaded(
                    f"the model is busy (about {expected:.1f} s of work queued, budget {budget_s:.1f} s)",
                    max(1.0, expected - ADMIT_SHARE * budget_s),
                )
            job.probe = idle
            self._pending.append(job)
            self._on_depth(len(self._pending))
            self._cond.notify()
        try:
            return await asyncio.wait_for(job.future, timeout=budget_s)
        except TimeoutError:
            raise BudgetExceeded(f"no model answer within the {budget_s:.1f} s budget") from None

    def expected_wait_s(self, depth: int) -> float:
        """Seconds until a request queued behind `depth` others would have its answer: what is left of the
        running batch plus the calls for the requests ahead and its own. 0 while nothing is known."""
        if not self.costs.known:
            return 0.0  # no batch has run yet: admit, and learn
        busy_left = 0.0
        if self._busy_since is not None:
            busy_left = max(0.0, self.costs.cost(self._busy_n) - (time.monotonic() - self._busy_since))
        full, rest = divmod(depth + 1, max(self.max_batch, 1))
        return busy_left + full * self.costs.cost(self.max_batch) + (self.costs.cost(rest) if rest else 0.0)

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                for job in self._pending:
                    job.settle(error=BudgetExceeded("the server is shutting down"))
                self._pending.clear()
                return None
            first = self._pending[0]
            # wait for companions: until the window closes or a full batch of the same key is waiting
            close_at = first.enqueued + self.wait_s
            while (left := close_at - time.monotonic()) > 0 and self._count(first.key) < self.max_batch:
                self._cond.wait(left)
            # a request that can no longer be answered in time, even alone, leaves now for its fallback: running
            # it would spend a model call on an answer nobody waits for
            if self.costs.known:
                now, alone = time.monotonic(), self.costs.cost(1)
                in_time: deque[_Job] = deque()
                for job in self._pending:
                    if job.probe or job.deadline - now >= alone:
                        in_time.append(job)
                        continue
                    job.settle(
                        error=BudgetExceeded(
                            f"the budget would run out before the model's answer ({job.deadline - now:.1f} s left, "
                            f"a model call takes about {alone:.1f} s)"
                        )
                    )
                self._pending = in_time
                if not self._pending:
                    self._on_depth(0)
                    return []
                first = self._pending[0]
            # No bigger than what can finish before the most urgent member's deadline, with the admission's margin
            # (on a CPU a batch's time grows with its size, and a batch that overruns answers none of its requests);
            # while nothing is known, one request: it teaches the costs (a cold first call of 9 took 23 s here).
            size = 1
            if self.costs.known:
                left = ADMIT_SHARE * (first.deadline - time.monotonic())
                size = min(self.max_batch, self.costs.most_within(left))
            batch: list[_Job] = []
            keep: deque[_Job] = deque()
            for job in self._pending:
                if job.key == first.key and len(batch) < size:
                    batch.append(job)
                else:
                    keep.append(job)
            self._pending = keep
            # busy from the moment the batch leaves the queue, under the same lock: otherwise a request arriving
            # between this and `_run` sees an empty queue and no running batch, and is admitted as if idle
            self._busy_since, self._busy_n = time.monotonic(), len(batch)
            self._on_depth(len(self._pending))
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.done():  # the caller stopped waiting (its budget ran out)
                continue
            if job.deadline - now < _MIN_MODEL_S:
                job.settle(error=BudgetExceeded("the time budget ran out while the request was queued"))
                continue
            live.append(job)
        return live

    def _count(self, key: Hashable) -> int:
        return sum(1 for job in self._pending if job.key == key)

    def _run(self, batch: list[_Job]) -> None:
        if not batch:
            self._busy_since, self._busy_n = None, 0
            return
        t0 = time.monotonic()
        # the model may use the time left to the batch's most urgent request; the recommender falls back by itself
        timeout = max(_MIN_MODEL_S, min(job.deadline for job in batch) - t0)
        cfg = batch[0].config.model_copy(update={"timeout_s": timeout})
        failed: BaseException | None = None
        try:
            results: list[Any] = list(self.run_batch(batch[0].key, [job.request for job in batch], cfg))
        except Exception as e:  # one bad request must not fail its companions: retry each alone
            results = []
            if len(batch) == 1:
                failed = e
            else:
                for job in batch:
                    try:
                        results.append(self.run_batch(job.key, [job.request], cfg)[0])
                    except Exception as single:
                        results.append(single)
        seconds = time.monotonic() - t0
        # the estimates first, then the answers: a caller answered now may submit again at once, and must be
        # judged by this batch's time too (it was not, when the answers went first: a test caught the race)
        self.costs.observe(len(batch), seconds)
        self._busy_since, self._busy_n = None, 0
        if failed is not None:
            batch[0].settle(error=failed)
        for job, result in zip(batch, results, strict=False):
            if isinstance(result, BaseException):
                job.settle(error=result)
            else:
                job.settle(result)
        self._on_batch(len(batch), seconds)
