"""``twotower index build``: rebuild a bundle's FAISS index from its item embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import BundleError


def rebuild_index(bundle_dir: Path, *, kind: str = "auto", recall_target: float = 0.95, seed: int = 0,
                  cache_dir: Path | None = None, batch_size: int = 64, log: Any = print) -> dict[str, Any]:
    """Build an index of ``kind`` (``towers.index.INDEX_TYPES``) over the bundle's item
    embeddings, measure recall@100 against exact search on sampled queries, and write
    index + manifest back atomically (a new version id: publish it again). ``auto`` runs the
    tuner (``offline.index_tune``) on calibration queries and installs its choice; it fails
    (``BundleError``) when no setting meets ``recall_target``. The target is recorded
    (``index.recall_target``) so ``publish`` can refuse an index that falls short of it.
    For trained bundles with a quantized index (and ``cache_dir`` to reload the dataset),
    the end-to-end Recall@20 against float32 is recorded too (``quant.e2e``). Uses the GPU
    for IVF training when ``faiss.get_num_gpus() > 0``. Returns the manifest's ``index``."""
    if kind == "auto":
        from offline.index_tune import tune_index

        report = tune_index(bundle_dir, recall_target=recall_target, batch_size=batch_size, cache_dir=cache_dir,
                            seed=seed, log=log)
        if report["chosen"] is None:
            raise BundleError(f"index build --type auto: {report['message']}")
        entry: dict[str, Any] = bundle_mod.read_manifest(bundle_dir)["index"]
        return entry
    man = bundle_mod.verify(bundle_dir)
    emb = np.load(bundle_dir / "item_embeddings.npy", allow_pickle=False)
    gpus = faiss.get_num_gpus()
    log(f"building {kind} index over {emb.shape[0]:,} x {emb.shape[1]} ({'GPU' if gpus else 'CPU'})")
    index, spec, recall = faiss_index.build_with_recall(emb, kind, recall_target=recall_target, seed=seed,
                                                        progress=log)
    entry = {"spec": spec.to_dict(), "ann_recall@100": recall, "gpus_used": gpus, "recall_target": recall_target,
             "recall_queries": "items perturbed (towers.index.sample_queries)"}
    updates: dict[str, Any] = {"index": entry}
    from offline.quantize import end_to_end, is_trained

    if spec.quantized and is_trained(man) and cache_dir is not None:
        b = bundle_mod.load(bundle_dir)
        quant = dict(man.get("quant", {}))
        quant["e2e"] = end_to_end(b, cache_dir=cache_dir, index=index, spec=spec)
        updates["quant"] = quant
    new = bundle_mod.update_bundle(bundle_dir, {"index.faiss": faiss_index.to_bytes(index)}, updates)
    log(f"index {spec.type}: recall@100 {recall:.4f} (nlist={spec.nlist}, nprobe={spec.nprobe}); "
        f"version {man['version']} -> {new['version']}")
    return entry
