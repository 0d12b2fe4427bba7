"""Offline jobs (train, evaluate, batch-score, index build, publish, synthetic bundles), each a
plain function with keyword parameters; ``offline.cli`` is the thin CLI over them. These are
the names other code (bench, the demo, tests) uses. Names resolve on first use (PEP 562):
importing ``offline`` does not load torch; only ``train`` does, when it is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towers.lazy import lazy_exports

_EXPORTS = {
    "train": "offline.train", "TrainConfig": "offline.train", "evaluate_bundle": "offline.evaluate",
    "evaluate_model": "offline.evaluate", "eval_set": "offline.evaluate", "format_table": "offline.evaluate",
    "batch_score_bundle": "offline.batch_score", "batch_topk": "offline.batch_score",
    "seen_rows": "offline.batch_score", "load_dataset": "offline.datasets", "temporal_split": "offline.datasets",
    "make_synthetic_bundle": "offline.synth", "rebuild_index": "offline.index_build", "publish": "offline.publish",
    "InteractionRows": "offline.interactions", "InteractionStore": "offline.interactions",
    "RefreshLock": "offline.refresh.run_lock", "RunDir": "offline.refresh.run_steps",
    "run_schedule": "offline.refresh.schedule",
}
__all__ = ["InteractionRows", "InteractionStore", "RefreshLock", "RunDir", "TrainConfig", "batch_score_bundle",
           "batch_topk", "eval_set", "evaluate_bundle", "evaluate_model", "format_table", "load_dataset",
           "make_synthetic_bundle", "publish", "rebuild_index", "run_schedule", "seen_rows", "temporal_split",
           "train"]

if TYPE_CHECKING:
    from offline.batch_score import batch_score_bundle, batch_topk, seen_rows
    from offline.datasets import load_dataset, temporal_split
    from offline.evaluate import eval_set, evaluate_bundle, evaluate_model, format_table
    from offline.index_build import rebuild_index
    from offline.interactions import InteractionRows, InteractionStore
    from offline.publish import publish
    from offline.refresh.run_lock import RefreshLock
    from offline.refresh.run_steps import RunDir
    from offline.refresh.schedule import run_schedule
    from offline.synth import make_synthetic_bundle
    from offline.train import TrainConfig, train


__getattr__ = lazy_exports(__name__, _EXPORTS)
