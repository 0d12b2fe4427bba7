"""What the online feature store holds and how: the Redis key layout and the value
encodings, shared by ``publish`` (which writes a version's keys), the server (which
reads them) and the jobs that read the event log. Nothing here talks to Redis.

Key layout — the one place it is defined (``RedisKeys``)::

    {p}:v:{version}:ue:{user_id}    user embedding: little-endian float32 (4d bytes) or float16
                                    (2d bytes), or int8: a 4-byte scale tag then d int8 levels
    {p}:v:{version}:ue_scale        int8 versions only: the (d,) float32 per-dimension scale
    {p}:v:{version}:recs:{user_id}  precomputed top-K: int32 item rows then float32 scores
    {p}:v:{version}:ready           set last by the loader: the version's keys are all there
    {p}:zsess:{user_id}             session events: a sorted set scored by timestamp, members
                                    "item\\ttype\\tts", capped to the newest + TTL

Embeddings and recs are version-scoped, so a worker serving version N can never
read another version's vectors (no skew); sessions are facts about the user,
shared by all versions, and hold raw item ids. An event is identified by (user,
item, type, timestamp), so recording the same event twice (a client retry after a
lost reply) stores it once: RecordEvents is idempotent.

int8 user embeddings (``twotower quantize`` calibrates the scale, ``publish --redis``
stores them when the bundle declares int8): d + 4 bytes per user against 4d for float32
(68 vs 256 at d=64, 3.8x fewer). The per-dimension scale is stored once per version, in
the bundle manifest (``quant.user_embeddings``) and under ``ue_scale``; each value starts
with the scale's 4-byte tag. Decoding needs the scale but no extra Redis round trip:
``towers.bundle.load`` registers a version's scale (:func:`register_int8_scale`) when a
worker loads it, and :func:`decode_embedding` finds it by the value's tag. A value whose
tag no loaded version has is refused (``FeatureStoreError``, so serving degrades), never
decoded with the wrong scale.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from towers.errors import FeatureStoreError
from towers.quant import TAG_BYTES, dequantize_int8, quantize_int8, scale_tag

EMBEDDING_DTYPES = ("float32", "float16", "int8")

EVENT_TYPES = ("view", "click", "cart", "purchase")


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    type: str  # one of EVENT_TYPES
    timestamp: int


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "tt"

    def user_embedding(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:ue:{user_id}"

    def recs(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:recs:{user_id}"

    def user_embedding_scale(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:ue_scale"

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


# Scales of the int8 versions this process has loaded, by tag. Tags are content hashes, so
# versions never overwrite each other's entry; a few hundred bytes per version ever loaded.
_INT8_SCALES: dict[bytes, np.ndarray] = {}
_SCALES_LOCK = threading.Lock()


def register_int8_scale(scale: np.ndarray) -> bytes:
    """Make a version's int8 scale known to :func:`decode_embedding`; returns its tag."""
    s = np.ascontiguousarray(scale, dtype=np.float32)
    tag = scale_tag(s)
    with _SCALES_LOCK:
        _INT8_SCALES[tag] = s
    return tag


def embedding_nbytes(dim: int, dtype: str) -> int:
    """Bytes per user in the feature store for ``dtype`` (float32 4d, float16 2d, int8 d + tag)."""
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim + TAG_BYTES}[dtype]


def encode_embedding(vec: np.ndarray, *, float16: bool = False, dtype: str | None = None,
                     scale: np.ndarray | None = None) -> bytes:
    """One user's value. ``dtype`` float32 (default), float16 (``float16=True`` is the old
    spelling) or int8, which needs the version's per-dimension ``scale``."""
    dtype = dtype or ("float16" if float16 else "float32")
    if dtype == "int8":
        if scale is None:
            raise ValueError("int8 embeddings need the version's per-dimension scale")
        v = np.asarray(vec, dtype=np.float32)
        if v.shape[-1] == TAG_BYTES:  # d + 4 == 2d: could not be told apart from float16 by length
            raise ValueError(f"int8 embeddings need dim != {TAG_BYTES}")
        return scale_tag(scale) + quantize_int8(v, scale).tobytes()
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {', '.join(EMBEDDING_DTYPES)}")
    return np.asarray(vec).astype("<f2" if dtype == "float16" else "<f4").tobytes()


def decode_embedding(raw: bytes | None, dim: int, *,
                     scales: Mapping[bytes, np.ndarray] | None = None) -> np.ndarray | None:
    """A stored user embedding as float32, told apart by length: 4d float32, 2d float16,
    d + 4 int8 (scale found by its tag in ``scales``, default: the versions loaded here)."""
    if raw is None:
        return None
    if len(raw) == 4 * dim:
        return np.frombuffer(raw, dtype="<f4")
    if len(raw) == 2 * dim:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if len(raw) == dim + TAG_BYTES:
        tag = bytes(raw[:TAG_BYTES])
        scale = (scales if scales is not None else _INT8_SCALES).get(tag)
        if scale is None:
            raise FeatureStoreError(f"int8 user embedding with scale tag {tag.hex()}: no loaded version has "
                                    "that scale (the bundle's manifest lacks quant.user_embeddings?)")
        return dequantize_int8(np.frombuffer(raw, dtype=np.int8, offset=TAG_BYTES), scale)
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
