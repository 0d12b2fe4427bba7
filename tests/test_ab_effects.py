"""Per-user metric effects (issue 21 item 2): hand-computed examples, and by simulation the
coverage of the fixed-horizon and always-valid 95% intervals over hundreds of A/A and A/B
experiments (seeded: deterministic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from offline.ab_effects import always_valid_halfwidth, benjamini_hochberg, cuped_theta, effect, normal_sf, verdict


def test_a_hand_computed_difference_lift_and_p_value() -> None:
    control, treatment = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 4.0, 5.0])
    e = effect(control, treatment)
    # var of each arm (ddof 1) = 5/3; se = sqrt(5/3/4 * 2) = sqrt(5/6)
    assert e.diff == 1.0 and e.se == pytest.approx(math.sqrt(5 / 6))
    assert (e.low, e.high) == pytest.approx((1 - 1.959964 * math.sqrt(5 / 6), 1 + 1.959964 * math.sqrt(5 / 6)))
    assert e.p_value == pytest.approx(2 * normal_sf(1 / math.sqrt(5 / 6)))
    assert e.lift == pytest.approx(1 / 2.5) and e.variance_reduction == 0.0
    assert e.seq_low < e.low and e.seq_high > e.high  # always valid: wider than fixed-horizon


def test_cuped_removes_what_the_pre_period_explains_and_keeps_the_difference() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    pre_c, pre_t = rng.normal(10, 3, n), rng.normal(10, 3, n)
    y_c = pre_c + rng.normal(0, 1, n)
    y_t = pre_t + rng.normal(0, 1, n) + 0.2
    raw, adj = effect(y_c, y_t), effect(y_c, y_t, control_pre=pre_c, treatment_pre=pre_t)
    assert cuped_theta(np.concatenate([y_c, y_t]), np.concatenate([pre_c, pre_t])) == pytest.approx(1.0, abs=0.02)
    assert adj.variance_reduction == pytest.approx(0.9, abs=0.02)  # var(pre) 9 of a total 10
    assert adj.se < raw.se / 2.5 and adj.diff == pytest.approx(0.2, abs=0.06)
    assert adj.control_mean == raw.control_mean  # the means shown are the raw ones
    with pytest.raises(ValueError, match="pre-period"):
        effect(y_c, y_t, control_pre=pre_c[:-1], treatment_pre=pre_t)


def test_the_always_valid_halfwidth_matches_the_msprt_boundary() -> None:
    se, tau2, alpha = 0.5, 0.04, 0.05
    h = always_valid_halfwidth(se, tau2=tau2, alpha=alpha)
    v = se * se
    lam = math.sqrt(v / (v + tau2)) * math.exp(tau2 * h * h / (2 * v * (v + tau2)))
    assert lam == pytest.approx(1 / alpha)  # exactly on the mSPRT's rejection boundary


def test_benjamini_hochberg_on_the_papers_example() -> None:
    # Benjamini & Hochberg (1995), section 4: 15 p-values, q = 0.05 rejects the smallest four.
    p = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
         0.6528, 0.7590, 1.0]
    rejected, adjusted = benjamini_hochberg(p, q=0.05)
    assert rejected == [True] * 4 + [False] * 11
    assert adjusted[3] == pytest.approx(0.0095 * 15 / 4) and adjusted[-1] == 1.0
    assert all(a >= b for a, b in zip(sorted(adjusted)[1:], sorted(adjusted), strict=False))
    shuffled = [p[i] for i in (3, 0, 14, 1)]
    assert benjamini_hochberg(shuffled, q=0.05)[0] == [True, True, False, True]  # input order kept


def _experiment(rng: np.random.Generator, n: int, effect_size: float) -> tuple[np.ndarray, ...]:
    """Per-user counts (events per user): overdispersed, like real engagement."""
    pre_c, pre_t = rng.gamma(2.0, 2.0, n), rng.gamma(2.0, 2.0, n)
    y_c = rng.poisson(pre_c * 0.8 + 1.0).astype(float)
    y_t = rng.poisson(pre_t * 0.8 + 1.0 + effect_size).astype(float)
    return y_c, y_t, pre_c, pre_t


@pytest.mark.parametrize("true_effect", [0.0, 0.3])
def test_the_95_percent_intervals_cover_over_simulated_experiments(true_effect: float) -> None:
    rng = np.random.default_rng(21)
    runs, covered, covered_cuped, seq_covered = 1000, 0, 0, 0
    for _ in range(runs):
        y_c, y_t, pre_c, pre_t = _experiment(rng, 400, true_effect)
        e = effect(y_c, y_t)
        c = effect(y_c, y_t, control_pre=pre_c, treatment_pre=pre_t)
        covered += e.low <= true_effect <= e.high
        covered_cuped += c.low <= true_effect <= c.high
        seq_covered += c.seq_low <= true_effect <= c.seq_high
    assert covered / runs >= 0.93 and covered_cuped / runs >= 0.93 and seq_covered / runs >= 0.95


def test_looking_daily_the_always_valid_interval_keeps_its_coverage_and_the_fixed_one_does_not() -> None:
    """A/A experiments read every day for 20 days: a false positive is any day whose interval
    excludes 0. The fixed-horizon interval, re-read daily, errs far more than 5% of the time;
    the always-valid one stays under 5%."""
    rng = np.random.default_rng(7)
    runs, days, per_day = 200, 20, 50
    fixed_fp = seq_fp = 0
    for _ in range(runs):
        y_c, y_t, _, _ = _experiment(rng, days * per_day, 0.0)
        fixed_hit = seq_hit = False
        for d in range(1, days + 1):
            e = effect(y_c[: d * per_day], y_t[: d * per_day])
            fixed_hit |= not e.low <= 0 <= e.high
            seq_hit |= not e.seq_low <= 0 <= e.seq_high
        fixed_fp += fixed_hit
        seq_fp += seq_hit
    assert seq_fp / runs <= 0.05 < 0.12 <= fixed_fp / runs


def test_the_verdict_reads_the_always_valid_interval_guardrails_first() -> None:
    rng = np.random.default_rng(3)
    y_c, y_t, _, _ = _experiment(rng, 3000, 1.0)
    good = effect(y_c, y_t)
    flat = effect(y_c, y_c + rng.normal(0, 0.01, len(y_c)))
    slow = effect(np.full(3000, 50.0) + rng.normal(0, 1, 3000), np.full(3000, 60.0) + rng.normal(0, 1, 3000))
    ok = {"events": True}
    assert verdict({"events": good}, primary="events", rejected=ok, srm=False) == "ship"
    assert verdict({"events": good, "p99_ms": slow}, primary="events", guardrails=["p99_ms"], rejected=ok,
                   srm=False) == "harm on a guardrail"
    assert verdict({"events": flat}, primary="events", rejected={"events": False}, srm=False) == "no difference"
    assert verdict({"events": good}, primary="events", rejected=ok, srm=True) == "sample ratio mismatch"
    small = effect(y_c[:20], y_t[:20])
    assert verdict({"events": small}, primary="events", rejected=ok, srm=False) == "not enough data"
