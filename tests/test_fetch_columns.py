"""The columnar fetch results (``BatchFeatures``, ``BatchRecs``) and the batch-wide session
dedup, each checked against a plain per-user, per-event reference on random data."""

from __future__ import annotations

import random

import numpy as np
import pytest

from online.feature_store import EVENT_TYPES, BatchFeatures, BatchRecs
from online.service import _first_per_request
from towers.store_format import Event, encode_event, encode_recs


def _sessions(rnd: random.Random, n_users: int) -> list[list[Event]]:
    return [[Event(f"u{u}", f"item-{rnd.randrange(50)}", rnd.choice(EVENT_TYPES), 1_700_000_000 + rnd.randrange(99))
             for _ in range(rnd.randrange(6))] for u in range(n_users)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_features_match_the_per_event_decoding(seed: int) -> None:
    rnd = random.Random(seed)
    sessions = _sessions(rnd, 9)
    embs = [None if rnd.random() < 0.3 else np.full(3, u, np.float32) for u in range(9)]
    f = BatchFeatures.from_rows(embs, [[encode_event(e) for e in s] for s in sessions], dim=3)

    def plain(rows: list[int]) -> list[tuple[str, str, int, int]]:  # (item, type, ts, owner) in order
        return [(e.item_id, e.type, e.timestamp, j) for j, u in enumerate(rows) for e in sessions[u]]

    def columns(g: BatchFeatures) -> list[tuple[str, str, int, int]]:
        return [(i, EVENT_TYPES[t], int(ts), int(o))
                for i, t, ts, o in zip(g.items, g.types, g.timestamps, g.owner, strict=True)]

    assert columns(f) == plain(list(range(9)))
    assert f.has_user.tolist() == [e is not None for e in embs]
    assert all(f.embedding[u].tolist() == ([u] * 3 if e is not None else [0.0] * 3) for u, e in enumerate(embs))
    pick = [4, 0, 4, 8, 2]  # any order, repeats allowed
    taken = f.take(np.array(pick))
    assert columns(taken) == plain(pick) and taken.embedding.tolist() == f.embedding[pick].tolist()
    both = BatchFeatures.concat(f.take(np.array([1, 2])), f.take(np.array([3])))
    assert columns(both) == plain([1, 2, 3]) and len(both) == 3


def test_first_per_request_is_dict_fromkeys_per_request() -> None:
    rng = np.random.default_rng(7)
    owner = rng.integers(0, 6, 200)  # not grouped: the request's own items, then the store's
    rows = rng.integers(-1, 15, 200)  # -1: an item the catalog does not know
    got_owner, got_rows = _first_per_request(owner, rows, 15)
    want = [(o, r) for o in range(6)
            for r in dict.fromkeys(int(r) for oo, r in zip(owner, rows, strict=True) if oo == o and r >= 0)]
    assert list(zip(got_owner.tolist(), got_rows.tolist(), strict=True)) == want


def test_batch_recs_from_stored_values_and_from_arrays() -> None:
    lists = [np.array([5, 3, 9]), None, np.array([1]), np.array([], dtype=np.int64)]
    raws = [None if r is None else encode_recs(r, r.astype(np.float32) / 10) for r in lists]
    recs = BatchRecs.from_raw(raws)
    assert recs.found.tolist() == [True, False, True, True] and recs.rows.shape == (4, 3)
    for i, r in enumerate(lists):
        n = 0 if r is None else len(r)
        assert recs.rows[i, :n].tolist() == ([] if r is None else r.tolist()) and (recs.rows[i, n:] == -1).all()
        assert np.allclose(recs.scores[i, :n], [] if r is None else r / 10)
    items = np.array([[7, 8, -1], [2, -1, -1]])  # a version's (users, K), -1 padded
    scores = np.array([[0.9, 0.8, 0.0], [0.5, 0.0, 0.0]], np.float32)
    g = BatchRecs.gather(np.array([1, -1, 0]), items, scores)
    assert g.found.tolist() == [True, False, True]
    assert g.rows.tolist() == [[2, -1, -1], [-1, -1, -1], [7, 8, -1]] and g.scores[1].tolist() == [0, 0, 0]
    none = BatchRecs.gather(np.array([0, 1]), None, None)
    assert not none.found.any() and none.rows.shape == (2, 0)
