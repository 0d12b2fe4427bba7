"""Memory of a version swap across workers: ``python -m bench.swap_memory [--workers 4]
[--items 200000] [--out bench/results/swap_memory.json]``.

A supervisor serves a synthetic bundle with N workers (embedded store: each worker holds its
bundle's arrays); a second bundle of the same size is published, and the sum of the workers'
resident memory is sampled every 10 ms until every worker serves it. Run twice: workers
taking turns (``workers.swap_one_at_a_time``, the default) and all at once. During a swap a
worker holds two bundles; taking turns bounds the extra memory to one bundle at a time
instead of N. Writes JSON and a PNG (summed RSS over time, both runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _one(registry: Path, new_bundle: Path, *, workers: int, one_at_a_time: bool) -> dict[str, Any]:
    from bench.procs import free_port_run
    from online.config import load_config
    from online.supervisor import Supervisor, rss_mb
    from towers import registry as registry_mod

    cfg = load_config(port=0, admin_port=free_port_run(2 * workers),
                      registry_poll_s=0.05, workers__workers=workers, workers__check_interval_s=0.2,
                      workers__swap_one_at_a_time=one_at_a_time)
    sup = Supervisor(cfg, registry)
    sup.start()
    try:
        if not sup.wait_until_serving(300):
            raise RuntimeError("workers did not start")
        time.sleep(1.0)  # settle: warmup garbage collected

        def total() -> float:
            return sum(rss_mb(pid) or 0.0 for pid in sup.pids())

        before = total()
        new = registry_mod.publish(new_bundle, registry)
        t0, samples = time.monotonic(), []
        served: set[str] = set()
        while time.monotonic() - t0 < 120:
            samples.append((round(time.monotonic() - t0, 3), round(total(), 1)))
            served = set(_versions(sup))
            if served == {new} and len(samples) > 5:
                break
            time.sleep(0.01)
        time.sleep(1.0)
        after = total()
        return {"one_at_a_time": one_at_a_time, "workers": workers, "rss_before_mb": round(before, 1),
                "rss_peak_mb": max(s[1] for s in samples), "rss_after_mb": round(after, 1),
                "swap_s": samples[-1][0], "samples": samples, "all_swapped": served == {new}}
    finally:
        sup.stop()


def _versions(sup: Any) -> list[str]:
    """The version each live worker's admin port says it serves."""
    import grpc

    from online.proto import recommender_pb2 as pb
    from online.proto import recommender_pb2_grpc as pb_grpc

    out = []
    for port in sup.admin_ports():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            out.append(pb_grpc.AdminStub(ch).Status(pb.StatusRequest(), timeout=5).version)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--work", type=Path, default=Path("runs/bench/swap_memory"))
    p.add_argument("--out", type=Path, default=Path("bench/results/swap_memory.json"))
    a = p.parse_args(argv)
    from offline.synth import make_synthetic_bundle
    from towers import registry as registry_mod

    bundles = []
    for seed in (1, 2):
        b = a.work / f"b{seed}"
        if not (b / "manifest.json").is_file():
            make_synthetic_bundle(b, n_items=a.items, n_users=a.items, seed=seed, index_type="flat", progress=False)
        bundles.append(b)
    runs = []
    for one in (True, False):
        reg = a.work / f"registry-{'turns' if one else 'together'}"
        if reg.exists():
            import shutil

            shutil.rmtree(reg)
        registry_mod.publish(bundles[0], reg)
        r = _one(reg, bundles[1], workers=a.workers, one_at_a_time=one)
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}), flush=True)
        runs.append(r)
    turns, together = runs
    result = {"items": a.items, "workers": a.workers, "runs": runs,
              "extra_peak_mb": {"turns": round(turns["rss_peak_mb"] - turns["rss_before_mb"], 1),
                                "together": round(together["rss_peak_mb"] - together["rss_before_mb"], 1)}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    _plot(result, a.out.with_suffix(".png"))
    print(json.dumps(result["extra_peak_mb"]))
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["runs"]:
        ts, mb = zip(*r["samples"], strict=True)
        ax.plot(ts, mb, label=f"{'one at a time' if r['one_at_a_time'] else 'all at once'} "
                              f"(peak +{r['rss_peak_mb'] - r['rss_before_mb']:.0f} MB)")
    ax.set(xlabel="seconds after publish", ylabel=f"summed worker RSS (MB), {result['workers']} workers",
           title=f"a version swap, {result['items']:,} items")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
