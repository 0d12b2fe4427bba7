"""Serving configuration: typed, documented, validated once at the edge
(``twotower serve`` flags and an optional JSON config file) and passed down."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX


@dataclass(frozen=True)
class BudgetConfig:
    """Latency budget in milliseconds (DESIGN §4), capped by the client's deadline."""

    total_ms: float = 100.0
    network_ms: float = 10.0  # reserved for the way back to the client
    fetch_ms: float = 30.0  # feature fetch + preprocessing
    inference_ms: float = 50.0  # combiner + ANN search
    post_ms: float = 10.0  # filtering + serialisation
    min_search_ms: float = 2.0  # below this much time left, skip the search: serve batch recs


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64  # 1 turns batching off
    max_wait_ms: float = 2.0  # only while another batch is in flight; idle requests go at once
    gap_ms: float = 1.0  # under load, a batch closes early once no request arrived for this long
    max_inflight_batches: int = 2  # a batch's feature fetch overlaps the previous batch's search
    # Admission control: requests a worker holds (queued + in flight) before it refuses more
    # with RESOURCE_EXHAUSTED (0: no bound). A request whose deadline the queue ahead of it
    # would miss (measured batch durations) is refused at once as well.
    max_pending: int = 512
    # What a refused request gets: "degrade" (answered at once from memory: the bundle's
    # precomputed list for the user, else popularity, labelled with the reason) or "refuse"
    # (RESOURCE_EXHAUSTED with retry pushback, for clients that would rather retry elsewhere).
    shed_answer: str = "degrade"


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = DEFAULT_PREFIX
    max_connections: int = 32
    socket_timeout_ms: float = 200.0  # hard ceiling; each call also gets the remaining budget
    session_ttl_s: int = 7 * 24 * 3600
    session_cap: int = 100  # events kept per user
    stream_maxlen: int = 10_000_000  # the impression log: XADD MAXLEN ~ (towers.store_format)
    # The event log's safety cap per stream, in bytes (0: none). Consumers trim what they have
    # acknowledged; past this the oldest entries go unread, counted (towers.store_format).
    events_max_bytes: int = 1 << 30
    impressions_max_bytes: int = 256 << 20  # the impression log's byte cap (0: none), beside stream_maxlen


