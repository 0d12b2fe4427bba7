"""Following the registry: zero-downtime hot swap with no version skew.

When ``CURRENT`` names a new version, the watcher loads it in the background
(verify checksums and shapes), checks the feature store holds that version's
user embeddings, warms it with synthetic requests, and only then swaps the
service's model reference. Batches in flight finish on the version they took;
every response names the version it was computed with. A candidate that fails
any step is rejected and logged, and the old version keeps serving. Polling
(not inotify) keeps it portable and works on network filesystems.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from online.polling import Poller
from online.service import RecommendService
from online.supervision_shared import SwapTurn
from towers import registry as registry_mod
from towers.errors import FeatureStoreError, TwoTowerError, VersionNotInStore

log = logging.getLogger("twotower.hotswap")
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0


@dataclass
class SwapState:
    version: str = ""
    state: str = "empty"  # empty | waiting (for the swap turn) | loading | serving | failed
    last_error: str = ""
    candidate: str = ""
    swaps: int = 0
    rejected: int = 0
    loaded_at: float = 0.0


class RegistryWatcher:
    def __init__(self, service: RecommendService, registry: Path, *, poll_s: float,
                 swap_turn: SwapTurn | None = None) -> None:
        self.service = service
        self.lifecycle = service.lifecycle
        # Workers of one supervisor swap one at a time (a swap holds two bundles): the first
        # load of each does not wait (nothing is held yet).
        self._turn = swap_turn
        self.registry = registry
        self.poll_s = poll_s
        self.state = SwapState()
        self._lock = asyncio.Lock()  # one load at a time
        self._poller = Poller(self.check, every_s=poll_s, name="registry-watcher", log=log)
        self._rejected_version = ""
        # A candidate refused because the feature store did not answer is tried again after
        # this long (doubling, with jitter, up to RETRY_MAX_S); a definite refusal is not.
        self._retry_at: float | None = None
        self._retry_s = RETRY_MIN_S

    async def load(self, version: str) -> bool:
        """Load, verify, check the feature store, warm, swap. False (and the old model
        keeps serving) if any step fails."""
        async with self._lock:
            if version == self.state.version:
                return True
            self.state.candidate = version
            prev = self.state.state
            if self._turn is None or not self.state.version:
                return await self._load(version, prev)
            self.state.state = "waiting"
            async with self._turn.turn() as held:
                if not held:
                    log.warning("no swap turn after %.0f s (another worker holds it): swapping to %s anyway",
                                self._turn.max_wait_s, version)
                return await self._load(version, prev)

    async def _load(self, version: str, prev: str) -> bool:
        self.state.state = "loading"
        t0 = time.perf_counter()
        try:
            path = self.registry / version
            if not path.is_dir():
                raise TwoTowerError(f"{self.registry}: CURRENT names {version}, which is not in the registry")
            self.lifecycle.install(await self.lifecycle.candidate(path))
        except Exception as e:  # any failure rejects the candidate; the old version serves on
            self.state.state = prev if prev == "serving" else "failed"
            self.state.last_error = f"{version}: {e}"
            self.state.rejected += 1
            self._rejected_version = version
            transient = isinstance(e, FeatureStoreError) and not isinstance(e, VersionNotInStore)
            self._retry_at = time.monotonic() + self._retry_s * random.uniform(0.8, 1.2) if transient else None
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S) if transient else RETRY_MIN_S
            self.lifecycle.reject(version)
            self.service.metrics.rejected()
            log.error("rejected %s, still serving %s: %s", version, self.state.version or "nothing", e)
            return False
        old = self.state.version
        self.state.version = version
        self.state.state = "serving"
        self.state.swaps += 1
        self.state.loaded_at = time.time()
        self._rejected_version = ""
        self._retry_at, self._retry_s = None, RETRY_MIN_S
        self.service.metrics.swapped()
        log.info("swapped %s -> %s in %.2f s", old or "nothing", version, time.perf_counter() - t0)
        return True

    async def check(self, *, force: bool = False) -> bool:
        """Load CURRENT if it differs from the serving version (and, unless ``force``,
        from the last rejected one, so a corrupt bundle is not retried every poll)."""
        try:
            version = registry_mod.current_version(self.registry)
        except TwoTowerError as e:  # unreadable, or not a version id: a rejected candidate too
            if str(e) != self.state.last_error:  # counted once per bad pointer, not once per poll
                self.state.rejected += 1
                self.service.metrics.rejected()
                log.error("CURRENT refused, still serving %s: %s", self.state.version or "nothing", e)
            self.state.last_error = str(e)
            return False
        if self.lifecycle.unverified:
            await self.lifecycle.verify_in_store()
        if version is None or version == self.state.version:
            return False
        if version == self._rejected_version and not force:
            if self._retry_at is None or time.monotonic() < self._retry_at:
                return False
            log.info("retrying %s (refused while the feature store did not answer)", version)
        return await self.load(version)

    def start(self) -> None:
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()

    def status(self) -> dict[str, object]:
        s = self.state
        return {"version": s.version, "state": s.state, "last_error": s.last_error, "candidate": s.candidate,
                "registry": str(self.registry), "swaps": s.swaps, "rejected": s.rejected,
                "requests_served": self.service.requests_served, "pid": os.getpid()}
