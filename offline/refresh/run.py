"""One refresh run, start to end: the lock, the run directory, the steps in order with a
checkpoint after each (``--resume`` continues a crashed run), the report, and train mode's
fallback to an embed run when the gate refuses the retrained model."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from offline.event_log import EventLog
from offline.refresh.config import STEPS, RefreshConfig
from offline.refresh.job import Job
from offline.refresh.run_lock import RefreshLock
from offline.refresh.run_steps import RunDir, write_json_atomic
from towers import registry as registry_mod
from towers.errors import ConfigError, FeatureStoreError, RegistryError
from towers.store_format import redact_url

Fault = Callable[[str], None]


def _no_fault(_: str) -> None:
    pass


def refresh(cfg: RefreshConfig, *, resume: Path | None = None, fault: Fault = _no_fault,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) one refresh; returns its report (also ``RUNS/reports/RUN.json``).

    Train mode with ``train_fallback``: when the gate refuses the retrained candidate, an embed
    run follows on the same (unacknowledged) events, so the night still publishes fresh user
    vectors from CURRENT's towers; its report carries the refused one as ``fallback_from``.
    ``fault(point)`` is a test hook called after each step's checkpoint (``after:<step>``)."""
    report = _refresh_once(cfg, resume=resume, fault=fault, progress=progress, log=log)
    steps = {s["name"]: s["result"] for s in report["steps"]}
    if cfg.mode == "train" and cfg.train_fallback and steps.get("evaluate", {}).get("passed") is False:
        log("refresh: the retrained candidate was refused; re-embedding with CURRENT's towers instead")
        report = {**_refresh_once(replace(cfg, mode="embed"), resume=None, fault=fault, progress=progress, log=log),
                  "fallback_from": report}
    return report


def _refresh_once(cfg: RefreshConfig, *, resume: Path | None, fault: Fault, progress: bool,
                  log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    current = registry_mod.current_version(cfg.registry)
    if current is None:
        raise RegistryError(f"{cfg.registry}: no CURRENT version to refresh")
    lock = RefreshLock(redis_url=cfg.redis_url, key=f"{cfg.prefix}:refresh:lock", ttl_ms=cfg.lock_ttl_ms)
    lock.acquire()  # before any run directory exists: a refused start leaves nothing behind
    results: dict[str, dict[str, Any]] = {}
    try:
        run = RunDir.open(resume) if resume is not None else RunDir.create(
            cfg.run_root, params={**{k: str(v) for k, v in asdict(cfg).items()}, "parent": current,
                                  "redis_url": redact_url(cfg.redis_url)})  # run.json is on a shared volume
        parent = str(run.params.get("parent", current))
        if resume is not None:
            for name, flag in (("mode", "--mode"), ("engine", "--engine")):
                if str(run.params.get(name, getattr(cfg, name))) != str(getattr(cfg, name)):
                    raise ConfigError(flag, f"run {run.run_id} was started with {flag} {run.params.get(name)}; "
                                            f"resume it with the same")
        job = Job(cfg, run, parent, lock, log)
        bar = tqdm(STEPS, desc=f"refresh {run.run_id}", unit="step", disable=not progress)
        for step in bar:
            bar.set_postfix_str(step)
            result = results[step] = run.run_step(step, getattr(job, step))
            fault(f"after:{step}")
            if step == "read" and result["events"] == 0 and result["entries"] == 0:
                log("refresh: no new events; nothing to publish")
                break
    finally:
        lock.release()
        lock.close()
        _record_run(cfg, results, log)
    # The run ended (published, refused, or nothing to do): its directory (the events read,
    # the candidate bundle) is no longer needed for a resume. Only its report is kept.
    report_path = cfg.run_root / "reports" / f"{run.run_id}.json"
    report = {**run.report(), "run_dir": str(run.path), "report": str(report_path), "mode": cfg.mode,
              "parent": parent}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_path, report)
    shutil.rmtree(run.path)
    return report


def _record_run(cfg: RefreshConfig, results: dict[str, dict[str, Any]], log: Callable[[str], None]) -> None:
    """The run's outcome in Redis for the servers' metrics (``EventLog.record_run``); a run
    that raised is "failed". Best effort: a Redis that is down must not hide the run's error."""
    pub = results.get("publish")
    if "gc" in results:
        outcome = "published" if pub and pub.get("published") else "refused"
    elif "read" in results and not results["read"]["entries"] and not results["read"]["events"]:
        outcome = "unchanged"
    else:
        outcome = "failed"
    try:
        ev = EventLog(redis_url=cfg.redis_url, prefix=cfg.prefix)
        try:
            ev.record_run(outcome=outcome, lost=results.get("read", {}).get("lost", 0), now=time.time(),
                          version=str(pub.get("version", "")) if pub else "")
        finally:
            ev.close()
    except FeatureStoreError as e:
        log(f"refresh: could not record the run's outcome ({outcome}) in Redis: {e}")
