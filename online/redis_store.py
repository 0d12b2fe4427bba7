"""The Redis feature stores: one Redis (production) and Redis Cluster (where one Redis is
outgrown), each a few Lua scripts and pipelines per batch (``towers.store_format`` is the key
layout publish writes). ``open_redis_store`` picks one from the URL:
``redis+cluster://h:p[,h:p...]/`` and ``rediss+cluster://`` give the cluster store, anything
else ``redis.asyncio.Redis.from_url`` accepts the standalone one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from online.config import RedisConfig
from online.feature_store import BatchFeatures, BatchRecs, LogStatus, StoreCapabilities
from towers.errors import FeatureStoreError, FeatureStoreTimeout, Unsupported
from towers.store_format import (
    LOG_SHARDS,
    REFRESH_GROUP,
    Event,
    Impression,
    RedisKeys,
    decode_embedding,
    encode_event,
    event_scores,
    impression_fields,
    is_cluster_url,
    log_shard,
    parse_cluster_url,
)

FETCH_LUA = """
local out = {}
local stop = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('GET', KEYS[i])
  out[#out + 1] = redis.call('ZREVRANGE', KEYS[i + 1], 0, stop)
end
return out
"""


# KEYS[1]: the log stream, KEYS[2]: its overflow counter; KEYS[3..]: the call's session keys.
# ARGV[1..3]: session TTL (s), session cap, the stream's safety cap in bytes (0: none); then per
# event, in call order, 7 values: the KEYS index of its session, member, score, user, item,
# type, ts; then each event's rid. An event enters the log only when its ZADD adds it to the
# session: a retried call (the same events with the same scores; clients stamp the time before
# the first try) logs nothing twice. One call is one command: 10,000 events as a MULTI of
# 10,000 XADDs took over the 1 s record timeout in client-side packing alone on a loaded 2-core
# machine. A script is atomic: an acknowledged event is in its session and in the log, or in
# neither. The log is trimmed by its consumers (towers.store_format "Event log"); here only the
# byte cap trims, oldest first, counting what it removed (returned, and added to KEYS[2]).
# Trim KEYS[1] to 90% of ``maxbytes`` (a local of the script) when MEMORY USAGE (5 samples,
# ~10 us at any length, measured on 1M entries) says it is over; sets ``trimmed``.
_BYTE_CAP_LUA = """
local trimmed = 0
if maxbytes > 0 then
  local used = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '5')
  if used and used > maxbytes then
    local len = redis.call('XLEN', KEYS[1])
    trimmed = redis.call('XTRIM', KEYS[1], 'MAXLEN', math.floor(len * 0.9 * maxbytes / used))
  end
end
"""
RECORD_LUA = """
local ttl, cap, maxbytes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 3) / 8
for j = 0, n - 1 do
  local a = 4 + 7 * j
  local key = KEYS[tonumber(ARGV[a])]
  if redis.call('ZADD', key, ARGV[a + 2], ARGV[a + 1]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'user', ARGV[a + 3], 'item', ARGV[a + 4], 'type', ARGV[a + 5],
               'ts', ARGV[a + 6], 'rid', ARGV[4 + 7 * n + j])
  end
end
for k = 3, #KEYS do
  redis.call('ZREMRANGEBYRANK', KEYS[k], 0, -cap - 1)
  redis.call('EXPIRE', KEYS[k], ttl)
end
""" + _BYTE_CAP_LUA + """
if trimmed > 0 then
  redis.call('INCRBY', KEYS[2], trimmed)
end
return trimmed
"""
# KEYS[1]: the impression stream. ARGV[1]: its entry cap, ARGV[2]: its byte cap (0: none); then
# 6 fields per impression (rid, user, variant, version, items, teams: "" unless interleaved). A
# sample for the outcome join: what the caps trim is old, and not counted.
IMPRESSIONS_LUA = """
local maxlen, maxbytes = tonumber(ARGV[1]), tonumber(ARGV[2])
for a = 3, #ARGV, 6 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'rid', ARGV[a], 'user', ARGV[a + 1],
             'variant', ARGV[a + 2], 'version', ARGV[a + 3], 'items', ARGV[a + 4], 'teams', ARGV[a + 5])
