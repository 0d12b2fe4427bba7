"""Serving through a Redis outage (issue 20 item 4), with a fault-injecting TCP proxy in front
of a real redis-server: a worker starts while Redis is blacked out and serves degraded (its
bundle's embeddings, labelled), becomes full once Redis answers, and a version published
during a 2 s blackout is refused for the store's silence, retried with backoff, and
installed; callers see 0 failed RPCs throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from waiting import wait_until

from offline.publish import publish
from online.client import RecommenderClient
from online.config import RedisConfig, load_config
from online.proto import recommender_pb2 as pb
from online.server import ServerThread
from towers import registry as registry_mod

PREFIX = "out"


class Callers:
    """A closed loop of Recommend calls in a thread: every answer's (rung, version), every failure."""

    def __init__(self, target: str, users: list[str]) -> None:
        self.answers: list[tuple[int, str, tuple[str, ...]]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target, users), daemon=True)
        self._thread.start()

    def _run(self, target: str, users: list[str]) -> None:
        import grpc

        with RecommenderClient(target, timeout=5.0) as c:
            j = 0
            while not self._stop.is_set():
                try:
                    r = c.recommend(users[j % len(users)], k=5)
                    self.answers.append((r.rung, r.model_version, tuple(r.reasons)))
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code().name}: {e.details()}")
                j += 1
                time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def outage(tmp_path: Path, synth_bundle_factory, redis_proc) -> Iterator[tuple[Path, FaultProxy, object]]:  # type: ignore[no-untyped-def]
    reg = tmp_path / "registry"
    publish(Path(synth_bundle_factory(seed=21, n_items=800, n_users=100)), registry=reg, redis_url=redis_proc.url,
            redis_prefix=PREFIX)
    proxy = FaultProxy(redis_proc.port)
    yield reg, proxy, redis_proc
    proxy.close()


def test_a_worker_starts_in_a_blackout_serves_degraded_recovers_and_swaps_through_another(
        outage, synth_bundle_factory) -> None:  # type: ignore[no-untyped-def]
    reg, proxy, redis_proc = outage
    v0 = registry_mod.current_version(reg)
    cfg = replace(load_config(port=0, feature_store="redis"), registry_poll_s=0.1,
                  redis=RedisConfig(url=proxy.url, prefix=PREFIX, socket_timeout_ms=50.0))
    proxy.blackhole(True)
    srv = ServerThread(cfg, registry=reg)  # used to exit: "redis has_version failed"
    callers = Callers(srv.target, ["u1", "u2", "u3"])
    try:
        wait_until(lambda: len(callers.answers) >= 20, what="answers during the blackout")
        rung, version, reasons = callers.answers[-1]
        assert version == v0 and rung == pb.RUNG_NO_SESSION  # the bundle's own embedding of v0
        assert any("feature store" in r for r in reasons), reasons
        proxy.blackhole(False)
        wait_until(lambda: callers.answers[-1][0] == pb.RUNG_FULL, timeout=20, what="full answers after the blackout")
        wait_until(lambda: not srv.running.service.lifecycle.unverified, what="v0 verified in the store")

        # A new version published (straight to Redis) while the proxy is dark for 2 s.
        proxy.blackhole(True)
        v1 = publish(Path(synth_bundle_factory(seed=22, n_items=800, n_users=100)), registry=reg,
                     redis_url=redis_proc.url, redis_prefix=PREFIX)
        wait_until(lambda: srv.running.watcher.state.rejected >= 1, timeout=20, what="the refusal in the blackout")
        assert srv.running.watcher.state.version == v0  # the old version serves on
        # Still dark at the next poll: refused again, not given up on.
        wait_until(lambda: srv.running.watcher.state.rejected >= 2, timeout=20, what="a second refusal in the blackout")
        assert srv.running.watcher.state.version == v0
        proxy.blackhole(False)
        wait_until(lambda: srv.running.watcher.state.version == v1, timeout=30, what="the retried swap")
        wait_until(lambda: callers.answers[-1][1] == v1 and callers.answers[-1][0] == pb.RUNG_FULL, timeout=20,
                   what="full answers from the new version")
    finally:
        callers.stop()
        srv.stop()
    assert callers.failures == []
    assert {v for _, v, _ in callers.answers} == {v0, v1}
