"""``twotower index build``: rebuild a bundle's FAISS index from its item embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from towers import bundle as bundle_mod
from towers import index as faiss_index


def rebuild_index(bundle_dir: Path, *, kind: str = "auto", recall_target: float = 0.95, seed: int = 0,
                  log: Any = print) -> dict[str, Any]:
    """Build an index of ``kind`` (``auto|flat|ivf|hnsw|ivfpq|sq8``) over the bundle's
    item embeddings, measure recall@100 against exact search on sampled queries,
    and write index + manifest back atomically (a new version id: publish it again). Uses the GPU for IVF training when
    ``faiss.get_num_gpus() > 0``. Returns the manifest's new ``index`` entry."""
    man = bundle_mod.verify(bundle_dir)
    emb = np.load(bundle_dir / "item_embeddings.npy", allow_pickle=False)
    gpus = faiss.get_num_gpus()
    log(f"building {kind} index over {emb.shape[0]:,} x {emb.shape[1]} ({'GPU' if gpus else 'CPU'})")
    index, spec, recall = faiss_index.build_with_recall(emb, kind, recall_target=recall_target, seed=seed,
                                                        progress=log)
    entry = {"spec": spec.to_dict(), "ann_recall@100": recall, "gpus_used": gpus}
    new = bundle_mod.update_bundle(bundle_dir, {"index.faiss": faiss_index.to_bytes(index)}, {"index": entry})
    log(f"index {spec.type}: recall@100 {recall:.4f} (nlist={spec.nlist}, nprobe={spec.nprobe}); "
        f"version {man['version']} -> {new['version']}")
    return entry
