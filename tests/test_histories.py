"""The vectorised history builders against plain per-user loops on small random logs."""

from __future__ import annotations

import numpy as np

from offline.datasets import Interactions
from offline.histories import lagged_items, user_histories
from towers.features import FeaturePipeline
from towers.spec import DatasetSpec


def _pipeline(n_users: int, n_items: int) -> FeaturePipeline:
    spec = DatasetSpec(name="ids-only", interactions={"path": "unused.csv"})
    return FeaturePipeline.fit(spec=spec, user_ids=[f"u{i}" for i in range(n_users)],
                               item_ids=[f"i{i}" for i in range(n_items)])


def _log(rng: np.random.Generator, n: int, n_users: int, n_items: int) -> Interactions:
    users = rng.integers(0, n_users + 2, n)  # two users unknown to the pipeline
    order = np.argsort(users, kind="stable")  # per-user blocks, each in time order
    ts = np.arange(n)[order]
    return Interactions(np.array([f"u{u}" for u in users[order]]),
                        np.array([f"i{i}" for i in rng.integers(0, n_items + 2, n)]),  # two unknown items
                        np.ones(n, np.float32), ts.astype(np.int64))


def test_user_histories_match_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    fp = _pipeline(20, 30)
    for n in (0, 1, 3, 8):
        log = _log(rng, 200, 20, 30)
        want = np.full((fp.n_users, n), -1, np.int64)
        per: dict[int, list[int]] = {}
        for u, i in zip(log.user.tolist(), log.item.tolist(), strict=True):
            ur, ir = fp.user_vocab.known(u), fp.item_vocab.known(i)
            if ur >= 0 and ir >= 0:
                per.setdefault(ur, []).append(ir)
        for ur, seq in per.items():
            last = seq[::-1][:n]
            want[ur, :len(last)] = last
        np.testing.assert_array_equal(user_histories(fp, log, n), want)
        some = np.array([5, 0, 17, 3])
        np.testing.assert_array_equal(user_histories(fp, log, n, users=some), want[some])


def test_lagged_items_match_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    users = np.sort(rng.integers(0, 6, 60))
    items = rng.integers(0, 50, 60)
    got = lagged_items(users, items, 4)
    for j in range(60):
        before = [items[k] for k in range(j - 1, -1, -1) if users[k] == users[j]][:4]
        assert got[j].tolist() == before + [-1] * (4 - len(before)), j
