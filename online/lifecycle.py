"""A model version's way into service, written once: load (checksums and shapes verified,
off the event loop) → prepare (the feature store holds the version) → warm → install, or
reject; pin and forget for versions an A/B experiment keeps resident beside CURRENT.

The first load (``online.server``), the registry watcher's hot swap (``online.hotswap``) and
the A/B router (``online.experiments``) all go through ``Lifecycle.candidate`` and then
install, pin or reject what it returns. The lifecycle also counts the batches running on each
version, so the embedded store drops an old version only after its last batch.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from online.config import ServeConfig
from online.feature_store import FeatureStore
from online.metrics import ServingMetrics
from online.request import RecRequest, RecResult
from towers import bundle as bundle_mod
from towers.context import ContextSchema
from towers.errors import FeatureStoreError, VersionNotInStore
from towers.labels import Mode
from towers.ranking import RankModel

log = logging.getLogger("twotower.serve")

RunBatch = Callable[["LoadedModel", Sequence[RecRequest], Sequence[float]],
                    Awaitable[list[RecResult | BaseException]]]


@dataclass(frozen=True)
class LoadedModel:
    """One bundle version, loaded and verified. Immutable: a swap replaces the whole object."""

    version: str
    bundle: bundle_mod.Bundle
    ranker: RankModel
    item_ids: np.ndarray  # object array of item ids by row: one fancy-index per response

    @classmethod
    def load(cls, path: Path) -> LoadedModel:
        b = bundle_mod.load(path)
        return cls(b.version, b, RankModel.from_bundle(b), np.array(b.item_ids, dtype=object))

    @cached_property
    def context_schema(self) -> ContextSchema:
        """The context keys this version's spec lets a request carry."""
        return ContextSchema.of(self.bundle.features)


