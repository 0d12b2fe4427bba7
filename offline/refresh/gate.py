"""The refresh gate (``offline.refresh`` evaluate step): which events are the holdout, each
target scored as the server would serve it by the candidate and by CURRENT, the standard
error of their paired difference clustered by user, and the decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from offline.ab_stats import clustered_se
from offline.evaluate import EvalSet, model_ranks
from offline.interactions import InteractionRows
from towers import bundle as bundle_mod
from towers.ranking import RankModel


def holdout_start(timestamps: np.ndarray, *, window_s: int, min_targets: int, not_before: int | None,
                  users: np.ndarray | None = None, min_users: int = 0) -> int:
    """The holdout is every event at or after the returned time: the newest ``window_s``
    seconds, reaching further back until it holds ``min_targets`` events and ``min_users``
    distinct users (a quiet night's few hundred events cannot tell a retrained model's 5% loss
    from noise, and on ML-100k a day's thousand ratings come from some 30 users: the test is
    clustered by user, so users are its sample size), but never before ``not_before``,
    CURRENT's ``trained_until``: scoring CURRENT on what it trained on would flatter it. A
    train-mode candidate trains on what came before: the window slides a day a night, so each
    night's candidate still learns from one more day than CURRENT did."""
    if not len(timestamps):
        return 0
    ts = np.asarray(timestamps, np.int64)
    order = np.argsort(-ts, kind="stable")  # newest first
    t0 = int(ts[order[0]]) - window_s + 1
    if min_targets > 0:
        t0 = min(t0, int(ts[order[min(min_targets, len(ts)) - 1]]))
    if users is not None and min_users > 0:
        # Position (newest first) where each user first appears; the min_users-th of them.
        _, first = np.unique(np.asarray(users)[order], return_index=True)
        first.sort()
        t0 = min(t0, int(ts[order[first[min(min_users, len(first)) - 1]]]))
    return max(t0, not_before) if not_before is not None else t0


@dataclass(frozen=True, kw_only=True)
class GateRule:
    max_drop: float  # refuse when measurably (95%, paired) worse than CURRENT by more than this share
    min_targets: int  # below: too few to refuse on (measured and reported)
    min_targets_to_accept: int = 0  # a candidate needs this many to pass at all (train mode)
    min_users_to_accept: int = 0  # ... and targets of this many distinct users
    gated: bool = True  # False: whatever the figures, pass (they are still reported)


def decide(hits_c: np.ndarray, hits_p: np.ndarray, users: list[str], rule: GateRule, *,
           stored_rows_ok: bool) -> dict[str, object]:
    """The paired test: per target, hit of candidate minus CURRENT, its mean's standard error
    clustered by user. Refused when the upper 95% bound is below ``-max_drop`` x CURRENT's
    Recall@20 (measurably worse by more than the allowed drop: a plain threshold on two noisy
    means refuses good candidates at random), when the sample is below what the rule needs to
    accept, or when the stored rows do not match the towers."""
    d = hits_c.astype(np.float64) - hits_p
    r_c, r_p = float(hits_c.mean()), float(hits_p.mean())
    se = clustered_se(d, users)  # a user's targets are not independent of each other
    upper = float(d.mean()) + 1.96 * se
    floor = -rule.max_drop * r_p
    few = len(d) < rule.min_targets
    n_users = len(set(users))
    short = len(d) < rule.min_targets_to_accept or n_users < rule.min_users_to_accept
    passed = not rule.gated or (stored_rows_ok and not short and (few or upper >= floor))
    why = (f"candidate Recall@20 {r_c:.4f} vs CURRENT {r_p:.4f} on {len(d)} holdout events of "
           f"{n_users} users (difference {d.mean():+.4f}, 95% upper bound {upper:+.4f}; refused "
           f"below {floor:+.4f}, max drop {rule.max_drop:.0%})")
    if few:
        why += f"; fewer than {rule.min_targets} targets: too few to tell, not refused on them"
    if short:
        why += (f"; fewer than {rule.min_targets_to_accept} targets or {rule.min_users_to_accept} users: too few "
                "to accept a retrained model on (CURRENT's towers stay; a later run has more)")
    if not stored_rows_ok:
        why += "; the candidate's stored user embeddings do not match its towers on the users' history"
    if not rule.gated:
        why += "; gate off"
    return {"targets": len(d), "stored_rows_ok": stored_rows_ok, "candidate": {"recall@20": r_c},
            "current": {"recall@20": r_p}, "difference": float(d.mean()), "se": se, "upper95": upper,
            "floor": floor, "gated": rule.gated, "passed": bool(passed), "why": why}


