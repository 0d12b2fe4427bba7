"""Online subcommands: serve, recommend; registered by the ``twotower`` CLI front."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from online.config import ServeConfig
from online.tls import add_client_tls_flags
from towers.cliargs import add_config_flags, config_overrides, flag_of, secret_file
from towers.errors import ConfigError

# Flags that set one ServeConfig field each: type, choices, help and default come from the field.
SERVE_FLAGS = {
    "--host": "host", "--port": "port", "--max-batch-size": "batching.max_batch_size",
    "--max-wait-ms": "batching.max_wait_ms", "--max-pending": "batching.max_pending",
    "--shed-answer": "batching.shed_answer", "--default-deadline-ms": "default_deadline_ms",
    "--workers": "workers.workers", "--max-age-s": "workers.max_age_s", "--max-requests": "workers.max_requests",
    "--max-rss-mb": "workers.max_rss_mb", "--drain-grace-s": "workers.drain_grace_s", "--transport": "transport",
    "--flags": "flags_file", "--max-resident-mb": "max_resident_mb", "--tls-cert": "tls.cert",
    "--tls-key": "tls.key", "--tls-client-ca": "tls.client_ca", "--metrics-port": "metrics_port",
    "--admin-host": "admin_host", "--admin-port": "admin_port", "--admin-token-file": "admin_token_file",
    "--log-format": "log_format",
}
STORE_FLAG = {"--feature-store": "feature_store"}  # in the --redis-url group


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the registry's CURRENT bundle (or one bundle) over gRPC")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--registry", type=Path, help="serve CURRENT and hot-swap when it changes (production)")
    what.add_argument("--bundle", type=Path, help="serve this one bundle directory, no registry (one process)")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--redis-url", default=None, help="use Redis as the feature store (or --redis-url-file)")
    store.add_argument("--redis-url-file", dest="redis_url", type=secret_file, default=None, metavar="FILE",
                       help="--redis-url's URL from the first line of FILE (keeps a password off the command line)")
    add_config_flags(store, ServeConfig, STORE_FLAG)
    p.add_argument("--config", type=Path, default=None, help="JSON file of ServeConfig settings (flags win over it)")
    add_config_flags(p, ServeConfig, SERVE_FLAGS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recommend", help="ask a running server for recommendations")
    p.add_argument("--user", required=True)
    p.add_argument("--session", default="", help="comma-separated recent item ids, most recent first")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--mode", choices=["auto", "online", "batch"], default="auto")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                   help="a context value the model's spec declares (repeatable): --context device=mobile")
    p.add_argument("--timestamp", type=int, default=0,
                   help="request time, unix seconds, for derived context (hour/day); 0: the server's clock")
    p.add_argument("--target", default="127.0.0.1:50051")
    add_client_tls_flags(p)
    p.set_defaults(func=cmd_recommend)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from online.config import load_config
    from online.logs import configure_logging
    from online.server import start_server

    flags = {**SERVE_FLAGS, **STORE_FLAG}
    if args.redis_url:
        args.feature_store = "redis"
    try:
        cfg = load_config(args.config, **config_overrides(args, flags))
    except ConfigError as e:
        raise flag_of(args, flags, e) from None
    configure_logging(level=logging.INFO, fmt=cfg.log_format)
    if args.redis_url:
        from dataclasses import replace

        cfg = replace(cfg, redis=replace(cfg.redis, url=args.redis_url))
    from online.admin_auth import check_admin_exposure
    from online.tls import load_server_tls

    load_server_tls(cfg.tls)  # bad TLS files or an exposed admin port: one clear error, before any worker starts
    check_admin_exposure(cfg)
    if cfg.flags_file:
        from towers.flags import load_flags

        load_flags(Path(cfg.flags_file))  # an invalid file: one clear error, before any worker starts
    w = cfg.workers
    if w.workers > 1 or w.max_age_s or w.max_requests or w.max_rss_mb:
        if args.bundle is not None:
            raise ConfigError("--bundle", "serves one process; use --registry for workers and recycling")
        # Several processes, or recycling: a gRPC-free supervisor of spawned workers.
        from online.supervisor import run_supervisor

        return run_supervisor(cfg, args.registry)
    if args.bundle is not None and not (args.bundle / "manifest.json").is_file():
        raise ConfigError("--bundle", f"{args.bundle} is not a bundle directory (no manifest.json)")

    async def main() -> None:
        from online.exporter import start_exporter

        running = await start_server(cfg, registry=args.registry, bundle_path=args.bundle)
        exporter = (start_exporter(running.service.metrics.registry, host=cfg.host, port=cfg.metrics_port)
                    if cfg.metrics_port >= 0 else None)
        print(f"serving {running.service.model.version if running.service.model else '-'} on "
              f"{cfg.host}:{running.port} ({cfg.feature_store} feature store)"
              + (f"; metrics on http://{cfg.host}:{exporter.port}/metrics" if exporter else ""), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await running.stop(grace=cfg.workers.drain_grace_s)
        if exporter is not None:
            exporter.close()

    asyncio.run(main())
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from online.client import RecommenderClient
    from online.tls import client_credentials
    from towers.errors import TwoTowerError

    session = [s for s in args.session.split(",") if s]
    context = parse_context(args.context)
    with RecommenderClient(args.target, timeout=2.0, credentials=client_credentials(args)) as client:
        try:
            resp = client.recommend(args.user, k=args.k, recent=session, mode=args.mode, include_titles=True,
                                    context=context, timestamp=args.timestamp)
        except grpc.RpcError as e:
            raise TwoTowerError(f"{e.code().name}: {e.details()}") from e
    print(format_response(resp))
    return 0


def parse_context(pairs: list[str]) -> dict[str, str]:
    """``--context KEY=VALUE`` flags as a dict (the value may contain "=")."""
    from towers.errors import ConfigError

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--context", f"expected KEY=VALUE, got {pair!r}")
        if key in out and out[key] != value:
            raise ConfigError("--context", f"{key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def format_response(r: Any) -> str:
    """A RecommendResponse as a few readable lines."""
    from towers.labels import Rung

    lines = [f"version {r.model_version}  rung {Rung(r.rung).label}  source {r.source}  "
             f"total {r.timings.total_us / 1000:.2f} ms"]
    for reason in r.reasons:
        lines.append(f"  reason: {reason}")
    titles = list(r.titles) or [""] * len(r.item_ids)
    for n, (i, s, t) in enumerate(zip(r.item_ids, r.scores, titles, strict=True), 1):
        lines.append(f"  {n:2d}. {i:>8s}  {s:7.4f}  {t}")
    return "\n".join(lines)

