"""The scoring path shared by ``twotower evaluate`` and the server:
combine → search → filter, as named stages over a batch of queries.

The server times each stage and runs ``search`` off its event loop; evaluate
calls the same methods in the same order, which is what makes offline and
online rankings identical (a test checks it).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from towers.bundle import Bundle
from towers.combiner import CombinerParams, combine

SEARCH_MARGIN = 16  # extra candidates beyond k + exclusions, for IVF/HNSW misses (-1 ids)


@dataclass(frozen=True)
class QueryInput:
    """One request, in catalog rows. ``session`` is most recent first, known items only."""

    user_row: int  # -1: unknown user (or user embedding unavailable)
    session: Sequence[int]
    exclude: Collection[int]


@dataclass(frozen=True)
class Ranked:
    rows: np.ndarray  # int64 item rows, best first
    scores: np.ndarray  # float32


class Scorer:
    """The arrays and index of one bundle version, and the stages over them."""

    def __init__(self, *, combiner: CombinerParams, item_emb: np.ndarray, user_emb: np.ndarray, index: object,
                 popularity: np.ndarray) -> None:
        self.combiner = combiner
        self.item_emb = item_emb
        self.user_emb = user_emb
        self.index = index
        self.popularity = popularity
        self.n_items = int(item_emb.shape[0])
        self.dim = int(item_emb.shape[1])

    @classmethod
    def from_bundle(cls, b: Bundle) -> Scorer:
        return cls(combiner=b.combiner, item_emb=b.item_emb, user_emb=b.user_emb, index=b.index,
                   popularity=b.popularity)

    # -- stage: combine --------------------------------------------------------
    def queries(
        self, inputs: Sequence[QueryInput], user_vectors: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries (B, d) and a mask of rows that have one (user or session).

        ``user_vectors`` (B, d) overrides the bundle's user embeddings (the server
        passes what it fetched from the feature store); rows with ``user_row < 0``
        are treated as unknown either way.
        """
        b, n, d = len(inputs), self.combiner.max_session, self.dim
        has_user = np.array([q.user_row >= 0 for q in inputs], dtype=bool)
        if user_vectors is None:
            rows = np.array([max(q.user_row, 0) for q in inputs], dtype=np.int64)
            user = np.asarray(self.user_emb[rows], dtype=np.float32).reshape(b, d)
        else:
            user = np.asarray(user_vectors, dtype=np.float32)
        user = np.where(has_user[:, None], user, 0.0).astype(np.float32)
        sess_rows = np.zeros((b, n), dtype=np.int64)
        mask = np.zeros((b, n), dtype=bool)
        for i, inp in enumerate(inputs):
            rows_i = list(inp.session)[:n]
            sess_rows[i, : len(rows_i)] = rows_i
            mask[i, : len(rows_i)] = True
        sess = self.item_emb[sess_rows] * mask[..., None]
        queries = combine(self.combiner, user, has_user, sess.astype(np.float32), mask)
        return queries, has_user | mask.any(axis=1)

    # -- stage: search ---------------------------------------------------------
    def search_k(self, inputs: Sequence[QueryInput], k: int) -> int:
        """Candidates to ask the index for so that filtering still leaves k."""
        most = max((len(q.exclude) + len(q.session) for q in inputs), default=0)
        return min(self.n_items, k + most + SEARCH_MARGIN)

    def search(self, q: np.ndarray, k_search: int) -> tuple[np.ndarray, np.ndarray]:
        """One batched index search; FAISS releases the GIL, so callers may run it in a thread."""
        if len(q) == 0:
            return np.zeros((0, k_search), np.float32), np.zeros((0, k_search), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k_search)  # type: ignore[attr-defined]
        return scores, rows

    # -- stage: filter ---------------------------------------------------------
    def filter(self, q_row: np.ndarray, scores: np.ndarray, rows: np.ndarray, inp: QueryInput, k: int) -> Ranked:
        """Drop excluded/session items and index padding; cut to k.

        If an approximate index returned too few eligible candidates, fall back to
        exact scoring for this query, so k results come back whenever the catalog
        has k eligible items.
        """
        banned = set(inp.exclude)
        banned.update(inp.session)
        keep = [j for j, r in enumerate(rows.tolist()) if r >= 0 and r not in banned][:k]
        eligible = self.n_items - sum(1 for r in banned if 0 <= r < self.n_items)
        if len(keep) < min(k, eligible):
            return self.exact(q_row, banned, k)
        return Ranked(rows[keep].astype(np.int64), scores[keep].astype(np.float32))

    def exact(self, q_row: np.ndarray, banned: Collection[int], k: int) -> Ranked:
        s = self.item_emb @ q_row
        if banned:
            s[np.fromiter(banned, dtype=np.int64)] = -np.inf
        k = min(k, self.n_items - len(banned))
        top = np.argpartition(-s, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
        top = top[np.lexsort((top, -s[top]))]
        return Ranked(top.astype(np.int64), s[top].astype(np.float32))

    def popular(self, inp: QueryInput, k: int) -> Ranked:
        """The last rung: the most popular items the request has not excluded."""
        banned = set(inp.exclude)
        banned.update(inp.session)
        rows = [r for r in self.popularity[: k + len(banned)].tolist() if r not in banned][:k]
        if len(rows) < k:
            rows = [r for r in self.popularity.tolist() if r not in banned][:k]
        arr = np.array(rows, dtype=np.int64)
        # Popularity has no similarity score; report rank-based scores that decrease.
        return Ranked(arr, (1.0 / (1.0 + np.arange(len(arr)))).astype(np.float32))

    # -- all stages ------------------------------------------------------------
    def recommend(self, inputs: Sequence[QueryInput], k: int) -> list[Ranked]:
        """combine → search → filter for a batch; popularity where there is no query."""
        q, valid = self.queries(inputs)
        scores, rows = self.search(q, self.search_k(inputs, k))
        return [self.filter(q[i], scores[i], rows[i], inp, k) if valid[i] else self.popular(inp, k)
                for i, inp in enumerate(inputs)]
