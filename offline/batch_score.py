"""Batch scoring: the precomputed top-K per user that ``mode=BATCH`` serves by
one lookup, and the degradation ladder falls back to.

The query is the user embedding alone (no session: that is the real-time part),
ranked by ``towers.ranking.rank`` like the server's user-only requests; items the
user already interacted with are excluded, and the search runs in chunks of users
with FAISS' BLAS path on (offline only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.ranking import QueryBatch, RankModel, rank


def batch_topk(model: RankModel, *, k: int, seen: Sequence[Sequence[int]] | None = None, chunk: int = 4096,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, k) int32 item rows (-1 padded) and float32 scores of every user's
    ``towers.ranking.rank`` with no session, excluding ``seen[u]``: exactly what the
    server's user-only path would rank."""
    n = len(model.user_emb)
    rows_out = np.full((n, k), -1, dtype=np.int32)
    scores_out = np.zeros((n, k), dtype=np.float32)
    with faiss_index.offline_blas():
        for lo in tqdm(range(0, n, chunk), desc="batch-score", unit="chunk", disable=not progress):
            hi = min(n, lo + chunk)
            excludes: Sequence[Sequence[int]] = seen[lo:hi] if seen is not None else [()] * (hi - lo)
            qb = QueryBatch.from_lists(model, user_rows=np.arange(lo, hi), sessions=[()] * (hi - lo),
                                       excludes=excludes, k=k)
            ranked = rank(model, qb)
            rows_out[lo:hi] = ranked.rows
            scores_out[lo:hi] = ranked.scores
    return rows_out, scores_out


def batch_score_bundle(bundle_dir: Path, *, k: int = 100, seen: Sequence[Sequence[int]] | None = None,
                       progress: bool = True, topk: Callable[..., tuple[np.ndarray, np.ndarray]] = batch_topk,
                       ) -> dict[str, Any]:
    """Compute and store ``recs_items.npy``/``recs_scores.npy`` in the bundle. ``topk``: the
    engine (``batch_topk``, or ``offline.ray_engine.batch_topk_ray`` with its work dir bound)."""
    b = bundle_mod.load(bundle_dir)
    rows, scores = topk(RankModel.from_bundle(b), k=min(k, len(b.item_ids)), seen=seen, progress=progress)
    return bundle_mod.update_bundle(bundle_dir, {"recs_items.npy": rows, "recs_scores.npy": scores},
                                    {"batch": {"k": int(rows.shape[1])}})


def seen_rows(bundle_dir: Path, *, cache_dir: Path) -> list[list[int]]:
    """Per user row: the item rows of the user's training interactions (from the bundle's dataset)."""
    from offline.datasets import load_dataset, temporal_split

    b = bundle_mod.load(bundle_dir, verify_checksums=False)
    split = temporal_split(load_dataset(b.manifest["dataset"], cache_dir=cache_dir).interactions)
    users = b.features.user_vocab.positions(split.train.user)
    items = b.features.item_vocab.positions(split.train.item)
    seen: list[list[int]] = [[] for _ in range(len(b.features.user_vocab))]
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        if u >= 0 and i >= 0:
            seen[u].append(i)
    return seen
