"""The feature store on a Redis Cluster (issue 10 item 9), against a real 3-node cluster
the test starts itself: publish/load, serve, Recommend and RecordEvents round trips, the
per-user hash-tag layout, and a node stopped (SIGSTOP) under load: the service degrades
to RUNG_NO_SESSION with no failed RPC, and recovers after SIGCONT."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from waiting import wait_until

from bench.procs import free_port
from online.client import RecommenderClient
from online.config import RedisConfig, load_config
from online.proto import recommender_pb2 as pb
from online.redis_store import RedisClusterFeatureStore, RedisFeatureStore, open_redis_store
from online.server import ServerThread
from towers import bundle as bundle_mod
from towers.errors import FeatureStoreError
from towers.redis_load import load_bundle_into_redis
from towers.store_format import LOG_SHARDS, RedisKeys, is_cluster_url, log_shard, parse_cluster_url

PREFIX = "ttc"


class RedisClusterProcs:
    """Three cluster-enabled redis-servers (no replicas) on free loopback ports, joined with
    ``redis-cli --cluster create``. The bus port is chosen too (``--cluster-port``): the default,
    port + 10000, can be out of range or taken for an ephemeral port."""

    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._taken: set[int] = set()  # every port handed out here: two nodes never get the same one
        try:
            for _ in range(n):
                self._start_node(workdir)
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()  # no fixture teardown runs for a failed setup: leave no servers behind
            raise

    def _port(self) -> int:
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    def _start_node(self, workdir: Path) -> None:
        """One node on fresh ports; a node that exits before it answers (a port another process
        took between our check and its bind) is started again on other ports."""
        for _ in range(5):
            port = self._port()
            d = workdir / str(port)
            d.mkdir()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--cluster-port", str(self._port()), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                 # Healthy nodes keep serving their slots while one is stopped (the test's point);
                 # a short node timeout exercises the FAIL flag and its clearing on SIGCONT.
                 "--cluster-require-full-coverage", "no", "--cluster-node-timeout", "2000",
                 "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda p=port, proc=proc: self._ping(p) or proc.poll() is not None,  # type: ignore[misc]
                       what=f"redis-server on {port}")
            if proc.poll() is None:
                self.ports.append(port)
                self.procs.append(proc)
                return
        raise AssertionError("redis-server did not start on 5 pairs of free ports")

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def _state_ok(self, port: int) -> bool:
        try:
            info = redis.Redis(port=port, socket_timeout=1, decode_responses=True).cluster("INFO")
        except redis.RedisError:
            return False
        return bool(info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(self.ports)
                    and int(info.get("cluster_slots_ok", 0)) == 16384)

    def wait_ok(self) -> None:
        """Every node sees every node and all 16384 slots served."""
        for port in self.ports:
            wait_until(lambda p=port: self._state_ok(p), what=f"cluster_state:ok on {port}", timeout=30)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/"

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGKILL's cleanup
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcs]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server/redis-cli are not installed (make setup installs them)")
    c = RedisClusterProcs(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def bundle(synth_bundle_factory) -> Path:  # type: ignore[no-untyped-def]
    return Path(synth_bundle_factory(seed=3, n_items=1000, n_users=300))


def _client(cluster: RedisClusterProcs) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=cluster.ports[0], socket_timeout=2)


def test_cluster_urls() -> None:
    c = parse_cluster_url("rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert c.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert c.ssl and c.username == "app" and c.password == "p@ss"
    assert not parse_cluster_url("redis+cluster://h:1").ssl
    assert is_cluster_url("REDIS+CLUSTER://h:1/") and not is_cluster_url("redis://h:1/0")
    for bad in ("redis://h:1/0", "redis+cluster://h:1/3", "redis+cluster://h:x/", "redis+cluster://:1/",
                "redis+cluster://h:1/?ssl=true"):
        with pytest.raises(FeatureStoreError):
            parse_cluster_url(bad)
    assert isinstance(open_redis_store(RedisConfig(url="redis+cluster://127.0.0.1:1/")), RedisClusterFeatureStore)
    store = open_redis_store(RedisConfig(url="redis://127.0.0.1:1/0"))
    assert type(store) is RedisFeatureStore


def test_a_users_keys_share_one_slot_and_standalone_names_are_unchanged() -> None:
    plain, tagged = RedisKeys("tt"), RedisKeys("tt", cluster=True)
    assert plain.session("42") == "tt:zsess:42" and plain.user_embedding("v1", "42") == "tt:v:v1:ue:42"
    assert plain.event_streams() == [plain.events_of("42")] == ["tt:events"]
    assert tagged.session("42") == f"tt:zsess:{{log{log_shard('42')}}}42"
    for user in ["42", "u{1}", "a}b", "é😀", "x" * 256, "\x00"]:
        # a user's keys and the log stream their events go to: one slot (one MULTI)
        slots = {key_slot(k.encode("utf-8", "surrogatepass")) for k in (
            tagged.session(user), tagged.user_embedding("v1", user), tagged.recs("v2", user), tagged.events_of(user))}
        assert len(slots) == 1, user
    assert len({key_slot(tagged.session(f"user{j}").encode()) for j in range(50)}) > 35  # users spread out
    assert len({key_slot(k.encode()) for k in tagged.event_streams()}) == LOG_SHARDS  # one slot per shard
    with pytest.raises(FeatureStoreError, match="braces"):
        RedisKeys("t{x}", cluster=True)


@pytest.fixture
def served(cluster: RedisClusterProcs, bundle: Path) -> Iterator[tuple[ServerThread, RedisClusterProcs]]:
    load_bundle_into_redis(bundle, redis_url=cluster.url, prefix=PREFIX, progress=False)
    cfg = load_config(port=0)
    store = open_redis_store(RedisConfig(url=cluster.url, prefix=PREFIX, socket_timeout_ms=100))
    srv = ServerThread(cfg, bundle_path=bundle, store=store)
    yield srv, cluster
    srv.stop()


def test_publish_loads_the_cluster_with_one_slot_per_user(cluster: RedisClusterProcs, bundle: Path) -> None:
    n = load_bundle_into_redis(bundle, redis_url=cluster.url, prefix=PREFIX, progress=False)
    b = bundle_mod.load(bundle)
    keys = RedisKeys(PREFIX, cluster=True)
    rc = _client(cluster)
    assert n == len(b.features.user_vocab) and int(rc.get(keys.ready(b.version))) == n
    # The keys are spread over every node, each user's keys on one.
    sizes = [redis.Redis(port=p).dbsize() for p in cluster.ports]
    assert all(s > 0 for s in sizes) and sum(sizes) == 2 * n + 1, sizes
    for user in b.features.user_vocab.values[:20]:
        assert rc.get(keys.user_embedding(b.version, user)) is not None
        assert rc.get(keys.recs(b.version, user)) is not None
        assert rc.keyslot(keys.user_embedding(b.version, user)) == rc.keyslot(keys.session(user))


def test_recommend_and_record_events_round_trip_on_a_cluster(served) -> None:  # type: ignore[no-untyped-def]
    srv, cluster = served
    rc = _client(cluster)
    keys = RedisKeys(PREFIX, cluster=True)
    users = [f"u{j}" for j in range(0, 300, 5)]  # 60 users, spread over the three nodes
    assert len({rc.get_node_from_key(keys.session(u)).port for u in users}) == 3
    now = int(time.time())
    with RecommenderClient(srv.target, timeout=10.0) as c:
        r = c.recommend("u1", k=5)
        assert (r.rung, r.source, len(r.item_ids)) == (pb.RUNG_FULL, "user_only", 5)
        batch = c.recommend("u1", k=5, mode="batch")
        assert batch.source == "batch" and len(batch.item_ids) == 5
        events = [(u, f"i{(7 * j + e) % 1000}", "click", now - 100 + e) for j, u in enumerate(users) for e in range(3)]
        assert c.record_events(events) == len(events)
        assert c.record_events(events[:3]) == 3  # a retry stores nothing twice
        for j, u in enumerate(users):
            stored = rc.zrevrange(keys.session(u), 0, -1)
            assert [s.split(b"\t")[0].decode() for s in stored] == [f"i{(7 * j + e) % 1000}" for e in (2, 1, 0)]
            assert rc.ttl(keys.session(u)) > 0
        r = c.recommend(users[4], k=10)
        assert (r.rung, r.source) == (pb.RUNG_FULL, "online")
        assert not {f"i{(7 * 4 + e) % 1000}" for e in range(3)} & set(r.item_ids)  # seen items are excluded


def test_the_event_log_on_a_cluster_is_written_with_the_sessions_and_read_whole(served) -> None:  # type: ignore[no-untyped-def]
    from offline.event_log import EventLog
    from offline.refresh.run_lock import RefreshLock

    srv, cluster = served
    rc = _client(cluster)
    keys = RedisKeys(PREFIX, cluster=True)
    users = [f"u{j}" for j in range(0, 300, 3)]
    now = int(time.time())
    events = [(u, f"i{(5 * j + e) % 1000}", "view", now - 50 + e) for j, u in enumerate(users) for e in range(2)]
    with RecommenderClient(srv.target, timeout=10.0) as c:
        assert c.record_events(events) == len(events)
        assert c.record_events(events[:4]) == 4  # a retry: stored and logged once
    # Each event sits in its user's shard stream, the slot of its session.
    shards = {log_shard(u) for u in users}
    assert len({rc.get_node_from_key(keys.events(s)).port for s in shards}) == 3  # spread over the nodes
    assert sum(rc.xlen(keys.events(s)) for s in shards) == len(events)
    log = EventLog(redis_url=cluster.url, prefix=PREFIX)
    try:
        log.ensure_group("refresh")
        batch = log.read(group="refresh", consumer="c1", count=100_000)
        assert {(e.user_id, e.item_id, e.type, e.timestamp) for e in batch.events} == set(events)
        assert len(batch.events) == len(batch.ids) == len(events)
        assert log.pending_count(group="refresh") == len(events)
        assert log.read(group="refresh", consumer="c1").ids == []  # nothing new
        again = log.read(group="refresh", consumer="c1", pending=True, count=100_000)  # after a crash
        assert sorted(again.ids) == sorted(batch.ids)
        assert log.ack(group="refresh", ids=batch.ids) == len(events)
        assert log.pending_count(group="refresh") == 0
    finally:
        log.close()
    # The refresh lock works on a cluster too (one key, routed to its slot).
    lock = RefreshLock(redis_url=cluster.url, key=f"{PREFIX}:refresh:lock")
    lock.acquire()
    lock.check()
    assert lock.holder() == lock.owner and lock.release()
    lock.close()


def test_a_stopped_node_degrades_without_failed_rpcs_and_recovers(served) -> None:  # type: ignore[no-untyped-def]
    srv, cluster = served
    rc = _client(cluster)
    keys = RedisKeys(PREFIX, cluster=True)
    stopped = 1
    port = cluster.ports[stopped]
    on_stopped = [u for u in (f"u{j}" for j in range(300)) if rc.get_node_from_key(keys.session(u)).port == port]
    elsewhere = [u for u in (f"u{j}" for j in range(300)) if rc.get_node_from_key(keys.session(u)).port != port]
    assert on_stopped and elsewhere
    results: list[pb.RecommendResponse] = []
    failures: list[str] = []
    done = threading.Event()

    def load(users: list[str]) -> None:
        # Steady Recommend traffic for users on every node while the node is stopped and resumed.
        with RecommenderClient(srv.target, timeout=10.0) as c:
            j = 0
            while not done.is_set():
                try:
                    results.append(c.recommend(users[j % len(users)], k=10))
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                j += 1

    threads = [threading.Thread(target=load, args=(us,)) for us in (on_stopped, elsewhere)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, what="traffic before the stop")
        cluster.signal(stopped, signal.SIGSTOP)
        mark = len(results)

        def degraded() -> bool:
            return any(r.rung == pb.RUNG_NO_SESSION and any(x.startswith("feature store:") for x in r.reasons)
                       for r in results[mark:])

        wait_until(degraded, what="a RUNG_NO_SESSION answer naming the feature store", timeout=30)
        with RecommenderClient(srv.target, timeout=10.0) as c:
            # Events for a user on a healthy node are still accepted: one MULTI per user, on its own node.
            assert c.record_events([(elsewhere[0], "i5", "view", int(time.time()))]) == 1
            # A user on the stopped node: not accepted, and said so (UNAVAILABLE is retryable).
            with pytest.raises(grpc.RpcError) as e:
                c.record_events([(on_stopped[0], "i5", "view", int(time.time()))])
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "redis record" in (e.value.details() or "")
        cluster.signal(stopped, signal.SIGCONT)
        cluster.wait_ok()
        with RecommenderClient(srv.target, timeout=10.0) as c:
            full = wait_until(lambda: (r := c.recommend(on_stopped[0], k=10)).rung == pb.RUNG_FULL and r,
                        what="RUNG_FULL after SIGCONT", timeout=30)
            assert full.source in ("online", "user_only")
        recovered_mark = len(results)
        wait_until(lambda: sum(r.rung == pb.RUNG_FULL for r in results[recovered_mark:]) >= 20,
             what="full answers on every node after the recovery", timeout=30)
    finally:
        cluster.signal(stopped, signal.SIGCONT)
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert {r.model_version for r in results} == {srv.running.service.model.version}
