"""``twotower ab report`` and ``twotower ab export``: the offline half of the ``ab`` group
(the online half, flags and assignment, is ``online.ab_cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from towers.cliargs import add_redis_url
from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX


def register(asub: argparse._SubParsersAction) -> None:
    """``report`` and ``export``, added to the ``ab`` group by the CLI front."""
    register_report(asub)
    register_export(asub)


def _log_source(p: argparse.ArgumentParser) -> None:
    """The flags every reader of an experiment's logs takes."""
    add_redis_url(p, required=True, help="the Redis the servers log to")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="the serve config's redis.prefix")
    p.add_argument("--experiment", required=True, help="the experiment's name in the flags file")
    p.add_argument("--since", default="0", help="unix seconds or an ISO date/time: logs from then on")


def register_report(asub: argparse._SubParsersAction) -> None:
    """``twotower ab report`` (added to the ``ab`` group by the CLI front)."""
    p = asub.add_parser("report", help="outcomes per variant: impressions joined with events (CTR, conversion, "
                                       "lift, sample ratio)")
    _log_source(p)
    p.add_argument("--flags", type=Path, default=None, help="the flags file: its weights drive the sample-ratio check")
    p.add_argument("--control", default=None, help="the control arm (default: the experiment's first variant)")
    p.add_argument("--store", type=Path, default=None,
                   help="the interaction store (the refresh's --store): each exposed user's clicks and purchases "
                        "in the --pre-days before --since feed CUPED")
    p.add_argument("--pre-days", type=float, default=14.0, help="CUPED's pre-period, in days before --since")
    p.add_argument("--metrics-url", default=None,
                   help="a server's /metrics (or a federation of them): degraded share and p99 per arm as guardrails "
                        "(counted since the servers started)")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of the primary metric's difference by day with its intervals (exposure log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ab_report)


def _since_ms(value: str) -> int:
    import datetime as dt

    if value.replace(".", "", 1).isdigit():
        return int(float(value) * 1000)
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError as e:
        raise ConfigError("--since", f"{value!r} is neither unix seconds nor an ISO date/time") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def cmd_ab_report(args: argparse.Namespace) -> int:
    from offline.ab_interleave import format_interleave, interleave_report, order_variants
    from offline.ab_report import format_report, guardrails, outcome_report, pre_period_counts
    from offline.event_log import EventLog
    from offline.exposure_store import ExposureStore

    since = _since_ms(args.since)
    weights: dict[str, float] | None = None
    order: tuple[str, str] | None = None
    control = args.control
    if args.flags is not None:
        from towers.flags import load_flags

        exp = next((e for e in load_flags(args.flags).experiments if e.name == args.experiment), None)
        if exp is None:
            raise ConfigError("--experiment", f"no experiment {args.experiment!r} in {args.flags}")
        order = (exp.arms[0].name, exp.arms[1].name) if exp.kind == "interleave" else None
        arms = [v for v in exp.variants if not v.shadow]
        # An interleave experiment serves everyone both arms: its weights split nobody.
        weights = {v.name: float(v.weight or 0.0) for v in arms} if exp.kind == "ab" else None
        control = control or arms[0].name
    if control is None:
        raise ConfigError("--control", "name the control arm (or pass --flags)")
    log = EventLog(redis_url=args.redis_url, prefix=args.prefix)
    try:
        events = [e for e, _ in log.events(since_ms=since) if e is not None]
        if args.store is not None and not args.store.is_dir():
            raise ConfigError("--store", f"not a directory: {args.store}")
        # Exposures are bounded by users x days, not by requests: what the refresh copied into
        # the store (kept past the stream's caps), then the stream after the copy's watermark.
        stored = ExposureStore(args.store) if args.store is not None else None
        timed = [*(stored.read(since_s=since // 1000) if stored else ()),
                 *log.timed_exposures(since_ms=since, after=stored.watermark() if stored else None)]
        exposures = [x for _, x in timed]
        pre = None
        if args.store is not None:
            if since <= 0:
                raise ConfigError("--since", "CUPED's pre-period ends where the experiment starts: give --since")
            pre = pre_period_counts(args.store, users={x.user_id for x in exposures}, until=since // 1000,
                                    days=args.pre_days)
            if not any(pre.values()):
                print(f"ab report: CUPED off: the exposed users have no clicks or purchases in the {args.pre_days:g} "
                      "days before --since in the store (the effects are unadjusted)", file=sys.stderr)
                pre = None
        guards = None
        if args.metrics_url:
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(args.metrics_url, timeout=10) as resp:
                    text = resp.read().decode()
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise ConfigError("--metrics-url", f"cannot read {args.metrics_url}: {e}") from e
            guards = guardrails(text, experiment=args.experiment, control=control)
        impressions = list(log.impressions(since_ms=since))
        report = outcome_report(impressions, events, experiment=args.experiment,
                                exposures=exposures or None, control=control, weights=weights, pre=pre, guards=guards)
        il = interleave_report(impressions, events, experiment=args.experiment)
        if il is not None and order is not None:
            il = order_variants(il, order)
    finally:
        log.close()
    if args.json:
        print(json.dumps({**report.to_dict(), "interleave": il.to_dict() if il is not None else None}, indent=1))
    else:
        print(format_report(report) + (f"\n{format_interleave(il)}" if il is not None else ""))
    if args.plot is not None:
        from offline.ab_report import lift_over_time, plot_lift

        plot_lift(lift_over_time(timed, events, experiment=args.experiment, control=control), args.plot)
        print(f"written: {args.plot}", file=sys.stderr)
    return 0


def register_export(asub: argparse._SubParsersAction) -> None:
    p = asub.add_parser("export", help="an experiment's exposures and outcomes as Parquet (GrowthBook / Statsig "
                                       "warehouse-native sources)")
    _log_source(p)
    p.add_argument("--out", type=Path, required=True,
                   help="a directory: exposures.parquet and outcomes.parquet are written into it")
    p.set_defaults(func=cmd_ab_export)


def cmd_ab_export(args: argparse.Namespace) -> int:
    from offline.ab_export import export_experiment
    from offline.event_log import EventLog

    since = _since_ms(args.since)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"not a directory: {args.out}")
    log = EventLog(redis_url=args.redis_url, prefix=args.prefix)
    try:
        summary = export_experiment(log.timed_exposures(since_ms=since),
                                    (e for e, _ in log.events(since_ms=since) if e is not None),
                                    experiment=args.experiment, out=args.out)
    finally:
        log.close()
    print(f"exported {args.experiment}: {summary.exposures:,} exposures of {summary.users:,} users "
          f"({summary.multi_arm_users:,} in more than one arm), {summary.outcomes:,} outcome events -> "
          f"{summary.paths[0]}, {summary.paths[1]}")
    return 0
