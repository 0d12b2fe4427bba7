"""``twotower replay``: the living loop's proof, on a dataset's own timeline.

Train on the interactions before ``--train-until``; serve that version (a real ``twotower
serve`` on a throwaway Redis); then, day by day, for every interaction of the day in time
order, ask the server for the user's recommendations (the session comes from Redis exactly
as the server reads it) and score the interaction's item against the served list, then send
the interaction through ``RecordEvents``. At each simulated night an arm refreshes:

- ``never``: the trained version serves every day;
- ``embed``: ``refresh --mode embed`` (users re-embedded from their new history);
- ``train``: ``refresh --mode train`` (a warm start on everything so far, then re-embedding).

Every arm sees the same events in the same order. Writes ``replay.json`` (per arm and day:
Recall@20, NDCG@10, events, the version served, the refresh's gate and seconds, failed RPCs,
responses whose version was neither the old nor the new one) and ``replay.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from towers.cliargs import default_data_dir, positive_int
from towers.errors import ConfigError

# The jobs (training, refresh: torch) and the client are imported by the functions that run
# them: the CLI front imports this module for its parser, and ``twotower serve`` never loads torch.

ARMS = ("never", "embed", "train")
K = 50
WITH_USER_EMBEDDING = ("online", "user_only", "batch")  # response sources that used the user's vector


def _day_start(date: str) -> int:
    try:
        d = dt.datetime.fromisoformat(date)
    except ValueError as e:
        raise ConfigError("--train-until", f"{date!r} is not an ISO date (YYYY-MM-DD)") from e
    return int((d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp())


def base_bundle(ds: Any, *, cut: int, work: Path, epochs: int, seed: int = 0) -> Path:
    """The version trained on everything before ``cut`` (cached in ``work``): its dataset is a
    GroupLens directory of those interactions with every user's profile (known at sign-up);
    only users with interactions before ``cut`` get a row, so later users arrive as new users."""
    from offline.datasets import load_dataset, write_grouplens
    from offline.train import TrainConfig, train

    out = work / f"base-{cut}-e{epochs}-s{seed}"
    if (out / "manifest.json").is_file():
        return out
    i = ds.interactions
    before = i.take(np.flatnonzero(i.timestamp < cut))
    data = write_grouplens(replace(ds, interactions=before), work / f"data-{cut}")
    train(dataset=load_dataset(str(data), cache_dir=work), dataset_spec=str(data), out=out,
          train_cfg=TrainConfig(epochs=epochs, patience=3, seed=seed, threads=1))
    return out


def _served_rank(resp: Any, item: str) -> int:
    items = list(resp.item_ids)
    return items.index(item) if item in items else K


def _gate_why(report: dict[str, Any] | None) -> str | None:
    """Why a refresh's gate decided as it did (None without a report)."""
    if report is None:
        return None
    return {s["name"]: s["result"] for s in report["steps"]}.get("evaluate", {}).get("why")


def _wait_version(client: Any, user: str, version: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.recommend(user, k=1).model_version == version:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the server did not switch to {version} within {timeout:.0f} s")


class _Traffic:
    """Closed-loop callers (``concurrency`` threads, one channel each) while a refresh runs:
    counts calls, failed RPCs, and the versions responses name."""

    def __init__(self, target: str, users: list[str], concurrency: int = 4) -> None:
        import threading

        self.target, self.users, self.concurrency = target, users or ["0"], concurrency
        self.stop = threading.Event()
        self.calls = self.failed = 0
        self.versions: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(j,), daemon=True) for j in range(concurrency)]

    def _run(self, j: int) -> None:
        import grpc

        from online.client import RecommenderClient

        with RecommenderClient(self.target, timeout=5.0) as client:
            i = j
            while not self.stop.is_set():
                user = self.users[i % len(self.users)]
                i += self.concurrency
                try:
                    v = client.recommend(user, k=10).model_version
                    with self.lock:
                        self.calls += 1
                        self.versions[v] = self.versions.get(v, 0) + 1
                except grpc.RpcError:
                    with self.lock:
                        self.calls += 1
                        self.failed += 1

    def __enter__(self) -> _Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def summary(self, *, allowed: set[str]) -> dict[str, Any]:
        return {"calls": self.calls, "failed_rpcs": self.failed, "versions": self.versions,
                "responses_from_other_versions": sum(n for v, n in self.versions.items() if v not in allowed)}


