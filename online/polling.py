"""A check run every few seconds on the event loop (the registry's CURRENT, the flags file),
for as long as the server runs. A check that raises is logged and the next one runs anyway:
a watcher must outlive any one bad candidate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable


class Poller:
    def __init__(self, check: Callable[[], Awaitable[object]], *, every_s: float, name: str,
                 log: logging.Logger) -> None:
        self._check = check
        self._every = every_s
        self._name = name
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling (``every_s`` 0: never)."""
        if self._every > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            # +-20% jitter: the workers of a deployment started together would otherwise all see
            # a new CURRENT (and load a second bundle) in the same instant.
            await asyncio.sleep(self._every * random.uniform(0.8, 1.2))
            try:
                await self._check()
            except Exception:
                self._log.exception("%s check failed", self._name)