class Lifecycle:
    """Which versions a serving process holds: the installed one (``model``), candidates
    being prepared, versions pinned by experiments, and those with batches still running."""

    def __init__(self, *, cfg: ServeConfig, store: FeatureStore, metrics: ServingMetrics,
                 run_batch: RunBatch) -> None:
        self.cfg, self.store, self.metrics = cfg, store, metrics
        self._run_batch = run_batch  # warmup answers synthetic batches with the candidate
        self.model: LoadedModel | None = None
        self._active: Counter[str] = Counter()  # batches running per model version
        self._candidates: set[str] = set()  # prepared, not yet installed or rejected: never dropped
        self.unverified: set[str] = set()  # installed while the feature store did not answer
        self.pinned: frozenset[str] = frozenset()

    async def candidate(self, path: Path) -> LoadedModel:
        """Load, verify, prepare and (``cfg.warmup``) warm the version at ``path``. The caller
        installs, pins or rejects it; if a step here fails, it is rejected here and the error
        propagates (the serving version is untouched)."""
        model = await asyncio.get_running_loop().run_in_executor(None, LoadedModel.load, path)
        try:
            await self.prepare(model)
            if self.cfg.warmup:
                await self.warm(model)
        except BaseException:
            self.reject(model.version)
            raise
        return model

    async def prepare(self, model: LoadedModel) -> None:
        """Make the feature store ready for ``model`` (before it serves): the embedded
        store takes the bundle's arrays; Redis must already hold the version's keys."""
        self._candidates.add(model.version)
        if self.store.capabilities.holds_versions:
            b = model.bundle
            self.store.add_version(model.version, user_ids=b.features.user_vocab.values, user_emb=b.user_emb,
                                   recs_items=b.recs_items, recs_scores=b.recs_scores)
            return
        try:
            present = await self.store.has_version(model.version)
        except FeatureStoreError as e:
            if self.model is not None:
                raise  # a swap waits for the store (the registry watcher retries with backoff)
            # Nothing serves yet: serve this version degraded (its bundle's own user embeddings,
            # no sessions; every response says so) rather than crash-loop through an outage.
            # Without its keys in the store it still answers from the bundle: no skew either way.
            self.unverified.add(model.version)
            log.warning("feature store unreachable at start (%s): serving %s degraded until it answers", e,
                        model.version)
            return
        if not present:
            raise VersionNotInStore(f"version {model.version} is not loaded in the feature store "
                                    "(publish it with --redis first)")

    async def verify_in_store(self) -> None:
        """Versions installed while the store was unreachable: check them once it answers."""
        for version in sorted(self.unverified):
            try:
                present = await self.store.has_version(version)
            except FeatureStoreError:
                return  # still down: the next poll tries again
            self.unverified.discard(version)
            if present:
                log.info("feature store reachable: %s is loaded there; serving it in full", version)
            else:
                log.error("feature store reachable, but %s is not loaded there (publish it with --redis): its "
                          "users are served from the bundle's embeddings, without precomputed recs", version)

    def install(self, model: LoadedModel) -> None:
        """Make ``model`` the one new batches use; batches in flight finish on the
        version they started with (each snapshots ``model`` once). The embedded
        store forgets the old version once its last batch is done."""
        self.model = model
        self._candidates.discard(model.version)
        self.forget_unused()
        self.metrics.installed(model.version, self.cfg.variant)
        # The bundle's objects live as long as the model: move them out of the cyclic GC's
        # reach, so a full collection under load does not walk millions of vocabulary entries.
        # freeze() is O(1) (no collection on the event loop during a swap); frozen objects are
        # still freed by reference counting when the old model goes (it holds no cycles).
        gc.freeze()

    def reject(self, version: str) -> None:
        """A prepared candidate will not be installed: let the embedded store drop it."""
        self._candidates.discard(version)
        self.forget_unused()

    def forget_unused(self) -> None:
        """Drop embedded-store versions that neither the installed model nor a running
        batch uses (after a swap, a rejected candidate, or an old version's last batch),
        so old bundles do not pile up in memory."""
        if self.store.capabilities.holds_versions and self.model is not None:
            self.store.drop_versions(keep={self.model.version, *self._active, *self._candidates, *self.pinned})

    def pin(self, versions: frozenset[str]) -> None:
        """Keep ``versions`` resident beside CURRENT (an experiment's pinned versions, already
        prepared); versions no longer pinned are dropped after their last batch."""
        self.pinned = versions
        self._candidates -= versions
        self.forget_unused()

    @contextmanager
    def running(self, model: LoadedModel) -> Iterator[None]:
        """Around one batch on ``model``: an old version's last batch lets it go."""
        self._active[model.version] += 1
        try:
            yield
        finally:
            self._active[model.version] -= 1
            if not self._active[model.version]:
                del self._active[model.version]
                if model is not self.model:  # an old version's last batch (candidates are kept)
                    self.forget_unused()

    async def warm(self, model: LoadedModel) -> int:
        """Synthetic requests down every path (online with and without session, batch mode,
        cold start) at every batch size up to the maximum, run directly against ``model``
        (not yet installed, so live traffic is unaffected). Returns the number sent."""
        users = model.bundle.features.user_vocab.values[:4] or ["__warmup_user__"]
        items = tuple(model.bundle.item_ids[:3])
        cases = [c for u in users for c in ((u, (), Mode.AUTO), (u, items, Mode.ONLINE), (u, (), Mode.BATCH))]
        cases += [("__warmup_unknown__", items[:1], Mode.AUTO), ("__warmup_unknown__", (), Mode.AUTO)]
        sent, size = 0, 1
        while True:
            reqs = [RecRequest(user_id=u, k=10, recent=s, cart=(), exclude=(), mode=m, request_id="warmup",
                               include_titles=False, deadline=time.monotonic() + 5.0)
                    for u, s, m in (cases * (size // len(cases) + 1))[:size]]
            results = await self._run_batch(model, reqs, [0.0] * size)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            sent += size
            if size >= self.cfg.batching.max_batch_size:
                return sent
            size = min(size * 2, self.cfg.batching.max_batch_size)