def embed_prefixes(b: bundle_mod.Bundle, users: list[str], prefixes: list[list[str]], *,
                   new_users: bool = False) -> np.ndarray:
    """(T, d): each target's user embedding from ``b``'s towers and the items known before it
    (most recent ``history_len``), with the user's features. ``new_users``: users ``b`` never
    saw are embedded too, as an embed-mode refresh of ``b`` would embed them (their id in an
    OOV bucket, their features and history); otherwise they get no vector."""
    from towers.model import ModelConfig, embed_users, model_from_arrays

    cfg_m = ModelConfig.from_dict(b.manifest["model_config"])
    fp = b.features.extended(user_ids=[u for u in users if b.features.user_vocab.known(u) < 0]) if new_users \
        else b.features
    with np.load(b.path / "towers.npz", allow_pickle=False) as z:
        model = model_from_arrays(cfg_m, fp, {k: z[k] for k in z.files})
    rows = fp.user_vocab.positions(users)
    hist = np.full((len(users), cfg_m.history_len), -1, np.int64)
    for t, prefix in enumerate(prefixes):
        known = [r for r in b.features.item_vocab.positions(prefix[::-1]).tolist() if r >= 0][:cfg_m.history_len]
        hist[t, :len(known)] = known
    vecs = np.zeros((len(users), cfg_m.dim), np.float32)  # a user unknown to ``b`` has no vector
    ok = rows >= 0
    if ok.any():
        vecs[ok] = embed_users(model, fp, hist[ok], rows=rows[ok], item_emb=np.asarray(b.item_emb))
    return vecs


def hits(b: bundle_mod.Bundle, users: list[str], prefixes: list[list[str]], targets: list[str], *,
          vectors: np.ndarray | None, every_user: bool = False, k: int = 20) -> np.ndarray:
    """(T,) bool: whether each target is in ``b``'s top ``k``, served as the server would:
    the user's vector (``vectors``, for the users ``b`` knows or, ``every_user``, for all;
    else ``b``'s stored row), session = the last items known,
    pessimistic ties. Excluded: every known item (``exclude_seen``), or only the session items
    when the spec keeps past items as candidates (the repeat-aware protocol; the interaction
    store holds no group id, so the session is the most recent items, as the server's is)."""
    fp = b.features
    n = b.combiner.max_session
    known = [[r for r in fp.item_vocab.positions(p).tolist() if r >= 0] for p in prefixes]
    rows = fp.user_vocab.positions(users)
    sessions = [list(dict.fromkeys(seq[::-1]))[:n] for seq in known]
    es = EvalSet(np.array(users), rows, sessions, known if fp.exclude_seen else sessions,
                 fp.item_vocab.positions(targets), np.ones(len(users), bool))
    model = RankModel.from_bundle(b)
    if vectors is not None:
        # One row per target: the vectors become the model's user table for this evaluation.
        model = replace(model, user_emb=np.asarray(vectors, np.float32))
        es = replace(es, user_rows=np.where((rows >= 0) | every_user, np.arange(len(users)), -1))
    return np.asarray(model_ranks(model, es) < k)


def stored_rows_match(cand: bundle_mod.Bundle, affected: np.ndarray, log: InteractionRows, *, seed: int,
                      sample: int = 64) -> bool:
    """The published rows, not only the towers: re-embed a sample of the users a run embedded
    (``affected``, rows of ``cand``) from their whole history in ``log`` and compare with the
    bundle's ``user_embeddings.npy`` (a row misaligned by the candidate step would pass a gate
    that scores only the towers)."""
    if len(affected) == 0:
        return True
    rows = np.sort(np.random.default_rng(seed).choice(affected, min(sample, len(affected)), replace=False))
    users = [cand.features.user_vocab.values[r] for r in rows.tolist()]
    mine = log.take(np.flatnonzero(np.isin(log.user, users)))
    prefixes = [mine.item[mine.user == u].tolist() for u in users]
    again = embed_prefixes(cand, users, prefixes)
    return bool(np.allclose(again, np.asarray(cand.user_emb)[rows], atol=1e-5))
