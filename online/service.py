"""The request path: fetch → combine → search → filter → respond, batched
across concurrent requests, inside a latency budget, degrading (never failing)
when a stage runs late or a dependency fails (DESIGN §3):

    full online → no session (user embedding only) → batch recs → popularity

Every result carries its rung, the reasons, the version and per-stage timings.
This module holds no gRPC objects: ``online.server`` adapts it to the wire.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from online.batcher import Batcher
from online.config import ServeConfig
from online.feature_store import Event, FeatureStore, InMemoryFeatureStore, UserFeatures
from online.request import RUNGS, RecRequest, RecResult
from online.stats import ServingStats
from towers import bundle as bundle_mod
from towers.errors import FeatureStoreError, NotReady, Unsupported
from towers.scoring import QueryInput, Ranked, Scorer

log = logging.getLogger("twotower.serve")


@dataclass(frozen=True)
class LoadedModel:
    """One bundle version, loaded and verified. Immutable: a swap replaces the whole object."""

    version: str
    bundle: bundle_mod.Bundle
    scorer: Scorer

    @classmethod
    def load(cls, path: Path) -> LoadedModel:
        b = bundle_mod.load(path)
        return cls(b.version, b, Scorer.from_bundle(b))

    def rows(self, item_ids: Sequence[str]) -> list[int]:
        """Catalog rows of known ids, in order, unknown ids dropped."""
        return [r for r in self.bundle.features.item_vocab.positions(list(item_ids)).tolist() if r >= 0]

    def ids(self, rows: np.ndarray) -> list[str]:
        vals = self.bundle.item_ids
        return [vals[r] for r in rows.tolist()]


@dataclass
class _Work:
    """Per-request state while its batch moves through the stages."""

    req: RecRequest
    queue_s: float
    source: str = "online"
    rung: str = "full"
    reasons: list[str] = field(default_factory=list)
    inp: QueryInput | None = None
    ranked: Ranked | None = None

    def degrade(self, rung: str, reason: str) -> None:
        """Move down the ladder (never up) and say why."""
        if RUNGS.index(rung) > RUNGS.index(self.rung):
            self.rung = rung
        self.reasons.append(reason)


class RecommendService:
    def __init__(self, cfg: ServeConfig, store: FeatureStore) -> None:
        self.cfg = cfg
        self.store = store
        self.model: LoadedModel | None = None
        # OpenMP's thread count is per calling thread, so each search thread sets its own.
        self._pool = ThreadPoolExecutor(max_workers=cfg.search_threads, thread_name_prefix="search",
                                        initializer=faiss.omp_set_num_threads, initargs=(cfg.search_omp_threads,))
        b = cfg.batching
        self.batcher: Batcher[_Work, RecResult] = Batcher(self._handle, max_batch_size=b.max_batch_size,
                                                           max_wait_ms=b.max_wait_ms,
                                                           max_inflight=b.max_inflight_batches)
        self.stats = ServingStats()
        self._active: Counter[str] = Counter()  # batches running per model version
        self._candidates: set[str] = set()  # prepared, not yet installed or rejected: never dropped

    @property
    def requests_served(self) -> int:
        """Recommend calls answered (the supervisor recycles on it)."""
        return self.stats.total()

    # -- lifecycle ------------------------------------------------------------
    async def prepare(self, model: LoadedModel) -> None:
        """Make the feature store ready for ``model`` (before it serves): the embedded
        store takes the bundle's arrays; Redis must already hold the version's keys."""
        self._candidates.add(model.version)
        if isinstance(self.store, InMemoryFeatureStore):
            b = model.bundle
            self.store.add_version(model.version, user_ids=b.features.user_vocab.values, user_emb=b.user_emb,
                                   recs_items=b.recs_items, recs_scores=b.recs_scores)
        elif not await self.store.has_version(model.version):
            raise FeatureStoreError(f"version {model.version} is not loaded in the feature store "
                                    "(publish it with --redis first)")

    def install(self, model: LoadedModel) -> None:
        """Make ``model`` the one new batches use; batches in flight finish on the
        version they started with (each snapshots ``self.model`` once). The embedded
        store forgets the old version once its last batch is done."""
        self.model = model
        self._candidates.discard(model.version)
        self.forget_unused()
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
        if isinstance(self.store, InMemoryFeatureStore) and self.model is not None:
            self.store.drop_versions(keep={self.model.version, *self._active, *self._candidates})

    async def warm(self, model: LoadedModel) -> int:
        """Synthetic requests down every path (online with and without session, batch mode,
        cold start) at every batch size up to the maximum, run directly against ``model``
        (not yet installed, so live traffic is unaffected). Returns the number sent."""
        users = model.bundle.features.user_vocab.values[:4] or ["__warmup_user__"]
        items = tuple(model.bundle.item_ids[:3])
        cases = [c for u in users for c in ((u, (), "auto"), (u, items, "online"), (u, (), "batch"))]
        cases += [("__warmup_unknown__", items[:1], "auto"), ("__warmup_unknown__", (), "auto")]
        sent, size = 0, 1
        while True:
            reqs = [RecRequest(user_id=u, k=10, recent=s, cart=(), exclude=(), mode=m, request_id="warmup",
                               include_titles=False, deadline=time.monotonic() + 5.0)
                    for u, s, m in (cases * (size // len(cases) + 1))[:size]]
            results = await self._run(model, [_Work(r, 0.0) for r in reqs], [0.0] * size)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            sent += size
            if size >= self.cfg.batching.max_batch_size:
                return sent
            size = min(size * 2, self.cfg.batching.max_batch_size)

    async def close(self) -> None:
        await self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

    # -- API ------------------------------------------------------------------
    async def recommend(self, req: RecRequest) -> RecResult:
        if self.model is None:
            raise NotReady("no model loaded yet")
        res = await self.batcher.submit(_Work(req, 0.0), deadline=req.client_deadline)
        self.stats.observe(res)
        return res

    async def record_events(self, events: Sequence[Event]) -> int:
        if isinstance(self.store, InMemoryFeatureStore) and self.cfg.workers.workers > 1:
            # Each worker process has its own memory store: an event recorded here would be
            # invisible to the worker that serves the user's next request.
            raise Unsupported("RecordEvents needs a shared feature store when serving with several workers "
                              "(serve with --redis-url)")
        # Acknowledged means stored: a store failure here is an error to the caller, not a silent drop.
        return await self.store.record(events, timeout=self.cfg.redis.socket_timeout_ms / 1000.0 * 5)

    # -- the batch handler ----------------------------------------------------
    async def _handle(self, works: Sequence[_Work], queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        model = self.model  # one version for the whole batch: no skew inside a batch
        if model is None:
            return [NotReady("no model loaded yet")] * len(works)
        return await self._run(model, works, queue_s)

    async def _run(self, model: LoadedModel, works: Sequence[_Work],
                   queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        self._active[model.version] += 1
        try:
            return await self._run_stages(model, works, queue_s)
        finally:
            self._active[model.version] -= 1
            if not self._active[model.version]:
                del self._active[model.version]
                if model is not self.model:  # an old version's last batch (candidates are kept)
                    self.forget_unused()

    async def _run_stages(self, model: LoadedModel, works: Sequence[_Work],
                          queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        t0 = time.monotonic()
        for w, waited in zip(works, queue_s, strict=True):
            w.queue_s = waited
        budget = self.cfg.budget
        timings = {"fetch": 0.0, "combine": 0.0, "search": 0.0, "filter": 0.0}
        online = [w for w in works if w.req.mode != "batch"]
        batch_mode = [w for w in works if w.req.mode == "batch"]

        # fetch: one pipeline for the whole batch
        feats: list[UserFeatures] | None = None
        if online:
            # The latest deadline sets the timeout: one caller with a tight deadline must not cost
            # the whole batch its features. Callers whose time runs out meanwhile are caught by the
            # "too little time left" check below and get the precomputed rung.
            latest = max(w.req.deadline for w in online)
            left = latest - time.monotonic() - (budget.inference_ms + budget.post_ms) / 1000.0
            timeout = min(budget.fetch_ms / 1000.0, max(left, 0.0))
            try:
                feats = await self.store.fetch(model.version, [w.req.user_id for w in online], dim=model.bundle.dim,
                                               n_recent=model.bundle.combiner.max_session, timeout=timeout)
            except FeatureStoreError as e:
                for w in online:
                    w.degrade("no_session", f"feature store: {e}")
        t1 = time.monotonic()
        timings["fetch"] = t1 - t0

        # combine
        user_vectors = np.zeros((len(online), model.bundle.dim), dtype=np.float32)
        for j, w in enumerate(online):
            w.inp, vec = self._inputs(model, w, feats[j] if feats is not None else None)
            if vec is not None:
                user_vectors[j] = vec
        to_search = [j for j, w in enumerate(online) if w.inp is not None and (w.inp.user_row >= 0 or w.inp.session)]
        for j, w in enumerate(online):
            if j not in set(to_search):
                w.source = "popularity"
                w.degrade("popularity", "cold start: unknown user and no session")
        late = [j for j in to_search if online[j].req.deadline - time.monotonic() < budget.min_search_ms / 1000.0]
        for j in late:
            online[j].degrade("batch", "too little time left for the search")
        to_search = [j for j in to_search if j not in set(late)]
        inputs = [online[j].inp for j in to_search]
        q, _ = model.scorer.queries(inputs, user_vectors[to_search])  # type: ignore[arg-type]
        scores: np.ndarray = np.zeros((0, 0), np.float32)
        rows: np.ndarray = np.zeros((0, 0), np.int64)
        t2 = time.monotonic()
        timings["combine"] = t2 - t1

        # search: one FAISS call, off the event loop (FAISS releases the GIL)
        k_max = max((online[j].req.k for j in to_search), default=0)
        if to_search:
            k_search = model.scorer.search_k(inputs, k_max)  # type: ignore[arg-type]
            scores, rows = await asyncio.get_running_loop().run_in_executor(
                self._pool, model.scorer.search, q, k_search)
        t3 = time.monotonic()
        timings["search"] = t3 - t2

        # filter
        for pos, j in enumerate(to_search):
            w = online[j]
            w.ranked = model.scorer.filter(q[pos], scores[pos], rows[pos], w.inp, w.req.k)  # type: ignore[arg-type]
        needs_batch = batch_mode + [w for w in online if w.ranked is None and w.rung == "batch"]
        await self._batch_recs(model, needs_batch)
        for w in works:
            if w.ranked is None:
                if w.inp is None:
                    w.inp = QueryInput(-1, (), frozenset(model.rows([*w.req.exclude, *w.req.cart])))
                if w.rung != "popularity":
                    w.degrade("popularity", "nothing precomputed for this user")
                w.source = "popularity"
                w.ranked = model.scorer.popular(w.inp, w.req.k)
        t4 = time.monotonic()
        timings["filter"] = t4 - t3
        return [self._result(model, w, timings, len(works)) for w in works]

    def _inputs(self, model: LoadedModel, w: _Work, f: UserFeatures | None) -> tuple[QueryInput, np.ndarray | None]:
        """Known rows of the session (request first, then the store's), cart and exclusions."""
        req = w.req
        user_row = model.bundle.features.user_vocab.known(req.user_id)
        vec: np.ndarray | None = None
        store_recent: list[str] = []
        store_cart: list[str] = []
        if f is not None:
            vec = f.embedding
            store_recent = [e.item_id for e in f.session]
            store_cart = [e.item_id for e in f.session if e.type == "cart"]
            if vec is None and user_row >= 0:
                w.reasons.append("user embedding missing from the feature store; used the bundle's copy")
        if vec is None and user_row >= 0:
            # Same version's embedding from the bundle itself: no skew, just not refreshed online.
            vec = np.asarray(model.bundle.user_emb[user_row], dtype=np.float32)
        recent = list(dict.fromkeys([*req.recent, *store_recent]))
        session = model.rows(recent)[: model.bundle.combiner.max_session]
        exclude = frozenset(model.rows([*recent, *req.cart, *store_cart, *req.exclude]))
        if user_row < 0:
            w.source = "session_only" if session else "popularity"
        elif not session:
            w.source = "user_only"
        return QueryInput(user_row=user_row if vec is not None else -1, session=tuple(session), exclude=exclude), vec

    async def _batch_recs(self, model: LoadedModel, works: list[_Work]) -> None:
        if not works:
            return
        users = [w.req.user_id for w in works]
        try:
            left = min(self.cfg.budget.fetch_ms / 1000.0, max(w.req.deadline for w in works) - time.monotonic())
            recs = await self.store.batch_recs(model.version, users, timeout=max(left, 0.0005))
        except FeatureStoreError as e:
            b = model.bundle
            rows = b.features.user_vocab.positions(users).tolist()
            recs = [None if r < 0 or b.recs_items is None or b.recs_scores is None
                    else (np.asarray(b.recs_items[r], np.int64), np.asarray(b.recs_scores[r], np.float32))
                    for r in rows]
            for w in works:
                w.degrade("batch", f"batch recs from the bundle: feature store: {e}")
        for w, rec in zip(works, recs, strict=True):
            if w.inp is None:
                w.inp = QueryInput(-1, tuple(model.rows(w.req.recent)),
                                   frozenset(model.rows([*w.req.recent, *w.req.cart, *w.req.exclude])))
            if rec is None:
                continue
            items, scores = rec
            banned = set(w.inp.exclude) | set(w.inp.session)
            keep = [j for j, r in enumerate(items.tolist()) if r >= 0 and r not in banned][: w.req.k]
            if len(keep) < w.req.k and w.req.mode != "batch":
                continue  # too short after filtering: the next rung serves k items
            w.ranked = Ranked(items[keep], scores[keep])
            w.source = "batch"
            w.rung = "batch"

    def _result(self, model: LoadedModel, w: _Work, timings: dict[str, float], batch_size: int) -> RecResult:
        assert w.ranked is not None
        ids = model.ids(w.ranked.rows)
        titles = [model.bundle.titles.get(i, "") for i in ids] if w.req.include_titles else []
        us = {k: int(v * 1e6) for k, v in timings.items()}
        us["queue"] = int(w.queue_s * 1e6)
        us["total"] = int((time.monotonic() - w.req.received) * 1e6)
        return RecResult(item_ids=ids, scores=w.ranked.scores.astype(float).tolist(), version=model.version,
                         variant=self.cfg.variant, rung=w.rung, reasons=w.reasons, source=w.source,
                         timings_us=us, batch_size=batch_size, titles=titles, request_id=w.req.request_id)
