"""``twotower synth-bundle``: a verified bundle with clustered embeddings and no
training, for scale tests and benchmarks (100k-1M items, 1M users).

Embeddings: ``n_clusters`` gaussian centres on the unit sphere; each item is a
centre plus noise, renormalised. MACHINE-FACTS: 1,000 centres make IVF recall
trivially 1.0 at 1M items, so the default scales the centre count with the
catalog (n_items / 100) to keep index choices distinguishable. Users are drawn
near item clusters too. Item popularity follows a Zipf law.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from offline.batch_score import batch_topk
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.combiner import CombinerParams
from towers.features import FeaturePipeline, Vocabulary
from towers.ranking import RankModel


def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 200_000) -> np.ndarray:
    d = centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        x = centres[rng.integers(0, len(centres), size=m)] + noise * rng.standard_normal((m, d), dtype=np.float32)
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_synthetic_bundle(
    out: Path, *, n_items: int, n_users: int, dim: int = 64, seed: int = 0, index_type: str = "auto",
    n_clusters: int | None = None, max_session: int = 10, recs_k: int = 100, progress: bool = True,
    item_prefix: str = "i", recall_target: float = 0.95,
) -> dict[str, Any]:
    """Write a synthetic bundle; ``seed`` changes every array, hence the version id.
    ``item_prefix`` names the items (tests give each version its own, so a response
    mixing versions would show)."""
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or max(8, n_items // 100)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Noise norm ≈ 0.8 x centre norm: clusters overlap, so IVF has to probe (at 1M items
    # recall@100 is ~0.9 at nprobe 1 and needs tens of probes for 0.95); 0.9 needs ~512 probes.
    noise = 0.8 / np.sqrt(dim)
    item_emb = clustered(n_items, centres, noise, rng)
    user_emb = clustered(n_users, centres, 2 * noise, rng)
    # Item rows most popular first; a random order (cluster-independent) is enough here.
    popularity = rng.permutation(n_items).astype(np.int64)
    item_ids = [f"{item_prefix}{j}" for j in range(n_items)]
    user_ids = [f"u{j}" for j in range(n_users)]
    # Vocabulary sorts on fit; build directly so row j is id j's position.
    fp = FeaturePipeline(user_vocab=Vocabulary(user_ids), item_vocab=Vocabulary(item_ids))
    comb = CombinerParams(
        W_s=np.eye(dim, dtype=np.float32), w_a=np.zeros(dim, np.float32),
        pos_bias=(-0.3 * np.arange(max_session)).astype(np.float32), w_g=np.zeros(2 * dim, np.float32),
        b_g=np.zeros(1, np.float32),
    )
    index, spec, recall = faiss_index.build_with_recall(item_emb, index_type, seed=seed, recall_target=recall_target,
                                                        progress=(lambda m: tqdm.write(m)) if progress else None)
    recs_index = index
    if n_items > faiss_index.FLAT_MAX_ITEMS:
        # Searching for every user with the serving index (exact, HNSW, or IVF tuned to a
        # high recall) would dominate the build; precomputed recs are a fallback list, so
        # a cheap IVF pass is good enough for them.
        recs_spec = faiss_index.default_spec("ivf", n_items)
        recs_spec.nprobe = 16
        recs_index = faiss_index.build(item_emb, recs_spec, seed=seed)
    recs_model = RankModel(combiner=comb, item_emb=item_emb, user_emb=user_emb, index=recs_index, popularity=popularity)
    recs_items, recs_scores = batch_topk(recs_model, k=min(recs_k, n_items), progress=progress)
    files: dict[str, Any] = {
        "features.json": fp.dumps(), "combiner.npz": comb.arrays(), "item_embeddings.npy": item_emb,
        "user_embeddings.npy": user_emb, "popularity.npy": popularity, "index.faiss": faiss_index.to_bytes(index),
        "recs_items.npy": recs_items, "recs_scores.npy": recs_scores,
    }
    manifest = {
        "dataset": f"synthetic-embeddings:{n_users}x{n_items}", "seed_tag": seed,
        "shapes": {"n_items": n_items, "n_users": n_users, "dim": dim},
        "index": {"spec": spec.to_dict(), "ann_recall@100": recall}, "metrics": {},
        "model_config": {"dim": dim, "max_session": max_session}, "synthetic": {"n_clusters": n_clusters, "seed": seed},
        "batch": {"k": int(recs_items.shape[1])},
    }
    bundle_mod.write_bundle(out, files, manifest)
    return bundle_mod.verify(out)