@dataclass(frozen=True)
class WorkersConfig:
    """Multi-process serving (``twotower serve --workers N``) and scheduled recycling.
    A threshold of 0 disables that trigger."""

    workers: int = 1
    max_age_s: float = 0.0  # recycle a worker older than this
    max_requests: int = 0  # ... or that has served this many Recommend calls
    max_rss_mb: float = 0.0  # ... or whose resident memory exceeds this
    drain_grace_s: float = 5.0  # in-flight work gets this long to finish on shutdown
    check_interval_s: float = 1.0  # how often the supervisor looks at its workers
    # Workers load a new version one at a time (a swap holds two bundles in memory: N workers
    # swapping together would need N extra copies at once). False: each as soon as it sees it.
    swap_one_at_a_time: bool = True


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS on the serving (and admin) port; both empty: plaintext.
    ``client_ca`` set: mutual TLS, clients must present a certificate that CA signed.
    Checked at start by ``online.tls.load_server_tls`` (errors name the flag and file)."""

    cert: str = ""  # server certificate chain (--tls-cert)
    key: str = ""  # its unencrypted private key (--tls-key)
    client_ca: str = ""  # CA bundle for client certificates (--tls-client-ca)

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    feature_store: str = "memory"  # memory | redis
    redis: RedisConfig = field(default_factory=RedisConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    default_k: int = 10
    max_k: int = 200
    max_session_items: int = 1000  # request-supplied recent + cart items
    max_exclude_items: int = 10_000
    max_id_length: int = 256
    max_events_per_call: int = 10_000  # at most 16384: the session order's tie-break has 14 bits
    max_event_skew_s: int = 3600  # event timestamps may run this far ahead of the server's clock
    max_message_bytes: int = 8 * 1024 * 1024  # larger messages are refused by gRPC itself
    # HTTP/2 streams one client connection may have open at once (0: gRPC's default, no
    # limit). Past it the client's own channel queues the call: under overload the wait is
    # spent (and the deadline runs out) on the client, not in this server's queue.
    max_concurrent_streams: int = 0
    variant: str = "control"
    impression_sample_rate: float = 0.01  # share of served responses logged to the impression stream
    warmup: bool = True  # send synthetic requests down every path before reporting SERVING
    registry_poll_s: float = 1.0  # how often CURRENT is checked for a new version (0: never)
    # The deadline of a Recommend call that carries none (0: none): without one, an overloaded
    # worker could hold it forever.
    default_deadline_ms: float = 1000.0
    # How often a Redis-backed server reads the event log's state and the refresh's last run
    # into its metrics (online/log_signals.py; 0: never).
    log_signals_s: float = 15.0
    admin_host: str = "127.0.0.1"  # the admin surface stays on localhost unless told otherwise
    admin_port: int = -1  # -1: no admin service; 0: a free port
    # A file holding the admin bearer token (a mounted secret; env TWOTOWER_ADMIN_TOKEN also works).
    # Required when admin_host is not loopback (online.admin_auth); never put the token itself here.
    admin_token_file: str = ""
    # Prometheus /metrics over plain HTTP on ``host``: -1 none (and no metrics collected), 0 a free
    # port. With workers, the supervisor serves every worker's values on it (online.metrics).
    metrics_port: int = -1
    log_format: str = "text"  # text | json (one JSON object per line: online.logs)
    search_threads: int = 2
    # FAISS uses BLAS for exact search only from this many queries at once. The wheel's
    # default (128000) means never; batches of >= 20 queries are much faster with BLAS,
    # and single queries stay on the direct path (MACHINE-FACTS; bench/results).
    search_blas_threshold: int = 20
    # OpenMP threads per FAISS call. Parallelism comes from batches in flight over
    # ``search_threads``; on 2 cores, OpenMP teams spin-wait between calls and stole the CPU
    # the event loop needed: single-query p50 went from ~2 ms to ~13 ms at 2 threads (bench).
    search_omp_threads: int = 1
    # gRPC transport: "aio" (grpc.aio, handlers on the event loop) or "sync" (grpc.server with
    # ``sync_threads`` pool threads, each waiting for the service on the event loop). Measured
    # with the real handler in the benchmark's ``paths`` scenario; the default is the faster.
    transport: str = "aio"
    sync_threads: int = 256  # at least the concurrency that should batch: a waiting call holds a thread
    # A/B flags (towers.flags): a YAML file of experiments, re-read every registry_poll_s
    # (online.experiments). "": no experiments, every request gets CURRENT and ``variant``.
    flags_file: str = ""
    # Bound on the bundles kept resident for the flags (CURRENT plus every pinned version,
    # counted by their files' bytes in the manifest); a flags file over it is refused. 0: none.
    max_resident_mb: float = 0.0
    max_shadow_inflight: int = 1  # shadow batches running at once; more are dropped (and counted)
    shadow_time_share: float = 0.1  # shadow batches may take at most this share of wall time
    assignment_cache: int = 100_000  # users whose assignment is remembered (per flags file)

    def validate(self) -> ServeConfig:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in 0..65535"),
            ("feature_store", self.feature_store in ("memory", "redis"), "must be 'memory' or 'redis'"),
            ("max_k", self.max_k >= 1, "must be >= 1"),
            ("default_k", 1 <= self.default_k <= self.max_k, "must be in 1..max_k"),
            ("batching.max_batch_size", self.batching.max_batch_size >= 1, "must be >= 1"),
            ("batching.max_wait_ms", self.batching.max_wait_ms >= 0, "must be >= 0"),
            ("batching.gap_ms", self.batching.gap_ms > 0, "must be > 0"),
            ("batching.max_inflight_batches", self.batching.max_inflight_batches >= 1, "must be >= 1"),
            ("budget.total_ms", self.budget.total_ms > 0, "must be > 0"),
            ("workers.workers", self.workers.workers >= 1, "must be >= 1"),
            *((f"workers.{name}", getattr(self.workers, name) >= 0, "must be >= 0 (0 disables)")
              for name in ("max_age_s", "max_requests", "max_rss_mb", "drain_grace_s")),
            ("workers.check_interval_s", self.workers.check_interval_s > 0, "must be > 0"),
            ("search_threads", self.search_threads >= 1, "must be >= 1"),
            ("max_events_per_call", 1 <= self.max_events_per_call <= 16384, "must be in 1..16384"),
            ("max_event_skew_s", self.max_event_skew_s >= 0, "must be >= 0"),
            ("search_omp_threads", self.search_omp_threads >= 1, "must be >= 1"),
            ("transport", self.transport in ("aio", "sync"), "must be 'aio' or 'sync'"),
            ("impression_sample_rate", 0.0 <= self.impression_sample_rate <= 1.0, "must be in [0, 1]"),
            ("redis.stream_maxlen", self.redis.stream_maxlen >= 1, "must be >= 1"),
            ("log_signals_s", self.log_signals_s >= 0, "must be >= 0 (0: never)"),
            ("redis.impressions_max_bytes", self.redis.impressions_max_bytes == 0
             or self.redis.impressions_max_bytes >= 1 << 16, "must be 0 (no cap) or >= 65536"),
            ("default_deadline_ms", self.default_deadline_ms >= 0, "must be >= 0 (0: none)"),
            ("max_concurrent_streams", self.max_concurrent_streams >= 0, "must be >= 0 (0: no limit)"),
            ("batching.max_pending", self.batching.max_pending >= 0, "must be >= 0 (0: no bound)"),
            ("batching.shed_answer", self.batching.shed_answer in ("degrade", "refuse"),
             "must be 'degrade' or 'refuse'"),
            ("redis.events_max_bytes", self.redis.events_max_bytes == 0 or self.redis.events_max_bytes >= 1 << 16,
             "must be 0 (no cap) or >= 65536"),
            ("sync_threads", self.sync_threads >= 1, "must be >= 1"),
            ("max_resident_mb", self.max_resident_mb >= 0, "must be >= 0 (0: no limit)"),
            ("max_shadow_inflight", self.max_shadow_inflight >= 0, "must be >= 0 (0: shadows never run)"),
            ("shadow_time_share", 0.0 <= self.shadow_time_share <= 1.0, "must be in [0, 1] (0: shadows never run)"),
            ("assignment_cache", self.assignment_cache >= 0, "must be >= 0"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "must be -1 (none), 0 (a free port) or a port"),
            ("log_format", self.log_format in ("text", "json"), "must be 'text' or 'json'"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(name, msg)
        return self


def _from_dict(cls: Any, d: dict[str, Any], path: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known:
            raise ConfigError(f"{path}{k}", "unknown setting")
        default = getattr(cls(), k)
        if hasattr(default, "__dataclass_fields__"):
            if not isinstance(v, dict):
                raise ConfigError(f"{path}{k}", "expected an object")
            kwargs[k] = _from_dict(type(default), v, f"{path}{k}.")
        else:
            if not isinstance(v, type(default)) and not (isinstance(default, float) and isinstance(v, int)):
                raise ConfigError(f"{path}{k}", f"expected {type(default).__name__}, got {type(v).__name__}")
            kwargs[k] = v
    return cls(**kwargs)


def load_config(path: Path | None = None, **overrides: Any) -> ServeConfig:
    """Defaults ← JSON file ← explicit overrides (flags); ``batching__max_batch_size`` style
    keys reach nested settings."""
    cfg = ServeConfig()
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from e
        except ValueError as e:
            raise ConfigError("--config", f"{path} is not valid JSON: {e}") from e
        cfg = _from_dict(ServeConfig, data, "")
    for key, value in overrides.items():
        if value is None:
            continue
        if "__" in key:
            outer, inner = key.split("__", 1)
            cfg = replace(cfg, **{outer: replace(getattr(cfg, outer), **{inner: value})})
        else:
            cfg = replace(cfg, **{key: value})
    return cfg.validate()