def run_arm(arm: str, *, bundle: Path, days: list[list[tuple[str, str, int]]], redis_url: str, work: Path,
            data_dir: Path, train_epochs: int, progress: bool,
            refresh_overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import grpc
    from tqdm import tqdm

    from bench.procs import server
    from offline.publish import publish
    from offline.refresh import RefreshConfig, refresh
    from online.client import RecommenderClient
    from towers import registry as registry_mod

    root = work / f"arm-{arm}"
    shutil.rmtree(root, ignore_errors=True)
    registry = root / "registry"
    prefix = f"replay-{arm}"
    publish(bundle, registry=registry, redis_url=redis_url, redis_prefix=prefix)
    cfg = RefreshConfig(registry=registry, redis_url=redis_url, run_root=root / "runs", store_root=root / "store",
                        data_dir=data_dir, prefix=prefix, mode="train" if arm == "train" else "embed",
                        train_epochs=train_epochs, holdout_s=86_400, grace_s=86_400, **(refresh_overrides or {}))
    config = {"feature_store": "redis", "redis": {"url": redis_url, "prefix": prefix}, "registry_poll_s": 0.2}
    from towers.bundle import load

    known = set(load(bundle, verify_checksums=False).features.user_vocab.values)
    out: list[dict[str, Any]] = []
    with server(registry, batch_size=32, redis_url=redis_url, config=config) as srv, \
            RecommenderClient(srv.target, timeout=5.0) as client:
        for d, events in enumerate(days):
            version = str(registry_mod.current_version(registry))
            ranks, failed, foreign = [], 0, 0
            new_ranks, new_embedded = [], 0
            for user, item, ts in tqdm(events, desc=f"{arm} day {d + 1}", unit="event", disable=not progress,
                                       leave=False):
                try:
                    resp = client.recommend(user, k=K)
                    foreign += resp.model_version != version
                    ranks.append(_served_rank(resp, item))
                    if user not in known:  # arrived after training
                        new_ranks.append(ranks[-1])
                        new_embedded += resp.source in WITH_USER_EMBEDDING
                    client.record_events([(user, item, "click", ts)])
                except grpc.RpcError:
                    failed += 1
            r, nr = np.array(ranks), np.array(new_ranks)
            row: dict[str, Any] = {
                "day": d + 1, "events": len(events), "version": version,
                "recall@20": float(np.mean(r < 20)) if len(r) else 0.0,
                "ndcg@10": float(np.mean(np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0))) if len(r) else 0.0,
                "failed_rpcs": failed, "responses_from_another_version": foreign,
                "new_user_events": len(nr), "new_user_recall@20": float(np.mean(nr < 20)) if len(nr) else None,
                "new_user_served_with_embedding": new_embedded,
                # Per event, for the paired comparison with the frozen arm (not written out).
                "_hits": r < 20, "_users": [u for u, _, _ in events]}
            if arm != "never" and d < len(days) - 1:  # the night after the day
                t0 = time.perf_counter()
                # Serving through the refresh: a closed loop of callers runs from before the
                # refresh until the server answers from the new version.
                with _Traffic(srv.target, sorted(known)[:200]) as traffic:
                    report = refresh(cfg, progress=False, log=lambda _m: None)
                    steps = {s["name"]: s["result"] for s in report["steps"]}
                    pub = steps.get("publish", {})
                    if pub.get("published"):
                        _wait_version(client, events[-1][0] if events else "0", str(pub["version"]))
                new_version = str(pub["version"]) if pub.get("published") else version
                row["refresh"] = {"seconds": round(time.perf_counter() - t0, 2), "published": pub.get("published"),
                                  "gate": steps.get("evaluate", {}).get("why"),
                                  "fallback_from_train": _gate_why(report.get("fallback_from")),
                                  "users_embedded": steps.get("candidate", {}).get("users_embedded"),
                                  "traffic": traffic.summary(allowed={version, new_version})}
            out.append(row)
    return out


