"""The refresh gate's scoring: each holdout target as the server would serve it, by the
candidate and by CURRENT, and the standard error of their paired difference clustered by
user (``offline.refresh`` evaluate step).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from offline.evaluate import EvalSet, model_ranks
from towers import bundle as bundle_mod
from towers.ranking import RankModel


def clustered_se(d: np.ndarray, groups: list[str]) -> float:
    """Standard error of ``d.mean()`` with observations clustered by group (CR1): a user's
    targets share their vector and session, so they are not independent draws."""
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_g = int(g.max()) + 1 if len(g) else 0
    if n_g < 2:
        return float("inf")
    resid = np.bincount(g, weights=d - d.mean(), minlength=n_g)
    return float(np.sqrt(n_g / (n_g - 1) * np.sum(resid ** 2)) / len(d))


def embed_prefixes(b: bundle_mod.Bundle, users: list[str], prefixes: list[list[str]]) -> np.ndarray:
    """(T, d): each target's user embedding from ``b``'s towers and the items known before it
    (most recent ``history_len``), with the user's features."""
    from towers.model import ModelConfig, embed_users, model_from_arrays

    cfg_m = ModelConfig.from_dict(b.manifest["model_config"])
    with np.load(b.path / "towers.npz", allow_pickle=False) as z:
        model = model_from_arrays(cfg_m, b.features, {k: z[k] for k in z.files})
    rows = b.features.user_vocab.positions(users)
    hist = np.full((len(users), cfg_m.history_len), -1, np.int64)
    for t, prefix in enumerate(prefixes):
        known = [r for r in b.features.item_vocab.positions(prefix[::-1]).tolist() if r >= 0][:cfg_m.history_len]
        hist[t, :len(known)] = known
    vecs = np.zeros((len(users), cfg_m.dim), np.float32)  # a user unknown to ``b`` has no vector
    ok = rows >= 0
    if ok.any():
        vecs[ok] = embed_users(model, b.features, hist[ok], rows=rows[ok], item_emb=np.asarray(b.item_emb))
    return vecs


def hits(b: bundle_mod.Bundle, users: list[str], prefixes: list[list[str]], targets: list[str], *,
          vectors: np.ndarray | None, k: int = 20) -> np.ndarray:
    """(T,) bool: whether each target is in ``b``'s top ``k``, served as the server would:
    the user's vector (``vectors``, else ``b``'s stored row), session = the last items known,
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
        es = replace(es, user_rows=np.where(rows >= 0, np.arange(len(users)), -1))
    return np.asarray(model_ranks(model, es) < k)
