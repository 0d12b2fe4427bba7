"""Training at e-commerce scale: ``python -m bench.train_scale [--sizes 1000000,10000000]
[--items 1000000] [--work DIR] [--out bench/results/train_scale.json]``.

Generates a synthetic log shaped like a shop's (1M items; every feature kind: categorical
brand and category, multi_categorical tags, numeric price, text title, bucketized rating;
users with a categorical country and a bucketized age; context: the device column and the
hour derived from the event time; repeat purchases of each user's staples), writes it the
way a user would hand it over (the interactions as Parquet shards, an items and a users
Parquet table, a spec YAML), and for each size trains ONE epoch through the normal path:
``load_dataset(spec)`` → ``temporal_split`` → ``fit_pipeline`` → ``train_model`` (a small
model: history_len 4, batch 4096; no per-epoch validation, which at 1M items would cost more
than the epoch).

Each size runs in its own child process, so the sizes do not contaminate each other's peak
RSS; inside it, each phase's peak is measured alone (``/proc/self/clear_refs`` resets the
high-water mark, ``VmHWM`` reads it). Reported: seconds and peak RSS per phase, the model's
own bytes (weights + gradients + AdamW's two moments), what the loaded dataset holds per
interaction, and the growth 1M → 10M (goal: time linear, RSS = model + a fixed buffer). A
size runs only if the one before it took less than ``--max-prev-s`` (default 300 s). Writes
JSON and a PNG. The machine is shared: times are noisy, ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = np.array(["mobile", "desktop", "app"])
COUNTRIES = np.array(["DE", "FR", "NL", "IT", "ES", "PL", "SE", "AT", "BE", "DK", "CZ", "PT", "IE", "FI", "GR"])
TAGS = np.array([f"tag{k:02d}" for k in range(60)])
ADJECTIVES = np.array(["Classic", "Organic", "Original", "Extra", "Light", "Fresh", "Bio", "Double", "Mini", "Gold",
                       "Family", "Pure", "Smart", "Ultra", "Eco", "Premium"])
NOUNS = np.array([f"{a}{b}" for a in ("Sol", "Mar", "Ven", "Kor", "Lum", "Tar", "Bel", "Dor", "Fen", "Ril")
                  for b in ("ix", "a", "on", "et", "us", "or", "ia", "el", "um", "ar")])  # 100 product nouns
SIZES = np.array(["250g", "500g", "1kg", "6-pack", "12-pack", "1L", "2L", "S", "M", "L", "XL"])
N_CATEGORIES = 400
N_BRANDS = 20_000
PER_USER = 20  # mean interactions per user: users = interactions / 20
STAPLES = 4  # items a user buys again and again
REPEAT, HOME = 0.25, 0.50  # shares of rows: a staple bought again, a home-category item; the rest: anywhere
MODEL = {"dim": 32, "id_dim": 32, "side_dim": 8, "hidden": 64, "history_len": 4, "history_staleness": 1,
         "max_session": 4}
BATCH = 4096

SPEC = """\
# A synthetic e-commerce log at scale (bench/train_scale.py).
name: {name}
interactions:
  path: interactions
  user: user_id
  item: item_id
  time: ts
  context:
    - {{column: device, kind: categorical}}
    - {{column: ts, name: hour, kind: categorical, derive: hour_of_day}}
items:
  path: items.parquet
  id: item_id
  title: title
  features:
    - {{column: brand, kind: categorical, min_count: 2, oov_buckets: 8}}
    - {{column: category, kind: categorical}}
    - {{column: tags, kind: multi_categorical, max_len: 4}}
    - {{column: price, kind: numeric, log: true}}
    - {{column: title, kind: text, max_len: 6, buckets: 8192}}
    - {{column: rating, kind: bucketized, edges: [2.0, 3.0, 3.5, 4.0, 4.5]}}
users:
  path: users.parquet
  id: user_id
  features:
    - {{column: country, kind: categorical}}
    - {{column: age, kind: bucketized, quantiles: 5}}
policies:
  exclude_seen: false  # staples are bought again
