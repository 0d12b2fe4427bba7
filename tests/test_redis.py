"""The Redis feature store path against a real, throwaway redis-server that the
tests stop and restart: publish --redis, sessions, degradation and recovery."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from online.client import RecommenderClient
from online.config import RedisConfig, load_config
from online.proto import recommender_pb2 as pb
from online.server import ServerThread
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.errors import TwoTowerError
from towers.redis_load import load_bundle_into_redis
from towers.store_format import RedisKeys


@pytest.fixture
def loaded(served_registry: Path, redis_proc) -> tuple[Path, object]:  # type: ignore[no-untyped-def]
    path = registry_mod.current_path(served_registry)
    load_bundle_into_redis(path, redis_url=redis_proc.url, prefix="tt-test", progress=False)
    return path, redis_proc


def _cfg(url: str):  # type: ignore[no-untyped-def]
    cfg = load_config(port=0, feature_store="redis", metrics_port=0)  # metrics collected (no exporter in-process)
    return replace(cfg, redis=RedisConfig(url=url, prefix="tt-test", socket_timeout_ms=50.0))


@pytest.fixture
def redis_server(loaded) -> Iterator[tuple[ServerThread, object]]:  # type: ignore[no-untyped-def]
    path, proc = loaded
    srv = ServerThread(_cfg(proc.url), bundle_path=path)
    yield srv, proc
    srv.stop()


def test_publish_loads_version_scoped_keys(loaded) -> None:  # type: ignore[no-untyped-def]
    path, proc = loaded
    b = bundle_mod.load(path)
    r = redis.Redis(port=proc.port)
    keys = RedisKeys("tt-test")
    assert int(r.get(keys.ready(b.version))) == len(b.features.user_vocab)
    raw = r.get(keys.user_embedding(b.version, "1"))
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), b.user_emb[b.features.user_vocab.known("1")])
    assert r.get(keys.recs(b.version, "1")) is not None
    assert r.get(keys.user_embedding("some-other-version", "1")) is None


def test_a_version_missing_from_redis_is_not_served(served_registry: Path, redis_proc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TwoTowerError, match="not loaded in the feature store"):
        ServerThread(_cfg(redis_proc.url), registry=served_registry)


def test_events_are_in_redis_and_shape_the_next_answer(redis_server) -> None:  # type: ignore[no-untyped-def]
    srv, proc = redis_server
    with RecommenderClient(srv.target, timeout=5.0) as c:
        assert c.recommend("3").source == "user_only"
        assert c.record_events([("3", "50", "click", 10), ("3", "181", "cart", 11)]) == 2
        # A retried call (same events) stores nothing twice.
        assert c.record_events([("3", "181", "cart", 11)]) == 1
        # Events sharing a timestamp keep their order within the call (the later one is newer).
        assert c.record_events([("4", "50", "click", 20), ("4", "181", "click", 20)]) == 2
        stored4 = redis.Redis(port=proc.port).zrevrange(RedisKeys("tt-test").session("4"), 0, -1)
        assert [s.split(b"\t")[0] for s in stored4] == [b"181", b"50"]
        stored = redis.Redis(port=proc.port).zrevrange(RedisKeys("tt-test").session("3"), 0, -1)
        assert [s.split(b"\t")[0] for s in stored] == [b"181", b"50"]
        r = c.recommend("3")
        assert r.source == "online" and r.rung == pb.RUNG_FULL and not {"50", "181"} & set(r.item_ids)


def _user_only(srv: ServerThread, user: str, *, exclude: list[str]) -> list[str]:
    from towers.ranking import QueryBatch, rank

    model = srv.running.service.model
    assert model is not None
    b = model.bundle
    qb = QueryBatch.from_lists(model.ranker, user_rows=[b.features.user_vocab.known(user)], sessions=[[]],
                               excludes=[[b.features.item_vocab.known(i) for i in exclude]], k=10)
    return [b.item_ids[r] for r in rank(model.ranker, qb).items(0)[0].tolist()]


def test_redis_hung_then_back_degrades_then_recovers(redis_server) -> None:  # type: ignore[no-untyped-def]
    srv, proc = redis_server
    with RecommenderClient(srv.target, timeout=5.0) as c:
        c.record_events([("9", "50", "click", 1)])
        assert c.recommend("9").rung == pb.RUNG_FULL
        proc.signal(signal.SIGSTOP)  # Redis stops answering: every fetch times out
        try:
            for _ in range(5):
                r = c.recommend("9", recent=["172"])
                assert r.rung == pb.RUNG_NO_SESSION and len(r.item_ids) == 10
                assert any("feature store" in x and "timed out" in x for x in r.reasons)
                assert r.model_version == srv.running.service.model.version
            # The label says what was used: the user embedding alone. The request's session
            # fed no query (it is only excluded), so the list is the user-only ranking.
            assert r.source == "user_only" and list(r.item_ids) == _user_only(srv, "9", exclude=["172"])
            cold = c.recommend("visitor-without-embedding", recent=["172"])
            assert cold.rung == pb.RUNG_POPULARITY and cold.source == "popularity" and "172" not in cold.item_ids
            b = c.recommend("9", mode="batch")
            assert b.rung == pb.RUNG_BATCH and len(b.item_ids) == 10  # from the bundle's copy of the recs
        finally:
            proc.signal(signal.SIGCONT)
        recovered = [c.recommend("9").rung for _ in range(20)]
        assert recovered[-1] == pb.RUNG_FULL  # no restart needed
    metrics = srv.running.service.metrics

    async def flushed() -> None:  # the local histogram counts, into the exported values (on the loop)
        metrics.flush()

    srv.call(flushed())
    get = metrics.registry.get_sample_value  # what /metrics serves
    version = srv.running.service.model.version
    labels = {"variant": "control", "version": version}
    assert get("twotower_request_latency_seconds_count", {"rung": "no_session", **labels}) >= 5
    assert get("twotower_degraded_responses_total", {"rung": "no_session", "reason": "feature store"}) >= 5
    assert get("twotower_feature_store_errors_total", {"op": "fetch", "kind": "timeout"}) >= 5
    assert get("twotower_stage_latency_seconds_count", {"stage": "total", "variant": "control"}) == metrics.served


def test_redis_killed_then_restarted_recovers(redis_server) -> None:  # type: ignore[no-untyped-def]
    srv, proc = redis_server
    with RecommenderClient(srv.target, timeout=5.0) as c:
        c.record_events([("11", "50", "click", 1)])
        proc.shutdown_saving()  # the data survives in dump.rdb, the process is gone
        r = c.recommend("11")
        assert r.rung == pb.RUNG_NO_SESSION and len(r.item_ids) == 10
        assert any("feature store" in x for x in r.reasons)
        proc.start()
        rungs = [c.recommend("11").rung for _ in range(20)]
        assert rungs[-1] == pb.RUNG_FULL
        assert c.recommend("11").source == "online"  # the session came back with Redis


def test_a_timed_out_call_does_not_wait_for_the_client_library_to_clean_up() -> None:
    """redis-py may take up to its socket timeout to wind down a cancelled call on a stalled
    server; the store must answer at its own deadline, not after that cleanup."""
    import asyncio

    from online.redis_store import RedisFeatureStore
    from towers.errors import FeatureStoreError

    async def main() -> None:
        store = RedisFeatureStore(RedisConfig(url="redis://127.0.0.1:1/0"))  # never connected: the call is a stand-in
        cleanup = asyncio.Event()  # never set while the store is expected to have answered
        cancelled = asyncio.Event()

        async def stubborn() -> list[object]:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                await cleanup.wait()  # a slow cleanup that swallows the deadline
                raise
            return []

        with pytest.raises(FeatureStoreError, match="timed out"):
            # wait_for here is only a fail-safe: without the fix this would hang until cleanup.set().
            await asyncio.wait_for(store._run("fetch", stubborn, 0.01), timeout=30)
        await asyncio.wait_for(cancelled.wait(), timeout=30)
        assert not cleanup.is_set()  # the store answered while the cancelled call was still winding down
        cleanup.set()
        await store.close()

    asyncio.run(main())
