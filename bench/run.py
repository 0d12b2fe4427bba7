"""``twotower bench``: the serving benchmark (DESIGN §7), as ratios measured in one run.

Scenarios (``--scenarios``, comma separated):

- ``matrix``  closed loop at each concurrency, batching on and off, per catalog
              (ML-100k, synthetic 100k, synthetic 1M with flat/ivf/hnsw/sq8)
- ``ceiling`` the same load against a trivial handler returning a fixed response
              (the Python gRPC limit of this machine)
- ``paths``   the request path's cost vs the trivial handler, same run: closed loop c=64
              QPS and server CPU per 1,000 calls, open loop at half peak (p99), per transport
- ``open``    open loop at half the measured peak (1M items, batching on)
- ``quant``   the ``paths`` measurement on the 1M catalog at recall@100 >= 0.95: today's
              IVF-Flat (``synth-1m-ivf95``) against the tuner's choice (``synth-1m-tuned``),
              each beside the do-nothing handler (issue 11's end-to-end rows); not in the
              default set (its bundles and the 1M tune take about an hour)
- ``faults``  Redis feature store: steady, slowed (DEBUG SLEEP), stopped (SIGSTOP), recovered
- ``cold``    the first requests after a load, with and without warmup
- ``hotswap``, ``corrupt``, ``recycle``, ``sigkill``, ``soak``: operations under
              load (``online/bench_ops.py``)

Servers and load generators run as separate processes; every number is written
to ``--out/results.json`` and drawn in ``--out/bench.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.catalogs import prepare_catalog, redis_loaded, sample_ids
from bench.procs import server, trivial_server

CONCURRENCY = (1, 8, 32, 64, 128)
ALL_SCENARIOS = ("ceiling", "paths", "matrix", "open", "faults", "cold", "hotswap", "corrupt", "recycle", "sigkill",
                 "soak", "quant")
# ``quant`` builds two 1M bundles and runs the 1M tuner (about an hour on 2 cores): on request only.
DEFAULT_SCENARIOS = tuple(s for s in ALL_SCENARIOS if s != "quant")
QUANT_CATALOGS = ("synth-1m-ivf95", "synth-1m-tuned")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test the server: batching, catalogs, faults; JSON + PNG")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="bundles are built and cached here")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma separated, of {','.join(ALL_SCENARIOS)} (default: all but quant)")
    p.add_argument("--catalogs", default="ml-100k,synth-100k,synth-1m-flat,synth-1m-ivf,synth-1m-hnsw,synth-1m-sq8")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    p.add_argument("--store", choices=["redis", "memory"], default="redis",
                   help="feature store of the matrix (Redis: a throwaway redis-server per catalog)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per matrix cell")
    p.add_argument("--ops-duration", type=float, default=30.0, help="seconds per operations scenario")
    p.add_argument("--soak-duration", type=float, default=300.0, help="seconds of the soak")
    p.add_argument("--ops-rate", type=float, default=400.0, help="open-loop rate of the operations scenarios")
    p.add_argument("--users-1m", type=int, default=1_000_000, help="users in the synthetic 1M-item catalogs")
    p.add_argument("--transports", default="aio,sync", help="gRPC transports the paths scenario compares")
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict[str, Any]] = []
        self.samples: dict[str, list[float]] = {}
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)

    def load(self, label: str, target: str, *, mode: str, users: tuple[str, ...], items: tuple[str, ...],
             concurrency: int = 1, rate: float = 0.0, duration: float | None = None, pid: int | None = None,
             **meta: Any) -> dict[str, Any]:
        """One load run; with the server's ``pid``, also its CPU seconds per 1,000 calls."""
        from bench.loadgen import LoadSpec, run_load
        from bench.procs import cpu_seconds

        spec = LoadSpec(target=target, mode=mode, duration_s=duration or self.args.duration, concurrency=concurrency,
                        rate=rate, processes=1 if (concurrency <= 8 and rate < 500) else 2, users=users, items=items)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        res = run_load(spec)
        row = {"label": label, "mode": mode, "concurrency": concurrency, "rate": rate, **meta, **res.to_dict()}
        if pid and res.completed:
            row["server_cpu_s_per_1k"] = round((cpu_seconds(pid) - cpu0) / res.completed * 1000, 4)
        self.results.append(row)
        self.samples[label] = res.samples_ms
        lat = res.latency_ms
        cpu = f"  cpu {row['server_cpu_s_per_1k']:.3f} s/1k" if "server_cpu_s_per_1k" in row else ""
        print(f"{label:48s} {res.qps:8.0f} QPS  p50 {lat.get('p50', 0):7.2f}  p99 {lat.get('p99', 0):7.2f} ms  "
              f"errors {sum(res.errors.values())}  rungs {res.rungs}{cpu}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        data = {"machine": {"cpus": os.cpu_count()}, "duration_s": self.args.duration, "results": self.results,
                "summary": summarize(self.results)}
        for name, text in (("results.json", json.dumps(data, indent=1)), ("results.md", markdown(self.results))):
            tmp = self.out / f"{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def full_quality_qps(row: dict[str, Any]) -> float:
    """A run's QPS counting only full-quality answers (a degraded answer skipped the search)."""
    return float(row["qps"] * row["rungs"].get("full", 0) / max(1, sum(row["rungs"].values())))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as ratios measured in this run."""
    def find(**kw: Any) -> dict[str, Any] | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)

    out: dict[str, Any] = {}
    for cat in sorted({str(r["catalog"]) for r in rows if r.get("catalog")}):
        on = find(catalog=cat, batching=True, concurrency=64)
        off = find(catalog=cat, batching=False, concurrency=64)
        if on and off and off["qps"]:
            out[f"{cat}: batching speedup at c=64"] = round(on["qps"] / off["qps"], 2)
            # Degraded answers are cheap (no search): count full-quality responses per second too.
            good = [full_quality_qps(r) for r in (on, off)]
            if good[1]:
                out[f"{cat}: full-quality QPS speedup at c=64"] = round(good[0] / good[1], 2)
            out[f"{cat}: p99 at c=64 batched / unbatched"] = round(
                on["latency_ms"]["p99"] / off["latency_ms"]["p99"], 2)
        on1 = find(catalog=cat, batching=True, concurrency=1)
        off1 = find(catalog=cat, batching=False, concurrency=1)
        if on1 and off1:
            out[f"{cat}: p50 added by batching at c=1 (ms)"] = round(
                on1["latency_ms"]["p50"] - off1["latency_ms"]["p50"], 3)
    ceiling = find(label="ceiling c=64")
    best = max((r for r in rows if r["mode"] == "closed" and r.get("catalog")), key=lambda r: r["qps"], default=None)
    if ceiling and best:
        out["best QPS / trivial-handler QPS"] = round(best["qps"] / ceiling["qps"], 2)
    for r in rows:
        if r.get("scenario") != "paths" or r.get("catalog_of") == "trivial":
            continue
        name = f"{r['catalog_of']} {r['transport']}"
        pair = find(scenario="paths", catalog_of="trivial", paired_with=name, mode=r["mode"], rep=r["rep"])
        if pair is None:
            continue
        if r["mode"] == "closed":
            out.setdefault(f"paths: {name} QPS / trivial QPS at c=64", []).append(round(r["qps"] / pair["qps"], 2))
            if r.get("server_cpu_s_per_1k") and pair.get("server_cpu_s_per_1k"):
                out.setdefault(f"paths: {name} server CPU per call / trivial's", []).append(
                    round(r["server_cpu_s_per_1k"] / pair["server_cpu_s_per_1k"], 2))
        elif r["latency_ms"].get("p99") and pair["latency_ms"].get("p99"):
            out.setdefault(f"paths: {name} open-loop p99 / trivial's at {r['open_rate']}/s", []).append(
                round(r["latency_ms"]["p99"] / pair["latency_ms"]["p99"], 2))
    # Issue 11's end-to-end row: the tuner's index against today's IVF-Flat, both at recall@100
    # >= 0.95, counting only full-quality answers (a degraded answer skipped the search).
    def full_qps(cat: str, transport: str) -> list[float]:
        return [full_quality_qps(r) for r in rows
                if r.get("scenario") == "paths" and r.get("catalog_of") == cat and r["mode"] == "closed"
                and r.get("transport") == transport]

    for transport in sorted({str(r.get("transport")) for r in rows if r.get("catalog_of") in QUANT_CATALOGS}):
        tuned, today = full_qps(QUANT_CATALOGS[1], transport), full_qps(QUANT_CATALOGS[0], transport)
        if tuned and today:
            out[f"quant ({transport}): full-quality QPS at c=64, tuned / today's IVF-Flat (medians over reps)"] = \
                round(statistics.median(tuned) / statistics.median(today), 2)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The run as Markdown tables (written beside results.json as results.md)."""
    def lat(r: dict[str, Any], q: str) -> str:
        return f"{r['latency_ms'].get(q, 0.0):.1f}"

    def rungs(r: dict[str, Any]) -> str:
        n = max(1, sum(r.get("rungs", {}).values()))
        degraded = {k: v for k, v in r.get("rungs", {}).items() if k != "full"}
        return ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(degraded.items())) or "-"

    out = ["| run | QPS | p50 ms | p99 ms | p99.9 ms | errors | degraded |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] in ("closed", "open"):
            errors = ", ".join(f"{k} {v}" for k, v in r.get("errors", {}).items()) or "0"
            out.append(f"| {r['label']} | {r['qps']:.0f} | {lat(r, 'p50')} | {lat(r, 'p99')} | {lat(r, 'p99.9')} | "
                       f"{errors} | {rungs(r)} |")
    cold = [r for r in rows if r["mode"] == "cold"]
    if cold:
        out += ["", "| cold start | to SERVING s | first request ms | first-100 p99 ms | steady p50 ms | ratio |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['label']} | {r['time_to_serving_s']} | {r['first_request_ms']:.1f} | "
                f"{r['first100_ms']['p99']:.1f} | {r['steady_ms']['p50']:.1f} | "
                f"{r['first100_p99_over_steady_p50']} |" for r in cold]
    ops = [r for r in rows if r["mode"] == "ops"]
    if ops:
        out += ["", "| operations | requests | failed RPCs | p99 before ms | p99 in the 5 s after each event ms "
                "| notes |", "|---|---|---|---|---|---|"]
        for r in ops:
            during = ", ".join(f"{e['during']['latency_ms'].get('p99', 0.0):.1f}" for e in r["events"]) or "-"
            notes = {k: r[k] for k in ("recycles", "time_to_serving_s", "time_to_serving_after_kill_s",
                                       "rss_start_mb", "rss_end_mb", "rss_growth_mb_per_100k_requests",
                                       "rss_threshold_lowered_at_s") if r.get(k) is not None}
            out.append(f"| {r['scenario']} | {r['requests']} | {r['failed_rpcs']} | "
                       f"{r['before']['latency_ms'].get('p99', 0.0):.1f} | {during} | "
                       f"{json.dumps(notes)[1:-1]} |")
    summary = summarize(rows)
    if summary:
        out += ["", "| summary | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]
    return "\n".join(out) + "\n"


def run_matrix(b: Bench, catalogs: list[str], conc: list[int]) -> None:
    """Closed loop, batching on and off, each catalog, against the feature store of ``--store``
    (Redis by default: one pipeline per batch is part of what batching saves)."""
    for cat in catalogs:
        reg = prepare_catalog(cat, b.args.workdir, data_dir=b.args.data_dir, users_1m=b.args.users_1m)
        users, items = sample_ids(reg)
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(redis_loaded(reg))[0].url if b.args.store == "redis" else None
            for batching in (True, False):
                with server(reg, batch_size=64 if batching else 1, redis_url=url) as srv:
                    for c in conc:
                        b.load(f"{cat} {'batched' if batching else 'unbatched'} c={c}", srv.target, mode="closed",
                               users=users, items=items, concurrency=c, catalog=cat, batching=batching,
                               store=b.args.store, time_to_serving_s=round(srv.ready_s, 2), pid=srv.pid)


def run_paths(b: Bench, catalogs: list[str], *, reps: int = 2) -> None:
    """The request path's own cost, against a do-nothing handler in the same run: closed loop
    at c=64 (QPS and the server's CPU seconds per 1,000 calls), then open loop (Poisson) at
    half the catalog's peak, for the catalog and for the do-nothing handler at the same rate.
    Both servers stay up and the runs alternate (trivial, real, trivial, real...), so a noisy
    neighbour on these shared cores lands on both sides of each ratio. Both gRPC transports
    of ``twotower serve`` (grpc.aio, and the sync server with a thread pool) are measured."""
    for cat in catalogs:
        reg = prepare_catalog(cat, b.args.workdir, data_dir=b.args.data_dir, users_1m=b.args.users_1m)
        users, items = sample_ids(reg)
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(redis_loaded(reg))[0].url if b.args.store == "redis" else None
            t = stack.enter_context(trivial_server())
            for transport in b.args.transports.split(","):
                name = f"{cat} {transport}"
                with server(reg, batch_size=64, redis_url=url, transport=transport) as srv:
                    peaks = []
                    for rep in range(reps):
                        b.load(f"paths: trivial c=64 (beside {name}, rep {rep})", t.target, mode="closed",
                               users=("1",), items=(), concurrency=64, pid=t.pid, scenario="paths",
                               catalog_of="trivial", paired_with=name, rep=rep)
                        peaks.append(b.load(f"paths: {name} c=64 (rep {rep})", srv.target, mode="closed",
                                            users=users, items=items, concurrency=64, pid=srv.pid, scenario="paths",
                                            catalog_of=cat, transport=transport, rep=rep)["qps"])
                    rate = round(sorted(peaks)[len(peaks) // 2] / 2, 1)
                    for rep in range(reps):
                        b.load(f"paths: {name} open at {rate}/s (rep {rep})", srv.target, mode="open", rate=rate,
                               users=users, items=items, pid=srv.pid, scenario="paths", catalog_of=cat,
                               transport=transport, open_rate=rate, rep=rep)
                        b.load(f"paths: trivial open at {rate}/s (beside {name}, rep {rep})", t.target, mode="open",
                               rate=rate, users=("1",), items=(), pid=t.pid, scenario="paths", catalog_of="trivial",
                               paired_with=name, open_rate=rate, rep=rep)


def run_open(b: Bench, catalog: str) -> None:
    reg = prepare_catalog(catalog, b.args.workdir, data_dir=b.args.data_dir, users_1m=b.args.users_1m)
    users, items = sample_ids(reg)
    peak = max((r["qps"] for r in b.results if r.get("catalog") == catalog and r.get("batching")), default=0.0)
    with server(reg, batch_size=64) as (target, _):
        if not peak:
            peak = b.load(f"{catalog} peak probe c=64", target, mode="closed", users=users, items=items,
                          concurrency=64)["qps"]
        b.load(f"{catalog} open loop at half peak", target, mode="open", rate=peak / 2, users=users, items=items,
               catalog_open=catalog, peak_qps=peak, duration=max(b.args.duration, 10.0))


def run_faults(b: Bench, catalog: str) -> None:
    """Redis as the feature store: steady, slowed, stopped, back. Each phase is its own load run."""
    reg = prepare_catalog(catalog, b.args.workdir, data_dir=b.args.data_dir, users_1m=b.args.users_1m)
    users, items = sample_ids(reg)
    with redis_loaded(reg) as (redis_proc, n, load_s):
        url, port = redis_proc.url, redis_proc.port
        rate = 150.0  # well under the 1M-item peak: the faults, not saturation, should show
        with server(reg, batch_size=64, redis_url=url) as (target, _):
            common: dict[str, Any] = {"users": users, "items": items, "rate": rate, "mode": "open",
                                      "redis_users_loaded": n, "redis_load_s": round(load_s, 1)}
            b.load("redis steady", target, phase="steady", **common)
            stop = threading.Event()

            def slow() -> None:  # Redis answers, but every call waits behind a 50 ms sleep
                import redis

                r = redis.Redis(port=port, socket_timeout=5)
                while not stop.is_set():
                    r.execute_command("DEBUG", "SLEEP", "0.05")

            t = threading.Thread(target=slow, daemon=True)
            t.start()
            try:
                b.load("redis slowed (DEBUG SLEEP 50 ms)", target, phase="slowed", **common)
            finally:
                stop.set()
                t.join()
            redis_proc.signal(signal.SIGSTOP)
            try:
                b.load("redis stopped (SIGSTOP)", target, phase="stopped", **common)
            finally:
                redis_proc.signal(signal.SIGCONT)
            b.load("redis back (no server restart)", target, phase="recovered", **common)


def run_cold(b: Bench, catalog: str) -> None:
    """The first 100 requests right after SERVING, with and without warmup, beside steady state
    (sequential calls from one client, each timed)."""
    import numpy as np

    from bench.loadgen import percentiles
    from online.client import RecommenderClient

    reg = prepare_catalog(catalog, b.args.workdir, data_dir=b.args.data_dir, users_1m=b.args.users_1m)
    users, items = sample_ids(reg)
    for warm in (True, False):
        with server(reg, batch_size=64, config={"warmup": warm}) as (target, ready), \
                RecommenderClient(target, timeout=5.0) as c:
            lat = []
            for i in range(600):
                t = time.perf_counter()
                c.recommend(users[i % len(users)], k=10, recent=[items[i % len(items)]])
                lat.append((time.perf_counter() - t) * 1000.0)
            first, steady = percentiles(np.array(lat[:100])), percentiles(np.array(lat[100:]))
            label = f"cold start {catalog}, warmup={'on' if warm else 'off'}"
            b.results.append({"label": label, "mode": "cold", "warmup": warm, "time_to_serving_s": round(ready, 2),
                              "first_request_ms": round(lat[0], 3), "first100_ms": first, "steady_ms": steady,
                              "first100_p99_over_steady_p50": round(first["p99"] / steady["p50"], 2)})
            print(f"{label}: first {lat[0]:.2f} ms, first-100 p99 {first['p99']:.2f} ms, "
                  f"steady p50 {steady['p50']:.2f} ms", flush=True)
    b.save()


def plot(b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(1, 2, figsize=(14, 5.5))
    cats = sorted({r["catalog"] for r in b.results if r.get("catalog")})
    for j, cat in enumerate(cats):
        for batching, style in ((True, "-"), (False, "--")):
            pts = sorted((r["concurrency"], r["qps"]) for r in b.results
                         if r.get("catalog") == cat and r.get("batching") == batching)
            if pts:
                ax[0].plot(*zip(*pts, strict=True), style, marker="o", color=f"C{j}",
                           label=f"{cat} {'batched' if batching else 'batch=1'}")
    ceiling = [r for r in b.results if r["label"].startswith("ceiling")]
    if ceiling:
        ax[0].plot([r["concurrency"] for r in ceiling], [r["qps"] for r in ceiling], ":", color="k", marker="x",
                   label="trivial handler (ceiling)")
    ax[0].set(xscale="log", xlabel="concurrency (closed loop)", ylabel="QPS", title="throughput vs concurrency")
    ax[0].legend(fontsize=7)
    for label, s in b.samples.items():
        if s and any(key in label for key in ("c=64", "open loop", "redis")):
            ax[1].plot(s, np.linspace(0, 1, len(s)), label=label)
    ax[1].set(xscale="log", xlabel="latency (ms, client-measured)", ylabel="CDF", title="latency CDFs")
    ax[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(b.out / "bench.png", dpi=100)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    from towers.cliargs import default_data_dir

    args.data_dir = args.data_dir or Path(default_data_dir())
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        from towers.errors import ConfigError

        raise ConfigError("--scenarios", f"unknown scenario(s) {', '.join(sorted(unknown))}")
    catalogs = [c for c in args.catalogs.split(",") if c]
    conc = [int(c) for c in args.concurrency.split(",") if c]
    b = Bench(args)
    if "ceiling" in scenarios:
        users = ("1",)
        with trivial_server() as t:
            for c in conc:
                b.load(f"ceiling c={c}", t.target, mode="closed", users=users, items=(), concurrency=c, pid=t.pid)
    if "paths" in scenarios:
        run_paths(b, [c for c in catalogs if not c.startswith("synth-1m")])
    if "quant" in scenarios:
        run_paths(b, list(QUANT_CATALOGS))
    if "matrix" in scenarios:
        run_matrix(b, catalogs, conc)
    big = next((c for c in catalogs if c.endswith("ivf")), catalogs[-1])
    if "open" in scenarios:
        run_open(b, big)
    if "faults" in scenarios:
        run_faults(b, big)
    if "cold" in scenarios:
        run_cold(b, big)
    from bench import ops as bench_ops

    for name in ("hotswap", "corrupt", "recycle", "sigkill"):
        if name in scenarios:
            b.results.append(getattr(bench_ops, f"run_{name}")(args.workdir, args.ops_duration, args.ops_rate))
            b.save()
    if "soak" in scenarios:
        b.results.append(bench_ops.run_soak(args.workdir, args.soak_duration, args.ops_rate, b.out))
        b.save()
    plot(b)
    print(json.dumps(summarize(b.results), indent=1))
    print(f"wrote {b.out / 'results.json'} and {b.out / 'bench.png'}")
    return 0
