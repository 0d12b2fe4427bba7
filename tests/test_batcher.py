"""Batcher semantics, driven by events: routing, partial failure, cancellation,
deadlines, max batch size, no wait when idle. Counts and structure, not wall time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from online.batcher import Batcher, DeadlineExceeded


class Recorder:
    """A handler that records each batch and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, items: Sequence[int], waited: Sequence[float]) -> list[object]:
        self.batches.append(list(items))
        self.entered.set()
        await self.gate.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_results_reach_their_own_callers_in_any_order() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=8, max_wait_ms=0)
        out = await asyncio.gather(*(b.submit(i) for i in [5, 3, 9, 1]))
        assert out == [50, 30, 90, 10]
        await b.stop()

    run(main())


def test_idle_request_is_dispatched_alone_and_at_once() -> None:
    async def ticks(n: int = 20) -> None:
        for _ in range(n):  # a few event-loop turns, no timer: a lingering batcher would still be waiting
            await asyncio.sleep(0)

    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=64, max_wait_ms=60_000,  # a wait that must not apply
                                       gap_ms=60_000)
        rec.gate.clear()
        first = asyncio.ensure_future(b.submit(7))
        await ticks()
        assert rec.entered.is_set() and rec.batches == [[7]]  # nothing in flight: no lingering for batchmates
        rec.gate.set()
        assert await first == 70
        # Idle again once that batch is done (not merely finishing): the next one goes at once too.
        rec.entered.clear()
        rec.gate.clear()
        second = asyncio.ensure_future(b.submit(8))
        await ticks()
        assert rec.entered.is_set() and rec.batches == [[7], [8]]
        rec.gate.set()
        assert await second == 80
        await b.stop()

    run(main())


def test_while_a_batch_runs_the_next_one_closes_on_the_gap() -> None:
    """Under load (a batch in flight) the dispatcher takes batchmates as they come and closes
    the batch once none arrived for gap_ms: here max_wait is an hour, so only the gap can."""

    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=64, max_wait_ms=3_600_000, gap_ms=1.0, max_inflight=2)
        rec.gate.clear()
        first = asyncio.ensure_future(b.submit(1))
        await rec.entered.wait()  # batch [1] holds the gate: a batch is in flight
        rest = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        async def second_batch() -> None:
            while len(rec.batches) < 2:  # [2, 3] dispatched on the gap, not after an hour
                await asyncio.sleep(0.001)

        await asyncio.wait_for(second_batch(), timeout=30)
        rec.gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30) == [10, 20, 30]
        assert rec.batches == [[1], [2, 3]]
        await b.stop()

    run(main())


def test_batches_form_while_the_previous_one_runs_and_respect_max_size() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=4, max_wait_ms=0, max_inflight=1)
        rec.gate.clear()
        first = asyncio.ensure_future(b.submit(0))
        await rec.entered.wait()  # batch [0] is running and holds the only slot
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0)  # let the submissions enqueue
        rec.gate.set()
        assert await first == 0
        assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 11)]
        assert rec.batches[0] == [0]
        assert [len(x) for x in rec.batches[1:]] == [4, 4, 2]
        assert sorted(i for x in rec.batches for i in x) == list(range(11))
        await b.stop()

    run(main())


def test_an_exception_fails_only_its_own_request() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=8, max_wait_ms=0)
        res = await asyncio.gather(b.submit(1), b.submit(-2), b.submit(3), return_exceptions=True)
        assert res[0] == 10 and res[2] == 30
        assert isinstance(res[1], ValueError) and str(res[1]) == "bad -2"
        await b.stop()

    run(main())


def test_cancelled_and_expired_requests_are_dropped_before_the_batch_runs() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=8, max_wait_ms=0, max_inflight=1)
        rec.gate.clear()
        blocker = asyncio.ensure_future(b.submit(0))
        await rec.entered.wait()
        cancelled = asyncio.ensure_future(b.submit(1))
        expired = asyncio.ensure_future(b.submit(2, deadline=time.monotonic() - 1.0))
        alive = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0)
        cancelled.cancel()
        rec.gate.set()
        assert await blocker == 0 and await alive == 30
        with pytest.raises(DeadlineExceeded):
            await expired
        assert rec.batches == [[0], [3]]
        assert b.stats.dropped_cancelled == 1 and b.stats.dropped_deadline == 1
        await b.stop()

    run(main())


