"""Offline subcommands: train, evaluate, verify, index build/tune, quantize, publish, batch-score, synth-bundle,
example-data, refresh, distill."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from offline.refresh.cli import register_refresh
from towers.cliargs import add_redis_url, default_data_dir, existing_dir, positive_int
from towers.errors import ConfigError
from towers.index import INDEX_TYPES

DATASET_HELP = ("ml-100k | a dataset spec (SPEC.yaml) | a directory of RecBole atomic files (NAME.inter, .item, "
                ".user) | a GroupLens directory | synthetic:UxI[:SEED]")


def dataset_ref(name: str) -> str:
    """What a bundle's manifest records to reload its dataset: a path made absolute (evaluate,
    refresh and batch-score may run from another directory), a name as given."""
    p = Path(name)
    return str(p.resolve()) if p.exists() else name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the towers and write a verified bundle")
    p.add_argument("--dataset", default="ml-100k", help=DATASET_HELP)
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", default="auto", choices=list(INDEX_TYPES))
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: Ray Train, data-parallel workers (DDP, CPU) fed by Ray Data from Parquet; "
                        "the [ray] extra")
    p.add_argument("--workers", type=positive_int, default=2, help="--engine ray: data-parallel workers")
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a bundle on its dataset's test split (serving path)")
    p.add_argument("--bundle", required=True, type=existing_dir)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("verify", help="check a bundle's checksums and shapes")
    p.add_argument("bundle", type=existing_dir)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("index", help="index operations")
    isub = p.add_subparsers(dest="index_command", required=True, parser_class=type(p))
    b = isub.add_parser("build", help="rebuild a bundle's FAISS index and measure its recall@100")
    b.add_argument("--bundle", required=True, type=existing_dir)
    b.add_argument("--type", default="auto", choices=list(INDEX_TYPES))
    b.add_argument("--recall-target", type=float, default=0.95)
    b.add_argument("--data-dir", type=Path, default=Path(default_data_dir()),
                   help="dataset cache (trained bundles: calibration queries and the end-to-end check)")
    b.set_defaults(func=cmd_index_build)
    t = isub.add_parser("tune", help="sweep index types/params on calibration queries; install the cheapest "
                                     "setting that meets the recall target (Pareto report + plot in the bundle)")
    t.add_argument("--bundle", required=True, type=existing_dir)
    t.add_argument("--recall-target", type=float, default=0.95)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--types", default=None, help="comma-separated families (default: "
                   "flat,ivf,sq8,ivfpqfs,ivfpqfs-sq6,ivfpqfs-sq4,ivfpqfs-opq,hnswsq8; also ivfpqfs-raw,"
                   "ivfpqfs-rflat,hnsw,ivfpq)")
    t.add_argument("--nlists", default=None, help="comma-separated IVF list counts to sweep "
                                                  "(default: 4 sqrt(n) and 16 sqrt(n), at least 39 items a list)")
    t.add_argument("--queries", type=positive_int, default=1000, help="calibration queries")
    t.add_argument("--max-bytes-per-item", type=float, default=None, help="memory bound for the choice")
    t.add_argument("--dry-run", action="store_true", help="report only; leave the bundle unchanged")
    t.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    t.add_argument("--json", action="store_true", help="print the whole report as JSON")
    t.set_defaults(func=cmd_index_tune)

    p = sub.add_parser("quantize", help="calibrate int8 user embeddings for the feature store (and measure "
                                        "Recall@20 per dtype); --towers-report: int8 towers users/s and overlap")
    p.add_argument("--bundle", required=True, type=existing_dir)
    p.add_argument("--user-dtype", default="int8", choices=["int8", "float16", "float32"],
                   help="what `publish --redis` stores for this bundle")
    p.add_argument("--towers-report", action="store_true",
                   help="also time the user tower float32 vs dynamic int8 and compare top-100 lists")
    p.add_argument("--report-users", type=positive_int, default=1_000_000)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("publish", help="install a verified bundle into a registry and flip CURRENT")
    p.add_argument("bundle", type=existing_dir)
    p.add_argument("--registry", required=True, type=Path)
    add_redis_url(p, flag="--redis", required=False,
                  help="load user embeddings and precomputed recs into this Redis before the flip")
    p.add_argument("--redis-dtype", default=None, choices=["float32", "float16", "int8"],
                   help="user-embedding encoding in Redis (default: what the bundle declares, else float32)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("batch-score", help="precompute top-K per user into the bundle (the batch path)")
    p.add_argument("--bundle", required=True, type=existing_dir)
    p.add_argument("--k", type=positive_int, default=100)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.set_defaults(func=cmd_batch_score)

    p = sub.add_parser("synth-bundle", help="a verified synthetic bundle (clustered embeddings, no training)")
    p.add_argument("--items", type=positive_int, required=True)
    p.add_argument("--users", type=positive_int, required=True)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", default="auto", choices=list(INDEX_TYPES))
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_synth_bundle)

    p = sub.add_parser("example-data", help="write a small e-commerce-shaped dataset (items, users, view/cart/"
                                            "purchase events, repeat purchases) and its dataset spec")
    p.add_argument("--out", required=True, type=Path, help="directory for items.parquet, users.csv, events.*, "
                                                           "spec.yaml")
    p.add_argument("--users", type=positive_int, default=2000)
    p.add_argument("--items", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--events-format", default="csv", choices=["csv", "parquet"])
    p.set_defaults(func=cmd_example_data)

    register_refresh(sub)

    p = sub.add_parser("distill", help="train a servable student bundle from an expensive teacher ensemble "
                                       "(CE + alpha T^2 KL over in-batch candidates or the catalog); "
                                       "report all side by side")
    p.add_argument("--teacher", required=True, type=Path,
                   help="a bundle, a directory of bundles (ensemble members), or a JSON config of members to train")
    p.add_argument("--out", required=True, type=Path, help="work directory: OUT/student (the bundle), OUT/teacher, "
                                                           "OUT/baseline")
    p.add_argument("--dataset", default="ml-100k", help=DATASET_HELP)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the KL term (0: plain training)")
    p.add_argument("--kd-temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--kl-over", choices=["batch", "catalog"], default="batch",
                   help="candidates of the KL term: the in-batch targets, or every catalog item")
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--baseline", type=existing_dir, default=None,
                   help="today's model to compare with (default: train the default config into OUT/baseline)")
    p.add_argument("--report-dir", type=Path, default=None, help="write distill.json/.md/.png here")
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_distill)



def format_load_report(report: dict[str, Any]) -> str:
    """One line: rows read, kept, and what was dropped or defaulted (``offline.loading``)."""
    parts = [f"{int(report.get('rows_read', report.get('interactions', 0))):,} rows read",
             f"{int(report.get('interactions', 0)):,} interactions of {int(report.get('users', 0)):,} users "
             f"and {int(report.get('items', 0)):,} items"]
    for key, value in report.items():
        if key.startswith("dropped_") and value:
            parts.append(f"{int(value):,} dropped ({key.removeprefix('dropped_').replace('_', ' ')})")
    for who in ("users", "items"):
        n = int(report.get(f"{who}_without_table_row", 0))
        if n:
            example = report.get(f"{who}_without_table_row_example")
            parts.append(f"{n:,} {who} not in their table, kept with missing features"
                         + (f" (e.g. {example!r})" if example else ""))
    return "data: " + "; ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from offline.datasets import load_dataset
    from offline.evaluate import format_table
    from offline.train import TrainConfig, train

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError("--out", f"{args.out} exists and is not a directory")
    if args.engine == "ray":
        from offline.ray_engine import INSTALL_HINT, ray_available

        if not ray_available():  # before the dataset is read: fail fast, naming the flag
            raise ConfigError("--engine", f"ray is not installed; {INSTALL_HINT}")
    ds = load_dataset(args.dataset, cache_dir=args.data_dir)

    out = sys.stderr if args.json else sys.stdout
    if ds.report:  # what loading read, dropped and defaulted: a user should see it before training
        print(format_load_report(ds.report), file=out)
    repeats = int(ds.report.get("repeated_pairs", 0))
    if repeats:
        # Repeat-heavy data (groceries, music) is where the policy matters: say which is in
        # force, so a zero-config (atomic files) user learns that the choice exists.
        policy = ("true: past items are never recommended again" if ds.spec.policies.exclude_seen
                  else "false: past items stay candidates (repeat-aware evaluation)")
        print(f"{repeats:,} of {len(ds.interactions):,} interactions repeat a (user, item) pair; "
              f"policies.exclude_seen is {policy} (set it in a dataset spec)",
              file=out)
    man = train(dataset=ds, dataset_spec=dataset_ref(args.dataset), out=args.out,
                train_cfg=TrainConfig(epochs=args.epochs, seed=args.seed), index_type=args.index,
                engine=args.engine, workers=args.workers)
    if args.json:
        print(json.dumps(man["metrics"]))
    else:
        print(format_table(man["metrics"]))
        print(f"bundle {man['version']} written to {args.out} (trained in {man['train_seconds']} s, "
              f"{man['epochs_run']} epochs)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from offline.evaluate import evaluate_bundle, format_table

    m = evaluate_bundle(args.bundle, cache_dir=args.data_dir)
    print(json.dumps(m) if args.json else format_table(m))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from towers.bundle import verify

    man = verify(args.bundle)
    print(f"ok: {man['version']} ({len(man['files'])} files)")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from offline.index_build import rebuild_index

    if not 0.0 < args.recall_target <= 1.0:
        raise ConfigError("--recall-target", "must be in (0, 1]")
    rebuild_index(args.bundle, kind=args.type, recall_target=args.recall_target, cache_dir=args.data_dir)
    return 0


def cmd_index_tune(args: argparse.Namespace) -> int:
    from offline.index_tune import format_pareto, tune_index

    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    nlists = None
    if args.nlists is not None:
        try:
            nlists = [int(x) for x in args.nlists.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError("--nlists", f"expected comma-separated integers, got {args.nlists!r}") from e
        if not nlists:
            raise ConfigError("--nlists", f"no list count in {args.nlists!r}")
    report = tune_index(args.bundle, recall_target=args.recall_target, batch_size=args.batch_size, types=types,
                        cache_dir=args.data_dir, n_queries=args.queries, max_bytes_per_item=args.max_bytes_per_item,
                        write=not args.dry_run, nlists=nlists, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_pareto(report))
    return 0 if report["chosen"] is not None else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from offline.quantize import calibrate_user_embeddings, int8_embedding_report

    log = (lambda *_: None) if args.json else print
    report = calibrate_user_embeddings(args.bundle, cache_dir=args.data_dir, dtype=args.user_dtype, log=log)
    if args.towers_report:
        report["int8_towers"] = int8_embedding_report(args.bundle, n_users=args.report_users, cache_dir=args.data_dir,
                                                      log=log)
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_batch_score(args: argparse.Namespace) -> int:
    from offline.batch_score import batch_score_bundle, seen_rows
    from towers.bundle import read_manifest

    man = read_manifest(args.bundle)
    synthetic = man["dataset"].startswith("synthetic-embeddings")
    seen = None if synthetic else seen_rows(args.bundle, cache_dir=args.data_dir)
    man = batch_score_bundle(args.bundle, k=args.k, seen=seen)
    print(f"batch recs (k={man['batch']['k']}) stored in {args.bundle}: now version {man['version']}")
    return 0


def cmd_synth_bundle(args: argparse.Namespace) -> int:
    from offline.synth import make_synthetic_bundle

    man = make_synthetic_bundle(args.out, n_items=args.items, n_users=args.users, dim=args.dim, seed=args.seed,
                                index_type=args.index)
    print(f"synthetic bundle {man['version']} ({args.items:,} items, {args.users:,} users, "
          f"{man['index']['spec']['type']} recall@100 {man['index']['ann_recall@100']:.3f}) in {args.out}")
    return 0


def cmd_example_data(args: argparse.Namespace) -> int:
    from offline.example_data import write_example_data

    data = write_example_data(args.out, users=args.users, items=args.items, seed=args.seed,
                              events_format=args.events_format)
    print(f"wrote {', '.join(p.name for p in data.files)} to {data.directory}")
    print(data.summary())
    print(f"next: twotower train --dataset {data.spec} --out runs/shop/bundle")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from offline.publish import publish

    version = publish(args.bundle, registry=args.registry, redis_url=args.redis_url, redis_dtype=args.redis_dtype)
    print(f"published {version}: {args.registry}/CURRENT -> {version}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from offline.datasets import load_dataset
    from offline.distill import distill, format_report
    from offline.train import TrainConfig

    if not args.teacher.exists():
        raise ConfigError("--teacher", f"not found: {args.teacher}")
    if args.alpha < 0 or args.kd_temperature <= 0:
        raise ConfigError("--alpha", "alpha must be >= 0 and --kd-temperature > 0")
    ds = load_dataset(args.dataset, cache_dir=args.data_dir)
    log = (lambda *_: None) if args.json else print
    report = distill(teacher=args.teacher, out=args.out, dataset=ds, dataset_spec=args.dataset, alpha=args.alpha,
                     temperature=args.kd_temperature, full_catalog=args.kl_over == "catalog",
                     baseline=args.baseline, report_dir=args.report_dir,
                     train_cfg=TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads), log=log)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
