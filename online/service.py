"""The request path: fetch → combine → search → filter → respond, batched
across concurrent requests, inside a latency budget, degrading (never failing)
when a stage runs late or a dependency fails (DESIGN §3):

    full online → no session (user embedding only) → batch recs → popularity

Every result carries its rung, the reasons, the version and per-stage timings.
This module holds no gRPC objects: ``online.server`` adapts it to the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Protocol

import faiss
import numpy as np

from online.batcher import Batcher
from online.config import ServeConfig
from online.degradation import EMBEDDING_FROM_BUNDLE, Ladder
from online.exposures import ExposureLog
from online.feature_store import CART, BatchFeatures, BatchRecs, Event, FeatureStore
from online.impressions import ImpressionLog
from online.lifecycle import Lifecycle, LoadedModel
from online.metrics import ServingMetrics
from online.request import RecRequest, RecResult, StageTimings
from online.settings import DEFAULT_SETTINGS, BatchSettings
from online.shared_fetch import SharedFetch
from towers.context import request_term
from towers.errors import FeatureStoreError, NotReady, Overloaded, Unsupported
from towers.labels import Mode, Rung, Source
from towers.ranking import (
    QueryBatch,
    combine_queries,
    merge_searches,
    plan_search,
    popular,
    search,
    select,
    take_eligible,
)

log = logging.getLogger("twotower.serve")


class BatchRouter(Protocol):
    """Answers a batch by routing its requests to versions and settings (A/B flags:
    ``online.experiments.Router``; a protocol here so this module does not import it)."""

    async def handle(self, current: LoadedModel, reqs: Sequence[RecRequest],
                     queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        ...


class RecommendService:
    def __init__(self, cfg: ServeConfig, store: FeatureStore) -> None:
        self.cfg = cfg
        self.store = store
        # OpenMP's thread count is per calling thread, so each search thread sets its own.
        self.search_pool = ThreadPoolExecutor(max_workers=cfg.search_threads, thread_name_prefix="search",
                                        initializer=faiss.omp_set_num_threads, initargs=(cfg.search_omp_threads,))
        b = cfg.batching
        self.batcher: Batcher[RecRequest, RecResult] = Batcher(self._handle, max_batch_size=b.max_batch_size,
                                                           max_wait_ms=b.max_wait_ms, gap_ms=b.gap_ms,
                                                           max_inflight=b.max_inflight_batches,
                                                           max_pending=b.max_pending)
        self.metrics = ServingMetrics(enabled=cfg.metrics_port >= 0, load=self.batcher)
        self.impressions = ImpressionLog(store, rate=cfg.impression_sample_rate)
        self.exposures = ExposureLog(store)  # users in an experiment: once per label and day
        # The versions this process holds: load -> prepare -> warm -> install / reject / pin.
        self.lifecycle = Lifecycle(cfg=cfg, store=store, metrics=self.metrics, run_batch=self.run_batch)
        # A/B flags (online.experiments): the router assigns each request a version and settings;
        # the versions it pins stay resident beside CURRENT. None: every request gets CURRENT.
        self.router: BatchRouter | None = None

    @property
    def model(self) -> LoadedModel | None:
        """The installed version (new batches use it)."""
        return self.lifecycle.model

    @property
    def requests_served(self) -> int:
        """Recommend calls answered (the supervisor recycles on it)."""
        return self.metrics.served

    async def close(self) -> None:
        await self.batcher.stop()
        await self.impressions.close()
        await self.exposures.close()
        self.search_pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

    # -- API ------------------------------------------------------------------
    async def recommend(self, req: RecRequest) -> RecResult:
        if self.model is None:
            raise NotReady("no model loaded yet")
        if req.context:
            # Checked once, against CURRENT's spec, before the request joins a batch (an invalid
            # key fails this request alone). A version an experiment pins reads only the keys
            # its own spec declares (towers.context.encode_requests), never a foreign one.
            self.model.context_schema.check(req.context)
        try:
            res = await self.batcher.submit(req, deadline=req.client_deadline)
        except Overloaded as e:
            self.metrics.shed(e.reason)
            if self.cfg.batching.shed_answer != "degrade":
                raise
            res = await self.shed_answer(req, e)
            self.metrics.observe_batch([res])
        self.impressions.offer(req, res)
        self.exposures.offer(req, res)
        return res

    async def record_events(self, events: Sequence[Event]) -> int:
        if not self.store.capabilities.shared and self.cfg.workers.workers > 1:
            # Each worker process has its own memory store: an event recorded here would be
            # invisible to the worker that serves the user's next request.
            raise Unsupported("RecordEvents needs a shared feature store when serving with several workers "
                              "(serve with --redis-url)")
        # Acknowledged means stored: a store failure here is an error to the caller, not a silent drop.
        try:
            trimmed = await self.store.record(events, timeout=self.cfg.redis.socket_timeout_ms / 1000.0 * 5)
        except FeatureStoreError as e:
            self.metrics.store_failed("record", e)
            raise
        if trimmed:  # the consumers stopped and the log hit its byte cap: never silent
            self.metrics.event_log_overflow(trimmed)
        return len(events)

    # -- the batch handler ----------------------------------------------------
    async def _handle(self, reqs: Sequence[RecRequest], queue_s: Sequence[float]) -> list[RecResult | BaseException]:
        model = self.model  # one version for the whole batch: no skew inside a batch
        if model is None:
            return [NotReady("no model loaded yet")] * len(reqs)
        if self.router is not None:  # groups the batch by (version, settings): one version per group
            results = await self.router.handle(model, reqs, queue_s)
        else:
            results = await self.run_batch(model, reqs, queue_s)
        self.metrics.observe_batch(results)  # once per batch; warmup and shadows (run_batch directly) are not
        return results

    async def run_batch(self, model: LoadedModel, reqs: Sequence[RecRequest], queue_s: Sequence[float], *,
                        settings: BatchSettings = DEFAULT_SETTINGS,
                        share: SharedFetch | None = None) -> list[RecResult | BaseException]:
        """Answer a batch with ``model`` (installed or not: warmup runs candidates through here),
        with an experiment's ``settings`` (search parameters, session length, allowed rungs);
        ``share``: the feature fetch shared with the batch's other groups (interleaving)."""
        with self.lifecycle.running(model):
            return await self._stages(model, reqs, queue_s, settings, share)

    async def _stages(self, model: LoadedModel, reqs: Sequence[RecRequest], queue_s: Sequence[float],
                      settings: BatchSettings = DEFAULT_SETTINGS,
                      share: SharedFetch | None = None) -> list[RecResult | BaseException]:
        t0 = time.monotonic()
        budget = self.cfg.budget
        n = len(reqs)
        ladder = Ladder(n)
        batch_mode = np.fromiter((r.mode is Mode.BATCH for r in reqs), dtype=bool, count=n)
        online = np.flatnonzero(~batch_mode)

        # fetch: one pipeline for the whole batch
        feats: BatchFeatures | None = None
        if len(online) and not settings.allow_full:  # no session in the query: the user embedding alone
            ladder.not_allowed(online, Rung.FULL, Rung.NO_SESSION)
        elif len(online):
            # The latest deadline sets the timeout: one caller with a tight deadline must not cost
            # the whole batch its features. Callers whose time runs out meanwhile are caught by the
            # "too little time left" check below and get the precomputed rung.
            latest = max(reqs[i].deadline for i in online.tolist())
            left = latest - time.monotonic() - (budget.inference_ms + budget.post_ms) / 1000.0
            timeout = min(budget.fetch_ms / 1000.0, max(left, 0.0))
            fetch = partial(self.store.fetch, model.version, dim=model.bundle.dim,
                            n_recent=model.bundle.combiner.max_session, timeout=timeout)
            users = [reqs[i].user_id for i in online.tolist()]
            try:
                feats = await (share.fetch(model.version, users, fetch) if share is not None else fetch(users))
            except FeatureStoreError as e:
                self.metrics.store_failed("fetch", e)
                ladder.feature_store_failed(online, str(e))
        t1 = time.monotonic()

        # combine: one QueryBatch (one vocabulary pass, one exclusion array), one combiner call
        batch = self._query_batch(model, reqs, online, feats, ladder, settings.max_session)
        has_query = batch.has_user | batch.has_session
        time_left = np.fromiter((r.deadline for r in reqs), dtype=np.float64, count=n) - time.monotonic()
        to_search = ladder.plan_search(online, has_query, time_left, budget.min_search_ms / 1000.0)
        if not settings.allow_no_session:
            demoted = to_search[ladder.rung[to_search] == Rung.NO_SESSION]
            ladder.not_allowed(demoted, Rung.NO_SESSION, Rung.BATCH)
            to_search = to_search[ladder.rung[to_search] != Rung.BATCH]
        sub = batch.subset(to_search)
        queries = combine_queries(model.ranker, sub)
        t2 = time.monotonic()

        # search: one FAISS call, off the event loop (FAISS releases the GIL). Always in a search
        # thread, however small: a batch is then in flight while it searches and the next one
        # gathers (searching tiny catalogs inline kept batches at 1.5-2 under load: -35% QPS).
        if len(sub):
            # A request whose exclusions need a deeper search than its batchmates gets one of its
            # own, on the other search thread at the same time: the batch waits for the slower
            # of the two, not for every row searched as deep as the widest (towers.ranking).
            loop, params = asyncio.get_running_loop(), settings.search_params
            plan = plan_search(model.ranker, sub)
            first = loop.run_in_executor(self.search_pool, partial(search, model.ranker, queries, plan.base,
                                                                   params=params))
            second = loop.run_in_executor(self.search_pool, partial(
                search, model.ranker, queries[plan.wide], plan.deep, params=params)) if len(plan.wide) else None
            cand_scores, cand_rows = merge_searches(plan, await first, await second if second is not None else None)
        else:
            cand_scores, cand_rows = search(model.ranker, queries, 0)
        t3 = time.monotonic()

        # select: filter to k (refill short lists), then the lower rungs for the rest
        k_max = int(batch.k.max(initial=0))
        rows = np.full((n, k_max), -1, dtype=np.int64)
        scores = np.zeros((n, k_max), dtype=np.float32)
        counts = np.zeros(n, dtype=np.int64)
        if len(sub):
            ranked = select(model.ranker, sub, queries, cand_scores, cand_rows)
            rows[to_search, : ranked.rows.shape[1]] = ranked.rows
            scores[to_search, : ranked.scores.shape[1]] = ranked.scores
            counts[to_search] = ranked.counts
            ladder.searched(to_search, ranked.source)
        answered = np.zeros(n, dtype=bool)
        answered[to_search] = True
        await self._lower_rungs(model, reqs, batch, batch_mode, ladder, answered, rows, scores, counts,
                                allow_batch=settings.allow_batch)
        t4 = time.monotonic()
        stage_us = (int((t1 - t0) * 1e6), int((t2 - t1) * 1e6), int((t3 - t2) * 1e6), int((t4 - t3) * 1e6))
        return self._results(model, reqs, queue_s, ladder, rows, scores, counts, stage_us)

    async def _lower_rungs(self, model: LoadedModel, reqs: Sequence[RecRequest], batch: QueryBatch,
                           batch_mode: np.ndarray, ladder: Ladder, answered: np.ndarray, rows: np.ndarray,
                           scores: np.ndarray, counts: np.ndarray, *, allow_batch: bool = True,
                           from_store: bool = True) -> None:
        """What the search did not answer: the precomputed rung for requests on it (or in
        batch mode), then popularity for the rest (filled in place)."""
        precomputed = np.flatnonzero(batch_mode | (ladder.rung == Rung.BATCH))
        if len(precomputed) and not allow_batch:
            ladder.not_allowed(precomputed, Rung.BATCH, Rung.POPULARITY)
            precomputed = precomputed[:0]
        if len(precomputed):
            answered[await self._batch_recs(model, reqs, batch, precomputed, batch_mode, ladder, rows, scores,
                                            counts, from_store=from_store)] = True
        rest = np.flatnonzero(~answered)
        if len(rest):
            ladder.popularity(rest)
            r, s, c = popular(model.ranker, batch, rest)
            rows[rest, : r.shape[1]], scores[rest, : s.shape[1]], counts[rest] = r, s, c

    async def shed_answer(self, req: RecRequest, why: Overloaded) -> RecResult:
        """A request admission refused, answered at once from memory: the bundle's precomputed
        list for the user (the same version's the store holds), else popularity, with its
        exclusions applied and the reason in its label. No store call, no search, no queue:
        a few numpy calls on the event loop, so shedding stays cheap under the overload that
        caused it. (Experiments are not consulted: CURRENT answers, labelled as such.)"""
        model = self.model
        if model is None:
            raise NotReady("no model loaded yet")
        reqs, ladder = [req], Ladder(1)
        ladder.overloaded(str(why))
        batch = self._query_batch(model, reqs, np.zeros(0, np.int64), None, ladder)
        k = max(req.k, 0)
        rows, scores = np.full((1, k), -1, dtype=np.int64), np.zeros((1, k), dtype=np.float32)
        counts, answered = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool)
        await self._lower_rungs(model, reqs, batch, np.zeros(1, dtype=bool), ladder, answered, rows, scores, counts,
                                from_store=False)
        filter_us = int((time.monotonic() - req.received) * 1e6)
        (res,) = self._results(model, reqs, [0.0], ladder, rows, scores, counts, (0, 0, 0, filter_us))
        assert isinstance(res, RecResult)
        return res

    def _query_batch(self, model: LoadedModel, reqs: Sequence[RecRequest], online: np.ndarray,
                     feats: BatchFeatures | None, ladder: Ladder, max_session: int | None = None) -> QueryBatch:
        """Every request's user vector, session (request first, then the store's; deduplicated,
        most recent first) and exclusions (session, cart, exclude), as one QueryBatch with one
        vocabulary pass over the batch's item ids. Batch-mode requests get no query, only
        exclusions; when the fetch failed, the session feeds no query (the no_session rung)."""
        n, bundle = len(reqs), model.bundle
        user_rows = bundle.features.user_vocab.positions([r.user_id for r in reqs])
        user = np.zeros((n, bundle.dim), dtype=np.float32)
        has_user = np.zeros(n, dtype=bool)
        in_query = np.zeros(n, dtype=bool)  # the request's recent items feed its query
        if feats is not None:
            in_query[online] = True
            user[online], has_user[online] = feats.embedding, feats.has_user
        # No embedding from the store (or no fetch): the same version's from the bundle itself.
        from_bundle = np.zeros(n, dtype=bool)
        from_bundle[online] = (user_rows[online] >= 0) & ~has_user[online]
        s_ids: list[str] = []
        s_owner: list[int] = []
        x_ids: list[str] = []
        x_owner: list[int] = []
        for i, r in enumerate(reqs):
            ids, owner = (s_ids, s_owner) if in_query[i] else (x_ids, x_owner)  # listed items are still excluded
            ids.extend(r.recent)
            owner.extend([i] * len(r.recent))
            x_ids.extend(r.cart)
            x_ids.extend(r.exclude)
            x_owner.extend([i] * (len(r.cart) + len(r.exclude)))
        session_owner = np.asarray(s_owner, dtype=np.int64)
        exclude_owner = np.asarray(x_owner, dtype=np.int64)
        if feats is not None and feats.items:
            # The store's sessions after the requests' own recent items; its carts are excluded.
            event_owner = online[feats.owner]
            cart = np.flatnonzero(feats.types == CART)
            s_ids += feats.items
            x_ids += [feats.items[j] for j in cart.tolist()]
            session_owner = np.concatenate([session_owner, event_owner])
            exclude_owner = np.concatenate([exclude_owner, event_owner[cart]])
        if feats is not None:
            ladder.note(np.flatnonzero(from_bundle), EMBEDDING_FROM_BUNDLE)
        idx = np.flatnonzero(from_bundle)
        if len(idx):
            user[idx] = bundle.user_emb[user_rows[idx]]
            has_user[idx] = True
        item_rows = bundle.features.item_vocab.positions([*s_ids, *x_ids])
        session_owner, session_rows = _first_per_request(session_owner, item_rows[: len(s_ids)], model.ranker.n_items)
        context = None
        if bundle.features.context_encoders:  # the spec declares context: what each request adds to its query
            now = int(time.time())
            context = request_term(bundle.features, bundle.combiner, [r.context for r in reqs],
                                   np.fromiter((r.timestamp or now for r in reqs), dtype=np.int64, count=n),
                                   [r.device for r in reqs])
        return QueryBatch.build(model.ranker, user=user, has_user=has_user,
                                session_owner=session_owner, session_rows=session_rows,
                                exclude_owner=exclude_owner, exclude_rows=item_rows[len(s_ids):],
                                k=np.fromiter((r.k for r in reqs), dtype=np.int64, count=n), max_session=max_session,
                                context=context)

    async def _batch_recs(self, model: LoadedModel, reqs: Sequence[RecRequest], batch: QueryBatch, idx: np.ndarray,
                          batch_mode: np.ndarray, ladder: Ladder, rows: np.ndarray, scores: np.ndarray,
                          counts: np.ndarray, *, from_store: bool = True) -> np.ndarray:
        """The precomputed rung for requests ``idx``: one lookup (or the bundle's own copy when
        not ``from_store``), filtered like any other list. Returns the requests it answered."""
        users = [reqs[i].user_id for i in idx.tolist()]
        error: str | None = None
        recs: BatchRecs | None = None
        if from_store:
            try:
                left = min(self.cfg.budget.fetch_ms / 1000.0,
                           max(reqs[i].deadline for i in idx.tolist()) - time.monotonic())
                recs = await self.store.batch_recs(model.version, users, timeout=max(left, 0.0005))
            except FeatureStoreError as e:
                self.metrics.store_failed("batch_recs", e)
                error = str(e)
        if recs is None:
            b = model.bundle
            recs = BatchRecs.gather(b.features.user_vocab.positions(users), b.recs_items, b.recs_scores)
        r, s, c = take_eligible(batch, idx, recs.rows, recs.scores)
        served = ladder.batch_recs(idx, recs.found, c >= batch.k[idx], batch_mode[idx], error)
        answered = idx[served]
        rows[answered, : r.shape[1]], scores[answered, : s.shape[1]] = r[served], s[served]
        counts[answered] = c[served]
        return answered

    def _results(self, model: LoadedModel, reqs: Sequence[RecRequest], queue_s: Sequence[float], ladder: Ladder,
                 rows: np.ndarray, scores: np.ndarray, counts: np.ndarray,
                 stage_us: tuple[int, int, int, int]) -> list[RecResult | BaseException]:
        item_ids, titles, n = model.item_ids, model.bundle.titles, len(reqs)
        rungs, sources, now = ladder.rung.tolist(), ladder.source.tolist(), time.monotonic()
        out: list[RecResult | BaseException] = []
        for i, (r, c) in enumerate(zip(reqs, counts.tolist(), strict=True)):
            ids = item_ids[rows[i, :c]].tolist()
            us = StageTimings(int(queue_s[i] * 1e6), *stage_us, int((now - r.received) * 1e6))
            out.append(RecResult(item_ids=ids, scores=scores[i, :c].tolist(), version=model.version,
                                 variant=self.cfg.variant, rung=Rung(rungs[i]), reasons=ladder.reasons_of(i),
                                 source=Source(sources[i]), timings=us, batch_size=n,
                                 titles=[titles.get(x, "") for x in ids] if r.include_titles else [],
                                 request_id=r.request_id))
        return out


def _first_per_request(owner: np.ndarray, rows: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Session items grouped by request in their order (a stable sort: the request's own
    first), each request's repeats and unknown items (-1) dropped: ``dict.fromkeys`` per
    request, as the offline evaluation builds its sessions, for the whole batch at once."""
    keep = rows >= 0
    owner, rows = owner[keep], rows[keep]
    order = np.argsort(owner, kind="stable")
    owner, rows = owner[order], rows[order]
    _, first = np.unique(owner * n_items + rows, return_index=True)
    first.sort()
    return owner[first], rows[first]