end
""" + _BYTE_CAP_LUA + """
return trimmed
"""


def _record_call(keys: RedisKeys, stream: str, events: Sequence[Event], *, ttl: int, cap: int,
                 max_bytes: int) -> tuple[list[str], list[bytes | str | int]]:
    """RECORD_LUA's keys and arguments for ``events``, all of whose users log to ``stream``."""
    index: dict[str, int] = {}
    script_keys: list[str] = [stream, keys.overflow(stream)]
    args: list[bytes | str | int] = [ttl, cap, max_bytes]
    for e, score in zip(events, event_scores(events), strict=True):
        k = index.get(e.user_id)
        if k is None:
            script_keys.append(keys.session(e.user_id))
            k = index[e.user_id] = len(script_keys)
        args += [k, encode_event(e), repr(score), e.user_id, e.item_id, e.type, e.timestamp]
    args += [e.request_id for e in events]
    return script_keys, args


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _id_ms(raw: object) -> int:
    """A stream entry id's time (unix ms)."""
    return int(_text(raw).partition("-")[0])


def _consume(task: asyncio.Future[object]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class RedisFeatureStore:
    """``redis.asyncio`` with a connection pool; every batch is one pipeline (one round trip)."""

    capabilities = StoreCapabilities(shared=True, holds_versions=False)

    def __init__(self, config: RedisConfig) -> None:
        import redis.asyncio as aioredis

        self._setup(config, RedisKeys(config.prefix))
        self._events_max_bytes = config.events_max_bytes  # the event log's safety cap (bytes; 0: none)
        timeout = config.socket_timeout_ms / 1000.0
        self._redis = aioredis.Redis.from_url(
            config.url, max_connections=config.max_connections, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry_on_timeout=False,
        )
        self._fetch_script = self._redis.register_script(FETCH_LUA)  # EVALSHA, loaded again after a restart
        self._record_script = self._redis.register_script(RECORD_LUA)
        self._impressions_script = self._redis.register_script(IMPRESSIONS_LUA)

    def _setup(self, config: RedisConfig, keys: RedisKeys) -> None:
        self.keys = keys
        self._ttl = config.session_ttl_s
        self._cap = config.session_cap
        self._stream_maxlen = config.stream_maxlen  # the impression stream's cap (entries)
        self._impressions_max_bytes = config.impressions_max_bytes  # the impression log's (bytes; 0: none)

    async def _run(self, what: str, coro_fn: object, timeout: float) -> list[object]:
        import redis

        # Not asyncio.wait_for: it waits for the cancelled call to finish, and redis-py's
        # cancellation cleanup on a stalled server takes up to the socket timeout (measured:
        # 200-250 ms "fetches" under a 30 ms budget). Here the caller moves on at the deadline;
        # the cancelled call winds down in the background.
        task = asyncio.ensure_future(coro_fn())  # type: ignore[operator]
        try:
            done, _ = await asyncio.wait({task}, timeout=max(timeout, 0.0005))
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            # Unknown, not "not applied": a write may still land. Recording is idempotent, so
            # the caller may retry (the client's retry policy does).
            unknown = "; it may still be applied (retrying is safe)" if what == "record" else ""
            raise FeatureStoreTimeout(f"redis {what} timed out after {timeout * 1000:.1f} ms{unknown}")
        try:
            return list(task.result())
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
            raise FeatureStoreError(f"redis {what} failed: {type(e).__name__}: {e}") from e
        except RuntimeError as e:
            # redis-py's asyncio cluster runs a transaction pipeline's commands on a loop of its
            # own in a thread; when the cluster must re-initialise (a node was down) that trips
            # over a lock bound to our loop. A failed call, not an internal error.
            raise FeatureStoreError(f"redis {what} failed: {type(e).__name__}: {e}") from e

    async def fetch(self, version: str, user_ids: Sequence[str], *, dim: int, n_recent: int,
                    timeout: float) -> BatchFeatures:
        keys = [k for u in user_ids for k in (self.keys.user_embedding(version, u), self.keys.session(u))]

        async def go() -> list[object]:
            # One server-side script for the whole batch: redis-py packs and parses a pipeline
            # command by command in Python (~40 us a user for GET + ZREVRANGE); one EVALSHA with
            # the batch's keys cost ~6x less CPU here (32 users: 1.2-1.4 ms -> 0.19 ms).
            return list(await self._fetch_script(keys=keys, args=[max(n_recent - 1, 0)]))

        return _features(await self._run("fetch", go, timeout), dim)

    async def batch_recs(self, version: str, user_ids: Sequence[str], *, timeout: float) -> BatchRecs:
        async def go() -> list[object]:
            return list(await self._redis.mget([self.keys.recs(version, u) for u in user_ids]))

        return BatchRecs.from_raw(await self._run("batch recs", go, timeout))  # type: ignore[arg-type]

    async def record(self, events: Sequence[Event], *, timeout: float) -> int:
        keys, args = _record_call(self.keys, self.keys.events(), events, ttl=self._ttl, cap=self._cap,
                                  max_bytes=self._events_max_bytes)

        async def go() -> list[object]:
            return [await self._record_script(keys=keys, args=args)]

        return int((await self._run("record", go, timeout))[0])  # type: ignore[call-overload]

    async def log_impressions(self, impressions: Sequence[Impression], *, timeout: float,
                              log: str = "impressions") -> None:
        key = self.keys.exposures() if log == "exposures" else self.keys.impressions()
        args: list[bytes | str | int] = [self._stream_maxlen, self._impressions_max_bytes]
        for imp in impressions:
            f = impression_fields(imp)
            args += [f["rid"], f["user"], f["variant"], f["version"], f["items"], f.get("teams", "")]

        async def go() -> list[object]:
            return [await self._impressions_script(keys=[key], args=args)]

        await self._run("impressions", go, timeout)

    async def log_status(self, *, timeout: float) -> LogStatus:
        """One pipeline (per node on a cluster) over every log stream, plus a second for the
        oldest undelivered entry of streams with nothing pending."""
        streams = self.keys.event_streams()

        async def go() -> list[object]:
            pipe = self._redis.pipeline(transaction=False)
            for st in streams:
                pipe.xlen(st)
                pipe.memory_usage(st, samples=5)
                pipe.xinfo_groups(st)
                pipe.xpending(st, REFRESH_GROUP)
            pipe.xlen(self.keys.dead_letters())
            pipe.hgetall(self.keys.refresh_status())
            return list(await pipe.execute(raise_on_error=False))

        res = await self._run("log status", go, timeout)
        entries = nbytes = pending = 0
        lag = -1
        oldest: list[float] = []
        undelivered: list[tuple[str, str]] = []  # (stream, last delivered id) with lag and nothing pending
        for j, st in enumerate(streams):
            n, used, groups, pend = res[4 * j: 4 * j + 4]
            entries += int(n) if isinstance(n, int) else 0
            nbytes += int(used) if isinstance(used, int) else 0
            g = next((g for g in groups if _text(g["name"]) == REFRESH_GROUP), None) \
                if isinstance(groups, list) else None
            if g is None:
                continue
            g_lag = int(g.get("lag") or 0)
            lag = max(lag, 0) + g_lag
            if isinstance(pend, dict) and int(pend["pending"]):
                pending += int(pend["pending"])
                oldest.append(_id_ms(pend["min"]) / 1000.0)
            elif g_lag:
                undelivered.append((st, _text(g["last-delivered-id"])))
        if undelivered:
            async def first() -> list[object]:
                pipe = self._redis.pipeline(transaction=False)
                for st, after in undelivered:
                    pipe.xrange(st, min="(" + after, count=1)
                return list(await pipe.execute(raise_on_error=False))

            for got in await self._run("log status", first, timeout):
                if isinstance(got, list) and got:
                    oldest.append(_id_ms(got[0][0]) / 1000.0)
        dead, status = res[-2], res[-1]
        return LogStatus(entries=entries, bytes=nbytes, lag=lag, pending=pending,
                         oldest_unacked_s=min(oldest) if oldest else None,
                         dead_letters=int(dead) if isinstance(dead, int) else 0,
                         refresh={_text(k): _text(v) for k, v in status.items()} if isinstance(status, dict) else {})

    async def has_version(self, version: str) -> bool:
        async def go() -> list[object]:
            return [await self._redis.exists(self.keys.ready(version))]

        return bool((await self._run("has_version", go, 1.0))[0])

    def add_version(self, version: str, *, user_ids: Sequence[str], user_emb: np.ndarray,
                    recs_items: np.ndarray | None = None, recs_scores: np.ndarray | None = None) -> None:
        raise Unsupported("a Redis feature store gets its versions from publish --redis, not from the server")

    def drop_versions(self, *, keep: set[str]) -> list[str]:
        return []  # a version's keys outlive this process; old ones are removed offline

    async def close(self) -> None:
        await self._redis.aclose()


class RedisClusterFeatureStore(RedisFeatureStore):
    """A Redis Cluster (``redis+cluster://h:p[,h:p...]/``, ``rediss+cluster://`` for TLS) via
    ``redis.asyncio.cluster.RedisCluster``, with the cluster key layout (``RedisKeys(cluster=True)``:
    the user's log shard is each per-user key's hash tag, so a user's keys and the stream
    their events go to share one slot).

    - fetch: one cluster pipeline per batch; redis-py groups its commands by node and sends
      each node's group as one pipeline, the nodes concurrently — not one call per key;
    - batch recs: ``mget_nonatomic`` (one MGET per slot, pipelined per node);
    - record: one MULTI per log shard (its users' session writes and the XADDs of their
      events to the shard's stream), the shards concurrently, at most ``max_connections``
      at a time. A call is not atomic across shards (a cluster cannot be), but each
      shard's part is, and a retried call is idempotent.

    A stalled or failed node fails the whole batch's fetch at its deadline, so the batch
    degrades (RUNG_NO_SESSION) exactly as with a stalled standalone Redis.
    """

    def __init__(self, config: RedisConfig) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        c = parse_cluster_url(config.url)
        self._setup(config, RedisKeys(config.prefix, cluster=True))
        events_max_bytes, max_connections = config.events_max_bytes, config.max_connections
        socket_timeout_s = config.socket_timeout_ms / 1000.0
        # The event log is LOG_SHARDS streams: each gets its share of the byte cap, so the log
        # as a whole is bounded like standalone Redis's one stream.
        self._shard_max_bytes = max(1 << 16, events_max_bytes // LOG_SHARDS) if events_max_bytes else 0
        self._max_connections = max_connections
        # Connects lazily (first command discovers the slots from the seed nodes).
        self._redis = RedisCluster(  # type: ignore[assignment]
            startup_nodes=[ClusterNode(h, p) for h, p in c.nodes], ssl=c.ssl, username=c.username,
            password=c.password, max_connections=max_connections, socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
        )
        self._record_script = self._redis.register_script(RECORD_LUA)
        self._impressions_script = self._redis.register_script(IMPRESSIONS_LUA)

    async def fetch(self, version: str, user_ids: Sequence[str], *, dim: int, n_recent: int,
                    timeout: float) -> BatchFeatures:
        # A script needs all its keys in one slot: on a cluster, one pipeline per node instead.
        async def go() -> list[object]:
            pipe = self._redis.pipeline(transaction=False)
            for u in user_ids:
                pipe.get(self.keys.user_embedding(version, u))
                pipe.zrevrange(self.keys.session(u), 0, max(n_recent - 1, 0))
            return list(await pipe.execute())

        return _features(await self._run("fetch", go, timeout), dim)

    async def batch_recs(self, version: str, user_ids: Sequence[str], *, timeout: float) -> BatchRecs:
        async def go() -> list[object]:
            return list(await self._redis.mget_nonatomic([self.keys.recs(version, u) for u in user_ids]))  # type: ignore[attr-defined]

        return BatchRecs.from_raw(await self._run("batch recs", go, timeout))  # type: ignore[arg-type]

    async def record(self, events: Sequence[Event], *, timeout: float) -> int:
        # One script call per log shard: its users' sessions and the shard's stream share one
        # slot (towers.store_format), so an acknowledged event is in its session and in the log,
        # or in neither. Shards go concurrently, at most ``max_connections`` at a time; a call is
        # not atomic across shards (a cluster cannot be), but each shard's part is, and a
        # retried call stores and logs each event once.
        by_shard: dict[int, list[Event]] = {}
        for e in events:
            by_shard.setdefault(log_shard(e.user_id), []).append(e)
        gate = asyncio.Semaphore(self._max_connections)

        async def one(shard: int, part: list[Event]) -> object:
            keys, args = _record_call(self.keys, self.keys.events(shard), part, ttl=self._ttl, cap=self._cap,
                                      max_bytes=self._shard_max_bytes)
            async with gate:
                return await self._record_script(keys=keys, args=args)

        async def go() -> list[object]:
            tasks = [asyncio.ensure_future(one(s, part)) for s, part in by_shard.items()]
            try:
                return list(await asyncio.gather(*tasks))
            finally:  # the first failure (or our cancellation at the deadline) stops the rest
                for t in tasks:
                    t.cancel()

        return sum(int(n) for n in await self._run("record", go, timeout))  # type: ignore[call-overload]


def open_redis_store(config: RedisConfig) -> RedisFeatureStore:
    """The Redis store ``config.url`` asks for: a cluster for ``redis+cluster://`` and
    ``rediss+cluster://``, else standalone (``redis://``, ``rediss://``, ``unix://``)."""
    cls = RedisClusterFeatureStore if is_cluster_url(config.url) else RedisFeatureStore
    return cls(config)


def _features(res: list[object], dim: int) -> BatchFeatures:
    """A fetch's replies (embedding, session members) per user, as one columnar batch."""
    return BatchFeatures.from_rows([decode_embedding(r, dim) for r in res[0::2]],  # type: ignore[arg-type]
                                   res[1::2], dim=dim)  # type: ignore[arg-type]