"""


# --------------------------------------------------------------------------- the data


def _ids(prefix: str, n: int) -> np.ndarray:
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype("U"), len(str(n - 1))))


def write_items(out: Path, n_items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The items table (Parquet); returns what the log generator needs (category, popularity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cat = rng.integers(0, N_CATEGORIES, n_items)
    # Brands live in a few categories each, popular ones more often (Zipf).
    brand = (cat * 37 + np.minimum(rng.zipf(1.3, n_items), 5000)) % N_BRANDS
    price = np.round(np.exp(rng.normal(np.log(2.0 + (cat % 40)), 0.5)), 2)
    rating = np.round(np.clip(rng.normal(3.9, 0.6, n_items), 1.0, 5.0), 1)
    rating[rng.random(n_items) < 0.1] = np.nan  # unrated items
    n_tags = rng.integers(0, 4, n_items)
    flat = rng.integers(0, len(TAGS), int(n_tags.sum()))
    offsets = np.r_[0, np.cumsum(n_tags)].astype(np.int32)
    brands = _ids("brand", N_BRANDS)
    title = np.char.add(np.char.add(np.char.add(brands[brand], " "), ADJECTIVES[rng.integers(0, len(ADJECTIVES),
                                                                                             n_items)]), " ")
    title = np.char.add(np.char.add(np.char.add(title, NOUNS[(cat * 7 + rng.integers(0, 5, n_items)) % len(NOUNS)]),
                                    " "), SIZES[rng.integers(0, len(SIZES), n_items)])
    ids = _ids("i", n_items)
    table = pa.table({
        "item_id": pa.array(ids), "brand": pa.array(brands[brand]),
        "category": pa.array(_ids("cat", N_CATEGORIES)[cat]),
        "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(TAGS[flat])), "price": pa.array(price),
        "title": pa.array(title), "rating": pa.array(rating, from_pandas=True)})
    pq.write_table(table, out / "items.parquet", row_group_size=131072)
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.05
    pop = pop[rng.permutation(n_items)]
    return {"cat": cat, "pop": pop / pop.sum()}


def write_log(out: Path, n_rows: int, items: dict[str, np.ndarray], rng: np.random.Generator, *,
              shard_users: int = 50_000, per_user: int = PER_USER) -> dict[str, int]:
    """The users table and the interactions as Parquet shards (a shard per ``shard_users``
    users), generated chunk by chunk so the generator holds one chunk at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_users = max(1, n_rows // per_user)
    cat, pop = items["cat"], items["pop"]
    n_items = len(cat)
    order = np.argsort(cat, kind="stable")
    bounds = np.searchsorted(cat[order], np.arange(N_CATEGORIES + 1))
    cdf_in = np.cumsum(pop[order])  # popularity CDF in category order: a category is a range of it
    cdf_all = np.cumsum(pop)
    # Heavy-tailed activity with the exact total: everyone has at least 3 interactions.
    counts = 3 + rng.multinomial(n_rows - 3 * n_users, (w := rng.gamma(1.5, size=n_users)) / w.sum())
    user_ids, item_ids = _ids("u", n_users), _ids("i", n_items)
    pq.write_table(pa.table({"user_id": pa.array(user_ids), "country": pa.array(COUNTRIES[rng.integers(
        0, len(COUNTRIES), n_users)]), "age": pa.array(np.where(rng.random(n_users) < 0.05, np.nan, rng.integers(
            16, 80, n_users).astype(np.float64)), from_pandas=True)}), out / "users.parquet")
    (out / "interactions").mkdir(exist_ok=True)
    repeats = 0

    def in_category(c: np.ndarray) -> np.ndarray:
        lo = np.where(bounds[c] > 0, cdf_in[np.maximum(bounds[c] - 1, 0)], 0.0)
        hi = cdf_in[bounds[c + 1] - 1]
        j = np.searchsorted(cdf_in, lo + rng.random(len(c)) * (hi - lo))
        return order[np.clip(j, bounds[c], bounds[c + 1] - 1)]

    for shard, u0 in enumerate(range(0, n_users, shard_users)):
        u1 = min(n_users, u0 + shard_users)
        m = u1 - u0
        home = rng.integers(0, N_CATEGORIES, (m, 2))
        staples = in_category(home[np.arange(m).repeat(STAPLES), rng.integers(0, 2, m * STAPLES)]).reshape(m,
                                                                                                            STAPLES)
        device_pref = rng.integers(0, len(DEVICES), m)
        c = counts[u0:u1]
        user = np.repeat(np.arange(m), c)
        n = len(user)
        kind = rng.random(n)
        item = np.minimum(np.searchsorted(cdf_all, rng.random(n)), n_items - 1)  # anywhere, by popularity
        is_home = (kind >= REPEAT) & (kind < REPEAT + HOME)
        item[is_home] = in_category(home[user[is_home], rng.integers(0, 2, int(is_home.sum()))])
        is_rep = kind < REPEAT
        item[is_rep] = staples[user[is_rep], rng.integers(0, STAPLES, int(is_rep.sum()))]
        repeats += int(is_rep.sum())
        device = np.where(rng.random(n) < 0.7, device_pref[user], rng.integers(0, len(DEVICES), n))
        # Each user's events spread over ~3 months from their own start, in time order.
        gaps = rng.exponential(4 * 86400.0, n)
        start = np.r_[0, np.cumsum(c)[:-1]]
        t = np.cumsum(gaps)
        t -= np.repeat(t[start] - gaps[start], c)
        ts = (1_700_000_000 + rng.integers(0, 30 * 86400, m)[user] + t).astype(np.int64)
        pq.write_table(pa.table({"user_id": pa.array(user_ids[u0 + user]), "item_id": pa.array(item_ids[item]),
                                 "ts": pa.array(ts), "device": pa.array(DEVICES[device])}),
                       out / "interactions" / f"part-{shard:05d}.parquet", row_group_size=262144)
    return {"users": n_users, "repeat_rows": repeats}


def generate(out: Path, *, n_rows: int, n_items: int, seed: int = 0, per_user: int = PER_USER) -> dict[str, Any]:
    """Write the dataset for ``n_rows`` interactions into ``out`` (kept: a later run reuses it);
    ``n_rows // per_user`` users (each at least 3 interactions)."""
    done = out / "generated.json"
    if done.is_file():
        info: dict[str, Any] = json.loads(done.read_text())
        return info
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    items = write_items(out, n_items, rng)
    info = {"interactions": n_rows, "items": n_items, **write_log(out, n_rows, items, rng, per_user=per_user)}
    (out / "spec.yaml").write_text(SPEC.format(name=f"shop-scale-{n_rows}"))
    info["generate_s"] = round(time.perf_counter() - t0, 1)
    info["bytes_on_disk"] = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    done.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- one size (a child process)


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _held_bytes(ds: Any) -> dict[str, int]:
    """What the loaded dataset keeps: numpy buffers, and Python objects in list columns."""
    def size(v: Any) -> int:
        if isinstance(v, np.ndarray):
            return int(v.nbytes) + (sum(sys.getsizeof(x) for x in v.tolist()) if v.dtype == object else 0)
        if isinstance(v, list):  # a list of Python objects: the list's pointers + each object
            return sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v)
        return 0

    i = ds.interactions
    out = {k: size(getattr(i, k)) for k in ("user", "item", "rating", "timestamp", "weight", "group")}
    out.update({f"context:{k}": size(v) for k, v in i.context.items()})
    return out


