"""Does a refresh's memory follow its backlog? ``python -m bench.refresh_backlog --bundle B
[--backlogs 100000,1000000] [--max-events 100000] [--out bench/results/refresh_backlog.json]``.

For each backlog size: a throwaway Redis, a fresh registry with bundle B published into it,
N synthetic events (B's users and items, timestamps over the last day) written through the
real stream (XADD), then one ``twotower refresh --mode embed --max-events M`` in a child
process, whose peak RSS (``ru_maxrss`` of the child) and per-step times come from the run's
report. With the per-run cap, a run's memory is bounded by M and the store's history of the
users it touches, not by N: the rest of the backlog waits for the next run. Writes JSON and a
PNG (peak RSS and step times per backlog).

``--make-shop-bundle DIR --users N --items M`` first builds the scale bundle the sizes then
run on: the synthetic shop log of ``bench/train_scale.py`` (every feature kind) with N users
(3 interactions each, 3N in all) over M items, a history tower trained for ``--train-steps``
steps (a scale run, not a quality one), an IVF index and top-100 per user; kept and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _send(url: str, prefix: str, users: list[str], items: list[str], n: int, seed: int) -> float:
    import redis

    from towers.store_format import RedisKeys

    rng = np.random.default_rng(seed)
    r = redis.Redis.from_url(url)
    key, now, t0 = RedisKeys(prefix).events(), int(time.time()), time.perf_counter()
    for lo in range(0, n, 20_000):
        m = min(20_000, n - lo)
        u, i = rng.integers(0, len(users), m), rng.integers(0, len(items), m)
        ts = now - rng.integers(60, 86_400, m)
        pipe = r.pipeline(transaction=False)
        for a, b, c in zip(u.tolist(), i.tolist(), ts.tolist(), strict=True):
            pipe.xadd(key, {"user": users[a], "item": items[b], "type": "click", "ts": str(c), "rid": ""})
        pipe.execute()
    r.close()
    return time.perf_counter() - t0


def make_shop_bundle(out: Path, *, users: int, items: int, train_steps: int, log: Any = print) -> Path:
    """The trained scale bundle in ``out / "bundle"`` (built once; see the module docstring)."""
    from bench.train_scale import BATCH, MODEL, generate
    from offline.batch_score import batch_score_bundle
    from offline.datasets import load_dataset
    from offline.train import TrainConfig, train
    from towers.model import ModelConfig

    bundle = out / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    t0 = time.perf_counter()
    info = generate(out / "data", n_rows=3 * users, n_items=items, seed=7, per_user=3)
    log(f"shop log: {info['interactions']:,} interactions, {info['users']:,} users, {items:,} items "
        f"({time.perf_counter() - t0:.0f} s)")
    spec = (out / "data" / "spec.yaml").resolve()
    ds = load_dataset(str(spec), cache_dir=spec.parent)
    train(dataset=ds, dataset_spec=str(spec), out=bundle, model_cfg=ModelConfig(**MODEL),  # type: ignore[arg-type]
          train_cfg=TrainConfig(epochs=1, patience=1, batch_size=BATCH, validate=False, fused_adam=True,
                                max_steps=train_steps), index_type="ivf")
    log(f"trained + embedded + indexed ({time.perf_counter() - t0:.0f} s)")
    batch_score_bundle(bundle, k=100)  # exclude_seen is off in the shop spec: nothing to exclude
    log(f"batch-scored ({time.perf_counter() - t0:.0f} s)")
    return bundle


def one(bundle: Path, n: int, max_events: int, work: Path, data_dir: Path) -> dict[str, Any]:
    from bench.procs import RedisProcess
    from offline.publish import publish
    from towers import bundle as bundle_mod

    redis_proc = RedisProcess(work)
    try:
        registry = work / "registry"
        publish(bundle, registry=registry, redis_url=redis_proc.url, redis_prefix="bl")
        b = bundle_mod.load(bundle)
        send_s = _send(redis_proc.url, "bl", list(b.features.user_vocab.values), list(b.item_ids), n, seed=n)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "twotower.cli", "refresh", "--registry", str(registry), "--redis-url",
             redis_proc.url, "--prefix", "bl", "--mode", "embed", "--max-events", str(max_events), "--no-gate",
             "--run-dir", str(work / "runs"), "--store", str(work / "store"), "--data-dir", str(data_dir), "--json"],
            capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"refresh failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        steps = {s["name"]: s for s in report["steps"]}
        return {"backlog": n, "max_events": max_events, "users": len(b.features.user_vocab), "items": len(b.item_ids),
                "send_s": round(send_s, 1), "refresh_wall_s": round(wall, 1),
                # ru_maxrss of children is the largest child so far: each size runs in its own
                # bench process (see main), so it is this refresh's peak.
                "peak_rss_mb": round(max(peak_kb, before) / 1024, 1),
                "read": steps["read"]["result"], "published": steps["publish"]["result"]["published"],
                "step_s": {k: round(float(v["duration_s"]), 2) for k, v in steps.items()}}
    finally:
        redis_proc.stop()


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['backlog']:,}" for r in rows]
    a.bar(labels, [r["peak_rss_mb"] for r in rows], color="tab:blue")
    a.set_title(f"refresh peak RSS (MB), --max-events {rows[0]['max_events']:,}")
    a.set_xlabel("events waiting in the log")
    steps = list(rows[0]["step_s"])
    bottom = np.zeros(len(rows))
    for s in steps:
        vals = np.array([r["step_s"].get(s, 0.0) for r in rows])
        b.bar(labels, vals, bottom=bottom, label=s)
        bottom += vals
    b.set_title("refresh time per step (s)")
    b.set_xlabel("events waiting in the log")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from towers.cliargs import default_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="a trained bundle (history tower)")
    p.add_argument("--make-shop-bundle", type=Path, default=None, metavar="DIR",
                   help="build (or reuse) the synthetic scale bundle in DIR and run on it")
    p.add_argument("--users", type=int, default=1_000_000, help="with --make-shop-bundle")
    p.add_argument("--items", type=int, default=1_000_000, help="with --make-shop-bundle")
    p.add_argument("--train-steps", type=int, default=100, help="with --make-shop-bundle")
    p.add_argument("--backlogs", default="100000,1000000")
    p.add_argument("--max-events", type=int, default=100_000)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--out", type=Path, default=Path("bench/results/refresh_backlog.json"))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, print JSON
    a = p.parse_args(argv)
    if a.make_shop_bundle is not None:
        a.bundle = make_shop_bundle(a.make_shop_bundle, users=a.users, items=a.items, train_steps=a.train_steps)
    if a.bundle is None:
        p.error("--bundle or --make-shop-bundle is required")
    if a.one is not None:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(a.bundle, a.one, a.max_events, Path(d), a.data_dir)))
        return 0
    rows = []
    for n in (int(x) for x in a.backlogs.split(",")):
        # One process per size: the children's ru_maxrss is a high-water mark across children.
        proc = subprocess.run([sys.executable, "-m", "bench.refresh_backlog", "--bundle", str(a.bundle), "--one",
                               str(n), "--max-events", str(a.max_events), "--data-dir", str(a.data_dir)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"backlog {n:,} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    a.out.write_text(json.dumps({"rows": rows, "peak_rss_ratio_last_vs_first": round(ratio, 3)}, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    print(f"peak RSS {rows[-1]['backlog']:,} vs {rows[0]['backlog']:,} events waiting: x{ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
