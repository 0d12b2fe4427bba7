"""Evaluation (DESIGN §6) through the serving path: precomputed embeddings →
combiner → FAISS search → filter, i.e. ``towers.ranking.rank``, the function whose
stages the server runs.

Metrics per target rank r (0-based, pessimistic: a target tied in score with
other items ranks after all of them): Recall@K = HR@K = [r < K] (one target per
user), NDCG@10 = 1/log2(r + 2) if r < 10. Averaged over users.

Two protocols, picked by the spec's repeat policy (``fp.exclude_seen``):
- ``exclude_seen`` (the default, DESIGN §6): everything the user interacted with
  before the target is removed from the ranking; the session is the most recent of it.
- ``repeat_aware`` (``policies.exclude_seen: false``): history stays in the ranking,
  so a repeat can be the target; the session is the interactions before the target
  that share its group id (order, basket; no group column: the most recent ones),
  most recent first, and only those are removed (they are already in the basket).
  Beside popularity it reports *personal frequency* (the user's own counts, popularity
  breaking ties), the baseline to beat on repeat-heavy data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offline.datasets import Dataset, Split, load_dataset, temporal_split
from towers import bundle as bundle_mod
from towers.context import context_term
from towers.features import FeaturePipeline
from towers.labels import Source
from towers.ranking import QueryBatch, Ranked, RankModel, rank

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
    # The target row's encoded context (its own context columns and timestamp: what the
    # request would carry), by feature name; empty when the spec declares no context.
    context: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, model: RankModel, lo: int, hi: int, *, k: int = MAX_K) -> QueryBatch:
        """Users ``lo:hi`` as the server would see them: user embedding + session + exclusions
        + context."""
        ctx = context_term(model.combiner, {name: x[lo:hi] for name, x in self.context.items()})
        return QueryBatch.from_lists(model, user_rows=self.user_rows[lo:hi], sessions=self.sessions[lo:hi],
                                     excludes=self.excludes[lo:hi], k=k, context=ctx)


def _by_user(split_part: Any, fp: FeaturePipeline) -> dict[str, list[int]]:
    rows = fp.item_vocab.positions(split_part.item)
    out: dict[str, list[int]] = {}
    for u, r in zip(split_part.user.tolist(), rows.tolist(), strict=True):
        out.setdefault(u, []).append(r)
    return out


def eval_set(split: Split, fp: FeaturePipeline, *, max_session: int, which: str = "test") -> EvalSet:
    """The serving-time inputs of each target, by the spec's repeat policy (module docstring).

    ``exclude_seen``: test session = last items of train + the validation item, all of them
    excluded; validation: session = last train items, train items excluded.
    ``repeat_aware``: what came before the target (train, + the validation item for test)
    is read only for the session: the items that share the target's group id (a target
    without one, or data without a group column: the most recent ``max_session`` items),
    most recent first; those session items, and nothing else, are excluded."""
    history = _by_user(split.train, fp)
    target_part = split.test if which == "test" else split.valid
    valid_rows = dict(zip(split.valid.user.tolist(), fp.item_vocab.positions(split.valid.item).tolist(), strict=True))
    valid_ts = dict(zip(split.valid.user.tolist(), split.valid.timestamp.tolist(), strict=True))
    train_last_ts: dict[str, int] = {}
    for u, t in zip(split.train.user.tolist(), split.train.timestamp.tolist(), strict=True):
        train_last_ts[u] = t  # train is sorted by user then time: the last write wins
    repeats = not fp.exclude_seen
    grouped = repeats and split.train.group is not None and target_part.group is not None
    groups: dict[str, list[str]] = {}
    valid_group: dict[str, str] = {}
    if grouped:
        assert split.train.group is not None and split.valid.group is not None
        for u, g in zip(split.train.user.tolist(), split.train.group.tolist(), strict=True):
            groups.setdefault(u, []).append(g)  # aligned with ``history[u]`` (same rows, same order)
        valid_group = dict(zip(split.valid.user.tolist(), split.valid.group.tolist(), strict=True))
    target_groups = target_part.group.tolist() if grouped and target_part.group is not None \
        else [""] * len(target_part)
    sessions, excludes, targets, later = [], [], [], []
    for u, target, ts, tg in zip(target_part.user.tolist(), fp.item_vocab.positions(target_part.item).tolist(),
                                 target_part.timestamp.tolist(), target_groups, strict=True):
        rows = history.get(u, [])
        gs = groups.get(u, [""] * len(rows))
        if which == "test" and u in valid_rows:
            rows, gs = [*rows, valid_rows[u]], [*gs, valid_group.get(u, "")]
        known = [(r, g) for r, g in zip(rows, gs, strict=True) if r >= 0]
        seq = [r for r, _ in known]
        prev_ts = valid_ts.get(u) if which == "test" else train_last_ts.get(u)
        recent = list(dict.fromkeys(seq[::-1]))
        if not repeats:
            sessions.append(recent[:max_session])
            excludes.append(seq)
        else:
            # The basket so far (every item of it is removed, even past the combiner's cut);
            # without a group id, the most recent items, as the server's session would hold.
            basket = (list(dict.fromkeys(r for r, g in reversed(known) if g == tg)) if tg
                      else recent[:max_session])
            sessions.append(basket[:max_session])
            excludes.append(basket)
        targets.append(target)
        later.append(prev_ts is not None and ts > prev_ts)
    return EvalSet(target_part.user, fp.user_vocab.positions(target_part.user), sessions, excludes,
                   np.array(targets, dtype=np.int64), np.array(later, dtype=bool),
                   context=fp.context_features(target_part.context, target_part.timestamp))


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
    by_score = ranked.source[found] != Source.POPULARITY
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
    return _count_ranks(counts, None, es)


def personal_frequency_ranks(counts: np.ndarray, own: dict[str, dict[int, int]], es: EvalSet) -> np.ndarray:
    """Personal frequency baseline: items by the user's own count (``own[user][row]``), then
    by popularity (``counts``); ties pessimistic. Under ``exclude_seen`` it equals popularity
    (every item with an own count is excluded), so it is reported for the repeat-aware protocol."""
    return _count_ranks(counts, [own.get(u, {}) for u in es.users.tolist()], es)


def _count_ranks(counts: np.ndarray, own: list[dict[int, int]] | None, es: EvalSet) -> np.ndarray:
    """0-based pessimistic rank of each target under the order (own count, popularity) among
    the items its user may be shown: the number of eligible items at least as high, minus one.
    Counted without a pass over the catalog per user: the items above a target with no own
    count are the popular ones (one binary search) plus the user's own; a target with an own
    count competes with the user's own items only."""
    ranks = np.empty(len(es), dtype=np.int64)
    by_count = np.sort(counts)
    for i, (excl, t) in enumerate(zip(es.excludes, es.targets.tolist(), strict=True)):
        if t < 0 or t in excl:  # an excluded target cannot be recommended, as for the model
            ranks[i] = MAX_K
            continue
        mine = own[i] if own is not None else {}
        o_t, c_t = mine.get(t, 0), counts[t]
        rows = np.fromiter(mine.keys(), dtype=np.int64, count=len(mine))
        vals = np.fromiter(mine.values(), dtype=np.int64, count=len(mine))
        if o_t == 0:  # every popular item, and every item of the user's own (own count > 0)
            above = len(counts) - int(np.searchsorted(by_count, c_t, side="left")) + int(np.sum(counts[rows] < c_t))
        else:
            above = int(np.sum((vals > o_t) | ((vals == o_t) & (counts[rows] >= c_t))))
        banned = np.unique(np.asarray(excl, dtype=np.int64))
        o_b = np.fromiter((mine.get(b, 0) for b in banned.tolist()), dtype=np.int64, count=len(banned))
        above -= int(np.sum((o_b > o_t) | ((o_b == o_t) & (counts[banned] >= c_t))))
        ranks[i] = above - 1
    return ranks


