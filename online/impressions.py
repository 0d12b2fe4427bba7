"""The impression log: a sample of served responses (request id, user, variant, version, items)
appended to the store's impression stream, so outcomes (events naming the request id) can be
joined to what was shown, per variant (``twotower ab report``).

Off the response path: ``offer`` only appends to a bounded buffer; one background task writes
the buffer in one pipeline. When the buffer is full or the store fails, impressions are dropped
and counted: an impression log must never delay or fail a response.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from online.feature_store import FeatureStore
from online.request import RecRequest, RecResult
from towers.errors import FeatureStoreError
from towers.store_format import Impression


@dataclass
class ImpressionStats:
    sampled: int = 0
    written: int = 0
    dropped: int = 0  # buffer full
    failed: int = 0  # the store did not take them


class ImpressionLog:
    log = "impressions"  # the store's log these go to

    def __init__(self, store: FeatureStore, *, rate: float, max_buffer: int = 10_000, chunk: int = 512,
                 timeout_s: float = 0.5, rng: random.Random | None = None) -> None:
        self.store = store
        self.rate = rate
        self.stats = ImpressionStats()
        self._buffer: list[Impression] = []
        self._max = max_buffer
        self._chunk = chunk
        self._timeout = timeout_s
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    def _keep(self, req: RecRequest, res: RecResult) -> bool:
        """Whether this response is logged: a sample at ``rate``; every interleaved one (its
        credits are the interleaving's only record: its volume is the experiment's traffic)."""
        if res.teams:
            return True
        return not (self.rate <= 0.0 or (self.rate < 1.0 and self._rng.random() >= self.rate))

    def offer(self, req: RecRequest, res: RecResult) -> None:
        if not self._keep(req, res):
            return
        self.stats.sampled += 1
        if len(self._buffer) >= self._max:
            self.stats.dropped += 1
            return
        self._buffer.append(Impression(res.request_id, req.user_id, res.variant, res.version, tuple(res.item_ids),
                                       tuple(res.teams)))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the batch's responses go out first
        while self._buffer:
            chunk, self._buffer = self._buffer[: self._chunk], self._buffer[self._chunk:]
            try:
                await self.store.log_impressions(chunk, timeout=self._timeout, log=self.log)
                self.stats.written += len(chunk)
            except FeatureStoreError:
                self.stats.failed += len(chunk)

    async def close(self) -> None:
        """Write what is buffered (bounded by the store's timeout), then stop."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._buffer:
            await self._flush()
