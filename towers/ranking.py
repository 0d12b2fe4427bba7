"""The one ranking path: combine → search → select, over a batch of queries.

The server, ``twotower evaluate``, ``batch-score`` and the demo all rank with
these functions; nothing else implements a stage. The server calls the three
stages one by one (it times each and runs ``search`` off its event loop);
everyone else calls :func:`rank`, which runs the same three in the same order.

Everything is vectorised across the batch (B requests, d dims, N session slots,
K = the largest k in the batch, C = candidates per query)::

    QueryBatch  user (B, d), has_user (B,), session (B, N) item rows -1 padded,
                banned: sorted unique keys ``b * n_items + row`` (B requests' exclusions
                and session items in one array), k (B,), context term (B, d) or None
                (``towers.context``: what the request's context adds to its query)
    combine     → queries (B, d) float32, unit norm (zero rows: nothing to query with)
    search      → (B, C) scores and rows from the index, C = K + most banned + margin
    select      → Ranked: rows (B, K) -1 padded, scores, counts, source per request

Filtering is one ``searchsorted`` of the (B, C) candidate keys into the banned
keys, not a Python set per request. A query whose approximate candidates leave
fewer than its k eligible items is re-ranked exactly (the refill), so k items
come back whenever the catalog has k eligible ones. Requests with neither a
user nor a session get the most popular eligible items.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from towers.bundle import Bundle
from towers.combiner import CombinerParams, combine
from towers.labels import Source

SEARCH_MARGIN = 16  # extra candidates beyond k + exclusions, for IVF/HNSW misses (-1 ids)
WIDE_BANNED = 256  # exclusions beyond this widen only their own request's search (search_batch)
EXACT_CHUNK = 64  # refill queries scored at once: 64 x 1M items x 4 bytes = 256 MB at most

@dataclass(frozen=True)
class RankModel:
    """The arrays and index of one bundle version that ranking reads (no torch)."""

    combiner: CombinerParams
    item_emb: np.ndarray  # (n_items, d) float32; row == FAISS id
    user_emb: np.ndarray  # (n_users, d) float32
    index: Any  # faiss.Index over item_emb
    popularity: np.ndarray  # item rows, most popular first

    @classmethod
    def from_bundle(cls, b: Bundle) -> RankModel:
        return cls(combiner=b.combiner, item_emb=b.item_emb, user_emb=b.user_emb, index=b.index,
                   popularity=b.popularity)

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])

    @property
    def max_session(self) -> int:
        return self.combiner.max_session


def first_per_owner(owner: np.ndarray, values: np.ndarray, n_owners: int, width: int) -> np.ndarray:
    """(n_owners, width) int64, -1 padded: each owner's first ``width`` values in order.
    ``owner`` must be non-decreasing (values grouped by owner), as flattened lists are."""
    out = np.full((n_owners, width), -1, dtype=np.int64)
    if len(owner) == 0 or width == 0:
        return out
    starts = np.searchsorted(owner, np.arange(n_owners))
    pos = np.arange(len(owner)) - starts[owner]
    keep = pos < width
    out[owner[keep], pos[keep]] = values[keep]
    return out


def flatten(lists: Sequence[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(owner, values) of ragged lists of rows, grouped by owner."""
    owner: list[int] = []
    values: list[int] = []
    for i, xs in enumerate(lists):
        n = len(values)
        values.extend(xs)
        owner.extend([i] * (len(values) - n))
    return np.asarray(owner, dtype=np.int64), np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class QueryBatch:
    """B requests in catalog rows. Build it with :meth:`build` (flat arrays) or :meth:`from_lists`."""

    user: np.ndarray  # (B, d) float32, zero rows where ``has_user`` is False
    has_user: np.ndarray  # (B,) bool
    session: np.ndarray  # (B, N) int64 item rows, most recent first, -1 padded
    banned: np.ndarray  # sorted unique int64 keys b * n_items + row: exclusions and session items
    n_banned: np.ndarray  # (B,) distinct banned rows per request
    k: np.ndarray  # (B,) int64 results wanted per request
    n_items: int
    context: np.ndarray | None = None  # (B, d) float32 context term (towers.context); None: no context

    def __len__(self) -> int:
        return len(self.k)

    @cached_property
    def has_session(self) -> np.ndarray:
        return self.session[:, 0] >= 0 if self.session.shape[1] else np.zeros(len(self), dtype=bool)

    @cached_property
    def source(self) -> np.ndarray:
        """(B,) source codes of a searched query: online, session_only, user_only or popularity."""
        hs, hu = self.has_session, self.has_user
        return np.where(hs, np.where(hu, Source.ONLINE, Source.SESSION_ONLY),
                        np.where(hu, Source.USER_ONLY, Source.POPULARITY)).astype(np.int8)

    @cached_property
    def queried(self) -> np.ndarray:
        """Requests with a query (a user or a session): the ones ``search`` runs for."""
        return np.flatnonzero(self.has_user | self.has_session)

    def subset(self, which: np.ndarray) -> QueryBatch:
        """The requests ``which`` (sorted), as a batch of their own."""
        if len(which) == len(self):  # all of them (the common case): nothing to copy
            return self
        n = self.n_items
        remap = np.full(len(self), -1, dtype=np.int64)
        remap[which] = np.arange(len(which))
        owner = self.banned // n if n else self.banned
        new_owner = remap[owner]
        keep = new_owner >= 0
        return QueryBatch(user=self.user[which], has_user=self.has_user[which], session=self.session[which],
                          banned=new_owner[keep] * n + (self.banned[keep] - owner[keep] * n),
                          n_banned=self.n_banned[which], k=self.k[which], n_items=n,
                          context=None if self.context is None else self.context[which])

    def banned_rows(self, i: int) -> np.ndarray:
        """Request ``i``'s banned item rows."""
        n = self.n_items
        lo, hi = np.searchsorted(self.banned, [i * n, (i + 1) * n])
        return self.banned[lo:hi] - i * n

    @classmethod
    def build(cls, model: RankModel, *, user: np.ndarray, has_user: np.ndarray, session_owner: np.ndarray,
              session_rows: np.ndarray, exclude_owner: np.ndarray, exclude_rows: np.ndarray,
              k: int | np.ndarray, max_session: int | None = None,
              context: np.ndarray | None = None) -> QueryBatch:
        """From flat (owner, row) arrays, grouped by owner, unknown rows (< 0) allowed and dropped.
        ``context``: the (B, d) context term (``towers.context.request_term``), None for none.

        Sessions are most recent first and are cut to the combiner's ``max_session`` (or to
        ``max_session`` when smaller: an experiment's override of how much session the query
        reads); every session item is banned too, cut or not (a user is not recommended what
        they just looked at).
        """
        b, n = len(has_user), model.n_items
        known = session_rows >= 0
        width = model.max_session if max_session is None else min(model.max_session, max_session)
        session = first_per_owner(session_owner[known], session_rows[known], b, width)
        own = np.concatenate([exclude_owner, session_owner])
        rows = np.concatenate([exclude_rows, session_rows])
        ok = (rows >= 0) & (rows < n)
        banned = np.unique(own[ok] * n + rows[ok])
        n_banned = np.bincount(banned // n, minlength=b).astype(np.int64) if n else np.zeros(b, np.int64)
        has_user = np.asarray(has_user, dtype=bool)
        user = np.where(has_user[:, None], np.asarray(user, dtype=np.float32).reshape(b, model.dim), 0.0)
        ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (b,)).copy()
        ctx = None if context is None else np.asarray(context, dtype=np.float32).reshape(b, model.dim)
        return cls(user=user.astype(np.float32), has_user=has_user, session=session, banned=banned,
                   n_banned=n_banned, k=ks, n_items=n, context=ctx)

    @classmethod
    def from_lists(cls, model: RankModel, *, sessions: Sequence[Sequence[int]], excludes: Sequence[Iterable[int]],
                   k: int | np.ndarray, user_rows: Sequence[int] | np.ndarray | None = None,
                   user_vectors: np.ndarray | None = None, context: np.ndarray | None = None) -> QueryBatch:
        """Per-request lists of item rows. The user comes from ``user_rows`` (the bundle's
        embeddings; -1 unknown) or ``user_vectors`` (B, d) with ``user_rows`` marking who has one."""
        b = len(sessions)
        rows = np.asarray(user_rows if user_rows is not None else [0] * b, dtype=np.int64).reshape(b)
        has_user = rows >= 0
        if user_vectors is None:
            user = np.asarray(model.user_emb[np.maximum(rows, 0)], dtype=np.float32).reshape(b, model.dim)
        else:
            user = np.asarray(user_vectors, dtype=np.float32)
        s_owner, s_rows = flatten(sessions)
        e_owner, e_rows = flatten(excludes)
        return cls.build(model, user=user, has_user=has_user, session_owner=s_owner, session_rows=s_rows,
                         exclude_owner=e_owner, exclude_rows=e_rows, k=k, context=context)


