"""``twotower refresh``: the thin CLI over ``offline.refresh.refresh`` (flags map onto
``RefreshConfig``'s fields; a flag left unset keeps the field's default)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from offline.refresh.config import RefreshConfig
from towers.cliargs import add_config_flags, add_redis_url, config_overrides, default_data_dir, existing_dir
from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX

# Flags that set one RefreshConfig field each: type, choices, help and default come from the field
# (a flag left unset is not passed, so the dataclass is the one source of truth).
REFRESH_FLAGS = {
    "--mode": "mode", "--engine": "engine", "--max-drop": "max_drop", "--epochs": "train_epochs",
    "--train-blend": "train_blend", "--train-min-targets": "train_min_targets",
    "--train-min-users": "train_min_users", "--max-events": "max_events",
    "--store-retention-days": "store_retention_days", "--keep-versions": "keep_versions",
}

# refresh ran, but the event log had lost entries before it read them (its byte cap trimmed them)
EXIT_EVENTS_LOST = 3


def register_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refresh", help="the nightly loop: consume new events, re-embed (or warm-start train), "
                                       "index, batch-score, gate against CURRENT, publish, acknowledge")
    p.add_argument("--registry", required=True, type=Path)
    add_redis_url(p, required=True, help="the Redis the servers write events to (and serve from)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="the serve config's redis.prefix")
    add_config_flags(p, RefreshConfig, REFRESH_FLAGS)
    p.add_argument("--run-dir", type=Path, default=None, help="where run directories go (default: REGISTRY/../runs)")
    p.add_argument("--resume", type=existing_dir, default=None, help="continue a crashed run (its directory)")
    p.add_argument("--store", type=Path, default=None,
                   help="the interaction store (Parquet by day; default: DATA_DIR/interactions)")
    p.add_argument("--holdout-hours", type=float, default=None,
                   help=f"the gate's window: the newest events (default {RefreshConfig.holdout_s / 3600:g})")
    p.add_argument("--no-gate", action="store_true",
                   help="publish even a candidate the holdout says is worse (still measured and reported)")
    p.add_argument("--no-train-fallback", action="store_true",
                   help="train mode: when the gate refuses the retrained model, publish nothing tonight "
                        "(default: an embed run follows, fresh user vectors from CURRENT's towers)")
    p.add_argument("--grace-s", type=float, default=None,
                   help=f"keep retired versions' Redis keys this long (default {RefreshConfig.grace_s})")
    p.add_argument("--flags", type=Path, default=None,
                   help="an A/B flags file: versions a running or paused experiment pins keep their keys and files")
    p.add_argument("--item-features", type=Path, default=None,
                   help="catalog feed in the dataset spec's item schema (the items table's id, feature and "
                        "title columns; CSV, Parquet, JSON lines): new items join with these features")
    p.add_argument("--schedule", default=None, help='run as a scheduler, e.g. "0 3 * * *" (cron, local time)')
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.set_defaults(func=cmd_refresh)


def cmd_refresh(args: argparse.Namespace) -> int:
    from offline.refresh import refresh

    if args.holdout_hours is not None and args.holdout_hours <= 0:
        raise ConfigError("--holdout-hours", "must be positive")
    if args.flags is not None and not args.flags.is_file():
        raise ConfigError("--flags", f"file not found: {args.flags}")
    if args.item_features is not None and not args.item_features.is_file():
        raise ConfigError("--item-features", f"file not found: {args.item_features}")
    if args.resume is not None and args.schedule is not None:
        raise ConfigError("--resume", "resumes one run; it cannot be combined with --schedule")
    given = {"holdout_s": None if args.holdout_hours is None else int(args.holdout_hours * 3600),
             "grace_s": None if args.grace_s is None else int(args.grace_s), **config_overrides(args, REFRESH_FLAGS)}
    cfg = RefreshConfig(registry=args.registry, redis_url=args.redis_url, prefix=args.prefix,
                        run_root=args.run_dir or args.registry.resolve().parent / "runs",
                        store_root=args.store or args.data_dir / "interactions", data_dir=args.data_dir,
                        gate=not args.no_gate, item_features=args.item_features, flags=args.flags,
                        train_fallback=not args.no_train_fallback, **{k: v for k, v in given.items() if v is not None})
    log = (lambda *_: None) if args.json else print

    def once() -> dict[str, Any]:
        report = refresh(cfg, resume=args.resume, log=log)
        steps = {s["name"]: s["result"] for s in report["steps"]}
        if args.json:
            print(json.dumps(report))
        elif "publish" in steps:
            pub = steps["publish"]
            print(f"refresh {report['run_id']}: " + (f"published {pub['version']}" if pub["published"]
                                                     else f"not published: {pub['why']}"))
        return report

    if args.schedule is None:
        report = once()
        read: dict[str, Any] = next((st["result"] for st in report["steps"] if st["name"] == "read"), {})
        if read.get("lost", 0) != 0:  # None (unknown) counts as a loss
            print(f"refresh: event log entries were lost before this run read them: {read.get('lost')} "
                  "(see the read step in the report)", file=sys.stderr)
            return EXIT_EVENTS_LOST
        return 0
    import signal
    import threading

    from offline.refresh.schedule import run_schedule, validate_cron

    validate_cron(args.schedule)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"refresh scheduler: {args.schedule!r}; reports in {cfg.run_root / 'schedule'}")
    run_schedule(cron=args.schedule, job=once, stop=stop, report_dir=cfg.run_root / "schedule")
    return 0
