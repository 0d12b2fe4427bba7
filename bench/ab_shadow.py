"""Does a shadow variant delay primary responses? ``python -m bench.ab_shadow [--out FILE]``.

The issue's claim: "A shadow must never change or delay a primary response (measured: p99
with and without a 100% shadow at half peak)". One ``twotower serve`` process over two
synthetic versions (100k items by default, built once and cached under ``--workdir``); its
flags file is switched (rewritten, then ``admin reload``) between two contents that differ
only in the shadow:

- ``no-shadow``: a running experiment, control CURRENT weight 1, plus a weight-0 treatment
  pinning the second version (it stays resident, no user gets it);
- ``shadow``: the same, plus a variant ``shadow: 1.0`` on the second version: every
  request is scored again, off the response path, by the other version.

First the closed loop at concurrency 64 in each mode (alternated, ``--peak-reps`` each) gives
the peak; the no-shadow median is "peak". Then the open loop (Poisson) at half that rate
(``--rate-fraction``), in ``--rounds`` rounds, each running both modes back to back (order
alternating between rounds) so a noisy neighbour on the shared cores lands on both. Per
mode: p50/p90/p99/p99.9 pooled over rounds, the median of the per-round values and of the
per-round ratios shadow / no-shadow, failed RPCs, the versions named by responses (the
primary's only), the server's CPU per call and per wall second, and the shadow counters
(sampled / scored / dropped / errors) from ``admin status`` per round.
A PNG draws p99 per round per mode and the pooled latency CDFs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.ab_resident import admin, fresh_registry, synth_versions
from bench.loadgen import LoadResult, LoadSpec, percentiles, run_load
from bench.procs import cpu_seconds, free_port, server

FLAGS = """experiments:
  - name: ab-shadow
    salt: ab-shadow-salt
    status: running
    allocation: 1.0
    variants:
      - {{name: control, weight: 1.0, version: CURRENT}}
      - {{name: idle, weight: 0.0, version: {version}}}
