"""Prometheus metrics of the serving path (``prometheus_client``), and the degraded-response log.

What is exported (every name starts with ``twotower_``; seconds, not microseconds):

- ``request_latency_seconds{rung,variant,version}`` histogram: server-side time of each
  answered Recommend call (received → result), so ``_count`` is responses by rung too;
- ``stage_latency_seconds{stage,variant}`` histogram, stage in queue|fetch|combine|search|
  filter|total, one observation per request (a batch's fetch time is what each of its
  requests waited for it);
- ``batch_size`` histogram (one observation per batch);
- ``degraded_responses_total{rung,reason}``: responses below the full rung, each counted once
  under its first reason's class (the text before its first ':': ``feature store``, ``cold
  start``, ...), so the label set stays small and the sum is the number of degraded responses;
- ``feature_store_errors_total{op,kind}``: kind timeout|error, op fetch|batch_recs|record;
- ``rpc_errors_total{code}``: RPCs that failed (invalid input, deadline, internal);
- ``model_swaps_total``, ``model_rejected_total``: from the registry watcher;
- ``shed_requests_total{reason}``: calls refused at admission (queue_full | deadline);
  ``event_log_overflow_entries_total``: unconsumed log entries the byte cap trimmed; the
  event log and refresh gauges (``event_log_*``, ``refresh_last_*``: ``online.log_signals``);
- gauges ``serving`` (1 per worker that is SERVING), ``model_info{version,variant}`` (1 per
  worker serving that version: the Info-metric convention as a gauge, because
  ``prometheus_client.Info`` has no multiprocess mode), ``batcher_queue_depth``,
  ``batches_inflight``; ``worker_resident_memory_bytes{slot}`` (read from /proc at scrape);
- ``event_loop_lag_seconds`` and ``gc_pause_seconds{generation}`` histograms: where slow
  requests wait outside the stages (``online.loop_health``, registered in this registry).

Cost is what shapes this module: the request path serves 1-2k requests per second on about
one core, so all of this has a budget of a few microseconds per request. Observation happens
once per *batch* (``observe_batch``, called by the batcher's handler), into plain local
bucket counts (``bisect``, no lock); every ``FLUSH_INTERVAL_S`` the event loop moves them into
the prometheus values, one increment per touched bucket, instead of one ``Histogram.observe``
per value and stage (each increment takes a lock, and in multiprocess mode writes a
memory-mapped file: 0.5-1.3 µs, ~16 of them per batch). Labelled children are looked up once
and cached. ``bench/metrics_cost.py`` measures it.

Several worker processes: ``prometheus_client``'s multiprocess mode. The supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it spawns the workers; each worker's
values live in memory-mapped files there, and one exporter in the supervisor aggregates them
(``supervisor_registry``), marking a dead worker's live gauges gone (``mark_dead``). Gauges
declare how they aggregate (``livesum``). See deploy/README.md for why not a port per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from online.exporter import PREFIX, WorkerCollector, multiprocess_dir
from towers.labels import Rung

if TYPE_CHECKING:
    from online.feature_store import LogStatus
    from online.request import RecResult

log = logging.getLogger("twotower.serve")
REFRESH_OUTCOMES = ("published", "unchanged", "refused", "failed")  # offline.event_log.EventLog.record_run

# Request latency: the budget is 100 ms with ~1-3 ms typical on the dev machine; 0.5 ms .. 1 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 1.0)
# Stages: combine and filter take tens of microseconds, a slow fetch tens of milliseconds.
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.03,
                 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "fetch", "combine", "search", "filter", "total")
BATCH_STAGES = ("fetch", "combine", "search", "filter")  # one value per batch, shared by its requests
FLUSH_INTERVAL_S = 0.1  # local histogram counts reach the exported values this much later at most
DEGRADED_LOG_INTERVAL_S = 1.0  # at most one degraded-response line per rung per second


class _Load(Protocol):
    """What the load gauges read: ``online.batcher.Batcher``."""

    @property
    def queued(self) -> int: ...

    @property
    def inflight(self) -> int: ...


class _Bulk:
    """A histogram child observed in bulk. Observations go to plain local counts (no lock, no
    file write: the event loop is the only writer) and ``flush`` moves them into the child:
    one increment per touched bucket and one for the sum. ``prometheus_client`` keeps one
    non-cumulative value per bucket plus the sum, so adding ``n`` to a bucket once equals ``n``
    calls of ``observe`` with values in it. (Private attributes of ``Histogram``;
    ``tests/test_metrics.py`` checks the exposition equals ``observe`` per value, so a client
    upgrade that changes them fails there.)"""

    __slots__ = ("bounds", "buckets", "dirty", "pending", "pending_sum", "sum")

    def __init__(self, child: Histogram) -> None:
        self.bounds: list[float] = list(child._upper_bounds)
        self.buckets: list[Any] = child._buckets
        self.sum: Any = child._sum
        self.pending = [0] * len(self.bounds)
        self.pending_sum = 0.0
        self.dirty = False

    def add(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value``."""
        self.pending[bisect_left(self.bounds, value)] += n
        self.pending_sum += value * n
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        pending = self.pending
        for i, c in enumerate(pending):
            if c:
                self.buckets[i].inc(c)
                pending[i] = 0
        self.sum.inc(self.pending_sum)
        self.pending_sum = 0.0
        self.dirty = False


