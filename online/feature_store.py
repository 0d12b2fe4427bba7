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

__all__ = ["EVENT_TYPES", "Event", "FeatureStore", "InMemoryFeatureStore", "LogStatus", "StoreCapabilities",
           "UserFeatures"]


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


@dataclass(frozen=True)
class UserFeatures:
    embedding: np.ndarray | None  # (d,) float32; None when the store has none for this user
    session: list[Event]  # newest first


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
                    timeout: float) -> list[UserFeatures]:
        """User embeddings (of ``version``) and recent session events, for a batch, in one round trip."""
        ...

    async def batch_recs(self, version: str, user_ids: Sequence[str], *,
                         timeout: float) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Precomputed (item rows, scores) of ``version`` per user; None where absent."""
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
        # Per user: encoded event -> (score, event), like the Redis sorted set's members.
        self._sessions: dict[str, dict[bytes, tuple[float, Event]]] = {}
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
                    timeout: float) -> list[UserFeatures]:
        index, emb, _, _ = self._versions.get(version, ({}, np.zeros((0, dim), np.float32), None, None))
        rows = [index.get(u) for u in user_ids]
        # One gather for the batch, as a plain ndarray: indexing a memmap row by row builds a
        # memmap view per user, which cost more than the rest of the fetch together.
        known = [r for r in rows if r is not None]
        vecs = np.asarray(emb[known], dtype=np.float32) if known else np.zeros((0, dim), np.float32)
        out, j = [], 0
        for u, row in zip(user_ids, rows, strict=True):
            sess = self._sessions.get(u)
            events: list[Event] = []
            if sess:
                # Newest first, ties by member descending: the order of Redis's ZREVRANGE.
                newest = sorted(sess.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True)[:n_recent]
                events = [ev for _, (_, ev) in newest]
            vec = None
            if row is not None:
                vec, j = vecs[j], j + 1
            out.append(UserFeatures(vec, events))
        return out

    async def batch_recs(self, version: str, user_ids: Sequence[str], *,
                         timeout: float) -> list[tuple[np.ndarray, np.ndarray] | None]:
        index, _, items, scores = self._versions.get(version, ({}, None, None, None))
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for u in user_ids:
            row = index.get(u)
            if row is None or items is None or scores is None:
                out.append(None)
            else:
                keep = items[row] >= 0
                out.append((items[row][keep].astype(np.int64), scores[row][keep].astype(np.float32)))
        return out

    async def record(self, events: Sequence[Event], *, timeout: float) -> int:
        dropped = 0
        for e, score in zip(events, event_scores(events), strict=True):
            sess = self._sessions.setdefault(e.user_id, {})
            member = encode_event(e)
            if member not in sess:  # logged once, however often it is retried (as Redis's RECORD_LUA)
                dropped += len(self.event_log) == self.event_log.maxlen
                self.event_log.append(e)
            sess[member] = (score, e)
            if len(sess) > self._cap:  # keep the newest session_cap, as ZREMRANGEBYRANK does
                oldest = min(sess.items(), key=lambda kv: (kv[1][0], kv[0]))[0]
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