def versus_frozen(arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each refreshing arm against ``never`` on the same events: the relative Recall@20 gain
    over the window and per day the paired difference with its standard error (clustered by
    user: a user's events share their vector); the worst day is the lowest difference."""
    from offline.ab_stats import clustered_se

    frozen = arms.get("never")
    if frozen is None:
        return {}
    base = _weighted(frozen, "recall@20")
    out: dict[str, Any] = {}
    for arm, rows in arms.items():
        if arm == "never":
            continue
        days = []
        for r, f in zip(rows, frozen, strict=True):
            d = r["_hits"].astype(np.float64) - f["_hits"]
            se = clustered_se(d, r["_users"]) if len(d) else float("nan")
            days.append({"day": r["day"], "difference": float(d.mean()) if len(d) else 0.0, "se": se})
        worst = min(days, key=lambda x: x["difference"])
        out[arm] = {"gain": _weighted(rows, "recall@20") / base - 1 if base else float("nan"), "days": days,
                    "worst_day": worst, "days_below_frozen_beyond_se": sum(x["difference"] < -x["se"] for x in days)}
    return out


def replay(*, dataset: str = "ml-100k", train_until: str, n_days: int, out: Path, data_dir: Path,
           arms: tuple[str, ...] = ARMS, epochs: int = 10, train_epochs: int = 2, progress: bool = True,
           log: Any = print, refresh_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every arm over the same ``n_days`` after ``train_until``; write JSON + PNG in ``out``."""
    from bench.procs import RedisProcess
    from offline.datasets import load_dataset

    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ConfigError("--arms", f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    ds = load_dataset(dataset, cache_dir=data_dir)
    cut = _day_start(train_until)
    i = ds.interactions
    if not (i.timestamp < cut).any() or not (i.timestamp >= cut).any():
        raise ConfigError("--train-until", f"{train_until}: the dataset has no interactions on one side of it")
    order = np.lexsort((i.item, i.user, i.timestamp))
    days: list[list[tuple[str, str, int]]] = []
    for d in range(n_days):
        lo, hi = cut + d * 86_400, cut + (d + 1) * 86_400
        sel = order[(i.timestamp[order] >= lo) & (i.timestamp[order] < hi)]
        days.append(list(zip(i.user[sel].tolist(), i.item[sel].tolist(), i.timestamp[sel].tolist(), strict=True)))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    log(f"replay: training on {int((i.timestamp < cut).sum()):,} interactions before {train_until}; "
        f"{n_days} days of {sum(map(len, days)):,} events follow")
    bundle = base_bundle(ds, cut=cut, work=work, epochs=epochs)
    redis = RedisProcess(work)
    results: dict[str, Any] = {}
    try:
        for arm in arms:
            t0 = time.perf_counter()
            results[arm] = run_arm(arm, bundle=bundle, days=days, redis_url=redis.url, work=work,
                                   data_dir=data_dir, train_epochs=train_epochs, progress=progress,
                                   refresh_overrides=refresh_overrides)
            log(f"replay arm {arm}: " + ", ".join(f"d{r['day']} {r['recall@20']:.3f}" for r in results[arm])
                + f" ({time.perf_counter() - t0:.0f} s)")
    finally:
        redis.stop()
    summary = {arm: {m: _weighted(rows, m) for m in ("recall@20", "ndcg@10")} | {
        "refresh_traffic_calls": sum(r.get("refresh", {}).get("traffic", {}).get("calls", 0) for r in rows),
        "refresh_traffic_failed_rpcs": sum(r.get("refresh", {}).get("traffic", {}).get("failed_rpcs", 0)
                                           for r in rows),
        "refresh_traffic_other_versions": sum(r.get("refresh", {}).get("traffic", {}).get(
            "responses_from_other_versions", 0) for r in rows),
        "new_user_events": sum(r["new_user_events"] for r in rows),
        "new_user_recall@20": _weighted(rows, "new_user_recall@20", "new_user_events"),
        "new_user_served_with_embedding": sum(r["new_user_served_with_embedding"] for r in rows),
        "failed_rpcs": sum(r["failed_rpcs"] for r in rows),
        "responses_from_another_version": sum(r["responses_from_another_version"] for r in rows)}
        for arm, rows in results.items()}
    versus = versus_frozen(results)
    for rows in results.values():
        for r in rows:
            del r["_hits"], r["_users"]
    report = {"dataset": dataset, "train_until": train_until, "days": n_days, "epochs": epochs,
              "train_epochs": train_epochs, "refresh": refresh_overrides or {}, "k_served": K, "arms": results,
              "summary": summary, "versus_frozen": versus}
    (out / "replay.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "replay.png")
    return report


def _weighted(rows: list[dict[str, Any]], metric: str, weight: str = "events") -> float:
    n = sum(r[weight] for r in rows if r[metric] is not None)
    return sum(r[metric] * r[weight] for r in rows if r[metric] is not None) / n if n else 0.0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("recall@20", "ndcg@10"), strict=True):
        for arm, rows in report["arms"].items():
            ax.plot([r["day"] for r in rows], [r[metric] for r in rows], marker="o",
                    label=f"{arm} ({report['summary'][arm][metric]:.3f})")
        ax.set(title=f"served {metric} per day after {report['train_until']}", xlabel="day", ylabel=metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def replay_windows(*, train_until: list[str], out: Path, **kw: Any) -> dict[str, Any]:
    """``replay`` once per window (``out/DATE``), then ``out/windows.json`` + ``windows.png``:
    per window and refreshing arm, the gain over frozen and the worst day."""
    reports = {d: replay(train_until=d, out=out / d, **kw) for d in train_until}
    table = {d: {arm: {"gain": v["gain"], "worst_day": v["worst_day"],
                       "days_below_frozen_beyond_se": v["days_below_frozen_beyond_se"]}
                 for arm, v in r["versus_frozen"].items()} | {"recall@20": {a: s["recall@20"]
                                                                           for a, s in r["summary"].items()}}
             for d, r in reports.items()}
    arms = sorted({a for r in reports.values() for a in r["versus_frozen"]})
    mean = {a: float(np.mean([table[d][a]["gain"] for d in train_until if a in table[d]])) for a in arms}
    summary = {"windows": table, "mean_gain": mean, "refresh": kw.get("refresh_overrides") or {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "windows.json").write_text(json.dumps(summary, indent=1))
    _plot_windows(reports, out / "windows.png")
    return summary


def _plot_windows(reports: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 4), squeeze=False)
    for ax, (date, r) in zip(axes[0], reports.items(), strict=True):
        for arm, v in r["versus_frozen"].items():
            x = [d["day"] for d in v["days"]]
            y = np.array([d["difference"] for d in v["days"]])
            se = np.array([d["se"] for d in v["days"]])
            ax.errorbar(x, y, yerr=se, marker="o", capsize=3, label=f"{arm}: {v['gain']:+.1%} over the window")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"after {date}: Recall@20 minus frozen (±1 SE)", xlabel="day")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a dataset's timeline through a live server with nightly refreshes "
                                      "(arms: never, embed, train); JSON + PNG")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--train-until", required=True,
                   help="ISO date: train on interactions before it; several, comma-separated: one replay per "
                        "window and windows.json + windows.png beside them")
    p.add_argument("--days", type=positive_int, default=7)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs of the base training")
    p.add_argument("--train-epochs", type=positive_int, default=2, help="warm-start epochs of the train arm")
    p.add_argument("--train-blend", type=float, default=None, help="the refresh's --train-blend (train arm)")
    p.add_argument("--train-min-targets", type=int, default=None, help="the refresh's --train-min-targets")
    p.add_argument("--train-min-users", type=int, default=None, help="the refresh's --train-min-users")
    p.add_argument("--no-train-fallback", action="store_true", help="the refresh's --no-train-fallback")
    p.add_argument("--out", type=Path, default=Path("bench/results/replay"))
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    dates = [d.strip() for d in args.train_until.split(",") if d.strip()]
    overrides: dict[str, Any] = {k: v for k, v in (("train_blend", args.train_blend),
                                                   ("train_min_targets", args.train_min_targets),
                                                   ("train_min_users", args.train_min_users)) if v is not None}
    if args.no_train_fallback:
        overrides["train_fallback"] = False
    kw: dict[str, Any] = {"dataset": args.dataset, "n_days": args.days, "data_dir": args.data_dir,
                          "arms": tuple(a.strip() for a in args.arms.split(",") if a.strip()), "epochs": args.epochs,
                          "train_epochs": args.train_epochs, "refresh_overrides": overrides}
    if len(dates) > 1:
        summary = replay_windows(train_until=dates, out=args.out, **kw)
        for date, row in summary["windows"].items():
            for arm, v in row.items():
                if arm != "recall@20":
                    w = v["worst_day"]
                    print(f"{date} {arm:6s} gain over frozen {v['gain']:+.1%}; worst day {w['day']}: "
                          f"{w['difference']:+.4f} (SE {w['se']:.4f}); days below frozen beyond 1 SE: "
                          f"{v['days_below_frozen_beyond_se']}")
        print(f"mean gain: {summary['mean_gain']}; written: {args.out / 'windows.json'}, {args.out / 'windows.png'}")
        return 0
    report = replay(train_until=dates[0] if dates else args.train_until, out=args.out, **kw)
    for arm, s in report["summary"].items():
        print(f"{arm:6s} Recall@20 {s['recall@20']:.4f}  NDCG@10 {s['ndcg@10']:.4f}  new users: Recall@20 "
              f"{s['new_user_recall@20']:.4f}, {s['new_user_served_with_embedding']}/{s['new_user_events']} served "
              f"with a user embedding  failed RPCs {s['failed_rpcs']}  responses from another version "
              f"{s['responses_from_another_version']}; through refreshes: {s['refresh_traffic_calls']} calls, "
              f"{s['refresh_traffic_failed_rpcs']} failed, {s['refresh_traffic_other_versions']} from other versions")
    print(f"written: {args.out / 'replay.json'}, {args.out / 'replay.png'}")
    return 0
