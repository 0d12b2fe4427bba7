"""``twotower demo``: the main job end to end on embedded defaults.

ML-100k → train → evaluate → bundle (+ batch recs) → publish to a local registry
→ serve it in-process on a free port (in-memory feature store) → real gRPC calls.
"""

from __future__ import annotations

from pathlib import Path

from offline.batch_score import batch_score_bundle, seen_rows
from offline.datasets import load_dataset
from offline.evaluate import format_table
from offline.train import TrainConfig, train
from towers import registry as registry_mod


def run_demo(*, workdir: Path, epochs: int, cache_dir: Path) -> int:
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
    try:
        from online.demo_calls import serve_and_call
    except ImportError:
        return 0
    return serve_and_call(registry=registry, titles=ds.titles())
