"""Batch scoring: the precomputed top-K per user that ``mode=BATCH`` serves by
one lookup, and the degradation ladder falls back to.

The query is the user embedding alone (no session: that is the real-time part),
ranked by ``towers.ranking.rank`` like the server's user-only requests; items the
user already interacted with are excluded when the spec's repeat policy says so
(``policies.exclude_seen``, the default; with ``false`` past items stay candidates, as
on the server), and the search runs in chunks of users with FAISS' BLAS path on
(offline only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.ranking import QueryBatch, RankModel, rank


def batch_topk(model: RankModel, *, k: int, seen: Sequence[Sequence[int]] | None = None, chunk: int = 4096,
               progress: bool = True, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) int32 item rows (-1 padded) and float32 scores of each user's
    ``towers.ranking.rank`` with no session, excluding ``seen[j]`` (aligned with the users):
    exactly what the server's user-only path would rank. ``users``: these user rows only
    (a refresh re-scores the users it re-embedded); default every user."""
    users = np.arange(len(model.user_emb)) if users is None else np.asarray(users, dtype=np.int64)
    n = len(users)
    rows_out = np.full((n, k), -1, dtype=np.int32)
    scores_out = np.zeros((n, k), dtype=np.float32)
    with faiss_index.offline_blas():
        for lo in tqdm(range(0, n, chunk), desc="batch-score", unit="chunk", disable=not progress):
            hi = min(n, lo + chunk)
            excludes: Sequence[Sequence[int]] = seen[lo:hi] if seen is not None else [()] * (hi - lo)
            qb = QueryBatch.from_lists(model, user_rows=users[lo:hi], sessions=[()] * (hi - lo),
                                       excludes=excludes, k=k)
            ranked = rank(model, qb)
            rows_out[lo:hi] = ranked.rows
            scores_out[lo:hi] = ranked.scores
    return rows_out, scores_out


def batch_score_bundle(bundle_dir: Path, *, k: int = 100, seen: Sequence[Sequence[int]] | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Compute and store ``recs_items.npy``/``recs_scores.npy`` in the bundle."""
    b = bundle_mod.load(bundle_dir)
    rows, scores = batch_topk(RankModel.from_bundle(b), k=min(k, len(b.item_ids)), seen=seen, progress=progress)
    return bundle_mod.update_bundle(bundle_dir, {"recs_items.npy": rows, "recs_scores.npy": scores},
                                    {"batch": {"k": int(rows.shape[1])}})


def seen_rows(bundle_dir: Path, *, cache_dir: Path) -> list[list[int]]:
    """Per user row: what batch scoring excludes for the user: the item rows of the user's
    training interactions (from the bundle's dataset), or nothing when the bundle's spec keeps
    past items as candidates (``exclude_seen: false``; the dataset is not even read)."""
    from offline.datasets import load_dataset, temporal_split

    b = bundle_mod.load(bundle_dir, verify_checksums=False)
    if not b.features.exclude_seen:
        return [[] for _ in range(len(b.features.user_vocab))]
    split = temporal_split(load_dataset(b.manifest["dataset"], cache_dir=cache_dir).interactions)
    users = b.features.user_vocab.positions(split.train.user)
    items = b.features.item_vocab.positions(split.train.item)
    seen: list[list[int]] = [[] for _ in range(len(b.features.user_vocab))]
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        if u >= 0 and i >= 0:
            seen[u].append(i)
    return seen