def test_a_handler_crash_fails_the_batch_not_the_batcher() -> None:
    async def main() -> None:
        calls = 0

        async def flaky(items: Sequence[int], waited: Sequence[float]) -> list[object]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            return [i for i in items]

        b: Batcher[int, int] = Batcher(flaky, max_batch_size=8, max_wait_ms=0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(1)
        assert await b.submit(2) == 2
        await b.stop()

    run(main())


def test_a_full_worker_refuses_at_once_and_admits_again_when_it_drains() -> None:
    """Admission control: at max_pending items held, the next is refused with Overloaded
    (queue_full) at submit, never queued to time out; held items are unaffected."""
    from towers.errors import Overloaded

    async def main() -> None:
        rec = Recorder()
        rec.gate.clear()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=2, max_wait_ms=0, max_inflight=1, max_pending=4)
        held = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
        await rec.entered.wait()
        with pytest.raises(Overloaded) as refused:
            await b.submit(99)
        assert refused.value.reason == "queue_full" and refused.value.retry_after_s > 0
        rec.gate.set()
        assert await asyncio.gather(*held) == [0, 10, 20, 30]
        assert await b.submit(5) == 50  # drained: admitted again
        assert 99 not in [i for batch in rec.batches for i in batch]
        await b.stop()

    run(main())


def test_a_deadline_the_queue_would_miss_is_refused_at_once() -> None:
    """With batches measured at ~50 ms and work queued ahead, a caller with 10 ms left is
    refused (reason deadline) instead of waiting to time out; one with time enough waits."""
    from towers.errors import Overloaded

    async def main() -> None:
        rec = Recorder()
        b: Batcher[int, int] = Batcher(rec, max_batch_size=1, max_wait_ms=0, max_inflight=1)
        b.batch_s = 0.05  # as measured (an exponential average of batch durations)
        rec.gate.clear()
        first = asyncio.ensure_future(b.submit(1))
        await rec.entered.wait()
        queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        assert b.expected_wait() == pytest.approx((2 / 1 + 1) * 0.05)
        with pytest.raises(Overloaded) as refused:
            await b.submit(4, deadline=time.monotonic() + 0.01)
        assert refused.value.reason == "deadline"
        patient = asyncio.ensure_future(b.submit(5, deadline=time.monotonic() + 10))
        rec.gate.set()
        assert await asyncio.gather(first, *queued, patient) == [10, 20, 30, 50]
        await b.stop()

    run(main())


def test_a_batch_that_raises_is_retried_item_by_item_so_only_the_poison_fails() -> None:
    """Issue 20 item 3: an exception a stage raises for one request's input (here: any batch
    holding a negative number) fails that request only; its batchmates get their answers."""
    async def main() -> None:
        seen: list[list[int]] = []
        gate, entered = asyncio.Event(), asyncio.Event()

        async def stage(items: Sequence[int], waited: Sequence[float]) -> list[object]:
            seen.append(list(items))
            entered.set()
            await gate.wait()
            if any(i < 0 for i in items):
                raise ValueError("cannot decode a negative item")
            return [i * 10 for i in items]

        b: Batcher[int, int] = Batcher(stage, max_batch_size=8, max_wait_ms=0, max_inflight=1)
        blocker = asyncio.ensure_future(b.submit(0))
        await entered.wait()  # the first batch runs: the next three queue up behind it together
        calls = [asyncio.ensure_future(b.submit(i)) for i in (1, -1, 2)]
        await asyncio.sleep(0)
        gate.set()
        assert await blocker == 0
        out = await asyncio.gather(*calls, return_exceptions=True)
        assert out[0] == 10 and out[2] == 20
        assert isinstance(out[1], ValueError)
        assert seen == [[0], [1, -1, 2], [1], [-1], [2]]
        await b.stop()

    run(main())
