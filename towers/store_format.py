"""What the online feature store holds and how: the Redis key layout and the value
encodings, shared by ``publish`` (which writes a version's keys), the server (which
reads them) and the jobs that read the event log. Nothing here talks to Redis.

Key layout — the one place it is defined (``RedisKeys``)::

    {p}:v:{version}:ue:{user_id}    user embedding, raw little-endian float32 (or float16) bytes
    {p}:v:{version}:recs:{user_id}  precomputed top-K: int32 item rows then float32 scores
    {p}:v:{version}:ready           set last by the loader: the version's keys are all there
    {p}:zsess:{user_id}             session events: a sorted set scored by timestamp, members
                                    "item\\ttype\\tts", capped to the newest + TTL

Embeddings and recs are version-scoped, so a worker serving version N can never
read another version's vectors (no skew); sessions are facts about the user,
shared by all versions, and hold raw item ids. An event is identified by (user,
item, type, timestamp), so recording the same event twice (a client retry after a
lost reply) stores it once: RecordEvents is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from towers.errors import FeatureStoreError

EVENT_TYPES = ("view", "click", "cart", "purchase")


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    type: str  # one of EVENT_TYPES
    timestamp: int
    # The request id of the Recommend response (impression) this event answers, for the A/B
    # outcome join; "" if unknown. Not part of the event's identity (user, item, type,
    # timestamp) nor of its session encoding: a retry that names it differently is the same event.
    request_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "tt"

    def user_embedding(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:ue:{user_id}"

    def recs(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:recs:{user_id}"

    def ready(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:ready"

    def session(self, user_id: str) -> str:
        return f"{self.prefix}:zsess:{user_id}"


# Events in one call that share a timestamp keep their order in the call: the score is
# timestamp + position * 2**-14 (exact in a double for any unix-seconds timestamp). A retried
# call gives every event the same score again, so recording stays idempotent.
TIE_STEP = 2.0 ** -14


def event_scores(events: Sequence[Event]) -> list[float]:
    return [e.timestamp + j * TIE_STEP for j, e in enumerate(events)]


def encode_event(e: Event) -> bytes:
    return f"{e.item_id}\t{e.type}\t{e.timestamp}".encode()


def decode_event(user_id: str, raw: bytes) -> Event:
    item, typ, ts = raw.decode().split("\t")
    return Event(user_id, item, typ, int(ts))


def encode_embedding(vec: np.ndarray, *, float16: bool = False) -> bytes:
    return np.asarray(vec).astype("<f2" if float16 else "<f4").tobytes()


def decode_embedding(raw: bytes | None, dim: int) -> np.ndarray | None:
    if raw is None:
        return None
    if len(raw) == 4 * dim:
        return np.frombuffer(raw, dtype="<f4")
    if len(raw) == 2 * dim:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    raise FeatureStoreError(f"user embedding of {len(raw)} bytes does not match dim {dim}")


def encode_recs(rows: np.ndarray, scores: np.ndarray) -> bytes:
    keep = rows >= 0
    return rows[keep].astype("<i4").tobytes() + scores[keep].astype("<f4").tobytes()


def decode_recs(raw: bytes | None) -> tuple[np.ndarray, np.ndarray] | None:
    if raw is None:
        return None
    n = len(raw) // 8
    return (np.frombuffer(raw[: 4 * n], dtype="<i4").astype(np.int64),
            np.frombuffer(raw[4 * n:], dtype="<f4").astype(np.float32))
