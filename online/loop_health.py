"""Where the slow requests wait, as histograms: the event loop's lag and the garbage
collector's pauses.

Every request of a ``grpc.aio`` worker is parsed, batched, answered and serialised on one
event loop; a request that waits did so because the loop was busy with something else (a
batch's stages, other calls' callbacks) or stopped (a GC pause holds the GIL for every
thread). Stage timings cannot show either: they measure the stages, not the wait between
them. So:

- ``event_loop_lag_seconds``: a probe sleeps ``interval_s`` on the loop and records how much
  later than asked it woke up (the time a ready callback waits for the loop, sampled);
- ``gc_pause_seconds{generation}``: each collection's duration (``gc.callbacks``; the
  callbacks run in whichever thread triggered it, with the GIL held throughout).

Cost: one timer per ``interval_s`` (20 per second) and two clock reads per collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from online.exporter import PREFIX

LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class LoopHealth:
    def __init__(self, registry: CollectorRegistry, *, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.lag = Histogram(f"{PREFIX}event_loop_lag_seconds", "How late a timer on the serving event loop fires "
                             f"(a probe every {interval_s * 1000:g} ms): the wait of a ready callback.",
                             buckets=LAG_BUCKETS, registry=registry)
        self.gc = Histogram(f"{PREFIX}gc_pause_seconds", "Garbage collections by generation: each one stops "
                            "every thread of the worker.", ["generation"], buckets=GC_BUCKETS, registry=registry)
        self._gc_children = [self.gc.labels(str(g)) for g in range(3)]
        self._gc_start = 0.0
        self._task: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc_children[info["generation"]].observe(time.perf_counter() - self._gc_start)

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.lag.observe(max(loop.time() - asked, 0.0))

    def start(self) -> None:
        """On the running loop; call ``stop`` before the loop closes."""
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-health")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
