"""Reading the durable logs the server writes (``towers.store_format``: the event stream,
the sampled impression stream, the dead letters).

The event log is consumed through a consumer group, so a job reads each entry once and
acknowledges it (``XACK``) only when it is done with it: a job that crashes before acking
reads the same entries again. The log is at least once (a timed-out RecordEvents call may
still land, and its retry lands again), so readers drop repeats by event identity (user,
item, type, timestamp). An entry that does not parse goes to the dead-letter stream with the
reason and is acknowledged: one bad entry never stops a consumer.

Consumers trim the log (``trim_acknowledged``, after their ack): only below what every
group still needs. Only the server's byte cap can drop unread entries; a reader finds out
exactly how many (``lost_undelivered`` before reading, ``ReadBatch.lost`` for delivered
entries that came back empty) and reports them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from towers.errors import FeatureStoreError
from towers.store_format import (
    DEFAULT_PREFIX,
    Event,
    Impression,
    RedisKeys,
    decode_event_fields,
    decode_impression,
    is_cluster_url,
)

DEAD_LETTERS_MAXLEN = 100_000


@dataclass(frozen=True)
class ReadBatch:
    ids: list[str]  # stream entry ids to acknowledge once the events are used
    events: list[Event]  # parsed, repeats (same identity) dropped
    dead: int  # entries moved to the dead letters
    lost: int = 0  # delivered entries the log's byte cap trimmed before they were acknowledged


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _id(raw: Any) -> tuple[int, int]:
    """A stream entry id as (ms, seq), comparable."""
    ms, _, seq = _text(raw).partition("-")
    return int(ms), int(seq or 0)


@dataclass
class _Collect:
    ids: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    seen: set[Event] = field(default_factory=set)
    dead: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


class EventLog:
    """A synchronous reader over one Redis or Redis Cluster (offline jobs are plain functions,
    not services). On a cluster the log is ``LOG_SHARDS`` streams (``towers.store_format``);
    this reads them all, and its entry ids name the shard (``"S/<id>"``) so ``ack`` finds it."""

    def __init__(self, *, redis_url: str, prefix: str = DEFAULT_PREFIX) -> None:
        import redis

        from towers.redis_load import sync_client

        self.cluster = is_cluster_url(redis_url)
        self.keys = RedisKeys(prefix, cluster=self.cluster)
        self._streams = self.keys.event_streams()
        self._redis = sync_client(redis_url, socket_timeout=30)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, redis.exceptions.RedisClusterException,
                                                         OSError)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise FeatureStoreError(f"redis {what} failed: {type(e).__name__}: {e}") from e

    def ensure_group(self, group: str) -> None:
        """Create the consumer group at the start of every stream (idempotent)."""
        import redis

        for stream in self._streams:
            try:
                self._redis.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise FeatureStoreError(f"redis xgroup create failed: {e}") from e
            except self._errors as e:
                raise FeatureStoreError(f"redis xgroup create failed: {type(e).__name__}: {e}") from e

    def _entry_id(self, shard: int, raw_id: Any) -> str:
        entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        return f"{shard}/{entry_id}" if self.cluster else entry_id

    def read(self, *, group: str, consumer: str, count: int = 10_000, pending: bool = False) -> ReadBatch:
        """Up to ``count`` entries not yet delivered to ``group`` (``pending``: every entry
        delivered to ``consumer`` and not acknowledged, e.g. after a crash: read whole, page
        by page). Malformed entries are moved to the dead letters and acknowledged here."""
        if pending:
            pages = list(self.pending_pages(group=group, consumer=consumer, count=count))
            return ReadBatch([i for p in pages for i in p.ids], list(dict.fromkeys(e for p in pages for e in p.events)),
                             sum(p.dead for p in pages), sum(p.lost for p in pages))
        out = _Collect()
        for shard, stream in enumerate(self._streams):
            left = count - len(out.ids) - len(out.dead) - len(out.lost)
            if left <= 0:
                break
            self._take(out, shard, stream, self._xreadgroup(group, consumer, stream, ">", left))
        return self._finish(group, out)

    def pending_pages(self, *, group: str, consumer: str, count: int = 10_000) -> Iterator[ReadBatch]:
        """The entries delivered to ``consumer`` and not acknowledged (a crashed or refused
        run's), ``count`` at a time: the caller holds one page, not the whole list."""
        for shard, stream in enumerate(self._streams):
            start = "0"
            while True:  # XREADGROUP from an id pages through the consumer's pending list
                entries = self._xreadgroup(group, consumer, stream, start, count)
                if not entries:
                    break
                out = _Collect()
                self._take(out, shard, stream, entries)
                yield self._finish(group, out)
                start = _text(entries[-1][0])

    def _finish(self, group: str, out: _Collect) -> ReadBatch:
        if out.dead or out.lost:  # nothing more can come of them: off the pending list
            self.ack(group=group, ids=out.dead + out.lost)
        return ReadBatch(out.ids, out.events, len(out.dead), len(out.lost))

    def _xreadgroup(self, group: str, consumer: str, stream: str, start: str, count: int) -> list[Any]:
        reply = self._call("xreadgroup", self._redis.xreadgroup, group, consumer, {stream: start}, count=count)
        return list(reply[0][1]) if reply else []

    def _take(self, out: _Collect, shard: int, stream: str, entries: list[Any]) -> None:
        for raw_id, fields in entries:
            entry_id = self._entry_id(shard, raw_id)
            if not fields:  # a pending entry the byte cap trimmed: its id is all that is left
                out.lost.append(entry_id)
                continue
            try:
                e = decode_event_fields(fields)
            except ValueError as err:
                # Capped (entries of at most ~1.5 KB: the server bounds every field it writes);
                # the dead letters are for a look at what went wrong, not a second log.
                self._call("xadd", self._redis.xadd, self.keys.dead_letters(),
                           {"reason": str(err), "stream": stream, "id": entry_id,
                            **{(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}},
                           maxlen=DEAD_LETTERS_MAXLEN, approximate=True)
                out.dead.append(entry_id)
                continue
            out.ids.append(entry_id)
            if e not in out.seen:  # Event equality is its identity (request_id does not count)
                out.seen.add(e)
                out.events.append(e)

    def _by_stream(self, ids: list[str]) -> dict[str, list[str]]:
        if not self.cluster:
            return {self._streams[0]: ids} if ids else {}
        out: dict[str, list[str]] = {}
        for i in ids:
            shard, _, entry = i.partition("/")
            out.setdefault(self._streams[int(shard)], []).append(entry)
        return out

    def ack(self, *, group: str, ids: list[str]) -> int:
        return sum(int(self._call("xack", self._redis.xack, stream, group, *part))
                   for stream, part in self._by_stream(ids).items())

    def lost_undelivered(self, *, group: str) -> int | None:
        """Entries trimmed from the log before ``group`` was delivered them (the byte cap's
        doing: consumers trim only what every group acknowledged). Measure before reading: a
        gap shows as the group's last delivered id older than the stream's first entry. None
        when Redis cannot tell (a group without a known read counter)."""
        import redis

        lost = 0
        for stream in self._streams:
            try:
                info = self._redis.xinfo_stream(stream)
                groups = self._redis.xinfo_groups(stream)
            except redis.ResponseError:  # no such stream yet: nothing was written, nothing lost
                continue
            except self._errors as e:
                raise FeatureStoreError(f"redis xinfo failed: {type(e).__name__}: {e}") from e
            g = next((g for g in groups if _text(g["name"]) == group), None)
            if g is None:
                continue
            first = info.get("first-entry")
            if first and _id(first[0]) <= _id(g["last-delivered-id"]):
                continue  # trimming goes oldest first: nothing after the delivered point is gone
            present = int(info["length"]) if first else 0
            if g.get("entries-read") is not None and g.get("lag") is not None:
                # lag: entries added after the group's last delivered one; present: those still here
                lost += int(g["lag"]) - present
            elif _id(g["last-delivered-id"]) == (0, 0):
                # A group that never read: Redis then reports lag = length, blind to a trimmed
                # head. Every entry added is one it needed (publish creates the group with the
                # stream, so nothing was added before it existed).
                lost += int(info["entries-added"]) - present
            else:
                return None
        return lost

    def backlog(self, *, group: str) -> int | None:
        """Entries not yet delivered to ``group`` (its lag; None when Redis cannot tell)."""
        import redis

        total = 0
        for stream in self._streams:
            try:
                groups = self._redis.xinfo_groups(stream)
            except redis.ResponseError:
                continue
            except self._errors as e:
                raise FeatureStoreError(f"redis xinfo failed: {type(e).__name__}: {e}") from e
            g = next((g for g in groups if _text(g["name"]) == group), None)
            if g is not None:
                if g.get("lag") is None:
                    return None
                total += int(g["lag"])
        return total

    def overflow_total(self) -> int:
        """Entries the server's byte cap has trimmed unread, ever (``{stream}:overflow``)."""
        return sum(int(self._call("get", self._redis.get, self.keys.overflow(s)) or 0) for s in self._streams)

    def record_run(self, *, outcome: str, lost: int | None, version: str = "", now: float) -> None:
        """The refresh's last run, for the servers to export (``RedisKeys.refresh_status``):
        ``outcome`` published | unchanged (nothing new) | refused (the gate) | failed; a run that
        published or had nothing to do is a success."""
        fields: dict[str, Any] = {"last_run": now, "outcome": outcome, "lost": -1 if lost is None else lost,
                                  "version": version}
        if outcome in ("published", "unchanged"):
            fields["last_success"] = now
        self._call("hset", self._redis.hset, self.keys.refresh_status(), mapping=fields)

    def start_refresh_clock(self, *, now: float) -> None:
        """A first publish starts the clock the stale-refresh alert reads (``last_success``),
        so a new deployment is not "stale" before its first nightly run; never moves it later."""
        self._call("hsetnx", self._redis.hsetnx, self.keys.refresh_status(), "last_success", now)

    def trim_acknowledged(self) -> int:
        """``XTRIM MINID`` each stream to the oldest entry some consumer group still needs (its
        oldest pending entry, else the one after its last delivered); returns entries removed.
        A stream with no group is left to its byte cap: nobody has said what it needs."""
        import redis

        removed = 0
        for stream in self._streams:
            try:
                groups = self._redis.xinfo_groups(stream)
            except redis.ResponseError:  # no such stream
                continue
            except self._errors as e:
                raise FeatureStoreError(f"redis xinfo failed: {type(e).__name__}: {e}") from e
            need = []
            for g in groups:
                if int(g["pending"]):
                    need.append(_id(self._call("xpending", self._redis.xpending, stream, _text(g["name"]))["min"]))
                else:
                    ms, seq = _id(g["last-delivered-id"])
                    need.append((ms, seq + 1))
            if need:
                ms, seq = min(need)
                removed += int(self._call("xtrim", self._redis.xtrim, stream, minid=f"{ms}-{seq}",
                                          approximate=False))
        return removed

    def pending_count(self, *, group: str) -> int:
        return sum(int(self._call("xpending", self._redis.xpending, stream, group)["pending"])
                   for stream in self._streams)

    def impressions(self, *, since_ms: int = 0, chunk: int = 10_000) -> Iterator[Impression]:
        """Every impression logged at or after ``since_ms`` (unix ms, the entry id's clock)."""
        yield from (decode_impression(f) for _, f in self._range(self.keys.impressions(), since_ms, chunk))

    def exposures(self, *, since_ms: int = 0, chunk: int = 10_000) -> Iterator[Impression]:
        """Every exposure logged at or after ``since_ms`` (``online.exposures``: one per user,
        experiment label and day; the items are empty)."""
        yield from (x for _, x in self.timed_exposures(since_ms=since_ms, chunk=chunk))

    def timed_exposures(self, *, since_ms: int = 0, chunk: int = 10_000,
                        after: str | None = None) -> Iterator[tuple[int, Impression]]:
        """(unix seconds logged, exposure): the entry id's clock. ``after``: only entries
        newer than this stream id (what an ``ExposureStore`` has not copied)."""
        for _, t, x in self.exposure_entries(since_ms=since_ms, chunk=chunk, after=after):
            yield t, x

    def exposure_entries(self, *, since_ms: int = 0, chunk: int = 10_000, after: str | None = None,
                         until: str | None = None) -> Iterator[tuple[str, int, Impression]]:
        """(stream id, unix seconds logged, exposure) of every exposure from ``since_ms`` on
        (after stream id ``after``, up to and with ``until``), oldest first."""
        for entry_id, f in self._range(self.keys.exposures(), since_ms, chunk, after=after, until=until):
            yield entry_id, int(entry_id.split("-", 1)[0]) // 1000, decode_impression(f)

    def exposure_counts(self) -> tuple[int | None, str | None]:
        """(entries ever added, the last id generated) of the exposure stream: a copy takes the
        entries up to that id, and what was added but neither copied nor there any more was
        trimmed (Redis 7's ``entries-added``; None on older servers). (0, None): no stream yet."""
        import redis

        try:
            info = self._redis.xinfo_stream(self.keys.exposures())
        except redis.ResponseError:
            return 0, None
        except self._errors as e:
            raise FeatureStoreError(f"redis xinfo failed: {type(e).__name__}: {e}") from e
        added = info.get("entries-added", info.get(b"entries-added"))
        last = info.get("last-generated-id", info.get(b"last-generated-id"))
        return (None if added is None else int(added)), (None if last is None else _text(last))

    def events(self, *, since_ms: int = 0, chunk: int = 10_000) -> Iterator[tuple[Event | None, str]]:
        """Every event logged at or after ``since_ms`` without a consumer group (reports):
        (event, "") or (None, reason) for an entry that does not parse. A cluster's shards
        come one after the other (each in time order)."""
        for _, fields in (entry for stream in self._streams for entry in self._range(stream, since_ms, chunk)):
            try:
                yield decode_event_fields(fields), ""
            except ValueError as err:
                yield None, str(err)

    def _range(self, key: str, since_ms: int, chunk: int, after: str | None = None,
               until: str | None = None) -> Iterator[tuple[str, dict[Any, Any]]]:
        start = f"{since_ms}-0"
        if after is not None and _id(after) >= _id(start):
            start = "(" + after  # exclusive
        while True:
            entries = self._call("xrange", self._redis.xrange, key, min=start, max=until or "+", count=chunk)
            if not entries:
                return
            for raw_id, fields in entries:
                yield (raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)), fields
            last = entries[-1][0]
            last = last.decode() if isinstance(last, bytes) else str(last)
            start = "(" + last  # exclusive: the next chunk starts after the last entry read
            if len(entries) < chunk:
                return

    def close(self) -> None:
        self._redis.close()
