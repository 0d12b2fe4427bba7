"""The event log is trimmed only below what every consumer group has acknowledged (issue 22
item 1), against a real redis-server: no entry a group still needs is ever trimmed by its
consumers, and when the server's byte cap must drop unread entries (the consumers stopped
for too long) a reader reports exactly how many it lost, delivered-and-pending included."""

from __future__ import annotations

import asyncio

import pytest
import redis

from offline.event_log import EventLog
from online.config import RedisConfig
from online.redis_store import RedisFeatureStore
from towers.store_format import Event, RedisKeys

PREFIX = "trim"


def _events(lo: int, hi: int) -> list[Event]:
    return [Event(f"u{j % 37}", f"i{j}", "view", 1_700_000_000 + j) for j in range(lo, hi)]


def _record(url: str, events: list[Event], *, max_bytes: int) -> int:
    async def go() -> int:
        store = RedisFeatureStore(RedisConfig(url=url, prefix=PREFIX, events_max_bytes=max_bytes,
                                              socket_timeout_ms=5000))
        try:
            trimmed = 0
            for lo in range(0, len(events), 250):  # calls of 250, as clients would send them
                trimmed += await store.record(events[lo:lo + 250], timeout=10.0)
            return trimmed
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def log(redis_proc) -> EventLog:  # type: ignore[no-untyped-def]
    el = EventLog(redis_url=redis_proc.url, prefix=PREFIX)
    el.ensure_group("refresh")
    yield el  # type: ignore[misc]
    el.close()


def test_consumers_trim_only_what_every_group_acknowledged(redis_proc, log: EventLog) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis(port=redis_proc.port)
    stream = RedisKeys(PREFIX).events()
    log.ensure_group("audit")  # a second group that reads nothing: it needs everything
    assert _record(redis_proc.url, _events(0, 1000), max_bytes=1 << 30) == 0
    first = log.read(group="refresh", consumer="c", count=100)  # 100 delivered, not acknowledged
    assert _record(redis_proc.url, _events(1000, 3000), max_bytes=1 << 30) == 0
    assert log.lost_undelivered(group="refresh") == 0
    assert log.trim_acknowledged() == 0  # nothing acknowledged by anyone yet
    rest = log.read(group="refresh", consumer="c", count=100_000)
    assert len(first.ids) + len(rest.ids) == 3000 and first.lost == rest.lost == 0
    assert log.ack(group="refresh", ids=first.ids[:50]) == 50
    assert log.trim_acknowledged() == 0  # "audit" still needs all of it
    r.xgroup_destroy(stream, "audit")
    assert log.trim_acknowledged() == 50  # up to refresh's oldest pending entry
    assert r.xlen(stream) == 2950
    assert log.ack(group="refresh", ids=first.ids[50:] + rest.ids) == 2950
    _record(redis_proc.url, _events(3000, 3010), max_bytes=1 << 30)  # not delivered yet: kept
    assert log.trim_acknowledged() == 2950 and r.xlen(stream) == 10
    assert len(log.read(group="refresh", consumer="c").ids) == 10


def test_a_stopped_consumer_past_the_byte_cap_loses_entries_and_says_exactly_how_many(redis_proc,  # type: ignore[no-untyped-def]
                                                                                        log: EventLog) -> None:
    r = redis.Redis(port=redis_proc.port)
    stream = RedisKeys(PREFIX).events()
    cap, n = 200_000, 10_600  # bytes: ~4,800 entries of ~41 bytes (the pending list counts too)
    assert _record(redis_proc.url, _events(0, 600), max_bytes=cap) == 0
    first = log.read(group="refresh", consumer="c", count=100)  # delivered, never acknowledged
    trimmed = _record(redis_proc.url, _events(600, n), max_bytes=cap)
    assert trimmed > 5000, "the cap did not bite: the test proves nothing"
    assert r.memory_usage(stream, samples=0) <= cap * 1.1  # checked after every call of 250
    lost_new = log.lost_undelivered(group="refresh")
    again = log.read(group="refresh", consumer="c", pending=True)  # the 100: trimmed ones come back empty
    rest = log.read(group="refresh", consumer="c", count=100_000)
    assert lost_new is not None and again.lost == 100 and again.ids == []  # the oldest go first
    # Every entry written is accounted for: delivered to the first read, delivered now, or reported lost.
    assert len(first.ids) + len(rest.ids) + lost_new == n
    assert [e.item_id for e in rest.events] == [f"i{j}" for j in range(n - len(rest.ids), n)]  # the newest kept
    assert lost_new + again.lost == trimmed == log.overflow_total() == int(r.get(RedisKeys.overflow(stream)))
    assert log.lost_undelivered(group="refresh") == 0  # read past the gap: nothing more to report
    assert log.pending_count(group="refresh") == len(rest.ids)  # the lost ones left the pending list