def user_item_counts(parts: list[Any], fp: FeaturePipeline) -> dict[str, dict[int, int]]:
    """Per raw user id: item row → how many times the user interacted with it in ``parts``."""
    out: dict[str, dict[int, int]] = {}
    for p in parts:
        for u, r in zip(p.user.tolist(), fp.item_vocab.positions(p.item).tolist(), strict=True):
            if r >= 0:
                mine = out.setdefault(u, {})
                mine[r] = mine.get(r, 0) + 1
    return out


def item_counts(parts: list[Any], fp: FeaturePipeline) -> np.ndarray:
    counts = np.zeros(fp.n_items, dtype=np.int64)
    for p in parts:
        rows = fp.item_vocab.positions(p.item)
        np.add.at(counts, rows[rows >= 0], 1)
    return counts


def evaluate_model(model: RankModel, fp: FeaturePipeline, split: Split, *, max_session: int) -> dict[str, Any]:
    """Test and validation metrics under the spec's protocol (``protocol``), the baselines
    beside each (popularity; personal frequency too under ``repeat_aware``), and the 'later'
    subset (users whose test timestamp is after their validation one). The baselines count
    train (+ validation for test): at least the information the model has."""
    result: dict[str, Any] = {"split": "test", "protocol": "exclude_seen" if fp.exclude_seen else "repeat_aware"}
    for which in ("test", "valid"):
        es = eval_set(split, fp, max_session=max_session, which=which)
        ranks = model_ranks(model, es)
        parts = [split.train, split.valid] if which == "test" else [split.train]
        counts = item_counts(parts, fp)
        baselines = {"popularity": popularity_ranks(counts, es)}
        if not fp.exclude_seen:
            baselines["personal_frequency"] = personal_frequency_ranks(counts, user_item_counts(parts, fp), es)
        m: dict[str, Any] = metrics_from_ranks(ranks)
        m["later"] = metrics_from_ranks(ranks[es.later])
        for name, r in baselines.items():
            m[name] = metrics_from_ranks(r)
            m["later"][name] = metrics_from_ranks(r[es.later])
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
    w = 30 if "personal_frequency" in m else 24  # "personal frequency test later"
    lines = [f"{'':{w}s}" + "".join(f"{k:>11s}" for k in keys)]
    if m.get("protocol") == "repeat_aware":
        lines.insert(0, "protocol: repeat-aware (exclude_seen: false; history stays in the ranking, "
                        "the basket so far is removed)")
    names = [b for b in ("popularity", "personal_frequency") if b in m]

    def row(name: str, d: dict[str, Any]) -> None:
        lines.append(f"{name:{w}s}" + "".join(f"{d[k]:11.4f}" for k in keys))

    def label(b: str) -> str:
        return b.replace("_", " ")

    row(f"model test ({m['users']})", m)
    for b in names:
        row(f"{label(b)} test", m[b])
    row(f"model test later ({m['later']['users']})", m["later"])
    for b in names:
        row(f"{label(b)} test later", m["later"][b])
    if "validation" in m:
        row("model valid", m["validation"])
        for b in names:
            if b in m["validation"]:
                row(f"{label(b)} valid", m["validation"][b])
    return "\n".join(lines)
