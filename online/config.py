"""Serving configuration: typed, documented, validated once at the edge
(``twotower serve`` flags and an optional JSON config file) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from towers.cliargs import Doc
from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX, IMPRESSIONS_MAX_BYTES, STREAM_MAX_BYTES, STREAM_MAXLEN

# Each setting is declared once, with its type and bounds (``Annotated[..., Field(...)]``);
# pydantic checks a whole config against them (``ServeConfig.validate``, ``load_config``): strict
# types (JSON's "5" is not a port), unknown keys refused, errors named by their dotted path. The
# classes stay plain frozen dataclasses: the request path reads plain attributes, and
# ``dataclasses.replace`` works as everywhere else.
_PYDANTIC = ConfigDict(extra="forbid", strict=True, revalidate_instances="always")
NonNeg = Annotated[int, Field(ge=0)]
Pos = Annotated[int, Field(ge=1)]
NonNegF = Annotated[float, Field(ge=0)]
PosF = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(ge=0, le=1)]


@dataclass(frozen=True)
class BudgetConfig:
    """Latency budget in milliseconds (DESIGN §4), capped by the client's deadline."""

    __pydantic_config__ = _PYDANTIC
    total_ms: PosF = 100.0
    network_ms: float = 10.0  # reserved for the way back to the client
    fetch_ms: float = 30.0  # feature fetch + preprocessing
    inference_ms: float = 50.0  # combiner + ANN search
    post_ms: float = 10.0  # filtering + serialisation
    min_search_ms: float = 2.0  # below this much time left, skip the search: serve batch recs


@dataclass(frozen=True)
class BatchingConfig:
    __pydantic_config__ = _PYDANTIC
    max_batch_size: Annotated[Pos, Doc("requests answered together (1 turns batching off)")] = 64
    max_wait_ms: Annotated[NonNegF, Doc("how long a batch waits to fill, only while another is in flight")] = 2.0
    gap_ms: PosF = 1.0  # under load, a batch closes early once no request arrived for this long
    max_inflight_batches: Pos = 2  # a batch's feature fetch overlaps the previous batch's search
    # Admission control: requests a worker holds (queued + in flight) before it refuses more
    # with RESOURCE_EXHAUSTED (0: no bound). A request whose deadline the queue ahead of it
    # would miss (measured batch durations) is refused at once as well.
    max_pending: Annotated[NonNeg, Doc("requests a worker holds (queued + in flight) before it sheds "
                                       "(0: no bound)")] = 512
    # What a refused request gets: "degrade" (answered at once from memory: the bundle's
    # precomputed list for the user, else popularity, labelled with the reason) or "refuse"
    # (RESOURCE_EXHAUSTED with retry pushback, for clients that would rather retry elsewhere).
    shed_answer: Annotated[Literal["degrade", "refuse"],
                           Doc("what a shed request gets: an answer from memory, or RESOURCE_EXHAUSTED")] = "degrade"


@dataclass(frozen=True)
class RedisConfig:
    """The Redis feature store (``online.redis_store``): every store is built from one of these."""

    __pydantic_config__ = _PYDANTIC
    url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss://, unix://; redis+cluster://h:p,... for a cluster
    prefix: str = DEFAULT_PREFIX  # every key starts with this (publish and refresh use the same)
    max_connections: Pos = 32
    socket_timeout_ms: PosF = 200.0  # hard ceiling; each call also gets the remaining budget
    session_ttl_s: Pos = 7 * 24 * 3600
    session_cap: Pos = 100  # events kept per user
    stream_maxlen: Pos = STREAM_MAXLEN  # the impression log: XADD MAXLEN ~ (towers.store_format)
    # The event log's safety cap per stream, in bytes (0: none). Consumers trim what they have
    # acknowledged; past this the oldest entries go unread, counted (towers.store_format).
    events_max_bytes: NonNeg = STREAM_MAX_BYTES  # 0, or at least 64 KiB (checked in ServeConfig.validate)
    impressions_max_bytes: NonNeg = IMPRESSIONS_MAX_BYTES  # the impression log's byte cap (0: none)


