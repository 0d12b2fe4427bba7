"""Dynamic batching of concurrent requests inside one worker (DESIGN §5).

Each submitted item gets its own future. The dispatcher takes the first
waiting item, waits for a free in-flight slot (while a batch runs, more items
queue up), then drains the queue up to ``max_batch_size``. Only while another
batch is in flight does it linger for batchmates: it takes them as they arrive,
up to ``max_wait_ms``, and closes the batch early once none arrived for
``gap_ms``. An idle worker dispatches at once, so batching adds no latency at
low load.

Items whose caller has gone (cancelled future) or whose deadline has passed are
dropped before the batch runs. The handler returns one result or exception per
item; an exception fails only its own item, and a handler that raises for the whole
batch is run again item by item, so only the items that fail alone fail. Results are
set "if not done".

Admission control: an item is refused at ``submit`` (``Overloaded``, at once, never left to
time out in the queue) when the worker already holds ``max_pending`` items (queued + in
flight), or when its deadline falls before the time it would take to get through the queue
ahead of it, estimated from measured batch durations (an exponential average).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from towers.errors import Overloaded

T = TypeVar("T")
R = TypeVar("R")


class DeadlineExceeded(Exception):
    """The item's deadline passed before its batch ran."""


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float  # time.monotonic(); inf when none
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    dropped_cancelled: int = 0
    dropped_deadline: int = 0
    sizes: list[int] = field(default_factory=list)  # recent batch sizes (bounded)


Handler = Callable[[Sequence[T], Sequence[float]], Awaitable[Sequence["R | BaseException"]]]


def _set_false(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Batcher(Generic[T, R]):
    """``handler(items, queue_seconds)`` → one result or exception per item."""

    def __init__(self, handler: Handler[T, R], *, max_batch_size: int, max_wait_ms: float,
                 max_inflight: int = 2, gap_ms: float = 1.0, max_pending: int = 0) -> None:
        if max_batch_size < 1 or max_inflight < 1 or max_pending < 0:
            raise ValueError("max_batch_size and max_inflight must be >= 1, max_pending >= 0")
        self._max_pending = max_pending  # 0: unbounded
        self._pending = 0  # submitted, not yet answered
        self.batch_s = 0.0  # exponential average of a batch's duration (0: none measured yet)
        self.answer_s = 0.0  # exponential average of an item's time from submit to its answer
        self._handler = handler
        self._max = max_batch_size
        self._wait = max_wait_ms / 1000.0
        self._gap = gap_ms / 1000.0
        self._waiter: asyncio.Future[bool] | None = None
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_inflight = max_inflight
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    @property
    def inflight(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        """Items waiting for a batch: > 0 means the worker is behind (optional work yields)."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def expected_wait(self) -> float:
        """Seconds until an item submitted now would be answered: the batches queued ahead of it
        (``max_inflight`` run at once) and its own, at the measured batch duration; and no less
        than items have recently taken from submit to answer (``answer_s``: under overload the
        event loop itself runs late, which batch durations alone do not show)."""
        ahead = self._queue.qsize() // self._max
        return max((ahead / self._max_inflight + 1) * self.batch_s, self.answer_s)

    def admit(self, *, deadline: float, now: float) -> None:
        """Raise ``Overloaded`` if an item with ``deadline`` should be refused now."""
        if self._max_pending and self._pending >= self._max_pending:
            raise Overloaded("queue_full", f"overloaded: {self._pending} requests held (limit {self._max_pending})",
                             retry_after_s=max(self.expected_wait(), 0.01))
        wait = self.expected_wait()
        # Only against a measurement, and only a deadline still ahead (a passed one is the
        # caller's DEADLINE_EXCEEDED, not our overload).
        if self.batch_s > 0 and now < deadline < now + wait:
            raise Overloaded("deadline", f"overloaded: the queue ahead takes ~{wait * 1000:.0f} ms, more than the "
                                         f"{max(deadline - now, 0) * 1000:.0f} ms left", retry_after_s=max(wait, 0.01))

    async def submit(self, item: T, *, deadline: float = float("inf")) -> R:
        """Queue ``item`` and wait for its result (``Overloaded`` at once if it is refused).
        Cancelling the caller drops the item."""
        self.start()
        self.admit(deadline=deadline, now=time.monotonic())
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, fut, deadline))
        self._pending += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)
        t0 = time.monotonic()
        try:
            result = await fut
        finally:
            self._pending -= 1
        self.answer_s = 0.95 * self.answer_s + 0.05 * (time.monotonic() - t0)
        return result

    def _busy(self) -> bool:
        """Under load: a batch is in flight (its fetch or search is running). Idle: dispatch at
        once, so batching adds no latency at low load. (Counting a batch that finished less than
        max_wait ago as load too batched a little more at c=64 but cost a single caller 1.5 ms.)"""
        return bool(self._running)

    async def _arrival(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the next submit; True if one came. One future and one timer
        per wait, not a task per item as ``asyncio.wait_for(queue.get())`` would cost."""
        if not self._queue.empty():
            return True
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = loop.call_later(timeout, _set_false, fut)
        try:
            return bool(await fut)
        finally:
            timer.cancel()
            self._waiter = None

    async def _dispatch(self) -> None:
        while True:
            first = await self._queue.get()
            await self._slots.acquire()
            batch = [first]
            self._drain(batch)
            if len(batch) < self._max and self._wait > 0 and self._busy():
                # Under load: take batchmates as they arrive, up to max_wait, and close the batch
                # early once none has arrived for gap_ms (the stream has paused).
                end = time.monotonic() + self._wait
                while len(batch) < self._max:
                    left = end - time.monotonic()
                    if left <= 0 or not await self._arrival(min(left, self._gap)):
                        break
                    self._drain(batch)
            live = self._live(batch)
            if not live:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(live))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _drain(self, batch: list[_Pending[T, R]]) -> None:
        while len(batch) < self._max:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _live(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        now = time.monotonic()
        live = []
        for p in batch:
            if p.future.done():  # cancelled by its caller
                self.stats.dropped_cancelled += 1
            elif p.deadline <= now:
                self.stats.dropped_deadline += 1
                p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(p)
        return live

    async def _one_by_one(self, batch: list[_Pending[T, R]]) -> list[R | BaseException]:
        out: list[R | BaseException] = []
        for p in batch:
            if p.future.done():  # its caller went away meanwhile
                out.append(asyncio.CancelledError())
                continue
            try:
                out.extend((await self._handler([p.item], [time.monotonic() - p.enqueued]))[:1])
            except Exception as e:
                out.append(e)
        return out

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        try:
            now = time.monotonic()
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes.append(len(batch))
            del self.stats.sizes[:-1000]
            try:
                results = await self._handler([p.item for p in batch], [now - p.enqueued for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
            except Exception as e:
                # One request's poison (a stage that raises on its input) must not fail its
                # batchmates: run each alone, and only those that fail alone fail. Costs a
                # batch per item, only when a batch has failed.
                results = [e] if len(batch) == 1 else await self._one_by_one(batch)
            took = time.monotonic() - now
            self.batch_s = took if self.batch_s == 0.0 else 0.8 * self.batch_s + 0.2 * took
            for p, r in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)
        finally:
            # Leave the in-flight set before freeing the slot, so the dispatcher never sees a
            # finished batch as running (and lingers max_wait for batchmates when idle).
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._slots.release()