@dataclass(frozen=True)
class Ranked:
    """A ranked batch: request i's list is ``rows[i, :counts[i]]`` (best first)."""

    rows: np.ndarray  # (B, K) int64 item rows, -1 padded
    scores: np.ndarray  # (B, K) float32
    counts: np.ndarray  # (B,) int64
    source: np.ndarray  # (B,) int8 ``Source`` codes
    queries: np.ndarray  # (B, d) the queries ranked with (zero rows for popularity)

    def __len__(self) -> int:
        return len(self.counts)

    def items(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        c = int(self.counts[i])
        return self.rows[i, :c], self.scores[i, :c]


def _is_banned(batch: QueryBatch, owner: np.ndarray, rows: np.ndarray) -> np.ndarray:
    keys = owner * batch.n_items + rows
    if len(batch.banned) == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(batch.banned, keys), len(batch.banned) - 1)
    return batch.banned[pos] == keys


def take_eligible(batch: QueryBatch, which: np.ndarray, cand_rows: np.ndarray,
                  cand_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filter candidates (len(which), C) of requests ``which``: drop -1 padding and banned
    items, keep each request's first k in candidate order. Returns (rows, scores) of width
    K = max k, -1/0 padded, and the count kept per request."""
    width = int(batch.k.max(initial=0))
    m = len(which)
    out_rows = np.full((m, width), -1, dtype=np.int64)
    out_scores = np.zeros((m, width), dtype=np.float32)
    if m == 0 or cand_rows.shape[1] == 0:
        return out_rows, out_scores, np.zeros(m, dtype=np.int64)
    owner = np.broadcast_to(which[:, None], cand_rows.shape)
    keep = (cand_rows >= 0) & ~_is_banned(batch, owner, np.maximum(cand_rows, 0))
    pos = np.cumsum(keep, axis=1) - 1
    keep &= pos < batch.k[which][:, None]
    r, c = np.nonzero(keep)
    out_rows[r, pos[r, c]] = cand_rows[r, c]
    out_scores[r, pos[r, c]] = cand_scores[r, c]
    return out_rows, out_scores, keep.sum(axis=1).astype(np.int64)


# -- stage: combine --------------------------------------------------------------------------


def combine_queries(model: RankModel, batch: QueryBatch) -> np.ndarray:
    """Queries (B, d): the combiner over user vectors, session item embeddings and context."""
    mask = batch.session >= 0
    sess = model.item_emb[np.maximum(batch.session, 0)] * mask[..., None]
    return combine(model.combiner, batch.user, batch.has_user, sess.astype(np.float32), mask, batch.context)


# -- stage: search ---------------------------------------------------------------------------


def search_width(model: RankModel, batch: QueryBatch) -> int:
    """Candidates the batch's one search asks the index for: enough that filtering still
    leaves each request k (margin for -1 ids), counting at most WIDE_BANNED exclusions. A
    request with more is searched again, deeper, on its own (:func:`search_batch`): one
    request with 10k exclusions must not make all 64 of its batchmates search 10k deep."""
    if len(batch) == 0:
        return 0
    banned = min(int(batch.n_banned.max()), WIDE_BANNED)
    return int(min(model.n_items, int(batch.k.max()) + banned + SEARCH_MARGIN))


@dataclass(frozen=True)
class SearchPlan:
    """How deep the search stage goes: ``base`` for the batch, ``deep`` for the rows ``wide``
    (positions among the queries) whose exclusions need more than ``base`` leaves."""

    base: int
    wide: np.ndarray
    deep: int


def plan_search(model: RankModel, batch: QueryBatch) -> SearchPlan:
    which = batch.queried
    base = search_width(model, batch)
    need = np.minimum(batch.k[which] + batch.n_banned[which] + SEARCH_MARGIN, model.n_items)
    wide = np.flatnonzero(need > base)
    return SearchPlan(base=base, wide=wide, deep=int(need[wide].max()) if len(wide) else 0)


def merge_searches(plan: SearchPlan, first: tuple[np.ndarray, np.ndarray],
                   second: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """The batch's candidates: ``first`` (every query, ``plan.base`` deep) with the wide rows
    replaced by ``second`` (theirs, ``plan.deep`` deep), padded to the deepest with -1 ids,
    which ``select`` drops like any miss."""
    if second is None or not len(plan.wide):
        return first
    scores, rows = first
    out_scores = np.zeros((len(rows), plan.deep), np.float32)
    out_rows = np.full((len(rows), plan.deep), -1, np.int64)
    out_scores[:, :plan.base], out_rows[:, :plan.base] = scores, rows
    out_scores[plan.wide], out_rows[plan.wide] = second
    return out_scores, out_rows


def search_batch(model: RankModel, batch: QueryBatch, queries: np.ndarray, *,
                 params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The search stage for ``queries`` (one row per ``batch.queried``), one search after the
    other: :func:`plan_search`, the batch ``base`` deep, the wide rows alone ``deep``. (The
    server runs the two on two search threads at once: ``RecommendService.run_batch``.)"""
    assert len(queries) == len(batch.queried), "one query per queried request"
    plan = plan_search(model, batch)
    first = search(model, queries, plan.base, params=params)
    second = search(model, queries[plan.wide], plan.deep, params=params) if len(plan.wide) else None
    return merge_searches(plan, first, second)


def search(model: RankModel, queries: np.ndarray, width: int, *,
           params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """One batched index search; FAISS releases the GIL, so callers may run it in a thread.
    ``params`` (a ``faiss.SearchParameters``, see ``towers.index.search_params``) changes
    nprobe/efSearch for this call only: the shared index object is never mutated, so
    requests with different settings can search the same index concurrently."""
    if len(queries) == 0 or width == 0:
        return np.zeros((len(queries), width), np.float32), np.full((len(queries), width), -1, np.int64)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, rows = model.index.search(q, width) if params is None else model.index.search(q, width, params=params)
    return scores, rows


# -- stage: select ---------------------------------------------------------------------------


def exact_topk(model: RankModel, batch: QueryBatch, which: np.ndarray,
               queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k over the whole catalog for requests ``which`` (the refill; also the
    plain reference the optimised path is tested against). Ties: lower row first."""
    n = model.n_items
    if len(which) > EXACT_CHUNK:  # bound the (m, n_items) score matrix
        parts = [exact_topk(model, batch, which[lo:lo + EXACT_CHUNK], queries[lo:lo + EXACT_CHUNK])
                 for lo in range(0, len(which), EXACT_CHUNK)]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]
    s = queries @ model.item_emb.T  # (m, n_items): only for the few queries that need it
    for j, i in enumerate(which.tolist()):
        s[j, batch.banned_rows(i)] = -np.inf
    width = int(batch.k.max(initial=0))
    kk = min(width, n)
    rows = np.full((len(which), width), -1, dtype=np.int64)
    scores = np.zeros((len(which), width), dtype=np.float32)
    counts = np.minimum(batch.k[which], n - batch.n_banned[which]).clip(min=0)
    if kk == 0 or len(which) == 0:
        return rows, scores, counts
    top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (len(which), 1))
    vals = np.take_along_axis(s, top, axis=1)
    order = np.lexsort((top, -vals), axis=1)
    top, vals = np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)
    keep = np.arange(kk)[None, :] < counts[:, None]
    rows[:, :kk] = np.where(keep, top, -1)
    scores[:, :kk] = np.where(keep, vals, 0.0)
    return rows, scores, counts


def popular(model: RankModel, batch: QueryBatch, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The most popular items each request has not excluded; rank-based scores 1/(1+i)
    (popularity has no similarity score)."""
    cand_len = min(len(model.popularity), int(batch.k.max(initial=0)) + int(batch.n_banned[which].max(initial=0)))
    cand = np.broadcast_to(model.popularity[:cand_len], (len(which), cand_len))
    rows, _, counts = take_eligible(batch, which, cand, np.zeros(cand.shape, np.float32))
    scores = np.where(rows >= 0, 1.0 / (1.0 + np.arange(rows.shape[1])), 0.0).astype(np.float32)
    return rows, scores, counts


def select(model: RankModel, batch: QueryBatch, queries: np.ndarray, cand_scores: np.ndarray,
           cand_rows: np.ndarray) -> Ranked:
    """Filter the searched candidates to each request's k; refill short lists exactly;
    popularity where there is no query. ``cand_*`` hold one row per request that has a
    query (``batch.queried``), in order: what ``search(queries[batch.queried])`` returns."""
    b = len(batch)
    source = batch.source
    searched = batch.queried
    width = int(batch.k.max(initial=0))
    rows = np.full((b, width), -1, dtype=np.int64)
    scores = np.zeros((b, width), dtype=np.float32)
    counts = np.zeros(b, dtype=np.int64)
    if len(searched):
        r, s, c = take_eligible(batch, searched, cand_rows, cand_scores)
        rows[searched], scores[searched], counts[searched] = r, s, c
        short = searched[c < np.minimum(batch.k[searched], model.n_items - batch.n_banned[searched])]
        if len(short):
            rows[short], scores[short], counts[short] = exact_topk(model, batch, short, queries[short])
    cold = np.flatnonzero(source == Source.POPULARITY)
    if len(cold):
        rows[cold], scores[cold], counts[cold] = popular(model, batch, cold)
    return Ranked(rows=rows, scores=scores, counts=counts, source=source, queries=queries)


def rank(model: RankModel, batch: QueryBatch) -> Ranked:
    """combine → search → select for a batch: what evaluate, batch-score and the demo run,
    and what the server runs stage by stage."""
    queries = combine_queries(model, batch)
    scores, rows = search_batch(model, batch, queries[batch.queried])
    return select(model, batch, queries, scores, rows)