"""
SHADOW = "      - {{name: shadow, shadow: 1.0, version: {version}}}\n"
MODES = ("no-shadow", "shadow")


def _switch(flags: Path, text: str, admin_target: str) -> dict[str, Any]:
    """Rewrite the flags file and make the server reload it now; the status after."""
    flags.write_text(text)
    st = admin(admin_target, "reload")
    if st.get("flags_error"):
        raise RuntimeError(f"flags refused: {st['flags_error']}")
    return st


def _shadow_counts(st: dict[str, Any]) -> dict[str, int]:
    sh: dict[str, Any] = next((s for s in st.get("shadows", []) if s.get("variant") == "shadow"), {})
    return {k: int(sh.get(k, 0)) for k in ("sampled", "scored", "dropped", "errors")}


def _lat(res: LoadResult) -> dict[str, float]:
    return {k: round(v, 3) for k, v in res.latency_ms.items()}


def measure(workdir: Path, *, items: int, users: int, index_type: str = "auto", rounds: int = 4,
            seconds: float = 10.0, peak_reps: int = 3, peak_seconds: float = 5.0, concurrency: int = 64,
            rate_fraction: float = 0.5, out_png: Path | None = None) -> dict[str, Any]:
    versions = synth_versions(workdir, items=items, users=users, index_type=index_type)
    (_, v0), (_, v1) = versions
    reg = fresh_registry(workdir / "ab-shadow-registry", versions)
    texts = {"no-shadow": FLAGS.format(version=v1), "shadow": FLAGS.format(version=v1) + SHADOW.format(version=v1)}
    flags = workdir / "ab-shadow-flags.yaml"
    flags.write_text(texts["no-shadow"])
    user_ids = tuple(f"u{j}" for j in range(0, users, max(1, users // 5000)))
    port = free_port()
    adm = f"127.0.0.1:{port}"
    peaks: dict[str, list[float]] = {m: [] for m in MODES}
    rows: list[dict[str, Any]] = []
    pooled: dict[str, list[np.ndarray]] = {m: [] for m in MODES}
    config = {"admin_port": port, "flags_file": str(flags), "registry_poll_s": 3600.0}
    with server(reg, batch_size=64, config=config, timeout=600) as srv:
        def load(mode: str, spec: LoadSpec) -> tuple[LoadResult, dict[str, Any]]:
            st0 = _switch(flags, texts[mode], adm)
            c0, t0 = cpu_seconds(srv.pid), time.perf_counter()
            res = run_load(spec)
            cpu, wall = cpu_seconds(srv.pid) - c0, time.perf_counter() - t0
            st1 = admin(adm)
            c_0, c_1 = _shadow_counts(st0), _shadow_counts(st1)
            row = {"mode": mode, "load": spec.mode, "requests": res.requests, "qps": round(res.qps, 1),
                   "latency_ms": _lat(res), "errors": res.errors, "versions": res.versions, "rungs": res.rungs,
                   "server_cpu_ms_per_call": round(1000.0 * cpu / max(res.completed, 1), 4),
                   # CPU seconds per wall second of the load run (client start-up included, so a
                   # little low): one process is capped near 1.0 by the GIL (MACHINE-FACTS).
                   "server_cpu_share": round(cpu / wall, 3),
                   "shadow": {k: c_1[k] - c_0[k] for k in c_0}}
            print(f"{mode:9s} {spec.mode:6s} {res.qps:7.0f} QPS  p50 {res.latency_ms.get('p50', 0):6.2f}  "
                  f"p99 {res.latency_ms.get('p99', 0):6.2f} ms  errors {sum(res.errors.values())}  "
                  f"shadow {row['shadow']}", flush=True)
            return res, row

        for rep in range(peak_reps):
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                spec = LoadSpec(target=srv.target, mode="closed", duration_s=peak_seconds, concurrency=concurrency,
                                processes=2, users=user_ids)
                res, row = load(mode, spec)
                peaks[mode].append(res.qps)
                rows.append({**row, "rep": rep})
        peak = statistics.median(peaks["no-shadow"])
        rate = round(peak * rate_fraction, 1)
        for r in range(rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                spec = LoadSpec(target=srv.target, mode="open", duration_s=seconds, rate=rate,
                                processes=1 if rate < 500 else 2, users=user_ids, seed=r)
                res, row = load(mode, spec)
                pooled[mode].append(res.timeline[:, 1])
                rows.append({**row, "round": r, "rate": rate})
        final = admin(adm)
    open_rows = {m: [x for x in rows if x["mode"] == m and x["load"] == "open"] for m in MODES}
    pooled_lat = {m: percentiles(np.concatenate(pooled[m])) for m in MODES}
    med = {m: {q: round(statistics.median(x["latency_ms"][q] for x in open_rows[m]), 3)
               for q in ("p50", "p90", "p99", "p99.9")} for m in MODES}
    pairs = list(zip(open_rows["no-shadow"], open_rows["shadow"], strict=True))  # the two runs of each round
    shadow_total = {k: sum(x["shadow"][k] for x in open_rows["shadow"]) for k in ("sampled", "scored", "dropped",
                                                                                   "errors")}
    summary = {
        "peak_qps_c64": {m: round(statistics.median(v), 1) for m, v in peaks.items()},
        "open_rate": rate,
        "open_rate_fraction_of_peak": rate_fraction,
        "pooled_ms": {m: {q: round(v, 3) for q, v in pooled_lat[m].items() if q in ("p50", "p90", "p99", "p99.9")}
                      for m in MODES},
        "pooled_ratio_shadow_over_none": {q: round(pooled_lat["shadow"][q] / pooled_lat["no-shadow"][q], 3)
                                          for q in ("p50", "p90", "p99", "p99.9")},
        "median_of_rounds_ms": med,
        "median_of_rounds_ratio": {q: round(med["shadow"][q] / med["no-shadow"][q], 3) for q in med["shadow"]},
        "per_round_p99_ratio": [round(s["latency_ms"]["p99"] / n["latency_ms"]["p99"], 3)
                                for n, s in pairs],
        "median_per_round_ratio": {q: round(statistics.median(s["latency_ms"][q] / n["latency_ms"][q]
                                                              for n, s in pairs), 3) for q in ("p50", "p99")},
        "server_cpu_ms_per_call": {m: round(statistics.median(x["server_cpu_ms_per_call"] for x in open_rows[m]), 4)
                                   for m in MODES},
        "server_cpu_share": {m: round(statistics.median(x["server_cpu_share"] for x in open_rows[m]), 3)
                             for m in MODES},
        "failed_rpcs": {m: sum(sum(x["errors"].values()) for x in open_rows[m]) for m in MODES},
        "primary_versions": {m: sorted({v for x in open_rows[m] for v in x["versions"]}) for m in MODES},
        "responses_from_current_only": all(set(x["versions"]) == {v0} for x in rows),
        "shadow_open_loop": {**shadow_total,
                             "scored_share": round(shadow_total["scored"] / max(shadow_total["sampled"], 1), 4),
                             "dropped_share": round(shadow_total["dropped"] / max(shadow_total["sampled"], 1), 4)},
        "shadow_status_at_end": {k: (int(v) if k in ("sampled", "scored", "dropped", "errors") else v)
                                 for k, v in next((s for s in final.get("shadows", [])
                                                   if s.get("variant") == "shadow"), {}).items()},
    }
    if out_png is not None:
        _plot(open_rows, pooled, rate, out_png)
    return {"items": items, "users": users, "index_type": index_type, "versions": {"current": v0, "shadow": v1},
            "concurrency": concurrency, "rounds": rounds, "seconds": seconds, "summary": summary, "runs": rows}


def _plot(open_rows: dict[str, list[dict[str, Any]]], pooled: dict[str, list[np.ndarray]], rate: float,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for j, m in enumerate(MODES):
        xs = [x["round"] for x in open_rows[m]]
        ax[0].plot(xs, [x["latency_ms"]["p99"] for x in open_rows[m]], marker="o", color=f"C{j}", label=f"{m} p99")
        ax[0].plot(xs, [x["latency_ms"]["p50"] for x in open_rows[m]], marker="x", ls="--", color=f"C{j}",
                   label=f"{m} p50")
        s = np.sort(np.concatenate(pooled[m]))
        ax[1].plot(s, np.linspace(0, 1, len(s)), color=f"C{j}", label=m)
    ax[0].set(xlabel="round", ylabel="latency (ms, client)", title=f"open loop at {rate:g}/s")
    ax[0].set_ylim(bottom=0)
    ax[0].legend(fontsize=8)
    ax[1].set(xscale="log", xlabel="latency (ms, client)", ylabel="CDF", title="pooled over rounds")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--index", default="auto", help="index type of both versions (towers.index.INDEX_TYPES)")
    p.add_argument("--workdir", type=Path, default=Path("runs/ab_shadow"), help="bundles are built and cached here")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per open-loop run")
    p.add_argument("--peak-reps", type=int, default=3)
    p.add_argument("--rate-fraction", type=float, default=0.5, help="open-loop rate as a fraction of the peak")
    p.add_argument("--out", type=Path, default=None, help="JSON; the PNG goes beside it")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    png = a.out.with_suffix(".png") if a.out is not None else None
    res = measure(a.workdir, items=a.items, users=a.users, index_type=a.index, rounds=a.rounds, seconds=a.seconds,
                  peak_reps=a.peak_reps, rate_fraction=a.rate_fraction, out_png=png)
    text = json.dumps(res, indent=1)
    print(json.dumps(res["summary"], indent=1))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
