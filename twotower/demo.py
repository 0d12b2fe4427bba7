"""``twotower demo``: the main job end to end on embedded defaults.

ML-100k → train → evaluate → bundle (+ batch recs) → publish to a local registry
→ serve it in-process on a free port (in-memory feature store) → real gRPC calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from towers.cliargs import default_data_dir, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the end-to-end demo on ML-100k with embedded defaults")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.set_defaults(func=lambda args: run_demo(workdir=args.workdir, epochs=args.epochs, cache_dir=args.data_dir))


def run_demo(*, workdir: Path, epochs: int, cache_dir: Path) -> int:
    from offline.batch_score import batch_score_bundle, seen_rows
    from offline.datasets import load_dataset
    from offline.evaluate import format_table
    from offline.train import TrainConfig, train
    from towers import registry as registry_mod

    workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir = workdir / "bundle"
    print(f"== train on ml-100k ({epochs} epochs max, early stopping) ==")
    ds = load_dataset("ml-100k", cache_dir=cache_dir)
    man = train(dataset=ds, dataset_spec="ml-100k", out=bundle_dir, train_cfg=TrainConfig(epochs=epochs))
    print(f"trained in {man['train_seconds']} s ({man['epochs_run']} epochs); bundle {man['version']}")
    print("== evaluation (test split, serving path; popularity baseline beside it) ==")
    print(format_table(man["metrics"]))
    print("== batch scoring (top-100 per user) ==")
    batch_score_bundle(bundle_dir, k=100, seen=seen_rows(bundle_dir, cache_dir=cache_dir), progress=False)
    registry = workdir / "registry"
    version = registry_mod.publish(bundle_dir, registry)
    print(f"published {version} -> {registry}/CURRENT")
    return serve_and_call(registry=registry, titles=ds.titles())


def serve_and_call(*, registry: Path, titles: dict[str, str]) -> int:
    """Serve the registry's CURRENT bundle in-process on a free port; make real gRPC calls."""
    import numpy as np

    from online.cli import format_response
    from online.client import RecommenderClient
    from online.config import load_config
    from online.server import ServerThread

    cfg = load_config(port=0)
    print("== serve (in-process gRPC on a free port, in-memory feature store) ==")
    t0 = time.perf_counter()
    srv = ServerThread(cfg, registry=registry)
    print(f"SERVING {srv.running.service.model.version if srv.running.service.model else '?'} on {srv.target} "
          f"after load + warmup in {time.perf_counter() - t0:.2f} s")
    try:
        with RecommenderClient(srv.target, timeout=2.0) as c:
            print(f"health: {c.health()}")
            print("\n-- user 1, no session (user embedding only) --")
            print(format_response(c.recommend("1", k=5, include_titles=True)))
            toy_story, star_wars = "1", "50"
            print(f"\n-- user 1 with a request session: {titles.get(star_wars)}, {titles.get(toy_story)} --")
            print(format_response(c.recommend("1", k=5, recent=[star_wars, toy_story], include_titles=True)))
            print("\n-- user 1 after RecordEvents (clicked three horror films) --")
            now = int(time.time())
            c.record_events([("1", "184", "click", now), ("1", "200", "click", now + 1), ("1", "219", "view", now + 2)])
            print(format_response(c.recommend("1", k=5, include_titles=True)))
            print("\n-- unknown user with a session (session-only query) --")
            print(format_response(c.recommend("new-visitor", k=5, recent=["172", "181"], include_titles=True)))
            print("\n-- unknown user, no session (popularity) --")
            print(format_response(c.recommend("another-visitor", k=5, include_titles=True)))
            print("\n-- user 42, mode=BATCH (precomputed top-K, one lookup) --")
            print(format_response(c.recommend("42", k=5, mode="batch", include_titles=True)))
            lat = []
            for i in range(500):
                t = time.perf_counter()
                c.recommend(str(1 + i % 943), k=10, recent=[str(1 + (i * 7) % 1682)])
                lat.append(time.perf_counter() - t)
            ms = np.array(lat) * 1000
            print(f"\nlatency of 500 sequential Recommend calls (client-measured, k=10, with session): "
                  f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms")
    finally:
        srv.stop()
    return 0
