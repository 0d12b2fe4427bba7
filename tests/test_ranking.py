"""The one ranking path (``towers.ranking``) against a plain per-request reference on small data."""

from __future__ import annotations

import numpy as np
import pytest

from towers import index as faiss_index
from towers.combiner import CombinerParams, combine
from towers.labels import Source
from towers.ranking import (
    QueryBatch,
    RankModel,
    combine_queries,
    rank,
    search,
    search_width,
    take_eligible,
)

D, N_ITEMS, N_USERS, MAX_SESSION = 8, 300, 40, 4


def make_model(kind: str = "flat", seed: int = 0) -> RankModel:
    rng = np.random.default_rng(seed)
    item = rng.standard_normal((N_ITEMS, D)).astype(np.float32)
    user = rng.standard_normal((N_USERS, D)).astype(np.float32)
    comb = CombinerParams(W_s=rng.standard_normal((D, D)).astype(np.float32) * 0.3,
                          w_a=rng.standard_normal(D).astype(np.float32), pos_bias=np.linspace(0, -1, MAX_SESSION,
                                                                                              dtype=np.float32),
                          w_g=rng.standard_normal(2 * D).astype(np.float32), b_g=np.zeros(1, np.float32))
    spec = faiss_index.default_spec(kind, N_ITEMS)
    if kind == "ivf":
        spec.nlist, spec.nprobe = 16, 2  # a poor IVF: many queries come back short and need the refill
    return RankModel(combiner=comb, item_emb=item, user_emb=user, index=faiss_index.build(item, spec, seed=seed),
                     popularity=rng.permutation(N_ITEMS).astype(np.int64))


def reference(model: RankModel, user_row: int, session: list[int], exclude: list[int], k: int) -> list[int]:
    """One request, plainly: exact scores over the catalog, a Python set of banned items, top k."""
    banned = set(exclude) | set(session)
    sess = session[:MAX_SESSION]
    if user_row < 0 and not sess:
        return [r for r in model.popularity.tolist() if r not in banned][:k]
    s = np.zeros((1, MAX_SESSION, D), np.float32)
    mask = np.zeros((1, MAX_SESSION), bool)
    s[0, : len(sess)] = model.item_emb[sess]
    mask[0, : len(sess)] = True
    user = model.user_emb[[max(user_row, 0)]] * (user_row >= 0)
    q = combine(model.combiner, user.astype(np.float32), np.array([user_row >= 0]), s, mask)[0]
    scores = model.item_emb @ q
    order = sorted((r for r in range(N_ITEMS) if r not in banned), key=lambda r: (-scores[r], r))
    return order[:k]