def test_the_logs_state_and_the_refreshs_last_run_become_metrics(redis_proc, log: EventLog) -> None:  # type: ignore[no-untyped-def]
    """Issue 22 item 3: what a serving worker exports from Redis (online/log_signals.py)."""
    import time

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from online.log_signals import LogSignals
    from online.metrics import ServingMetrics

    _record(redis_proc.url, _events(0, 10), max_bytes=1 << 30)
    batch = log.read(group="refresh", consumer="c", count=4)  # 4 pending, 6 not delivered
    log.record_run(outcome="refused", lost=0, now=1_700_000_000.0)
    log.record_run(outcome="published", lost=0, version="v1", now=1_700_000_100.0)
    log.record_run(outcome="failed", lost=None, now=1_700_000_200.0)
    metrics = ServingMetrics(enabled=True)

    async def check() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix=PREFIX))
        try:
            await LogSignals(store, metrics, every_s=0).check()
        finally:
            await store.close()

    asyncio.run(check())
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()) for s in fam.samples
           if s.name.startswith(("twotower_event_log", "twotower_refresh"))}
    oldest_ms = int(batch.ids[0].split("-")[0])
    assert got[("twotower_event_log_monitored", ())] == 1
    assert (got[("twotower_event_log_entries", ())], got[("twotower_event_log_lag_entries", ())],
            got[("twotower_event_log_pending_entries", ())]) == (10, 6, 4)
    assert got[("twotower_event_log_bytes", ())] > 0 and got[("twotower_event_log_dead_letters", ())] == 0
    assert abs(got[("twotower_event_log_oldest_unacked_age_seconds", ())] - (time.time() - oldest_ms / 1000)) < 60
    assert got[("twotower_refresh_last_run_timestamp_seconds", ())] == 1_700_000_200
    assert got[("twotower_refresh_last_success_timestamp_seconds", ())] == 1_700_000_100  # a failure is no success
    assert got[("twotower_refresh_last_lost_entries", ())] == -1  # unknown
    assert got[("twotower_refresh_last_outcome", (("outcome", "failed"),))] == 1
    assert got[("twotower_refresh_last_outcome", (("outcome", "published"),))] == 0


def test_the_impression_log_is_held_under_its_byte_cap(redis_proc) -> None:  # type: ignore[no-untyped-def]
    """Issue 20 item 6: an impression carries up to max_k item ids, so an entry cap alone does
    not bound its bytes; the newest impressions stay."""
    from towers.store_format import Impression

    cap = 100_000

    async def go() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix=PREFIX, impressions_max_bytes=cap))
        try:
            for lo in range(0, 5000, 100):
                await store.log_impressions([Impression(f"r{j}", f"u{j % 7}", "control", "v1",
                                                        tuple(f"item-{j}-{x}" for x in range(50)))
                                             for j in range(lo, lo + 100)], timeout=5.0)
        finally:
            await store.close()

    asyncio.run(go())
    r = redis.Redis(port=redis_proc.port)
    key = RedisKeys(PREFIX).impressions()
    assert r.memory_usage(key, samples=0) <= cap * 1.1 and 0 < r.xlen(key) < 5000
    last = r.xrevrange(key, count=1)[0][1]
    assert last[b"rid"] == b"r4999" and len(last[b"items"].split(b"\t")) == 50
