"""``twotower refresh``: the thin CLI over ``offline.refresh.refresh`` (flags map onto
``RefreshConfig``'s fields; a flag left unset keeps the field's default)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from offline.refresh.config import ENGINES, MODES
from offline.refresh.config import RefreshConfig as D  # the defaults the help shows
from towers.cliargs import add_redis_url, default_data_dir, existing_dir, positive_int
from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX

# refresh ran, but the event log had lost entries before it read them (its byte cap trimmed them)
EXIT_EVENTS_LOST = 3


def register_refresh(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refresh", help="the nightly loop: consume new events, re-embed (or warm-start train), "
                                       "index, batch-score, gate against CURRENT, publish, acknowledge")
    p.add_argument("--registry", required=True, type=Path)
    add_redis_url(p, required=True, help="the Redis the servers write events to (and serve from)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="the serve config's redis.prefix")
    # Every default below is RefreshConfig's (``D``): flags left unset (None) are not passed,
    # so the dataclass is the one source of truth and the help shows its values.
    p.add_argument("--mode", default=None, choices=list(MODES), help=f"default {D.mode}")
    p.add_argument("--engine", default=None, choices=list(ENGINES),
                   help=f"ray: the embedding and batch-scoring steps on a local Ray (the [ray] extra); "
                        f"default {D.engine}")
    p.add_argument("--run-dir", type=Path, default=None, help="where run directories go (default: REGISTRY/../runs)")
    p.add_argument("--resume", type=existing_dir, default=None, help="continue a crashed run (its directory)")
    p.add_argument("--store", type=Path, default=None,
                   help="the interaction store (Parquet by day; default: DATA_DIR/interactions)")
    p.add_argument("--holdout-hours", type=float, default=None,
                   help=f"the gate's window: the newest events (default {D.holdout_s / 3600:g})")
    p.add_argument("--max-drop", type=float, default=None,
                   help="gate: refuse a candidate whose Recall@20 is measurably (95%%) lower than CURRENT's "
                        f"by more than this fraction (default {D.max_drop:g})")
    p.add_argument("--no-gate", action="store_true",
                   help="publish even a candidate the holdout says is worse (still measured and reported)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"train mode: warm-start epochs (default {D.train_epochs})")
    p.add_argument("--train-blend", type=float, default=None,
                   help="train mode: publish this share of the warm start's weights averaged with CURRENT's "
                        f"(default {D.train_blend:g}: the warm start's alone)")
    p.add_argument("--train-min-targets", type=int, default=None,
                   help="train mode: holdout events a retrained model must be scored on to be published "
                        f"(default {D.train_min_targets})")
    p.add_argument("--train-min-users", type=int, default=None,
                   help=f"train mode: ... and the distinct users they come from (default {D.train_min_users})")
    p.add_argument("--no-train-fallback", action="store_true",
                   help="train mode: when the gate refuses the retrained model, publish nothing tonight "
                        "(default: an embed run follows, fresh user vectors from CURRENT's towers)")
    p.add_argument("--grace-s", type=float, default=None,
                   help=f"keep retired versions' Redis keys this long (default {D.grace_s})")
    p.add_argument("--flags", type=Path, default=None,
                   help="an A/B flags file: versions a running or paused experiment pins keep their keys and files")
    p.add_argument("--max-events", type=int, default=None,
                   help="take at most N log entries this run (pending ones first); the rest wait for the next run "
                        f"(default {D.max_events:,})")
    p.add_argument("--store-retention-days", type=int, default=None,
                   help="interaction store: keep this many days of history before the newest event "
                        f"(default {D.store_retention_days}: all)")
    p.add_argument("--keep-versions", type=int, default=None,
                   help="registry retention: keep the newest N versions beside CURRENT and pinned ones (rollbacks; "
                        f"default {D.keep_versions})")
    p.add_argument("--item-features", type=Path, default=None,
                   help="catalog feed in the dataset spec's item schema (the items table's id, feature and "
                        "title columns; CSV, Parquet, JSON lines): new items join with these features")
    p.add_argument("--schedule", default=None, help='run as a scheduler, e.g. "0 3 * * *" (cron, local time)')
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.set_defaults(func=cmd_refresh)


def cmd_refresh(args: argparse.Namespace) -> int:
    from offline.refresh import RefreshConfig, refresh

    if args.holdout_hours is not None and args.holdout_hours <= 0:
        raise ConfigError("--holdout-hours", "must be positive")
    if args.flags is not None and not args.flags.is_file():
        raise ConfigError("--flags", f"file not found: {args.flags}")
    if args.item_features is not None and not args.item_features.is_file():
        raise ConfigError("--item-features", f"file not found: {args.item_features}")
    if args.resume is not None and args.schedule is not None:
        raise ConfigError("--resume", "resumes one run; it cannot be combined with --schedule")
    given = {"mode": args.mode, "engine": args.engine, "max_drop": args.max_drop, "train_epochs": args.epochs,
             "holdout_s": None if args.holdout_hours is None else int(args.holdout_hours * 3600),
             "grace_s": None if args.grace_s is None else int(args.grace_s), "keep_versions": args.keep_versions,
             "max_events": args.max_events, "train_blend": args.train_blend,
             "train_min_targets": args.train_min_targets, "train_min_users": args.train_min_users,
             "store_retention_days": args.store_retention_days}
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