def random_requests(seed: int, n: int) -> list[tuple[int, list[int], list[int], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        user = int(rng.integers(-1, N_USERS)) if rng.random() < 0.8 else -1
        session = [int(x) for x in rng.choice(N_ITEMS, size=int(rng.integers(0, 7)), replace=False)]
        exclude = [int(x) for x in rng.integers(0, N_ITEMS, size=int(rng.integers(0, 30)))]
        out.append((user, session, exclude, int(rng.integers(1, 40))))
    return out


def batch_of(model: RankModel, reqs: list[tuple[int, list[int], list[int], int]]) -> QueryBatch:
    return QueryBatch.from_lists(model, user_rows=[r[0] for r in reqs], sessions=[r[1] for r in reqs],
                                 excludes=[r[2] for r in reqs], k=np.array([r[3] for r in reqs]))


def test_exact_index_ranks_every_request_like_the_plain_reference() -> None:
    model = make_model("flat")
    reqs = random_requests(1, 120)
    ranked = rank(model, batch_of(model, reqs))
    for i, (user, session, exclude, k) in enumerate(reqs):
        rows, scores = ranked.items(i)
        assert rows.tolist() == reference(model, user, session, exclude, k), i
        assert np.all(np.diff(scores) <= 1e-6) or ranked.source[i] == Source.POPULARITY


def test_short_approximate_lists_are_refilled_exactly() -> None:
    """A poor IVF (2 of 16 lists probed) with long exclusion lists: every request still gets
    k eligible items, none excluded, none twice, and a short list is the exact top k."""
    model = make_model("ivf")
    rng = np.random.default_rng(5)
    reqs = [(int(rng.integers(0, N_USERS)), [], [int(x) for x in rng.choice(N_ITEMS, 200, replace=False)], 60)
            for _ in range(20)]
    qb = batch_of(model, reqs)
    ranked = rank(model, qb)
    queries = combine_queries(model, qb)
    _, cand = search(model, queries, search_width(model, qb))
    short = 0
    for i, (user, session, exclude, k) in enumerate(reqs):
        rows, _ = ranked.items(i)
        assert len(rows) == k and len(set(rows.tolist())) == k and not set(rows.tolist()) & set(exclude)
        eligible = [r for r in cand[i].tolist() if r >= 0 and r not in set(exclude)]
        if len(eligible) < k:  # IVF came back short: this list must be the exact top k
            short += 1
            assert rows.tolist() == reference(model, user, session, exclude, k), i
    assert short > 0  # the setting really exercises the refill


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_one_wide_exclusion_list_deepens_only_its_own_search(kind: str) -> None:
    """Issue 20 item 3: one request excluding almost the whole catalog in a batch of 64. Its
    batchmates are searched WIDE_BANNED deep at most, it alone as deep as it needs, and every
    list is still right: k eligible items, the exact top k where the index is exact."""
    from towers.ranking import SEARCH_MARGIN, WIDE_BANNED, search_batch

    model = make_model(kind)
    rng = np.random.default_rng(11)
    reqs = [(int(rng.integers(0, N_USERS)), [], [int(x) for x in rng.choice(N_ITEMS, 3, replace=False)], 10)
            for _ in range(63)]
    wide_exclude = [int(x) for x in rng.choice(N_ITEMS, N_ITEMS - 40, replace=False)]
    reqs.insert(17, (5, [], wide_exclude, 10))
    qb = batch_of(model, reqs)
    assert search_width(model, qb) == min(N_ITEMS, 10 + min(N_ITEMS - 40, WIDE_BANNED) + SEARCH_MARGIN) < N_ITEMS
    queries = combine_queries(model, qb)
    _, cand = search_batch(model, qb, queries[qb.queried])
    base = search_width(model, qb)
    assert cand.shape[1] == 10 + (N_ITEMS - 40) + SEARCH_MARGIN > base  # the wide request alone went deeper...
    assert (np.delete(cand, 17, axis=0)[:, base:] == -1).all()  # ...its batchmates only `base` deep
    if kind == "flat":
        assert (cand[17] >= 0).all()
    ranked = rank(model, qb)
    for i, (user, session, exclude, k) in enumerate(reqs):
        rows, _ = ranked.items(i)
        assert len(rows) == k and not set(rows.tolist()) & set(exclude), i
        if kind == "flat":
            assert rows.tolist() == reference(model, user, session, exclude, k), i


def test_sources_follow_what_the_query_had() -> None:
    model = make_model()
    reqs = [(3, [5, 6], [], 5), (-1, [5], [], 5), (3, [], [], 5), (-1, [], [9], 5)]
    ranked = rank(model, batch_of(model, reqs))
    assert ranked.source.tolist() == [Source.ONLINE, Source.SESSION_ONLY, Source.USER_ONLY, Source.POPULARITY]
    rows, scores = ranked.items(3)
    assert 9 not in rows.tolist() and scores.tolist() == pytest.approx([1 / (1 + j) for j in range(5)])


def test_k_larger_than_the_eligible_catalog_returns_what_is_left() -> None:
    model = make_model()
    banned = list(range(N_ITEMS - 7))
    ranked = rank(model, batch_of(model, [(1, [], banned, 20), (-1, [], banned, 20)]))
    assert ranked.counts.tolist() == [7, 7]
    assert set(ranked.items(0)[0].tolist()) == set(range(N_ITEMS - 7, N_ITEMS)) == set(ranked.items(1)[0].tolist())


def test_take_eligible_keeps_candidate_order_and_cuts_each_request_to_its_k() -> None:
    model = make_model()
    qb = QueryBatch.from_lists(model, user_rows=[0, 1], sessions=[[4], []], excludes=[[2], [7, 8]], k=np.array([3, 2]))
    cand = np.array([[4, 1, 2, -1, 3, 5], [7, 6, 8, 9, 10, 11]])
    rows, scores, counts = take_eligible(qb, np.arange(2), cand, cand.astype(np.float32))
    assert rows.tolist() == [[1, 3, 5], [6, 9, -1]] and counts.tolist() == [3, 2]
    assert scores[0].tolist() == [1.0, 3.0, 5.0]


def test_a_subset_keeps_each_requests_own_exclusions() -> None:
    model = make_model()
    qb = QueryBatch.from_lists(model, user_rows=[0, 1, 2], sessions=[[], [4], []], excludes=[[1], [2], [3, 5]], k=4)
    sub = qb.subset(np.array([0, 2]))
    assert [sub.banned_rows(i).tolist() for i in range(2)] == [[1], [3, 5]]
    assert sub.n_banned.tolist() == [1, 2] and len(sub) == 2
    assert qb.banned_rows(1).tolist() == [2, 4]  # the session item is banned too
