"""Where the request path's cost and its slow 1% go. Four servers stay up side by side and
the runs alternate (a noisy neighbour lands on all of them):

- ``plain``: a do-nothing gRPC handler (a fixed response), the ceiling;
- ``batched``: the same, but each call waits for its answer from the server's own ``Batcher``
  (a future per call, a batch task; the handler does nothing);
- ``batched+thread``: each batch also hops to a worker thread and back, as the search does;
- ``serve``: ``twotower serve`` on the catalog (in-memory store, metrics on).

Each runs the closed loop at c=64 (QPS, the server's CPU seconds per call), then the open loop
(Poisson) at half the real server's peak. Around the real server's runs its own histograms are
scraped, so each phase says what the server saw during it: ``event_loop_lag_seconds``,
``gc_pause_seconds`` by generation, ``stage_latency_seconds`` per stage, ``batch_size``.

    python -m bench.wait_probe --catalog ml-100k --out bench/results/paths/waits

Writes ``waits.json`` and ``waits.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.catalogs import prepare_catalog, sample_ids
from bench.loadgen import LoadSpec, run_load
from bench.procs import TRIVIAL_KINDS, cpu_seconds, free_port, server, trivial_server
from towers.cliargs import default_data_dir

Hist = dict[tuple[str, str], dict[str, float]]  # (metric, label) -> {le: cumulative count, "sum": s}


def scrape(url: str) -> Hist:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: Hist = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("twotower_event_loop_lag_seconds", "twotower_gc_pause_seconds",
                            "twotower_stage_latency_seconds", "twotower_batch_size"):
            continue
        for s in fam.samples:
            label = s.labels.get("generation") or s.labels.get("stage") or ""
            h = out.setdefault((fam.name, label), {})
            if s.name.endswith("_bucket"):
                h[s.labels["le"]] = h.get(s.labels["le"], 0.0) + s.value
            elif s.name.endswith("_sum"):
                h["sum"] = h.get("sum", 0.0) + s.value
    return out


def quantile(buckets: dict[str, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (Prometheus' resolution)."""
    edges = sorted(((float(le), n) for le, n in buckets.items() if le != "sum"), key=lambda x: x[0])
    total = edges[-1][1] if edges else 0.0
    if total <= 0:
        return None
    return next(le for le, n in edges if n >= q * total)


