"""The ``/metrics`` endpoint and ``prometheus_client``'s multiprocess mode: the collectors
read at scrape time (each worker's RSS, the supervisor's counters), the multiprocess
directory the supervisor prepares before it spawns workers, and the HTTP exporter.
``online.metrics`` holds what the request path records; this module, how it is served.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "twotower_"


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process writes its values to files (a worker)."""
    return os.environ.get(MULTIPROC_ENV) or None


# -- process-level collectors -------------------------------------------------------------------

def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (Linux /proc); None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class WorkerCollector(Collector):
    """Each worker's resident memory, read when scraped. In multiprocess mode the exporter's
    own ``ProcessCollector`` would describe the supervisor only."""

    def __init__(self, workers: Callable[[], list[tuple[int, int]]]) -> None:
        self._workers = workers  # [(slot, pid)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # pid too: while a recycle's replacement warms up, two workers share a slot.
        g = GaugeMetricFamily(f"{PREFIX}worker_resident_memory_bytes", "Resident memory of each worker process.",
                              labels=["slot", "pid"])
        for slot, pid in self._workers():
            rss = rss_bytes(pid)
            if rss is not None:
                g.add_metric([str(slot), str(pid)], rss)
        yield g


class SupervisorCollector(Collector):
    """The supervisor's own counters (``online.supervisor.SupervisorStats``), read when scraped."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._stats()
        yield CounterMetricFamily(f"{PREFIX}worker_restarts", "Workers restarted after dying unexpectedly.",
                                  value=s.restarts)
        yield CounterMetricFamily(f"{PREFIX}worker_recycles", "Scheduled worker recycles completed.",
                                  value=s.recycles)
        yield CounterMetricFamily(f"{PREFIX}worker_failed_starts", "Workers that exited before SERVING.",
                                  value=s.failed_starts)
        yield GaugeMetricFamily(f"{PREFIX}supervisor_crash_loop", "1 while a worker restart waits out a backoff "
                                "because workers keep dying.", value=int(s.crash_loop))
        yield GaugeMetricFamily(f"{PREFIX}supervisor_restart_backoff_seconds", "Time left before the pending "
                                "worker restart.", value=s.restart_backoff_s)
        yield CounterMetricFamily(f"{PREFIX}supervisor_monitor_errors", "Exceptions the supervisor's monitor "
                                  "loop survived.", value=s.monitor_errors)


# -- multiprocess mode and the exporter ---------------------------------------------------------

def prepare_multiprocess_dir() -> tuple[Path, bool]:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory before any worker is spawned
    (workers inherit the environment). An operator's own setting is honoured but emptied:
    files of a previous run would add its counts to this one's. Otherwise a fresh temporary
    directory (``/tmp`` is the writable emptyDir in the Kubernetes pod). Returns the directory
    and whether it was created here (``cleanup_multiprocess_dir`` removes only that)."""
    existing = multiprocess_dir()
    if existing:
        path = Path(existing)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.glob("*.db"):
            f.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="twotower-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return path, not existing


def cleanup_multiprocess_dir(path: Path, *, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(MULTIPROC_ENV, None)


def mark_dead(pid: int) -> None:
    """A worker exited: its live gauges (serving, model_info, queue depth) leave the sums.
    Its counters and histograms stay: totals never go backwards over a recycle."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def supervisor_registry(path: Path, *, workers: Callable[[], list[tuple[int, int]]],
                        stats: Callable[[], Any]) -> CollectorRegistry:
    """What the supervisor's /metrics serves: every worker's values (dead ones' counters
    included), each worker's RSS, the supervisor's counters and its own process metrics."""
    from prometheus_client import ProcessCollector
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(WorkerCollector(workers))
    registry.register(SupervisorCollector(stats))
    ProcessCollector(registry=registry)
    return registry


@dataclass
class Exporter:
    """The /metrics HTTP endpoint (``prometheus_client``'s threaded WSGI server, a daemon thread)."""

    server: Any
    thread: Any

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_exporter(registry: CollectorRegistry, *, host: str, port: int) -> Exporter:
    """Serve ``registry`` on http://host:port/metrics (port 0: a free one). A port that cannot
    be bound is a ConfigError naming --metrics-port, before anything else starts."""
    from prometheus_client import start_http_server

    from towers.errors import ConfigError

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError("--metrics-port", f"cannot bind {host}:{port}: {e.strerror or e}") from e
    return Exporter(server, thread)


@dataclass
class SupervisorExporter:
    exporter: Any
    path: Path
    created: bool

    @property
    def port(self) -> int:
        return int(self.exporter.port)

    def close(self) -> None:
        self.exporter.close()
        cleanup_multiprocess_dir(self.path, created=self.created)


def start_supervisor_exporter(*, host: str, port: int, workers: Callable[[], list[tuple[int, int]]],
                              stats: Callable[[], Any]) -> SupervisorExporter:
    """One /metrics for the pod: prometheus_client's multiprocess mode (deploy/README.md says
    why). The directory is set in the environment the workers are spawned with."""
    path, created = prepare_multiprocess_dir()
    try:
        exporter = start_exporter(supervisor_registry(path, workers=workers, stats=stats), host=host, port=port)
    except BaseException:
        cleanup_multiprocess_dir(path, created=created)
        raise
    return SupervisorExporter(exporter, path, created)
