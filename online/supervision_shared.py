"""What a supervisor shares with its worker processes: its own state, for each worker's
``admin status`` (a crash loop must be visible where operators look), and the swap turn that
makes workers load a new version one at a time.

Both cross a ``spawn`` boundary: the state is a shared-memory array of doubles (the
supervisor writes it under its lock; a worker reads a consistent-enough snapshot, each field
being one aligned double), the turn is a file lock (``filelock``: ``flock`` on POSIX, so a
worker killed while holding it releases it with its file descriptor — a
``multiprocessing.Lock`` would stay held by the dead worker and stall every later swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

FIELDS = ("workers", "restarts", "failed_starts", "crash_loop", "restart_backoff_s")


class SharedSupervision:
    """The supervisor's counters in shared memory (``FIELDS``, as doubles)."""

    def __init__(self, ctx: SpawnContext) -> None:
        self._values: Any = ctx.Array("d", len(FIELDS), lock=False)

    def publish(self, **values: float) -> None:
        for name, v in values.items():
            self._values[FIELDS.index(name)] = float(v)

    def snapshot(self) -> dict[str, Any]:
        v = list(self._values)
        return {"workers": int(v[0]), "restarts": int(v[1]), "failed_starts": int(v[2]),
                "crash_loop": bool(v[3]), "restart_backoff_s": float(v[4])}


def swap_lock_path(supervisor_pid: int) -> Path:
    """One lock file per supervisor (its workers share it; another supervisor's never do)."""
    return Path(tempfile.gettempdir()) / f"twotower-swap-{supervisor_pid}.lock"


class SwapTurn:
    """An asyncio context manager: at most one worker of a supervisor holds it. The waiting
    worker polls (a blocking ``flock`` would stall its event loop, which serves meanwhile);
    past ``max_wait_s`` it goes ahead anyway (a swap late by a minute is worse than two
    bundles in memory at once) and says so."""

    def __init__(self, path: Path, *, poll_s: float = 0.05, max_wait_s: float = 120.0) -> None:
        self.path = path
        self.poll_s, self.max_wait_s = poll_s, max_wait_s
        self._lock = FileLock(str(path), thread_local=False)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[bool]:
        """Yields True when the turn was taken, False when the wait gave up."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_wait_s
        held = False
        while True:
            try:
                self._lock.acquire(timeout=0)
                held = True
                break
            except Timeout:
                if loop.time() >= end:
                    break
                await asyncio.sleep(self.poll_s)
        try:
            yield held
        finally:
            if held:
                self._lock.release()


def remove_swap_lock(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