class ServingMetrics:
    """One worker's (or one in-process server's) metrics, in its own registry.

    ``enabled=False`` (no ``--metrics-port``) keeps only what the process itself needs:
    ``served`` (the supervisor recycles on it; admin status shows it) and the degraded-response
    log. ``load`` is the batcher, read for the queue-depth and in-flight gauges: at scrape time
    in a single process, by ``sample()`` (the worker's report loop) in multiprocess mode."""

    def __init__(self, *, enabled: bool, load: _Load | None = None) -> None:
        self.enabled = enabled
        self.served = 0  # Recommend calls answered (warmup excluded: it does not go through the batcher)
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._latency = Histogram(f"{PREFIX}request_latency_seconds",
                                  "Server-side latency of answered Recommend calls (received to result).",
                                  ["rung", "variant", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self._stage = Histogram(f"{PREFIX}stage_latency_seconds",
                                "Per-stage latency, one observation per request (a batch stage counts for each "
                                "request of the batch).", ["stage", "variant"], buckets=STAGE_BUCKETS, registry=r)
        self._batch = Histogram(f"{PREFIX}batch_size", "Requests per batch of the dynamic batcher.",
                                buckets=BATCH_SIZE_BUCKETS, registry=r)
        self._reasons = Counter(f"{PREFIX}degraded_responses", "Responses below the full rung, by rung and the class "
                                "of their first reason (its text before the first ':').", ["rung", "reason"],
                                registry=r)
        self._store_errors = Counter(f"{PREFIX}feature_store_errors", "Feature store calls that failed or timed out.",
                                     ["op", "kind"], registry=r)
        for op in ("fetch", "batch_recs", "record"):  # exported from 0: rate() and alerts see the first error
            for kind in ("timeout", "error"):
                self._store_errors.labels(op, kind)
        self._rpc_errors = Counter(f"{PREFIX}rpc_errors", "RPCs answered with an error status.", ["code"],
                                   registry=r)
        self._shed = Counter(f"{PREFIX}shed_requests", "Recommend calls refused at admission "
                             "(RESOURCE_EXHAUSTED), by reason: queue_full | deadline.", ["reason"], registry=r)
        for reason in ("queue_full", "deadline"):
            self._shed.labels(reason)
        self._overflow = Counter(f"{PREFIX}event_log_overflow_entries", "Event log entries no consumer had "
                                 "acknowledged, trimmed by the log's byte cap (redis.events_max_bytes).", registry=r)
        self._swaps = Counter(f"{PREFIX}model_swaps", "Bundle versions installed (the first load included).",
                              registry=r)
        self._rejected = Counter(f"{PREFIX}model_rejected", "Candidate versions rejected (load, verify, feature "
                                 "store check or warmup failed); the old version kept serving.", registry=r)
        self._serving = Gauge(f"{PREFIX}serving", "1 per worker whose health status is SERVING.", registry=r,
                              multiprocess_mode="livesum")
        self._info = Gauge(f"{PREFIX}model_info", "Workers serving each bundle version (1 per worker).",
                           ["version", "variant"], registry=r, multiprocess_mode="livesum")
        self._queue = Gauge(f"{PREFIX}batcher_queue_depth", "Requests waiting for a batch.", registry=r,
                            multiprocess_mode="livesum")
        self._inflight = Gauge(f"{PREFIX}batches_inflight", "Batches running.", registry=r,
                               multiprocess_mode="livesum")
        # The event log and the refresh (online/log_signals.py polls them from Redis); every
        # worker reads the same values, so workers aggregate by max.
        def g(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"{PREFIX}{name}", doc, list(labels), registry=r, multiprocess_mode="livemax")

        self._log_gauges = {
            "monitored": g("event_log_monitored", "1 when this server reads the event log's state from Redis."),
            "entries": g("event_log_entries", "Entries in the durable event log."),
            "bytes": g("event_log_bytes", "Redis memory of the event log (sampled)."),
            "lag": g("event_log_lag_entries", "Entries not yet delivered to the refresh's consumer group."),
            "pending": g("event_log_pending_entries", "Entries delivered to the refresh, not acknowledged."),
            "age": g("event_log_oldest_unacked_age_seconds", "Age of the oldest entry the refresh has not "
                     "acknowledged (0: none)."),
            "dead": g("event_log_dead_letters", "Entries in the dead-letter stream."),
            "last_run": g("refresh_last_run_timestamp_seconds", "When the last refresh run ended."),
            "last_success": g("refresh_last_success_timestamp_seconds", "When a refresh last published or "
                              "found nothing new."),
            "lost": g("refresh_last_lost_entries", "Event log entries the last refresh found lost before it "
                      "read them (-1: unknown)."),
        }
        self._outcome = g("refresh_last_outcome", "1 for the last refresh run's outcome.", ["outcome"])
        self._load = load
        if load is not None and not self.multiprocess:  # read at scrape time; exact, and free otherwise
            self._queue.set_function(lambda: load.queued)
            self._inflight.set_function(lambda: load.inflight)
        if not self.multiprocess:
            from prometheus_client import ProcessCollector

            ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
            r.register(WorkerCollector(lambda: [(0, os.getpid())]))
        # Children cached by label values: .labels() builds and hashes a key every call.
        self._lat_children: dict[tuple[Rung, str, str], _Bulk] = {}
        self._stage_children: dict[str, dict[str, _Bulk]] = {}
        self._all_bulk: list[_Bulk] = []
        self._batch_child = self._bulk(self._batch)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._reason_children: dict[tuple[Rung, str], Any] = {}
        self._version: tuple[str, str] | None = None
        self._last_log: dict[Rung, float] = {}
        self._suppressed: dict[Rung, int] = {}

    # -- the request path: once per batch ---------------------------------------------------------
    def observe_batch(self, results: Sequence[RecResult | BaseException]) -> None:
        """Account one batch's results (exceptions are counted where the RPC fails). Plain
        local counts here; the prometheus values get them at most ``FLUSH_INTERVAL_S`` later."""
        ok = [r for r in results if not isinstance(r, BaseException)]
        if not ok:
            return
        self.served += len(ok)
        # Below the full rung for a reason (mode=BATCH asks for the batch rung: that has no reason).
        degraded = [r for r in ok if r.rung is not Rung.FULL and r.reasons]
        if degraded:
            self._degraded(degraded)
        if not self.enabled:
            return
        lat_children, stage_children = self._lat_children, self._stage_children
        # The batch stages (fetch .. filter) are one value per run_batch; an A/B router splits a
        # batch into groups, one run each: group the requests by variant and those values.
        groups: dict[tuple[str, int, int, int, int], int] = {}
        for r in ok:
            ts = r.timings
            total = ts.total * 1e-6
            key = (r.rung, r.variant, r.version)
            child = lat_children.get(key)
            if child is None:
                child = lat_children[key] = self._bulk(self._latency.labels(*key))
            child.add(total)
            st = stage_children.get(r.variant)
            if st is None:
                st = self._stage_of(r.variant)
            st["queue"].add(ts.queue * 1e-6)
            st["total"].add(total)
            g = (r.variant, ts.fetch, ts.combine, ts.search, ts.filter)
            groups[g] = groups.get(g, 0) + 1
        for (variant, *stage_us), n in groups.items():
            st = stage_children[variant]
            for s, us in zip(BATCH_STAGES, stage_us, strict=True):
                st[s].add(us * 1e-6, n)
        self._batch_child.add(len(ok))
        if self._flush_handle is None:
            self._schedule_flush()

    def _bulk(self, child: Histogram) -> _Bulk:
        b = _Bulk(child)
        self._all_bulk.append(b)
        return b

    def _stage_of(self, variant: str) -> dict[str, _Bulk]:
        st = self._stage_children[variant] = {s: self._bulk(self._stage.labels(s, variant)) for s in STAGES}
        return st

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a direct call): nothing would flush later
            self.flush()
            return
        self._flush_handle = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Move the local counts into the prometheus values (the event loop's thread, or a
        caller with no loop running: the only writers of the local counts)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for b in self._all_bulk:
            b.flush()

    def _degraded(self, results: list[RecResult]) -> None:
        """Count reasons by class and log, at most once per second per rung, one of the batch's
        degraded responses with its request id, version, variant, rung and reasons."""
        if self.enabled:
            counts: dict[tuple[Rung, str], int] = {}
            for r in results:  # each response once, under its first reason (what sent it down first)
                key = (r.rung, r.reasons[0].split(":", 1)[0])
                counts[key] = counts.get(key, 0) + 1
            for key, c in counts.items():
                child = self._reason_children.get(key)
                if child is None:
                    child = self._reason_children[key] = self._reasons.labels(*key)
                child.inc(c)
        now = time.monotonic()
        for r in results:
            if now - self._last_log.get(r.rung, float("-inf")) >= DEGRADED_LOG_INTERVAL_S:
                extra = self._suppressed.pop(r.rung, 0)
                log.warning("degraded response rung=%s version=%s reasons=%s total_us=%d (+%d similar since "
                            "last line)", r.rung, r.version, "; ".join(r.reasons), r.timings.total,
                            extra, extra=request_fields(r, reasons=r.reasons, suppressed=extra))
                self._last_log[r.rung] = now
            else:
                self._suppressed[r.rung] = self._suppressed.get(r.rung, 0) + 1

    # -- events (rare: no caching needed) ---------------------------------------------------------
    def store_failed(self, op: str, error: BaseException) -> None:
        from towers.errors import FeatureStoreTimeout

        self._store_errors.labels(op, "timeout" if isinstance(error, FeatureStoreTimeout) else "error").inc()

    def event_log(self, status: LogStatus, *, now: float) -> None:
        """The event log's state as last read (``online.log_signals``)."""
        ref = status.refresh
        values = {"monitored": 1, "entries": status.entries, "bytes": status.bytes, "lag": status.lag,
                  "pending": status.pending, "dead": status.dead_letters,
                  "age": 0.0 if status.oldest_unacked_s is None else max(now - status.oldest_unacked_s, 0.0),
                  "last_run": float(ref.get("last_run", 0)), "last_success": float(ref.get("last_success", 0)),
                  "lost": float(ref.get("lost", 0))}
        for name, value in values.items():
            self._log_gauges[name].set(value)
        for outcome in REFRESH_OUTCOMES:
            self._outcome.labels(outcome).set(1 if ref.get("outcome") == outcome else 0)

    def event_log_overflow(self, entries: int) -> None:
        """The event log's safety cap trimmed ``entries`` no consumer had acknowledged."""
        self._overflow.inc(entries)
        log.error("event log over its byte cap (redis.events_max_bytes): %d unconsumed entries trimmed; "
                   "is the nightly refresh running?", entries)

    def shed(self, reason: str) -> None:
        """A request refused at admission (queue_full | deadline)."""
        self._shed.labels(reason).inc()

    def rpc_failed(self, code: Any) -> None:
        """``code``: a ``grpc.StatusCode`` (its name is the label)."""
        self._rpc_errors.labels(getattr(code, "name", str(code))).inc()

    def installed(self, version: str, variant: str) -> None:
        """The serving version changed: the info gauge moves from the old version to the new."""
        if self._version is not None:
            self._info.labels(*self._version).set(0)
        self._version = (version, variant)
        self._info.labels(version, variant).set(1)

    def swapped(self) -> None:
        self._swaps.inc()

    def rejected(self) -> None:
        self._rejected.inc()

    def set_serving(self, serving: bool) -> None:
        self._serving.set(1 if serving else 0)
        if not serving:
            self.flush()

    def sample(self) -> None:
        """Multiprocess mode: copy the batcher's queue depth and in-flight count into the gauges
        (the worker's report loop calls this every 0.1 s; the exporter is another process)."""
        if self._load is not None and self.multiprocess:
            self._queue.set(self._load.queued)
            self._inflight.set(self._load.inflight)


def request_fields(r: RecResult, **more: Any) -> dict[str, Any]:
    """The request-scoped fields of a log line (``extra=``): JSON logs carry them as keys."""
    return {"request_id": r.request_id, "version": r.version, "variant": r.variant, "rung": r.rung.label, **more}


def error_fields(service: Any, request: Any) -> dict[str, Any]:
    """The same fields for a failed call (no result, so no rung): the wire request's id and
    the version the service had installed."""
    model = getattr(service, "model", None)
    return {"request_id": getattr(request, "request_id", ""), "version": model.version if model else "",
            "variant": service.cfg.variant, "rung": ""}
