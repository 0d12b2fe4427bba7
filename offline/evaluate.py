"""Evaluation (DESIGN §6) through the serving path: precomputed embeddings →
combiner → FAISS search → filter, i.e. ``towers.ranking.rank``, the function whose
stages the server runs.

Metrics per target rank r (0-based, pessimistic: a target tied in score with
other items ranks after all of them): Recall@K = HR@K = [r < K] (one target per
user), NDCG@10 = 1/log2(r + 2) if r < 10. Averaged over users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline.datasets import Dataset, Split, load_dataset, temporal_split
from towers import bundle as bundle_mod
from towers.features import FeaturePipeline
from towers.ranking import POPULARITY, QueryBatch, Ranked, RankModel, rank

METRIC_KS = {"recall@10": 10, "recall@20": 20, "hr@50": 50}
MAX_K = 50


@dataclass(frozen=True)
class EvalSet:
    """One target per user, with the serving-time inputs for it (item rows)."""

    users: np.ndarray  # raw user ids
    user_rows: np.ndarray  # (U,) int64 user rows (-1: unknown)
    sessions: list[list[int]]  # most recent first, cut to the combiner's max_session
    excludes: list[list[int]]  # every item the user interacted with before the target
    targets: np.ndarray  # item rows (-1: target unknown to the catalog)
    later: np.ndarray  # bool: target timestamp strictly after the previous target's

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, model: RankModel, lo: int, hi: int, *, k: int = MAX_K) -> QueryBatch:
        """Users ``lo:hi`` as the server would see them: user embedding + session + exclusions."""
        return QueryBatch.from_lists(model, user_rows=self.user_rows[lo:hi], sessions=self.sessions[lo:hi],
                                     excludes=self.excludes[lo:hi], k=k)


def _by_user(split_part: Any, fp: FeaturePipeline) -> dict[str, list[int]]:
    rows = fp.item_vocab.positions(split_part.item)
    out: dict[str, list[int]] = {}
    for u, r in zip(split_part.user.tolist(), rows.tolist(), strict=True):
        out.setdefault(u, []).append(r)
    return out


def eval_set(split: Split, fp: FeaturePipeline, *, max_session: int, which: str = "test") -> EvalSet:
    """Test: session = last items of train + the validation item; exclude all of them.
    Validation: session = last train items; exclude train items."""
    history = _by_user(split.train, fp)
    target_part = split.test if which == "test" else split.valid
    valid_rows = dict(zip(split.valid.user.tolist(), fp.item_vocab.positions(split.valid.item).tolist(), strict=True))
    valid_ts = dict(zip(split.valid.user.tolist(), split.valid.timestamp.tolist(), strict=True))
    train_last_ts: dict[str, int] = {}
    for u, t in zip(split.train.user.tolist(), split.train.timestamp.tolist(), strict=True):
        train_last_ts[u] = t  # train is sorted by user then time: the last write wins
    sessions, excludes, targets, later = [], [], [], []
    for u, target, ts in zip(target_part.user.tolist(), fp.item_vocab.positions(target_part.item).tolist(),
                             target_part.timestamp.tolist(), strict=True):
        seq = [r for r in history.get(u, []) if r >= 0]
        if which == "test" and valid_rows.get(u, -1) >= 0:
            seq = [*seq, valid_rows[u]]
        prev_ts = valid_ts.get(u) if which == "test" else train_last_ts.get(u)
        sessions.append(list(dict.fromkeys(seq[::-1]))[:max_session])
        excludes.append(seq)
        targets.append(target)
        later.append(prev_ts is not None and ts > prev_ts)
    return EvalSet(target_part.user, fp.user_vocab.positions(target_part.user), sessions, excludes,
                   np.array(targets, dtype=np.int64), np.array(later, dtype=bool))


def pessimistic_ranks(model: RankModel, batch: QueryBatch, ranked: Ranked, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among eligible items; ``MAX_K`` or more means not in the list.

    A target tied in score with other items ranks after all of them. Where the list's last
    score still ties the target, the ties may continue past the list's end: they are counted
    over the whole catalog with exact scores on both sides (FAISS rounds differently from
    numpy). The popularity fallback is not ranked by a query, so its ties count within the list.
    """
    b, width = ranked.rows.shape
    ranks = np.full(b, MAX_K, dtype=np.int64)
    if width == 0:
        return ranks
    hit = (ranked.rows == targets[:, None]) & (targets[:, None] >= 0)
    found = np.flatnonzero(hit.any(axis=1))
    if len(found) == 0:
        return ranks
    in_list = np.arange(width)[None, :] < ranked.counts[found, None]
    ts = ranked.scores[found, hit[found].argmax(axis=1)]
    ranks[found] = ((ranked.scores[found] >= ts[:, None]) & in_list).sum(axis=1) - 1
    last = ranked.scores[found, np.maximum(ranked.counts[found] - 1, 0)]
    by_score = ranked.source[found] != POPULARITY
    for i in found[by_score & (last >= ts)].tolist():
        s = model.item_emb @ ranked.queries[i]
        s[batch.banned_rows(i)] = -np.inf
        ranks[i] = int(np.sum(s >= s[targets[i]])) - 1
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, Any]:
    if len(ranks) == 0:
        return {**{k: 0.0 for k in METRIC_KS}, "ndcg@10": 0.0, "users": 0}
    out: dict[str, Any] = {name: float(np.mean(ranks < k)) for name, k in METRIC_KS.items()}
    out["ndcg@10"] = float(np.mean(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)))
    out["users"] = len(ranks)
    return out