def delta(before: Hist, after: Hist) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, h in after.items():
        b = before.get(key, {})
        d = {le: n - b.get(le, 0.0) for le, n in h.items()}
        count = d.get("+Inf", 0.0)
        name = f"{key[0].removeprefix('twotower_')}{'{' + key[1] + '}' if key[1] else ''}"
        out[name] = {"count": int(count), "sum_s": round(d.get("sum", 0.0), 4),
                     "mean": round(d.get("sum", 0.0) / count, 5) if count else None,
                     "p50": quantile(d, 0.5), "p99": quantile(d, 0.99), "max_bucket": quantile(d, 1.0),
                     "buckets": {le: int(n) for le, n in d.items() if le != "sum"}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", default="ml-100k")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/paths/waits"))
    p.add_argument("--config", type=json.loads, default={}, help="JSON ServeConfig settings for the server")
    p.add_argument("--alt-config", type=json.loads, default=None,
                   help="JSON ServeConfig settings of a second server, ``serve-alt``, measured beside the first")
    args = p.parse_args()
    reg = prepare_catalog(args.catalog, args.workdir, data_dir=args.data_dir, users_1m=1_000_000)
    users, items = sample_ids(reg)
    configs = {"serve": args.config, **({"serve-alt": args.alt_config} if args.alt_config is not None else {})}
    urls: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = {kind: stack.enter_context(trivial_server(kind)) for kind in TRIVIAL_KINDS}
        for name, config in configs.items():
            mport = free_port()
            urls[name] = f"http://127.0.0.1:{mport}/metrics"
            servers[name] = stack.enter_context(server(reg, batch_size=64, config={**config, "metrics_port": mport}))

        def one(kind: str, mode: str, rep: int, rate: float = 0.0) -> dict[str, Any]:
            srv = servers[kind]
            real = kind in urls
            spec = LoadSpec(target=srv.target, mode=mode, duration_s=args.duration, concurrency=64, rate=rate,
                            users=users if real else ("1",), items=items if real else (), processes=2)
            before, cpu0 = scrape(urls[kind]) if real else {}, cpu_seconds(srv.pid)
            res = run_load(spec)
            row = {"server": kind, "mode": mode, "rep": rep, "rate": rate, "qps": round(res.qps, 1),
                   "latency_ms": res.latency_ms, "errors": res.errors,
                   "cpu_ms_per_call": round((cpu_seconds(srv.pid) - cpu0) / max(res.completed, 1) * 1000, 4)}
            if real:
                row["seen_by_server"] = delta(before, scrape(urls[kind]))
            runs.append(row)
            print(f"{kind} {mode} rep {rep}: {row['qps']}/s, p50/p99 {res.latency_ms.get('p50')}/"
                  f"{res.latency_ms.get('p99')} ms, {row['cpu_ms_per_call']} ms CPU/call", flush=True)
            return row

        for rep in range(args.reps):
            for kind in servers:
                one(kind, "closed", rep)
        peaks = sorted(r["qps"] for r in runs if r["server"] == "serve")
        rate = round(peaks[len(peaks) // 2] / 2, 1)
        for rep in range(args.reps):
            for kind in servers:
                one(kind, "open", rep, rate)
    summary = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"catalog": args.catalog, "configs": configs, "open_rate": rate, "summary": summary, "runs": runs}
    (args.out / "waits.json").write_text(json.dumps(report, indent=1))
    plot(runs, summary, args.out / "waits.png", title=f"{args.catalog}, open loop at {rate}/s")
    print(json.dumps(summary, indent=1))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server: the median over reps of closed-loop QPS and CPU per call and of open-loop
    p50/p99, each also as a ratio to ``plain``'s; the real server's open-loop waits."""
    import statistics

    def med(kind: str, mode: str, get: Any) -> float:
        return statistics.median(get(r) for r in runs if r["server"] == kind and r["mode"] == mode)

    out: dict[str, Any] = {}
    for kind in dict.fromkeys(r["server"] for r in runs):
        s = {"qps": med(kind, "closed", lambda r: r["qps"]),
             "cpu_ms_per_call": med(kind, "closed", lambda r: r["cpu_ms_per_call"]),
             "open_p50_ms": med(kind, "open", lambda r: r["latency_ms"].get("p50", 0.0)),
             "open_p99_ms": med(kind, "open", lambda r: r["latency_ms"].get("p99", 0.0))}
        out[kind] = {k: round(v, 3) for k, v in s.items()}
    base = out.get("plain")
    for s in out.values():
        if base:
            s["qps_vs_plain"] = round(s["qps"] / base["qps"], 2)
            s["cpu_vs_plain"] = round(s["cpu_ms_per_call"] / base["cpu_ms_per_call"], 2)
            s["open_p99_vs_plain"] = round(s["open_p99_ms"] / max(base["open_p99_ms"], 1e-9), 2)
    for kind in out:
        seen = [r["seen_by_server"] for r in runs if r["server"] == kind and r["mode"] == "open" and
                "seen_by_server" in r]
        if seen:
            out[kind]["open_loop_seen_by_server"] = {
                name: {k: h[k] for k in ("count", "mean", "p50", "p99", "max_bucket")} for name, h in seen[-1].items()}
    return out


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = list(summary)
    x = range(len(kinds))
    left.bar([i - 0.2 for i in x], [summary[k]["qps"] for k in kinds], width=0.4, label="closed c=64 QPS")
    twin = left.twinx()
    twin.bar([i + 0.2 for i in x], [summary[k]["cpu_ms_per_call"] for k in kinds], width=0.4, color="tab:orange",
             label="server CPU ms per call")
    left.set_xticks(list(x), kinds)
    left.set_ylabel("QPS")
    twin.set_ylabel("CPU ms per call")
    left.set_title("Fixed cost: QPS (blue) and CPU per call (orange)")
    seen = [r["seen_by_server"] for r in runs if r["server"] == "serve" and r["mode"] == "open"]
    if seen:
        for name, h in seen[-1].items():
            if not h["count"] or name.startswith("batch_size"):
                continue
            edges = sorted((float(le), n) for le, n in h["buckets"].items() if le != "+Inf")
            right.plot([e * 1000 for e, _ in edges], [n / h["count"] for _, n in edges], marker="o", label=name)
    right.set_xscale("log")
    right.set_xlabel("ms (bucket upper bound)")
    right.set_ylabel("share at or below")
    right.set_title(f"What the server saw: {title}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