def run_one(spec: Path, *, fused_adam: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Load, split, fit and train one epoch on ``spec``; seconds and peak RSS per phase."""
    t_import = time.perf_counter()
    import torch

    from offline.datasets import load_dataset, temporal_split
    from offline.train import TrainConfig, fit_pipeline, train_model
    from towers.model import ModelConfig

    rep: dict[str, Any] = {"phases": {}, "peak_reset": _reset_peak()}

    cpu0 = [0.0]  # the import phase counts from the process start

    def phase(name: str, t0: float) -> None:
        # CPU seconds beside wall seconds: on a shared machine the wall clock also counts the
        # time other jobs held the cores.
        cpu = _cpu_s()
        rep["phases"][name] = {"s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu - cpu0[0], 2),
                               "peak_rss": _status("VmHWM"), "rss_after": _status("VmRSS")}
        cpu0[0] = cpu
        _reset_peak()

    phase("import", t_import)
    t0 = time.perf_counter()
    ds = load_dataset(str(spec), cache_dir=spec.parent)
    phase("load", t0)
    held = _held_bytes(ds)
    rep["dataset_held_bytes"] = held
    rep["interactions"] = n = len(ds.interactions)
    rep["dataset_bytes_per_interaction"] = round(sum(held.values()) / n, 1)
    t0 = time.perf_counter()
    split = temporal_split(ds.interactions)
    phase("split", t0)
    t0 = time.perf_counter()
    fp = fit_pipeline(ds, split.train)
    phase("fit_pipeline", t0)
    cfg = ModelConfig(**MODEL)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    model, _fp, _split, history = train_model(ds, model_cfg=cfg, progress=False, split=split, fp=fp,
                                              train_cfg=TrainConfig(epochs=1, batch_size=BATCH, validate=False,
                                                                    fused_adam=fused_adam, max_steps=max_steps))
    phase("train", t0)
    rep["train_examples"] = len(split.train)
    rep["steps_per_epoch"] = -(-len(split.train) // BATCH)
    rep["steps"] = min(rep["steps_per_epoch"], max_steps or rep["steps_per_epoch"])
    rep["s_per_step"] = round(history[0]["train_s"] / max(rep["steps"], 1), 4)
    rep["partial_epoch"] = rep["steps"] < rep["steps_per_epoch"]
    # A capped run's epoch is its measured seconds per step times the epoch's steps.
    rep["epoch_s"] = round(rep["s_per_step"] * rep["steps_per_epoch"], 1) if rep["partial_epoch"] \
        else history[0]["train_s"]
    rep["users"], rep["items"] = fp.n_users, fp.n_items
    params = sum(p.numel() for p in model.parameters())
    rep["model_params"] = params
    rep["model_bytes"] = params * 4 * 4  # float32 weights + gradients + AdamW's exp_avg and exp_avg_sq
    rep["peak_rss"] = max(p["peak_rss"] for p in rep["phases"].values())
    rep["threads"] = torch.get_num_threads()
    return rep


# --------------------------------------------------------------------------- the bench


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "phases" in r]
    if not runs:
        return
    labels = [_label(r["interactions"]) for r in runs]
    phases = ["load", "split", "fit_pipeline", "train"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    bottom = np.zeros(len(runs))
    for ph in phases:
        # The train bar is one whole epoch: measured, or seconds per step x steps (hatched).
        v = np.array([r["epoch_s"] if ph == "train" else r["phases"][ph]["s"] for r in runs])
        bars = ax[0].bar(labels, v, bottom=bottom, label="one epoch" if ph == "train" else ph)
        if ph == "train":
            for bar, r in zip(bars, runs, strict=True):
                if r["partial_epoch"]:
                    bar.set_hatch("//")
        bottom += v
    ax[0].set(title="seconds: load, split, fit, one epoch (hatched: projected)", ylabel="s")
    ax[0].legend()
    x = np.arange(len(runs))
    for k, ph in enumerate(phases):
        ax[1].bar(x + (k - 1.5) * 0.2, [r["phases"][ph]["peak_rss"] / 2**30 for r in runs], 0.2, label=f"peak: {ph}")
    ax[1].plot(x, [r["model_bytes"] / 2**30 for r in runs], "k_", markersize=30, mew=2, label="model + AdamW")
    ax[1].set_xticks(x, labels)
    ax[1].set(title="peak RSS per phase (GiB)", ylabel="GiB")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _total_s(run: dict[str, Any]) -> float:
    """Load + split + fit + one whole epoch (projected when the run was capped)."""
    return sum(run["phases"][k]["s"] for k in ("load", "split", "fit_pipeline")) + run["epoch_s"]


def growth(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How ``b`` (the larger size) grew from ``a``: ratios, and the RSS per extra interaction
    beyond the model's own growth."""
    rows = b["interactions"] / a["interactions"]
    extra_rss = (b["peak_rss"] - a["peak_rss"]) - (b["model_bytes"] - a["model_bytes"])
    return {
        "interactions_ratio": round(rows, 2),
        "epoch_s_ratio": round(b["epoch_s"] / a["epoch_s"], 2),
        "s_per_step_ratio": round(b["s_per_step"] / a["s_per_step"], 2),
        "epoch_measured_whole": not (a["partial_epoch"] or b["partial_epoch"]),
        "load_s_ratio": round(b["phases"]["load"]["s"] / a["phases"]["load"]["s"], 2),
        "total_s_ratio": round(_total_s(b) / _total_s(a), 2),
        "train_cpu_s_ratio": round(b["phases"]["train"]["cpu_s"] / a["phases"]["train"]["cpu_s"], 2),
        "load_cpu_s_ratio": round(b["phases"]["load"]["cpu_s"] / a["phases"]["load"]["cpu_s"], 2),
        "peak_rss_ratio": round(b["peak_rss"] / a["peak_rss"], 2),
        "peak_rss_bytes_per_extra_interaction": round(extra_rss / (b["interactions"] - a["interactions"]), 1),
        "load_peak_bytes_per_extra_interaction": round(
            (b["phases"]["load"]["peak_rss"] - a["phases"]["load"]["peak_rss"]) /
            (b["interactions"] - a["interactions"]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000000,10000000", help="interactions per run, comma separated")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("runs/bench/train_scale"), help="generated data (kept)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_scale.json"))
    ap.add_argument("--max-prev-s", type=float, default=300.0,
                    help="run a size only if the previous one's load + train took less than this")
    ap.add_argument("--fused-adam", action="store_true", help="TrainConfig.fused_adam (default: the default AdamW)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train at most this many steps of the epoch (TrainConfig.max_steps); the epoch's time is "
                         "then seconds per step x its steps, reported as partial_epoch")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # one size: SPEC -> JSON on stdout
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, fused_adam=args.fused_adam, max_steps=args.max_steps)))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    report: dict[str, Any] = {"model": MODEL, "batch_size": BATCH, "epochs": 1, "items": args.items,
                              "fused_adam": args.fused_adam, "max_steps": args.max_steps,
                              "cpus": os.cpu_count(), "runs": [],
                              "note": "a shared 2-core machine (other jobs beside it): seconds are noisy"}
    prev_s: float | None = None
    for n in sizes:
        if prev_s is not None and prev_s >= args.max_prev_s:
            report["runs"].append({"interactions": n, "skipped": f"the previous size took {prev_s:.0f} s "
                                                                 f"(>= --max-prev-s {args.max_prev_s:.0f})"})
            continue
        d = args.work / f"{_label(n)}-{_label(args.items)}"
        info = generate(d, n_rows=n, n_items=args.items)
        print(f"{_label(n)}: data in {d} ({info})", flush=True)
        cmd = [sys.executable, "-m", "bench.train_scale", "--child", str(d / "spec.yaml")]
        cmd += ["--fused-adam"] * args.fused_adam + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            report["runs"].append({"interactions": n, "error": proc.stderr.strip().splitlines()[-1:]})
            print(proc.stderr[-3000:], file=sys.stderr)
            break
        run = {**json.loads(proc.stdout.strip().splitlines()[-1]), "data": info}
        report["runs"].append(run)
        prev_s = sum(p["s"] for k, p in run["phases"].items() if k != "import")
        print(f"{_label(n)}: " + ", ".join(f"{k} {p['s']} s / peak {p['peak_rss'] / 2**30:.2f} GiB"
                                           for k, p in run["phases"].items()), flush=True)
        _write(report, args.out)  # after every size: a long run that dies keeps what it measured
    _write(report, args.out)
    print(json.dumps(report.get("growth", {})))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _write(report: dict[str, Any], out: Path) -> None:
    done = [r for r in report["runs"] if "phases" in r]
    if len(done) >= 2:
        report["growth"] = growth(done[0], done[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
