"""Users' item histories: what the history-reading user tower reads (``towers.model``),
built from time-ordered interaction logs. Shared by training (one window per example),
embedding at train time and by the refresh, and the offline reports."""

from __future__ import annotations

import numpy as np

from offline.datasets import Interactions
from towers.features import FeaturePipeline


def lagged_items(users: np.ndarray, items: np.ndarray, n: int) -> np.ndarray:
    """(E, n): for each row of a per-user time-ordered log, the ``n`` items before it, most
    recent first, -1 padded (never crossing into another user's rows)."""
    e = len(users)
    out = np.full((e, n), -1, dtype=np.int64)
    new_user = np.r_[True, users[1:] != users[:-1]] if e else np.zeros(0, bool)
    start = np.maximum.accumulate(np.where(new_user, np.arange(e), 0)) if e else np.zeros(0, np.int64)
    for lag in range(1, n + 1):
        src = np.arange(e) - lag
        ok = src >= start
        out[ok, lag - 1] = items[src[ok]]
    return out


def user_histories(fp: FeaturePipeline, log: Interactions, n: int, *,
                   users: np.ndarray | None = None) -> np.ndarray:
    """Each user's last ``n`` item rows in ``log``, most recent first, -1 padded: what the
    user tower reads at embedding time. Shape (n_users, n), or (len(users), n) for the user
    rows ``users`` (a refresh embeds only some: a million-row table would be 400 MB).
    ``log`` must be in time order within each user (``temporal_split``'s parts and the
    interaction store are). Unknown users and items are skipped."""
    rows_of = fp.user_vocab.positions(log.user)
    items = fp.item_vocab.positions(log.item)
    if users is None:
        out_row = rows_of
        out = np.full((fp.n_users, n), -1, dtype=np.int64)
    else:
        slot = {int(u): j for j, u in enumerate(np.asarray(users).tolist())}
        out_row = np.fromiter((slot.get(int(u), -1) for u in rows_of.tolist()), dtype=np.int64, count=len(rows_of))
        out = np.full((len(slot), n), -1, dtype=np.int64)
    keep = (out_row >= 0) & (items >= 0)
    out_row, items = out_row[keep], items[keep]
    if n == 0 or len(out_row) == 0:
        return out
    order = np.argsort(out_row, kind="stable")  # groups users, keeps each one's time order
    out_row, items = out_row[order], items[order]
    last = np.r_[out_row[1:] != out_row[:-1], True]
    ends = np.flatnonzero(last)  # each user's last row
    pos_from_end = np.repeat(ends, np.diff(np.r_[-1, ends])) - np.arange(len(out_row))
    take = pos_from_end < n
    out[out_row[take], pos_from_end[take]] = items[take]
    return out
