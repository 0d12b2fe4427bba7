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

On a Redis Cluster (``redis+cluster://`` URLs, ``RedisKeys(cluster=True)``) every
per-user key carries the user's log shard as a hash tag — ``{p}:v:{version}:ue:{logS}<user>``,
``{p}:v:{version}:recs:{logS}<user>``, ``{p}:zsess:{logS}<user>`` with S = crc32(user) mod
``LOG_SHARDS`` — and the event log is one stream per shard, ``{p}:events:{logS}``. So a
user's keys and the stream their events go to share one slot: a RecordEvents call is one
MULTI per shard (session writes + XADDs: acknowledged means in both or in neither, as on
standalone Redis), and a user's features sit on one node (a stalled node degrades whole
users, never half of one, and stops only its shards' logs). Nothing needs *different*
shards in one slot: a batch's fetch is a pipeline that redis-py splits per node, and batch
recs an MGET split per slot. 256 shards spread over a cluster's nodes like users did.
Standalone Redis keeps the untagged names above and one stream (no migration).

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

import re
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    # The request id of the Recommend response (impression) this event answers, for the A/B
    # outcome join; "" if unknown. Not part of the event's identity (user, item, type,
    # timestamp) nor of its session encoding: a retry that names it differently is the same event.
    request_id: str = field(default="", compare=False)


DEFAULT_PREFIX = "tt"  # every key a server, publish and refresh share starts with this (redis.prefix)


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = DEFAULT_PREFIX
    cluster: bool = False  # hash-tag per-user keys with the user's log shard (see the module docstring)

    def __post_init__(self) -> None:
        if self.cluster and ("{" in self.prefix or "}" in self.prefix):
            # A brace in the prefix would become the hash tag of every key: one slot for all.
            raise FeatureStoreError(f"redis prefix {self.prefix!r} must not contain braces on a cluster")

    def _user(self, user_id: str) -> str:
        return f"{{log{log_shard(user_id)}}}{user_id}" if self.cluster else user_id

    def user_embedding(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:ue:{self._user(user_id)}"

    def recs(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:v:{version}:recs:{self._user(user_id)}"

    def user_embedding_scale(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:ue_scale"

    def ready(self, version: str) -> str:
        # The cluster layout changed when the event log was sharded (per-user tags went from
        # the user id to the user's log shard): a version loaded under the old layout has the
        # old ``ready`` key only, so servers never take it for loaded; publish it again.
        return f"{self.prefix}:v:{version}:ready" + (":shards" if self.cluster else "")

    def session(self, user_id: str) -> str:
        return f"{self.prefix}:zsess:{self._user(user_id)}"

    # The durable logs (not per version): see "Event log" below.
    def events(self, shard: int | None = None) -> str:
        """The event stream (standalone), or shard ``shard``'s stream (cluster)."""
        if not self.cluster:
            return f"{self.prefix}:events"
        if shard is None or not 0 <= shard < LOG_SHARDS:
            raise ValueError(f"a cluster's event log is {LOG_SHARDS} streams: name the shard (got {shard!r})")
        return f"{self.prefix}:events:{{log{shard}}}"

    def event_streams(self) -> list[str]:
        """Every stream of the event log, in shard order."""
        return [self.events(s) for s in range(LOG_SHARDS)] if self.cluster else [self.events()]

    def events_of(self, user_id: str) -> str:
        """The stream a user's events go to (in the same slot as the user's session)."""
        return self.events(log_shard(user_id)) if self.cluster else self.events()

    def impressions(self) -> str:
        return f"{self.prefix}:impressions"

    def exposures(self) -> str:
        """One entry per user, experiment label and day served (``online.exposures``)."""
        return f"{self.prefix}:exposures"

    def dead_letters(self) -> str:
        return f"{self.prefix}:events:dead"

    def refresh_status(self) -> str:
        """A hash the nightly refresh writes at the end of each run (last_run, outcome,
        last_success, lost, version); the servers export it as metrics."""
        return f"{self.prefix}:refresh:status"

    @staticmethod
    def overflow(stream: str) -> str:
        """Entries the safety cap trimmed from ``stream`` unread (a counter in its slot)."""
        return f"{stream}:overflow"


LOG_SHARDS = 256  # a cluster's event log: streams, each in the slot of its users' keys


def log_shard(user_id: str) -> int:
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % LOG_SHARDS


CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


@dataclass(frozen=True)
class ClusterURL:
    """``redis+cluster://[user:password@]host:port[,host:port...][/]`` (``rediss+cluster`` for
    TLS): the seed nodes a cluster client discovers the rest of the cluster from."""

    nodes: tuple[tuple[str, int], ...]
    ssl: bool
    username: str | None = None
    password: str | None = None


_USERINFO = re.compile(r"(?P<head>://(?P<user>[^:@/]*)):[^/]*@")  # greedy: a raw "@" in the password
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|pass|pwd)=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``redis://user:***@host``, also in a
    ``?password=`` option): what a file, a log line, an exception or a status may show."""
    return _QUERY_SECRET.sub(r"\g<key>***", _USERINFO.sub(r"\g<head>:***@", url, count=1))


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """Parsed by hand: ``urllib`` refuses a comma-separated list of host:port pairs."""
    from urllib.parse import unquote

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise FeatureStoreError(f"{redact_url(url)!r} is not a redis+cluster:// or rediss+cluster:// URL")
    netloc, _, path = rest.partition("/")
    if path.split("?")[0] not in ("", "0") or "?" in rest:
        raise FeatureStoreError(f"{redact_url(url)!r}: a cluster has only database 0 and takes no options in the URL")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_pw, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if has_pw else None)
    nodes = []
    for part in hosts.split(","):
        host, port = part, "6379"
        if part.startswith("["):  # [ipv6]:port
            host, _, tail = part[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else "6379"
        elif ":" in part:
            host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FeatureStoreError(f"{redact_url(url)!r}: bad node {part!r} (expected host:port)")
        nodes.append((host, int(port)))
    return ClusterURL(tuple(nodes), CLUSTER_SCHEMES[scheme.lower()], username, password)


# Events in one call that share a timestamp keep their order in the call: the score is
# timestamp + position * 2**-14 (exact in a double for any unix-seconds timestamp). A retried
# call gives every event the same score again, so recording stays idempotent.
TIE_STEP = 2.0 ** -14


def event_scores(events: Sequence[Event]) -> list[float]:
    return [e.timestamp + j * TIE_STEP for j, e in enumerate(events)]


# -- Event log -----------------------------------------------------------------------------
#
# Every event RecordEvents accepts is appended to ``{p}:events`` (a cluster: the user's shard
# stream ``{p}:events:{logS}``) in the same script call as the session update, so an
# acknowledged event is in both or in neither, and once (online/feature_store.py RECORD_LUA).
# Entry fields: user, item, type, ts (unix s), rid (the impression's request id, may be empty).
#
# The event log is trimmed only below what every consumer group has acknowledged: the
# refresh, after its ack, runs ``XTRIM MINID`` to the oldest entry some group still needs (its
# oldest pending entry, else the one after its last delivered) (offline/event_log.py). A
# consumer that stops for days must not take Redis down with it, so the server also holds a
# hard safety cap in *bytes* per stream (``MEMORY USAGE``, default STREAM_MAX_BYTES): past it
# the oldest entries are trimmed whether read or not, the count is added to
# ``{stream}:overflow`` and to the server's ``twotower_event_log_overflow_entries`` counter,
# and the next refresh reports exactly how many entries it lost (never silent). Entries take
# ~45 bytes each in Redis's listpacks (measured: 1M entries, 40-45 MB), so 1 GiB is ~24M
# events, ~2.7 days at 100 events/s.
# Served impressions are sampled into ``{p}:impressions``: rid, user, variant, version, items
# (tab-joined ids), capped at STREAM_MAXLEN entries (``XADD MAXLEN ~``) and at
# IMPRESSIONS_MAX_BYTES (an entry carries up to max_k ids: its size varies 100-fold); no group
# consumes it, reports read it by time.
# Entries a consumer cannot parse go to ``{p}:events:dead`` with the reason; never lost, never
# blocking.

STREAM_MAXLEN = 10_000_000
STREAM_MAX_BYTES = 1 << 30
IMPRESSIONS_MAX_BYTES = 256 << 20
REFRESH_GROUP = "refresh"  # the nightly refresh's consumer group (publish --redis creates it)


@dataclass(frozen=True)
class Impression:
    request_id: str
    user_id: str
    variant: str
    version: str
    item_ids: tuple[str, ...]
    teams: tuple[str, ...] = ()  # interleaving: the variant that contributed each item (parallel)


def event_fields(e: Event) -> dict[str, str]:
    return {"user": e.user_id, "item": e.item_id, "type": e.type, "ts": str(e.timestamp), "rid": e.request_id}


def _text(fields: dict[Any, Any], name: str) -> str:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        raise ValueError(f"missing field {name!r}")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def decode_event_fields(fields: dict[Any, Any]) -> Event:
    """An event stream entry; ValueError naming what is wrong (it then goes to the dead letters)."""
    user, item, typ, ts = (_text(fields, n) for n in ("user", "item", "type", "ts"))
    if not user or not item:
        raise ValueError("empty user or item")
    if typ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {typ!r}")
    if not ts.isdigit():
        raise ValueError(f"timestamp {ts!r} is not unix seconds")
    rid = fields.get(b"rid", fields.get("rid", b""))
    return Event(user, item, typ, int(ts), rid.decode() if isinstance(rid, bytes) else str(rid))


def impression_fields(imp: Impression) -> dict[str, str]:
    f = {"rid": imp.request_id, "user": imp.user_id, "variant": imp.variant, "version": imp.version,
         "items": "\t".join(imp.item_ids)}
    if imp.teams:
        f["teams"] = "\t".join(imp.teams)
    return f


def decode_impression(fields: dict[Any, Any]) -> Impression:
    items = _text(fields, "items")
    teams = fields.get(b"teams", fields.get("teams", b""))
    teams = teams.decode() if isinstance(teams, bytes) else str(teams)
    return Impression(_text(fields, "rid"), _text(fields, "user"), _text(fields, "variant"), _text(fields, "version"),
                      tuple(items.split("\t")) if items else (), tuple(teams.split("\t")) if teams else ())


def encode_event(e: Event) -> bytes:
    return f"{e.item_id}\t{e.type}\t{e.timestamp}".encode()


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
