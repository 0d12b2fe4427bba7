"""Run a job on a cron schedule (the nightly refresh's ``--schedule``), in-process.

Why not the system cron: the refresh runs in a container with no crond, and an in-process
loop can be stopped cleanly (SIGTERM sets ``stop``; a wait ends at once, a running job is
let finish) and writes a report per run where an operator looks. The schedule is computed
with ``croniter`` from the clock after each run, so a run that overruns its next fire time
skips it rather than starting a burst of catch-up runs, and a failing job is logged and
reported while the schedule stays alive (tomorrow's run may well succeed).

Times are the clock's: the default clock is local time, timezone-aware (a container's local
time is UTC), and croniter follows DST in an aware zone. Tests pass a fake ``now`` and a
``sleep`` that advances it, so nothing really sleeps.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from offline.refresh.run_steps import write_bytes_atomic
from towers.errors import ConfigError

log = logging.getLogger(__name__)

SCHEDULE_FLAG = "--schedule"
# The longest single wait: the clock is read again after it, so a clock step (NTP, a
# suspended VM) delays a fire time by at most this much.
MAX_WAIT_S = 60.0


def local_now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


def next_fire_time(cron: str, after: _dt.datetime) -> _dt.datetime:
    """The first fire time of ``cron`` strictly after ``after``; ConfigError naming
    ``--schedule`` for an expression croniter does not accept."""
    from croniter import CroniterError, croniter

    try:
        nxt = croniter(cron, after).get_next(_dt.datetime)
    except (CroniterError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(SCHEDULE_FLAG, f"invalid cron expression {cron!r}: {e}") from e
    if not isinstance(nxt, _dt.datetime):
        raise ConfigError(SCHEDULE_FLAG, f"cron expression {cron!r} has no next fire time")
    return nxt


def validate_cron(cron: str) -> None:
    """Refuse a bad ``--schedule`` at startup rather than at the first fire time."""
    if not isinstance(cron, str) or not cron.strip():
        raise ConfigError(SCHEDULE_FLAG, "empty cron expression")
    next_fire_time(cron, _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc))


def _report_name(fire: _dt.datetime, report_dir: Path) -> Path:
    base = "run-" + fire.strftime("%Y%m%dT%H%M%S%z")
    path, n = report_dir / f"{base}.json", 1
    while path.exists():  # a clock stepped back may fire the same time twice: keep both
        n += 1
        path = report_dir / f"{base}-{n}.json"
    return path


def _write_report(report_dir: Path, fire: _dt.datetime, report: dict[str, Any]) -> Path | None:
    import json

    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        path = _report_name(fire, report_dir)
        write_bytes_atomic(path, (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode())
        return path
    except OSError as e:  # a full disk must not stop tomorrow's refresh
        log.error("schedule: cannot write the run report into %s: %s", report_dir, e)
        return None


def run_schedule(*, cron: str, job: Callable[[], dict[str, Any]], stop: threading.Event,
                 now: Callable[[], _dt.datetime] = local_now, sleep: Callable[[float], bool] | None = None,
                 report_dir: Path | None = None) -> int:
    """Run ``job`` at every fire time of ``cron`` until ``stop`` is set; returns the number of
    runs. ``sleep(seconds)`` waits and returns True when stopping (default ``stop.wait``).
    Each run writes ``report_dir/run-<fire time>.json``: fire time, start, end, duration,
    status ("ok" or "failed"), the job's result dict or the error. A job that raises is
    logged and reported; the loop goes on to the next fire time."""
    validate_cron(cron)
    wait = sleep if sleep is not None else stop.wait
    runs = 0
    while not stop.is_set():
        fire = next_fire_time(cron, now())
        log.info("schedule %r: next run at %s", cron, fire.isoformat())
        while True:
            remaining = (fire - now()).total_seconds()
            if remaining <= 0:
                break
            if wait(min(remaining, MAX_WAIT_S)) or stop.is_set():
                log.info("schedule %r: stopped", cron)
                return runs
        started, t0 = now(), time.perf_counter()
        report: dict[str, Any] = {"cron": cron, "scheduled": fire.isoformat(), "started": started.isoformat()}
        try:
            result = job()
            report.update(status="ok", result=result)
        except Exception as e:  # the schedule outlives one bad night
            log.exception("schedule %r: the run scheduled at %s failed", cron, fire.isoformat())
            report.update(status="failed", error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=20))
        runs += 1
        report.update(finished=now().isoformat(), duration_s=round(time.perf_counter() - t0, 6))
        if report_dir is not None:
            _write_report(report_dir, fire, report)
    return runs