@dataclass(frozen=True)
class WorkersConfig:
    """Multi-process serving (``twotower serve --workers N``) and scheduled recycling.
    A threshold of 0 disables that trigger."""

    __pydantic_config__ = _PYDANTIC
    workers: Annotated[Pos, Doc("server processes sharing the port (SO_REUSEPORT)")] = 1
    max_age_s: Annotated[NonNegF, Doc("recycle a worker older than this (0: never)")] = 0.0
    max_requests: Annotated[NonNeg, Doc("recycle a worker after this many Recommend calls (0: never)")] = 0
    max_rss_mb: Annotated[NonNegF, Doc("recycle a worker whose resident memory exceeds this (0: never)")] = 0.0
    drain_grace_s: Annotated[NonNegF, Doc("time in-flight RPCs get to finish on shutdown")] = 5.0
    check_interval_s: PosF = 1.0  # how often the supervisor looks at its workers
    # Workers load a new version one at a time (a swap holds two bundles in memory: N workers
    # swapping together would need N extra copies at once). False: each as soon as it sees it.
    swap_one_at_a_time: bool = True


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS on the serving (and admin) port; both empty: plaintext.
    ``client_ca`` set: mutual TLS, clients must present a certificate that CA signed.
    Checked at start by ``online.tls.load_server_tls`` (errors name the flag and file)."""

    __pydantic_config__ = _PYDANTIC
    cert: Annotated[str, Doc("PEM server certificate (chain): serve TLS")] = ""
    key: Annotated[str, Doc("PEM private key of the certificate (unencrypted)")] = ""
    client_ca: Annotated[str, Doc("PEM CA bundle: mutual TLS, clients must present a certificate it signed")] = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)


@dataclass(frozen=True)
class ServeConfig:
    __pydantic_config__ = _PYDANTIC
    host: Annotated[str, Doc("address the gRPC (and metrics) server binds")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535), Doc("gRPC port (0: a free one)")] = 50051
    feature_store: Annotated[Literal["memory", "redis"], Doc("where user embeddings and sessions live")] = "memory"
    redis: RedisConfig = field(default_factory=RedisConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    default_k: Pos = 10  # at most max_k
    max_k: Pos = 200
    max_session_items: int = 1000  # request-supplied recent + cart items
    max_exclude_items: int = 10_000
    max_id_length: int = 256
    max_events_per_call: Annotated[int, Field(ge=1, le=16384)] = 10_000  # the session order's tie-break: 14 bits
    max_event_skew_s: NonNeg = 3600  # event timestamps may run this far ahead of the server's clock
    max_message_bytes: int = 8 * 1024 * 1024  # larger messages are refused by gRPC itself
    # HTTP/2 streams one client connection may have open at once (0: gRPC's default, no
    # limit). Past it the client's own channel queues the call: under overload the wait is
    # spent (and the deadline runs out) on the client, not in this server's queue.
    max_concurrent_streams: NonNeg = 0
    variant: str = "control"
    impression_sample_rate: Share = 0.01  # share of served responses logged to the impression stream
    warmup: bool = True  # send synthetic requests down every path before reporting SERVING
    registry_poll_s: float = 1.0  # how often CURRENT is checked for a new version (0: never)
    # The deadline of a Recommend call that carries none (0: none): without one, an overloaded
    # worker could hold it forever.
    default_deadline_ms: Annotated[NonNegF, Doc("deadline of a Recommend call that carries none (0: none)")] = 1000.0
    # How often a Redis-backed server reads the event log's state and the refresh's last run
    # into its metrics (online/log_signals.py; 0: never).
    log_signals_s: NonNegF = 15.0
    admin_host: Annotated[str, Doc("address of the admin service (localhost unless told otherwise)")] = "127.0.0.1"
    admin_port: Annotated[int, Field(ge=-1, le=65535),
                          Doc("admin gRPC port (-1: no admin service; 0: a free one)")] = -1
    # A file holding the admin bearer token (a mounted secret; env TWOTOWER_ADMIN_TOKEN also works).
    # Required when admin_host is not loopback (online.admin_auth); never put the token itself here.
    admin_token_file: Annotated[str, Doc("file holding the admin bearer token (a mounted secret)")] = ""
    # Prometheus /metrics over plain HTTP on ``host``: -1 none (and no metrics collected), 0 a free
    # port. With workers, the supervisor serves every worker's values on it (online.metrics).
    metrics_port: Annotated[int, Field(ge=-1, le=65535),
                            Doc("Prometheus /metrics over HTTP (-1: none; 0: a free port); with workers, one "
                                "endpoint for all")] = -1
    log_format: Annotated[Literal["text", "json"],
                          Doc("json: one JSON object per line (time, level, logger, message, request fields)")] = "text"
    search_threads: Pos = 2
    # FAISS uses BLAS for exact search only from this many queries at once. The wheel's
    # default (128000) means never; batches of >= 20 queries are much faster with BLAS,
    # and single queries stay on the direct path (MACHINE-FACTS; bench/results).
    search_blas_threshold: int = 20
    # OpenMP threads per FAISS call. Parallelism comes from batches in flight over
    # ``search_threads``; on 2 cores, OpenMP teams spin-wait between calls and stole the CPU
    # the event loop needed: single-query p50 went from ~2 ms to ~13 ms at 2 threads (bench).
    search_omp_threads: Pos = 1
    # gRPC transport: "aio" (grpc.aio, handlers on the event loop) or "sync" (grpc.server with
    # ``sync_threads`` pool threads, each waiting for the service on the event loop). Measured
    # with the real handler in the benchmark's ``paths`` scenario; the default is the faster.
    transport: Annotated[Literal["aio", "sync"],
                         Doc("gRPC server: grpc.aio, or the sync server with a thread pool")] = "aio"
    sync_threads: Pos = 256  # at least the concurrency that should batch: a waiting call holds a thread
    # A/B flags (towers.flags): a YAML file of experiments, re-read every registry_poll_s
    # (online.experiments). "": no experiments, every request gets CURRENT and ``variant``.
    flags_file: Annotated[str, Doc("A/B flags file (YAML; `twotower ab validate`): re-read every registry poll")] = ""
    # Bound on the bundles kept resident for the flags (CURRENT plus every pinned version,
    # counted by their files' bytes in the manifest); a flags file over it is refused. 0: none.
    max_resident_mb: Annotated[NonNegF, Doc("refuse flags whose resident versions (CURRENT + pinned) exceed this "
                                            "(0: no limit)")] = 0.0
    max_shadow_inflight: NonNeg = 1  # shadow batches running at once; more are dropped (and counted)
    shadow_time_share: Share = 0.1  # shadow batches may take at most this share of wall time
    assignment_cache: NonNeg = 100_000  # users whose assignment is remembered (per flags file)

    def validate(self) -> ServeConfig:
        """Every setting against its declaration, then what spans settings; ConfigError naming
        the first bad one by its dotted path."""
        try:
            _ADAPTER.validate_python(self)
        except ValidationError as e:
            raise _config_error(e) from None
        checks = [
            ("default_k", self.default_k <= self.max_k, "must be in 1..max_k"),
            *((f"redis.{name}", getattr(self.redis, name) == 0 or getattr(self.redis, name) >= 1 << 16,
               "must be 0 (no cap) or >= 65536") for name in ("impressions_max_bytes", "events_max_bytes")),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(name, msg)
        return self


_ADAPTER = TypeAdapter(ServeConfig)


def _config_error(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "config"
    msg = "unknown setting" if err["type"] == "unexpected_keyword_argument" else err["msg"]
    return ConfigError(loc, msg)


def load_config(path: Path | None = None, **overrides: Any) -> ServeConfig:
    """Defaults ← JSON file ← explicit overrides (flags); ``batching__max_batch_size`` style
    keys reach nested settings."""
    cfg = ServeConfig()
    if path is not None:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from e
        try:
            cfg = _ADAPTER.validate_json(text)
        except ValidationError as e:
            if e.errors()[0]["type"] == "json_invalid":
                raise ConfigError("--config", f"{path} is not valid JSON: {e.errors()[0]['msg']}") from None
            raise _config_error(e) from None
    for key, value in overrides.items():
        if value is None:
            continue
        if "__" in key:
            outer, inner = key.split("__", 1)
            cfg = replace(cfg, **{outer: replace(getattr(cfg, outer), **{inner: value})})
        else:
            cfg = replace(cfg, **{key: value})
    return cfg.validate()
