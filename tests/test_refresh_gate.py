"""The refresh gate's rules on small hand-made data: which events are the holdout, when a
candidate is refused, and the warm start that never leaves its starting point for worse."""

from __future__ import annotations

import numpy as np
import pytest

from offline.ab_stats import clustered_se
from offline.refresh.gate import GateRule, decide, holdout_start
from offline.train_loop import blend_arrays

DAY = 86_400


def test_the_holdout_is_the_newest_window_reaching_back_for_enough_events() -> None:
    ts = np.array([10 * DAY + j * 60 for j in range(100)] + [9 * DAY + j for j in range(400)])
    newest = int(ts.max())
    # One day holds 100 events: enough when 50 are asked for.
    assert holdout_start(ts, window_s=DAY, min_targets=50, not_before=None) == newest - DAY + 1
    # 300 are asked for: the window reaches back to the 300th newest event.
    t0 = holdout_start(ts, window_s=DAY, min_targets=300, not_before=None)
    assert (ts >= t0).sum() == 300
    # ... but never into what CURRENT trained on.
    assert holdout_start(ts, window_s=DAY, min_targets=300, not_before=10 * DAY) == 10 * DAY
    # Fewer events than asked for: all of them (still bounded by not_before).
    assert holdout_start(ts, window_s=DAY, min_targets=10_000, not_before=None) == int(ts.min())
    assert holdout_start(np.array([], np.int64), window_s=DAY, min_targets=10, not_before=None) == 0


def test_the_holdout_reaches_back_for_enough_distinct_users() -> None:
    # Newest first: user "a" rates 50 items today, then "b" and "c" one each on earlier days.
    ts = np.array([10 * DAY + j for j in range(50)] + [8 * DAY, 6 * DAY])
    users = np.array(["a"] * 50 + ["b", "c"])
    def start(min_users: int) -> int:
        return holdout_start(ts, window_s=1, min_targets=1, not_before=None, users=users, min_users=min_users)

    assert start(1) == 10 * DAY + 49  # the newest event alone: one user
    assert start(2) == 8 * DAY and start(3) == 6 * DAY
    assert start(9) == 6 * DAY  # fewer users than asked for: all of them


def _pairs(n_users: int, per_user: int, p_c: float, p_p: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                        list[str]]:
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    return rng.random(n) < p_c, rng.random(n) < p_p, [str(j // per_user) for j in range(n)]


def test_a_measurably_worse_candidate_is_refused_and_an_equal_one_passes() -> None:
    rule = GateRule(max_drop=0.01, min_targets=20)
    worse = decide(*_pairs(400, 5, 0.10, 0.30), rule, stored_rows_ok=True)
    assert not worse["passed"] and worse["upper95"] < worse["floor"]
    same = decide(*_pairs(400, 5, 0.30, 0.30, seed=1), rule, stored_rows_ok=True)
    assert same["passed"], same["why"]
    assert not decide(*_pairs(400, 5, 0.30, 0.30, seed=1), rule, stored_rows_ok=False)["passed"]
    off = decide(*_pairs(400, 5, 0.10, 0.30), GateRule(max_drop=0.01, min_targets=20, gated=False),
                 stored_rows_ok=True)
    assert off["passed"] and "gate off" in off["why"]


def test_a_retrained_model_needs_the_minimum_sample_to_pass() -> None:
    rule = GateRule(max_drop=0.01, min_targets=20, min_targets_to_accept=1_000)
    small = decide(*_pairs(100, 5, 0.35, 0.30), rule, stored_rows_ok=True)  # 500 targets, better
    assert not small["passed"] and "too few to accept" in str(small["why"])
    large = decide(*_pairs(400, 5, 0.35, 0.30), rule, stored_rows_ok=True)
    assert large["passed"] and large["targets"] == 2_000
    few_users = GateRule(max_drop=0.01, min_targets=20, min_targets_to_accept=1_000, min_users_to_accept=500)
    assert not decide(*_pairs(400, 5, 0.35, 0.30), few_users, stored_rows_ok=True)["passed"]  # 400 users


def test_the_standard_error_is_clustered_by_user() -> None:
    # Two users whose differences are all +1 and all -1: independent draws would give a small
    # SE; clustered, the mean's SE is what two independent users give.
    d = np.array([1.0] * 50 + [-1.0] * 50)
    users = ["a"] * 50 + ["b"] * 50
    naive = d.std(ddof=1) / np.sqrt(len(d))
    assert clustered_se(d, users) == pytest.approx(np.sqrt(2 * 50.0 ** 2 * 2) / 100)
    assert clustered_se(d, users) > 5 * naive
    assert clustered_se(d, ["a"] * 100) == float("inf")  # one cluster: no estimate


def test_weight_averaging_blends_shared_rows_and_keeps_new_ones() -> None:
    old = {"emb": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.array(5)}
    new = {"emb": np.full((4, 3), 3.0, np.float32), "b": np.full(3, 2.0, np.float32), "steps": np.array(9),
           "extra": np.ones(2, np.float32)}
    out = blend_arrays(new, old, 0.25)
    np.testing.assert_allclose(out["emb"][:2], 0.25 * 3 + 0.75 * 1)
    np.testing.assert_allclose(out["emb"][2:], 3.0)  # rows only the new model has
    np.testing.assert_allclose(out["b"], 0.5)
    assert out["steps"] == 9 and out["emb"].dtype == np.float32
    np.testing.assert_array_equal(out["extra"], new["extra"])
    assert all(np.array_equal(blend_arrays(new, old, 1.0)[k], new[k]) for k in new)
