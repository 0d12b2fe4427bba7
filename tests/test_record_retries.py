"""Exactly-once recording through retries (issue 22 item 6): a RecordEvents whose Redis
write lands but whose reply arrives after the server's record deadline is answered
UNAVAILABLE ("may still be applied"); the client's own retry policy sends it again, and the
event is in the session once and in the durable log once. A fault-injecting TCP proxy sits
between the server and a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from faultproxy import FaultProxy

from online.client import RecommenderClient
from online.config import RedisConfig, load_config
from online.server import ServerThread
from towers.redis_load import load_bundle_into_redis
from towers.store_format import RedisKeys, decode_event_fields

PREFIX = "rr"


@pytest.fixture
def proxied(synth_bundle: Path, redis_proc) -> Iterator[tuple[ServerThread, FaultProxy, redis.Redis]]:  # type: ignore[no-untyped-def]
    load_bundle_into_redis(synth_bundle, redis_url=redis_proc.url, prefix=PREFIX, progress=False)
    proxy = FaultProxy(redis_proc.port)
    cfg = load_config(port=0, feature_store="redis")
    # socket_timeout_ms 50: the record deadline is 5x that, 250 ms; the held reply comes after 1 s.
    cfg = replace(cfg, redis=RedisConfig(url=proxy.url, prefix=PREFIX, socket_timeout_ms=50.0))
    srv = ServerThread(cfg, bundle_path=synth_bundle)
    r = redis.Redis(port=redis_proc.port)
    try:
        yield srv, proxy, r
    finally:
        srv.stop()
        proxy.close()
        r.close()


def _logged(r: redis.Redis, user: str) -> list[tuple[str, str, str, int]]:
    entries = r.xrange(RedisKeys(PREFIX).events())
    events = [decode_event_fields(fields) for _, fields in entries]
    return [(e.user_id, e.item_id, e.type, e.timestamp) for e in events if e.user_id == user]


def test_a_retried_record_whose_first_write_landed_counts_once(proxied) -> None:  # type: ignore[no-untyped-def]
    srv, proxy, r = proxied
    keys = RedisKeys(PREFIX)
    with RecommenderClient(srv.target, timeout=10.0) as c:
        assert c.record_events([("warm", "i1", "view", 0)]) == 1  # the record script is loaded
        before = proxy.sent.count(b"EVALSHA")
        proxy.hold_next_reply(1.0)
        # timestamp 0: the client stamps it before the first try, so the retry is the same event
        assert c.record_events([("u-retry", "i7", "click", 0), ("u-retry", "i8", "cart", 0)]) == 2
    assert proxy.held == 1
    assert proxy.sent.count(b"EVALSHA") - before >= 2, "the client did not retry: the held reply did not time out"
    session = r.zrange(keys.session("u-retry"), 0, -1)
    assert sorted(m.split(b"\t")[0] for m in session) == [b"i7", b"i8"]
    logged = _logged(r, "u-retry")
    assert sorted((i, t) for _, i, t, _ in logged) == [("i7", "click"), ("i8", "cart")]
    assert all(ts > 0 for *_, ts in logged)


def test_the_same_call_twice_is_logged_once_and_new_events_are_logged(proxied) -> None:  # type: ignore[no-untyped-def]
    srv, _, r = proxied
    events = [("u-twice", f"i{j}", "view", 1_700_000_000 + j) for j in range(5)]
    with RecommenderClient(srv.target, timeout=10.0) as c:
        assert c.record_events(events) == 5
        assert c.record_events(events) == 5
        assert c.record_events([*events[:2], ("u-twice", "i9", "purchase", 1_700_000_100)]) == 3
    assert sorted(_logged(r, "u-twice")) == sorted([*events, ("u-twice", "i9", "purchase", 1_700_000_100)])
    assert r.zcard(RedisKeys(PREFIX).session("u-twice")) == 6
