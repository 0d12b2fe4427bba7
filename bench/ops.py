"""Operations scenarios of ``twotower bench`` (the seed's failure modes, under load):

- ``hotswap``  3 new versions published one after another while serving
- ``corrupt``  a corrupt version becomes CURRENT: rejected, the old one serves on
- ``recycle``  every worker recycled by schedule (max age) under load
- ``sigkill``  a worker SIGKILLed under load: the supervisor restarts it
- ``soak``     one worker under steady load, RSS sampled every second, with a
               recycle threshold that triggers (PNG of RSS over time)

Each runs an open-loop load for ``duration`` seconds (≥ 30 by default) and
reports failed RPCs and p99 in the windows before and during the event.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import LoadResult, LoadRun, LoadSpec

OPS_SCENARIOS = ("hotswap", "corrupt", "recycle", "sigkill", "soak")


def _versions(workdir: Path, n: int) -> list[tuple[Path, str]]:
    from offline.synth import make_synthetic_bundle
    from towers import bundle as bundle_mod

    out = []
    for seed in range(n):
        path = workdir / "ops" / f"v{seed}"
        if not (path / "manifest.json").is_file():
            make_synthetic_bundle(path, n_items=20_000, n_users=20_000, dim=64, seed=100 + seed, index_type="flat",
                                  progress=False, item_prefix=f"v{seed}-")
        out.append((path, str(bundle_mod.read_manifest(path)["version"])))
    return out


def _fresh_registry(workdir: Path, first: Path) -> Path:
    from towers import registry as registry_mod

    reg = workdir / "ops" / "registry"
    shutil.rmtree(reg, ignore_errors=True)
    registry_mod.publish(first, reg)
    return reg


def _spec(target: str, duration: float, rate: float) -> LoadSpec:
    users = tuple(f"u{j}" for j in range(0, 20_000, 13))
    return LoadSpec(target=target, mode="open", rate=rate, duration_s=duration, processes=1, users=users,
                    timeout_s=2.0, warmup_s=1.0)


def _report(name: str, res: LoadResult, events: list[tuple[str, float]], start: float, **extra: Any) -> dict[str, Any]:
    """Failures overall; p99 before the first event vs in the 5 s after each event."""
    first = min((t for _, t in events), default=start)
    row: dict[str, Any] = {"label": f"ops {name}", "mode": "ops", "scenario": name, **res.to_dict(), **extra,
                           "failed_rpcs": int(sum(res.errors.values())), "before": res.window(start, first),
                           "events": [{"event": e, "at_s": round(t - start, 2), "during": res.window(t, t + 5.0)}
                                      for e, t in events]}
    during = [ev["during"]["latency_ms"].get("p99", 0.0) for ev in row["events"]]
    before = row["before"]["latency_ms"].get("p99", 0.0)
    print(f"ops {name:8s}: {res.requests} requests, failed {row['failed_rpcs']}, p99 before {before:.2f} ms, "
          f"during {', '.join(f'{x:.2f}' for x in during)} ms, versions {res.versions}", flush=True)
    return row


def run_hotswap(workdir: Path, duration: float, rate: float) -> dict[str, Any]:
    from bench.procs import server
    from towers import registry as registry_mod

    versions = _versions(workdir, 4)
    reg = _fresh_registry(workdir, versions[0][0])
    with server(reg, batch_size=64, config={"registry_poll_s": 0.2}) as (target, ready):
        run = LoadRun(_spec(target, duration, rate))
        start = time.time() + 1.0  # the client's warmup second
        events = []
        for j, (path, version) in enumerate(versions[1:], 1):
            time.sleep(max(0.0, start + j * duration / 4 - time.time()))
            registry_mod.publish(path, reg)
            events.append((f"publish {version}", time.time()))
        res = run.result()
    return _report("hotswap", res, events, start, time_to_serving_s=round(ready, 2),
                   published=[v for _, v in versions])


def run_corrupt(workdir: Path, duration: float, rate: float) -> dict[str, Any]:
    from bench.procs import server
    from towers import registry as registry_mod

    (first, version), = _versions(workdir, 1)
    reg = _fresh_registry(workdir, first)
    bad = reg / "v20000101T000000-badbad"
    shutil.copytree(first, bad)
    data = bytearray((bad / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "index.faiss").write_bytes(bytes(data))
    with server(reg, batch_size=64, config={"registry_poll_s": 0.2}) as (target, _):
        run = LoadRun(_spec(target, duration, rate))
        start = time.time() + 1.0
        time.sleep(max(0.0, start + duration / 3 - time.time()))
        registry_mod.set_current(reg, "v20000101T000000-badbad")
        events = [("CURRENT -> corrupt bundle", time.time())]
        res = run.result()
    return _report("corrupt", res, events, start, serving_version=version,
                   only_old_version_served=set(res.versions) == {version})


def _supervised(workdir: Path, **workers: Any) -> Any:
    from dataclasses import replace

    from online.config import WorkersConfig, load_config
    from online.supervisor import Supervisor

    (first, _), = _versions(workdir, 1)
    reg = _fresh_registry(workdir, first)
    cfg = load_config(port=0)
    cfg = replace(cfg, workers=replace(WorkersConfig(), **workers))
    sup = Supervisor(cfg, reg)
    t0 = time.perf_counter()
    sup.start()
    if not sup.wait_until_serving(300):
        sup.stop()
        raise RuntimeError("workers did not reach SERVING")
    return sup, time.perf_counter() - t0


def run_recycle(workdir: Path, duration: float, rate: float) -> dict[str, Any]:
    sup, ready = _supervised(workdir, workers=2, max_age_s=duration / 3, drain_grace_s=3.0)
    try:
        first_pids = set(sup.pids())
        run = LoadRun(_spec(sup.target, duration, rate))
        start = time.time() + 1.0
        res = run.result()
        recycled = sup.stats.recycles
        all_replaced = not (first_pids & set(sup.pids()))
    finally:
        sup.stop()
    # Recycles happen on the supervisor's schedule; mark the windows at each max_age boundary.
    events = [(f"max age reached ({k})", start + k * duration / 3 - 1.0) for k in (1, 2)]
    return _report("recycle", res, events, start, workers=2, recycles=recycled,
                   all_original_workers_replaced=all_replaced, time_to_serving_s=round(ready, 2))


def run_sigkill(workdir: Path, duration: float, rate: float) -> dict[str, Any]:
    sup, ready = _supervised(workdir, workers=2, drain_grace_s=3.0)
    try:
        run = LoadRun(_spec(sup.target, duration, rate))
        start = time.time() + 1.0
        time.sleep(max(0.0, start + duration / 3 - time.time()))
        victim = sup.pids()[0]
        os.kill(victim, signal.SIGKILL)
        events = [(f"SIGKILL worker {victim}", time.time())]
        t_kill = time.perf_counter()
        restarted_after = None
        while time.perf_counter() - t_kill < 120:
            if victim not in sup.pids() and len(sup.pids()) == 2 and sup.wait_until_serving(0.1):
                restarted_after = time.perf_counter() - t_kill
                break
            time.sleep(0.05)
        res = run.result()
        restarts = sup.stats.restarts
    finally:
        sup.stop()
    return _report("sigkill", res, events, start, restarts=restarts,
                   time_to_serving_after_kill_s=None if restarted_after is None else round(restarted_after, 2),
                   time_to_serving_s=round(ready, 2))


def run_soak(workdir: Path, duration: float, rate: float, out: Path, rss_margin_mb: float = 10.0) -> dict[str, Any]:
    """One worker under steady load; RSS every second. The max_rss_mb threshold starts a
    little above the warmed-up RSS; if steady growth has not tripped it by 60% of the run,
    the cap is lowered to just under the worker's RSS (an operator tightening it), so the
    recycle (replacement first, then drain) shows in every run. Growth per 100k requests
    is fitted on the first worker's samples before any change."""
    from online.supervisor import rss_mb

    sup, ready = _supervised(workdir, workers=1, drain_grace_s=3.0)
    samples: list[tuple[float, int, float]] = []
    thresholds: list[tuple[float, float]] = []  # (t, max_rss_mb) steps, for the plot
    lowered_at = None
    try:
        pid0 = sup.pids()[0]
        base = rss_mb(pid0) or 0.0
        threshold = base + rss_margin_mb
        sup.wcfg = replace(sup.wcfg, max_rss_mb=threshold)
        thresholds.append((0.0, threshold))
        run = LoadRun(_spec(sup.target, duration, rate))
        t0 = time.time()
        while (now := time.time() - t0) < duration + 1.5:
            for pid in sup.pids():
                mb = rss_mb(pid)
                if mb is not None:
                    samples.append((now, pid, mb))
            if lowered_at is None and now > 0.6 * duration and not sup.stats.recycle_reasons:
                current = rss_mb(sup.pids()[0]) or threshold
                sup.wcfg = replace(sup.wcfg, max_rss_mb=current - 2.0)
                lowered_at = now
                thresholds.append((now, current - 2.0))
            elif lowered_at is not None and sup.stats.recycle_reasons and thresholds[-1][1] != threshold:
                # Triggered: back to the first cap, or the fresh worker (at its warmed-up RSS,
                # maybe above the lowered cap) would be recycled again and again.
                sup.wcfg = replace(sup.wcfg, max_rss_mb=threshold)
                thresholds.append((now, threshold))
            time.sleep(1.0)
        res = run.result()
    finally:
        sup.stop()
    fit_until = lowered_at if lowered_at is not None else duration
    arr = np.array([(t, mb) for t, pid, mb in samples if pid == pid0 and t <= fit_until])
    growth_per_100k = 0.0
    if len(arr) > 10 and res.requests:
        slope = np.polyfit(arr[:, 0], arr[:, 1], 1)[0]  # MB per second
        growth_per_100k = float(slope * duration / res.requests * 100_000)
    _plot_rss(samples, out / "soak_rss.png", base, thresholds, duration)
    row = _report("soak", res, [], t0 + 1.0, rss_start_mb=round(base, 1), rss_threshold_mb=round(threshold, 1),
                  rss_threshold_lowered_at_s=None if lowered_at is None else round(lowered_at, 1),
                  rss_threshold_lowered_to_mb=None if lowered_at is None else round(thresholds[1][1], 1),
                  recycles=dict(sup.stats.recycle_reasons),
                  rss_end_mb=round(float(arr[-1, 1]), 1) if len(arr) else None,
                  rss_growth_mb_per_100k_requests=round(growth_per_100k, 3), time_to_serving_s=round(ready, 2))
    (out / "soak_rss.json").write_text(json.dumps([{"t": t, "pid": p, "rss_mb": m} for t, p, m in samples]))
    return row


def _plot_rss(samples: list[tuple[float, int, float]], path: Path, base: float,
              thresholds: list[tuple[float, float]], duration: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for j, pid in enumerate(sorted({p for _, p, _ in samples})):
        pts = [(t, m) for t, p, m in samples if p == pid]
        ax.plot(*zip(*pts, strict=True), marker=".", color=f"C{j}", label=f"worker {pid}")
    ax.axhline(base, color="grey", ls=":", label="RSS after warmup")
    steps = [*thresholds, (duration, thresholds[-1][1])]
    ax.step([t for t, _ in steps], [m for _, m in steps], where="post", color="red", ls="--",
            label="recycle threshold (max_rss_mb)")
    ax.set(xlabel="seconds under load", ylabel="RSS (MB)", title="soak: worker RSS over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
