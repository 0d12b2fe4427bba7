"""Online feature stores: what the request path needs of one (``FeatureStore``), and the
in-memory store (the embedded default). The Redis stores (production, and Redis Cluster
where one Redis is outgrown) are ``online.redis_store``.

The key layout and value encodings are ``towers.store_format`` (publish writes what
the server reads). Each store says what it can do (``StoreCapabilities``), so the
service never asks which class it holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from towers.store_format import (
    EVENT_TYPES,
    Event,
    Impression,
    encode_event,
    event_scores,
)

__all__ = ["EVENT_TYPES", "BatchFeatures", "BatchRecs", "Event", "FeatureStore", "InMemoryFeatureStore", "LogStatus",
           "StoreCapabilities"]

_TYPE_CODE = {t: i for i, t in enumerate(EVENT_TYPES)}
CART = _TYPE_CODE["cart"]


@dataclass(frozen=True)
class StoreCapabilities:
    shared: bool  # one store for every worker process: a session recorded by one is read by all
    holds_versions: bool  # takes a version's arrays from its bundle at load (else publish loads them)


@dataclass(frozen=True)
class LogStatus:
    """The durable event log and its consumer as the operator's metrics see them (a Redis
    store's ``log_status``; summed over a cluster's shards)."""

    entries: int  # in the log now
    bytes: int  # its Redis memory (MEMORY USAGE, 5 samples a stream)
    lag: int  # entries not yet delivered to the refresh group (-1: no group yet)
    pending: int  # delivered to the refresh, not acknowledged
    oldest_unacked_s: float | None  # unix time of the oldest entry the refresh has not acknowledged
    dead_letters: int
    refresh: dict[str, str]  # the refresh's last run (RedisKeys.refresh_status): last_run, outcome, ...


@dataclass(frozen=True, slots=True)
class BatchFeatures:
    """One fetch's answer for a batch of users, columnar (row i: the i-th user asked for):
    no object per user or per event, so the request path reads it with array operations."""

    embedding: np.ndarray  # (B, d) float32; zero rows where ``has_user`` is False
    has_user: np.ndarray  # (B,) bool: the store holds this version's embedding of the user
    offsets: np.ndarray  # (B + 1,) int64: user i's session events are [offsets[i], offsets[i + 1])
    items: list[str]  # (E,) session item ids, each user's newest first
    types: np.ndarray  # (E,) int8 positions in EVENT_TYPES
    timestamps: np.ndarray  # (E,) int64 unix seconds

    def __len__(self) -> int:
        return len(self.has_user)

    @property
    def owner(self) -> np.ndarray:
        """(E,) the row each session event belongs to (non-decreasing)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    @classmethod
    def from_rows(cls, embeddings: Sequence[np.ndarray | None], sessions: Sequence[Sequence[bytes]], *,
                  dim: int) -> BatchFeatures:
        """From per-user decoded embeddings (None: absent) and raw session members (see
        ``from_sessions``)."""
        n = len(embeddings)
        emb = np.zeros((n, dim), np.float32)
        has = np.zeros(n, bool)
        for i, e in enumerate(embeddings):
            if e is not None:
                emb[i], has[i] = e, True
        return cls.from_sessions(emb, has, sessions)

    @classmethod
    def from_sessions(cls, embedding: np.ndarray, has_user: np.ndarray,
                      sessions: Sequence[Sequence[bytes]]) -> BatchFeatures:
        """With the batch's embeddings already gathered, from raw session members
        (``towers.store_format.encode_event``: ``item\ttype\tts``, newest first). The members
        are decoded as one string (one decode, one split for the batch, not one per event)."""
        offsets = np.zeros(len(sessions) + 1, np.int64)
        np.cumsum([len(s) for s in sessions], out=offsets[1:])
        members = [m for s in sessions for m in s]
        if not members:
            return cls(embedding, has_user, offsets, [], np.zeros(0, np.int8), np.zeros(0, np.int64))
        parts = b"\t".join(members).decode().split("\t")
        types = np.fromiter((_TYPE_CODE.get(t, -1) for t in parts[1::3]), np.int8, count=len(members))
        return cls(embedding, has_user, offsets, parts[0::3], types, np.array(parts[2::3], dtype=np.int64))

    def take(self, rows: np.ndarray) -> BatchFeatures:
        """Rows ``rows`` (any order, repeats allowed), as a batch of their own."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Each kept event's position: its row's start plus its rank inside the row.
        events = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        items = self.items
        return BatchFeatures(self.embedding[rows], self.has_user[rows], offsets, [items[j] for j in events.tolist()],
                             self.types[events], self.timestamps[events])

    @staticmethod
    def concat(a: BatchFeatures, b: BatchFeatures) -> BatchFeatures:
        return BatchFeatures(np.concatenate([a.embedding, b.embedding]), np.concatenate([a.has_user, b.has_user]),
                             np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]), [*a.items, *b.items],
                             np.concatenate([a.types, b.types]), np.concatenate([a.timestamps, b.timestamps]))


@dataclass(frozen=True, slots=True)
class BatchRecs:
    """Precomputed lists for a batch of users, as one padded matrix (row i: the i-th user)."""

    rows: np.ndarray  # (B, K) int64 item rows, best first, -1 padded
    scores: np.ndarray  # (B, K) float32
    found: np.ndarray  # (B,) bool: the user has a precomputed list

    @classmethod
    def gather(cls, user_rows: np.ndarray, items: np.ndarray | None, scores: np.ndarray | None) -> BatchRecs:
        """From a version's (U, K) arrays (-1 padded), for users at ``user_rows`` (-1: none)."""
        n = len(user_rows)
        if items is None or scores is None:
            return cls(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32), np.zeros(n, bool))
        found = user_rows >= 0
        at = np.where(found, user_rows, 0)
        # One gather for the batch, as plain ndarrays (a memmap's fancy indexing returns one).
        rows = np.asarray(items[at], dtype=np.int64)
        rows[~found] = -1
        return cls(rows, np.where(found[:, None], np.asarray(scores[at], np.float32), 0.0).astype(np.float32),
                   found)

    @classmethod
    def from_raw(cls, raws: Sequence[bytes | None]) -> BatchRecs:
        """From stored values (``towers.store_format``: n int32 rows, then n float32 scores)."""
        n = len(raws)
        width = max((len(r) // 8 for r in raws if r is not None), default=0)
        rows = np.full((n, width), -1, np.int64)
        scores = np.zeros((n, width), np.float32)
        found = np.zeros(n, bool)
        for i, raw in enumerate(raws):
            if raw is not None:
                m = len(raw) // 8
                rows[i, :m] = np.frombuffer(raw, "<i4", count=m)
                scores[i, :m] = np.frombuffer(raw, "<f4", count=m, offset=4 * m)
                found[i] = True
        return cls(rows, scores, found)


class FeatureStore(Protocol):
    @property
    def capabilities(self) -> StoreCapabilities:
        ...

    def add_version(self, version: str, *, user_ids: Sequence[str], user_emb: np.ndarray,
                    recs_items: np.ndarray | None = None, recs_scores: np.ndarray | None = None) -> None:
        """Take a version's arrays from its bundle (only where ``capabilities.holds_versions``)."""
        ...

    def drop_versions(self, *, keep: set[str]) -> list[str]:
        """Forget versions not in ``keep`` that this process loaded; returns them."""
        ...

    async def fetch(self, version: str, user_ids: Sequence[str], *, dim: int, n_recent: int,
                    timeout: float) -> BatchFeatures:
        """User embeddings (of ``version``) and recent session events, for a batch, in one round trip."""
        ...

    async def batch_recs(self, version: str, user_ids: Sequence[str], *, timeout: float) -> BatchRecs:
        """Precomputed lists of ``version`` for a batch of users, in one round trip."""
        ...

    async def record(self, events: Sequence[Event], *, timeout: float) -> int:
        """Append events to the users' sessions and to the durable event log (each event
        once, however often it is sent). Returns how many log entries the log's safety cap
        removed unread to make room: 0 unless its consumers have stopped for too long."""
        ...

    async def log_impressions(self, impressions: Sequence[Impression], *, timeout: float,
                              log: str = "impressions") -> None:
        """Append served impressions (a sample) to the impression log, for the outcome join;
        ``log="exposures"``: to the exposure log (``online.exposures``) instead."""
        ...

    async def has_version(self, version: str) -> bool:
        ...

    async def close(self) -> None:
        ...


class InMemoryFeatureStore:
    """The embedded default: embeddings and recs from loaded bundles, sessions in process memory."""

    capabilities = StoreCapabilities(shared=False, holds_versions=True)

    def __init__(self, *, session_cap: int = 100) -> None:
        self._versions: dict[str, tuple[dict[str, int], np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        # Per user: encoded event -> score, like the Redis sorted set's members.
        self._sessions: dict[str, dict[bytes, float]] = {}
        self._cap = session_cap
        # The embedded default keeps its logs in memory (bounded): enough for the demo and for
        # tests to see what a Redis store would have logged; not durable.
        self.event_log: deque[Event] = deque(maxlen=100_000)
        self.impression_log: deque[Impression] = deque(maxlen=100_000)
        self.exposure_log: deque[Impression] = deque(maxlen=100_000)

    def add_version(self, version: str, *, user_ids: Sequence[str], user_emb: np.ndarray,
                    recs_items: np.ndarray | None = None, recs_scores: np.ndarray | None = None) -> None:
        # Plain ndarray views (not memmap): a memmap's indexing goes through Python-level hooks.
        self._versions[version] = ({u: i for i, u in enumerate(user_ids)}, np.asarray(user_emb),
                                   None if recs_items is None else np.asarray(recs_items),
                                   None if recs_scores is None else np.asarray(recs_scores))

    def versions(self) -> set[str]:
        """The versions whose arrays this store holds."""
        return set(self._versions)

    def drop_versions(self, *, keep: set[str]) -> list[str]:
        """Forget every version not in ``keep`` (the old bundles' arrays can then be
        freed); returns the dropped ones."""
        dropped = [v for v in self._versions if v not in keep]
        for v in dropped:
            del self._versions[v]
        return dropped

    async def fetch(self, version: str, user_ids: Sequence[str], *, dim: int, n_recent: int,
                    timeout: float) -> BatchFeatures:
        index, emb, _, _ = self._versions.get(version, ({}, np.zeros((0, dim), np.float32), None, None))
        rows = np.fromiter((index.get(u, -1) for u in user_ids), np.int64, count=len(user_ids))
        has = rows >= 0
        vecs = np.zeros((len(user_ids), dim), np.float32)
        if has.any():  # one gather for the batch
            vecs[has] = emb[rows[has]]
        sessions: list[list[bytes]] = []
        for u in user_ids:
            sess = self._sessions.get(u)
            # Newest first, ties by member descending: the order of Redis's ZREVRANGE.
            sessions.append([m for m, _ in sorted(sess.items(), key=lambda kv: (kv[1], kv[0]),
                                                  reverse=True)[:n_recent]] if sess else [])
        return BatchFeatures.from_sessions(vecs, has, sessions)

    async def batch_recs(self, version: str, user_ids: Sequence[str], *, timeout: float) -> BatchRecs:
        index, _, items, scores = self._versions.get(version, ({}, None, None, None))
        return BatchRecs.gather(np.fromiter((index.get(u, -1) for u in user_ids), np.int64, count=len(user_ids)),
                                items, scores)

    async def record(self, events: Sequence[Event], *, timeout: float) -> int:
        dropped = 0
        for e, score in zip(events, event_scores(events), strict=True):
            sess = self._sessions.setdefault(e.user_id, {})
            member = encode_event(e)
            if member not in sess:  # logged once, however often it is retried (as Redis's RECORD_LUA)
                dropped += len(self.event_log) == self.event_log.maxlen
                self.event_log.append(e)
            sess[member] = score
            if len(sess) > self._cap:  # keep the newest session_cap, as ZREMRANGEBYRANK does
                oldest = min(sess.items(), key=lambda kv: (kv[1], kv[0]))[0]
                del sess[oldest]
        return dropped

    async def log_impressions(self, impressions: Sequence[Impression], *, timeout: float,
                              log: str = "impressions") -> None:
        (self.exposure_log if log == "exposures" else self.impression_log).extend(impressions)

    async def has_version(self, version: str) -> bool:
        return version in self._versions

    async def close(self) -> None:
        return None


# KEYS: embedding key, session key, per user; ARGV[1]: the last session index to read.
# Returns [embedding or nil, [newest session members...]] per user, like GET + ZREVRANGE.