def model_ranks(model: RankModel, es: EvalSet, *, batch: int = 1024) -> np.ndarray:
    """Each user's target rank through ``towers.ranking.rank``: the server's ranking path."""
    ranks = np.empty(len(es), dtype=np.int64)
    for lo in range(0, len(es), batch):
        hi = min(len(es), lo + batch)
        qb = es.batch(model, lo, hi)
        ranks[lo:hi] = pessimistic_ranks(model, qb, rank(model, qb), es.targets[lo:hi])
    return ranks


def popularity_ranks(counts: np.ndarray, es: EvalSet) -> np.ndarray:
    """Popularity baseline: items by count (ties → higher row first is arbitrary, so pessimistic)."""
    ranks = np.empty(len(es), dtype=np.int64)
    for i, (excl, t) in enumerate(zip(es.excludes, es.targets.tolist(), strict=True)):
        if t < 0 or t in excl:  # an excluded target cannot be recommended, as for the model
            ranks[i] = MAX_K
            continue
        banned = np.zeros(len(counts), dtype=bool)
        banned[excl] = True
        ranks[i] = int(np.sum((counts >= counts[t]) & ~banned)) - 1
    return ranks


def item_counts(parts: list[Any], fp: FeaturePipeline) -> np.ndarray:
    counts = np.zeros(fp.n_items, dtype=np.int64)
    for p in parts:
        rows = fp.item_vocab.positions(p.item)
        np.add.at(counts, rows[rows >= 0], 1)
    return counts


def evaluate_model(model: RankModel, fp: FeaturePipeline, split: Split, *, max_session: int) -> dict[str, Any]:
    """Test and validation metrics, the popularity baseline beside each, and the
    'later' subset (users whose test timestamp is after their validation one)."""
    result: dict[str, Any] = {"split": "test"}
    for which in ("test", "valid"):
        es = eval_set(split, fp, max_session=max_session, which=which)
        ranks = model_ranks(model, es)
        counts = item_counts([split.train, split.valid] if which == "test" else [split.train], fp)
        pop = popularity_ranks(counts, es)
        m: dict[str, Any] = metrics_from_ranks(ranks)
        m["popularity"] = metrics_from_ranks(pop)
        m["later"] = metrics_from_ranks(ranks[es.later])
        m["later"]["popularity"] = metrics_from_ranks(pop[es.later])
        if which == "test":
            result.update(m)
        else:
            result["validation"] = m
    return result


def evaluate_bundle(bundle_dir: Path, *, cache_dir: Path, dataset: Dataset | None = None) -> dict[str, Any]:
    """``twotower evaluate``: reload the bundle's dataset, re-split, score via the bundle's index."""
    b = bundle_mod.load(bundle_dir)
    ds = dataset or load_dataset(b.manifest["dataset"], cache_dir=cache_dir)
    split = temporal_split(ds.interactions)
    return evaluate_model(RankModel.from_bundle(b), b.features, split, max_session=b.combiner.max_session)


def format_table(m: dict[str, Any]) -> str:
    keys = ["recall@10", "recall@20", "ndcg@10", "hr@50"]
    lines = [f"{'':24s}" + "".join(f"{k:>11s}" for k in keys)]

    def row(name: str, d: dict[str, Any]) -> None:
        lines.append(f"{name:24s}" + "".join(f"{d[k]:11.4f}" for k in keys))

    row(f"model test ({m['users']})", m)
    row("popularity test", m["popularity"])
    row(f"model test later ({m['later']['users']})", m["later"])
    row("popularity test later", m["later"]["popularity"])
    if "validation" in m:
        row("model valid", m["validation"])
        row("popularity valid", m["validation"]["popularity"])
    return "\n".join(lines)
