"""``twotower serve --workers N``: a supervisor of server worker processes.

It follows gRPC's multiprocessing pattern (grpc ``examples/python/multiprocessing``):
the supervisor creates no gRPC object at all, and each worker is a *spawned*
interpreter that runs its own ``grpc.aio`` server on the same port with
SO_REUSEPORT, so the kernel spreads new connections over the workers.

The supervisor restarts a worker that dies unexpectedly and recycles workers one
at a time when one crosses a threshold (age, requests served, resident memory):
the replacement is started first and must report SERVING (loaded and warmed)
before the old worker is asked to drain, so capacity never drops below N.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

# Deliberately no grpc / online.server import at module level: spawned workers import
# this module to find their entry point, and the supervisor must stay gRPC-free.
from online.config import ServeConfig
from online.exporter import mark_dead, start_supervisor_exporter
from online.logs import configure_logging
from online.ports import admin_port_for, check_admin_ports, check_port_free, pick_port
from online.supervision_shared import SharedSupervision, SwapTurn, remove_swap_lock, swap_lock_path
from towers.errors import TwoTowerError

log = logging.getLogger("twotower.supervisor")
LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
KILL_MARGIN_S = 5.0  # beyond drain_grace_s: closing the service, interpreter exit
START_TIMEOUT_S = 300.0  # a replacement that is not SERVING by then is killed
REPORT_INTERVAL_S = 0.1  # how often a worker publishes its requests-served count
MAX_BACKOFF_S = 30.0  # ceiling of the delay before restarting a worker that keeps failing to start
CRASH_WINDOW_S = 60.0  # deaths of SERVING workers this close together are a crash loop (a query of death)


# -- worker side ------------------------------------------------------------------

def _worker_main(cfg: ServeConfig, registry: Path, ready: Connection, served: Synchronized[int],
                 parent_pid: int, log_level: int, admin_port: int, supervision: SharedSupervision) -> None:
    """Entry point of a spawned worker process."""
    # Ctrl-C reaches the whole process group; only the supervisor acts on it (it then
    # SIGTERMs each worker), so a worker never dies mid-request from a terminal's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(level=log_level, fmt=cfg.log_format, text_format=LOG_FORMAT)
    import asyncio

    from online.server import start_server

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Installed before start_server: a SIGTERM during load/warmup drains as soon as it is up.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # bind_early=False: bind the shared port only once loaded and warm. The kernel spreads
        # new connections over every listener, and one that is still loading could only refuse
        # them (a retry stays on the same connection, so it would fail again).
        turn = SwapTurn(swap_lock_path(parent_pid)) if cfg.workers.swap_one_at_a_time else None
        running = await start_server(cfg, registry=registry, bind_early=False, reuse_port=True,
                                     admin_port=admin_port, swap_turn=turn, supervision=supervision)
        # Warmup requests went through the same counter; recycle on real traffic only.
        baseline = running.service.requests_served
        ready.send("serving")
        ready.close()
        log.info("worker serving on port %d", running.port)
        while not stop.is_set():
            served.value = running.service.requests_served - baseline
            running.service.metrics.sample()  # multiprocess gauges: queue depth, batches in flight
            if os.getppid() != parent_pid:  # orphaned (supervisor SIGKILLed): do not serve forever
                log.warning("supervisor %d is gone; draining", parent_pid)
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_INTERVAL_S)
        grace = cfg.workers.drain_grace_s
        log.info("draining (grace %.1f s) after %d requests", grace, running.service.requests_served - baseline)
        # stop(): health NOT_SERVING, refuse new RPCs, let in-flight ones finish within grace.
        await running.stop(grace=grace)
        running.service.metrics.flush()  # the drain's last batches, into the multiprocess files

    asyncio.run(serve())


# -- supervisor side --------------------------------------------------------------

@dataclass
class Worker:
    slot: int
    proc: BaseProcess
    ready_conn: Connection
    served: Synchronized[int]
    started: float  # time.monotonic() at spawn
    ready: bool = False
    requested: bool = False  # we asked it to exit: its exit is not a crash
    kill_at: float = 0.0  # SIGKILL after this if it is still draining
    replaces: Worker | None = None  # set on a recycle's replacement until the old one is told to go
    admin_port: int = -1  # its own admin service (-1: none; 0: a free port)

    @property
    def pid(self) -> int:
        return int(self.proc.pid or 0)


@dataclass
class SupervisorStats:
    """Counters a test (or a log line) can read."""

    started: int = 0  # worker processes spawned
    restarts: int = 0  # unexpected worker deaths answered with a restart (at once or after a backoff)
    recycles: int = 0  # scheduled recycles completed (old worker drained and gone)
    recycle_reasons: dict[str, int] = field(default_factory=dict)  # age | requests | rss
    failed_starts: int = 0  # workers that exited before reporting SERVING
    kills: int = 0  # workers SIGKILLed for not finishing their drain in time
    recycle_backoff_s: float = 0.0  # the last pause scheduled after a failed recycle replacement
    restart_backoff_s: float = 0.0  # the pause before the pending restart (0: none waiting)
    crash_loop: bool = False  # workers keep dying: restarts wait out a growing backoff
    monitor_errors: int = 0  # exceptions the monitor loop survived


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` from /proc (Linux); None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class Supervisor:
    """Starts ``cfg.workers.workers`` server processes and keeps them healthy from a
    background monitor thread. ``start()`` returns at once; ``wait_until_serving``
    blocks until every slot has a SERVING worker; ``stop()`` drains them all."""

    def __init__(self, cfg: ServeConfig, registry: Path, *, log_level: int | None = None) -> None:
        cfg.validate()  # workers.* included: a Supervisor may be built without load_config
        if cfg.port:
            check_port_free(cfg.host, cfg.port)
        self.cfg = replace(cfg, port=cfg.port or pick_port(cfg.host))
        check_admin_ports(self.cfg)
        self.wcfg = cfg.workers
        self.registry = registry
        self.stats = SupervisorStats()
        self._log_level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no gRPC state inherited, ever
        self.shared = SharedSupervision(self._ctx)  # what each worker's admin status shows
        self.shared.publish(workers=self.wcfg.workers)
        self._lock = threading.Lock()  # guards _workers/_pending/stats against readers in other threads
        self._workers: list[Worker] = []
        self._pending: list[tuple[int, float]] = []  # (slot, not before): restarts waiting out a backoff
        self._fail_streak = 0  # consecutive workers that died before SERVING (drives the backoff)
        self._deaths: list[float] = []  # when SERVING workers died unexpectedly, within CRASH_WINDOW_S
        self._recycle_not_before = 0.0  # after a failed replacement, the next recycle waits out a backoff
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)  # wakes the monitor out of wait() on stop
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.cfg.port

    @property
    def target(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def pids(self) -> list[int]:
        """Live workers not asked to exit (N, or N+1 while a replacement warms up)."""
        with self._lock:
            return [w.pid for w in sorted(self._workers, key=lambda w: w.slot) if not w.requested]

    def slots(self) -> list[tuple[int, int]]:
        """(slot, pid) of every live worker, draining ones included (per-worker metrics)."""
        with self._lock:
            return [(w.slot, w.pid) for w in self._workers if w.proc.exitcode is None]

    def admin_ports(self) -> list[int]:
        """The admin port of each live worker not asked to exit (-1: none)."""
        with self._lock:
            return [w.admin_port for w in sorted(self._workers, key=lambda w: w.slot) if not w.requested]

    def served(self) -> dict[int, int]:
        """Requests served per worker pid, as last reported (warmup excluded)."""
        with self._lock:
            return {w.pid: int(w.served.value) for w in self._workers if not w.requested}

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            for slot in range(self.wcfg.workers):
                self._spawn(slot)
        self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)
        self._thread.start()
        log.info("supervisor started %d workers on %s", self.wcfg.workers, self.target)

    def wait_until_serving(self, timeout: float) -> bool:
        """True once every slot has a SERVING worker; False if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                slots = {w.slot for w in self._workers if w.ready and not w.requested}
            if len(slots) == self.wcfg.workers:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Drain every worker (SIGTERM; SIGKILL after drain_grace_s + margin) and return."""
        self._stopping.set()
        self._wake_w.send(None)
        if self._thread is not None:
            self._thread.join()  # from here on nothing restarts or recycles
        with self._lock:
            now = time.monotonic()
            for w in self._workers:
                self._terminate(w, now)
            for w in self._workers:
                w.proc.join(max(0.0, w.kill_at - time.monotonic()))
                if w.proc.exitcode is None:
                    log.warning("worker %d did not drain in time; killing it", w.pid)
                    w.proc.kill()
                    self.stats.kills += 1
                    w.proc.join(10)
                w.ready_conn.close()
            self._workers.clear()
            self._pending.clear()
        remove_swap_lock(swap_lock_path(os.getpid()))
        log.info("supervisor stopped: %s", self.stats)

    # -- internals (called with self._lock held) ---------------------------------
    def _spawn(self, slot: int, replaces: Worker | None = None) -> Worker:
        ready_r, ready_w = self._ctx.Pipe(duplex=False)
        served: Synchronized[int] = self._ctx.Value("q", 0)
        admin_port = self._admin_port(slot)
        proc = self._ctx.Process(target=_worker_main, name=f"twotower-worker-{slot}", daemon=True,
                                 args=(self.cfg, self.registry, ready_w, served, os.getpid(), self._log_level,
                                       admin_port, self.shared))
        proc.start()
        ready_w.close()  # the child holds the only write end: its exit reads as EOF here
        w = Worker(slot, proc, ready_r, served, time.monotonic(), replaces=replaces, admin_port=admin_port)
        self._workers.append(w)
        self.stats.started += 1
        log.info("started worker %d (slot %d%s)", w.pid, slot, f", replacing {replaces.pid}" if replaces else "")
        return w

    def _admin_port(self, slot: int) -> int:
        held = {w.admin_port for w in self._workers if w.slot == slot and w.proc.exitcode is None}
        return admin_port_for(self.cfg.admin_port, workers=self.wcfg.workers, slot=slot, held=held)

    def snapshot(self) -> SupervisorStats:
        """A copy of the counters, consistent with each other (taken under the lock)."""
        with self._lock:
            return replace(self.stats, recycle_reasons=dict(self.stats.recycle_reasons))

    def _terminate(self, w: Worker, now: float) -> None:
        if w.proc.exitcode is None and not w.requested:
            w.proc.terminate()  # SIGTERM: the worker drains
        w.requested = True
        w.kill_at = now + self.wcfg.drain_grace_s + KILL_MARGIN_S

    def _recycle_reason(self, w: Worker, now: float) -> str | None:
        c = self.wcfg
        if c.max_age_s and now - w.started > c.max_age_s:
            return "age"
        if c.max_requests and w.served.value >= c.max_requests:
            return "requests"
        if c.max_rss_mb:
            rss = rss_mb(w.pid)
            if rss is not None and rss > c.max_rss_mb:
                return "rss"
        return None

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                waitables: list[Any] = [self._wake_r]
                waitables += [w.proc.sentinel for w in self._workers]
                waitables += [w.ready_conn for w in self._workers if not w.ready]
            # Wakes at once on a worker exit, a SERVING report or stop(); else every check_interval_s.
            wait(waitables, timeout=self.wcfg.check_interval_s)
            if self._stopping.is_set():
                return
            try:
                with self._lock:
                    self._tick(time.monotonic())
            except Exception:  # supervision must outlive its own bugs (a failed spawn, a /proc race)
                self.stats.monitor_errors += 1
                log.exception("supervisor monitor step failed; continuing")
                self._stopping.wait(min(self.wcfg.check_interval_s, 1.0))

    def _tick(self, now: float) -> None:
        for w in self._workers:
            if not w.ready and w.ready_conn.poll():
                try:
                    w.ready_conn.recv()
                except EOFError:
                    continue  # it exited before SERVING; reaped below
                w.ready = True
                self._fail_streak = 0
                log.info("worker %d is SERVING after %.1f s", w.pid, now - w.started)
        self._reap(now)
        for slot, not_before in list(self._pending):
            if now >= not_before:
                self._pending.remove((slot, not_before))
                self._spawn(slot)
        self.stats.crash_loop = bool(self._pending)
        self.stats.restart_backoff_s = max((nb - now for _, nb in self._pending), default=0.0)
        self._recycle_step(now)
        self.shared.publish(restarts=self.stats.restarts, failed_starts=self.stats.failed_starts,
                            crash_loop=self.stats.crash_loop, restart_backoff_s=self.stats.restart_backoff_s)

    def _reap(self, now: float) -> None:
        for w in [w for w in self._workers if w.proc.exitcode is not None]:
            self._workers.remove(w)
            w.proc.join()
            mark_dead(w.pid)  # its live gauges (serving, version) leave the sums; its counters stay
            w.ready_conn.close()
            code = w.proc.exitcode
            if w.requested:
                log.info("worker %d exited (code %s)", w.pid, code)
                if w.ready and any(r.slot == w.slot and r.ready for r in self._workers):
                    # Drained and its slot is served by the replacement: a completed recycle.
                    self.stats.recycles += 1
                    log.info("recycle of slot %d done (%d so far)", w.slot, self.stats.recycles)
                continue
            log.warning("worker %d died unexpectedly (exit code %s)", w.pid, code)
            if not w.ready:
                self.stats.failed_starts += 1
                self._fail_streak += 1
            else:
                self._deaths = [t for t in self._deaths if now - t < CRASH_WINDOW_S] + [now]
            successor = next((r for r in self._workers if r.replaces is w), None)
            if successor is not None:
                successor.replaces = None  # its replacement is already on the way: that is the restart
                self.stats.restarts += 1
            elif w.replaces is not None:
                # The old worker still crosses its threshold: without a pause the next tick would
                # spawn another replacement at once, and a bad bundle would spin the CPU.
                self.stats.recycle_backoff_s = max(self._backoff(), 0.5)
                self._recycle_not_before = now + self.stats.recycle_backoff_s
                log.warning("replacement for worker %d failed; it keeps serving; next recycle attempt in %.1f s",
                            w.replaces.pid, self._recycle_not_before - now)
            else:
                self.stats.restarts += 1
                # Back off when workers keep dying before SERVING (a bad bundle must not spin the CPU).
                delay = self._backoff()
                if delay:
                    log.warning("restarting slot %d in %.1f s", w.slot, delay)
                    self._pending.append((w.slot, now + delay))
                else:
                    self._spawn(w.slot)

    def _backoff(self) -> float:
        """0 for a first failure (a long-lived worker that crashes once restarts at once); then
        0.5 s doubling to MAX_BACKOFF_S, with +-20% jitter so replicas do not restart in step.
        Counts workers that died before SERVING in a row, and SERVING workers that died within
        CRASH_WINDOW_S of each other (a query of death would otherwise be a restart storm)."""
        now = time.monotonic()
        streak = max(self._fail_streak, len([t for t in self._deaths if now - t < CRASH_WINDOW_S]) - 1)
        if streak <= 0:
            return 0.0
        return min(MAX_BACKOFF_S, 0.5 * 2 ** (streak - 1)) * random.uniform(0.8, 1.2)

    def _recycle_step(self, now: float) -> None:
        """One recycle at a time: replacement SERVING first, then drain the old worker."""
        for w in self._workers:  # a drain past its deadline
            if w.requested and w.proc.exitcode is None and now > w.kill_at:
                log.warning("worker %d did not drain in %.1f s; killing it", w.pid, self.wcfg.drain_grace_s)
                w.proc.kill()
                self.stats.kills += 1
        if any(w.requested for w in self._workers):
            return  # the previous recycle's old worker is still draining
        new = next((w for w in self._workers if w.replaces is not None), None)
        if new is not None:
            old = new.replaces
            assert old is not None
            if new.ready:
                new.replaces = None
                log.info("replacement %d is SERVING; draining worker %d", new.pid, old.pid)
                self._terminate(old, now)
            elif now - new.started > START_TIMEOUT_S:
                log.warning("replacement %d not SERVING after %.0f s; giving up on it", new.pid, START_TIMEOUT_S)
                self._terminate(new, now)
            return
        if self._pending or now < self._recycle_not_before:
            return  # restore capacity before recycling anything; after a failed replacement, wait
        for w in sorted(self._workers, key=lambda w: w.started):
            reason = self._recycle_reason(w, now) if w.ready else None
            if reason is not None:
                self.stats.recycle_reasons[reason] = self.stats.recycle_reasons.get(reason, 0) + 1
                log.info("recycling worker %d on %s (age %.0f s, %d requests, rss %s MB)", w.pid, reason,
                         now - w.started, w.served.value, f"{rss_mb(w.pid) or 0:.0f}")
                self._spawn(w.slot, replaces=w)
                return


def run_supervisor(cfg: ServeConfig, registry: Path, *, startup_timeout_s: float = START_TIMEOUT_S) -> int:
    """The CLI's multi-worker serve: run until SIGTERM/SIGINT, then drain every worker."""
    from towers import registry as registry_mod

    registry_mod.current_path(registry)  # fail fast, in one line, if nothing is published
    if cfg.feature_store == "memory":
        log.warning("memory feature store with %d worker(s): sessions live per process and die with a "
                    "recycle; RecordEvents is refused with several workers (use --redis-url)", cfg.workers.workers)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sup = Supervisor(cfg, registry)
    # Before any worker spawns: the multiprocess directory goes into their environment.
    exporter = start_supervisor_exporter(host=sup.cfg.host, port=sup.cfg.metrics_port, workers=sup.slots,
                                         stats=sup.snapshot) if cfg.metrics_port >= 0 else None
    sup.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not stop.is_set() and not sup.wait_until_serving(0.5):
            if time.monotonic() > deadline or (sup.stats.failed_starts >= cfg.workers.workers):
                raise TwoTowerError(f"workers did not start serving ({sup.stats.failed_starts} failed; "
                                    "see the worker log above)")
        if not stop.is_set():
            print(f"serving {registry_mod.current_version(registry)} on {sup.target} with "
                  f"{cfg.workers.workers} workers ({cfg.feature_store} feature store)"
                  + (f"; metrics on http://{cfg.host}:{exporter.port}/metrics" if exporter else ""), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        sup.stop()
        if exporter is not None:
            exporter.close()
    return 0
