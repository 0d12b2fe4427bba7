"""Outcome statistics of an A/B experiment and of the refresh gate: pure functions, no I/O.

The report (``twotower ab report``) joins impressions and events per variant and
hands the counts here. What it prints per variant:

- a rate (CTR, conversion) with a 95% Wilson interval: unlike the normal
  ("Wald") interval it stays inside [0, 1] and keeps its coverage for the small
  rates and small early counts an experiment starts with;
- the relative lift vs the control, ``p_t / p_c - 1``, with a 95% interval from
  the delta method on ``log(p_t / p_c)`` (the log ratio is close to normal; the
  ratio itself is skewed), independent samples assumed;
- a sample-ratio-mismatch check: a chi-square goodness of fit of the users per
  arm against the configured weights. A mismatch means the split itself is
  broken (dropped responses, a biased redirect, a bot filter hitting one arm)
  and no metric of the experiment can be trusted; the conventional threshold is
  p < 0.001, strict because the test runs on every report.

Also here, for the refresh gate's paired test (``offline.refresh.gate``): the standard error
of a mean difference clustered by user.

scipy is not a dependency of this project, so the chi-square survival function
is computed here in closed form (integer degrees of freedom, via ``math.erfc``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
SRM_ALPHA = 0.001


@dataclass(frozen=True, kw_only=True)
class Proportion:
    successes: int
    trials: int
    rate: float
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class Lift:
    """Relative lift ``treatment / control - 1`` and its interval (same units)."""

    lift: float
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class SampleRatio:
    chi2: float
    df: int
    p_value: float
    mismatch: bool  # p_value < alpha: the split is broken
    expected: dict[str, float]  # users each arm should have had under the weights


def _check_counts(successes: int, trials: int, what: str) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"{what}: need 0 <= successes <= trials, got {successes}/{trials}")


def proportion(*, successes: int, trials: int, z: float = Z95) -> Proportion:
    """The rate with its Wilson score interval. No trials: rate 0 and the uninformative [0, 1]."""
    _check_counts(successes, trials, "proportion")
    if trials == 0:
        return Proportion(successes=0, trials=0, rate=0.0, low=0.0, high=1.0)
    p = successes / trials
    z2 = z * z
    denom = 1.0 + z2 / trials
    center = (p + z2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denom
    return Proportion(successes=successes, trials=trials, rate=p,
                      low=max(0.0, center - half), high=min(1.0, center + half))


def relative_lift(*, control_successes: int, control_trials: int, treatment_successes: int,
                  treatment_trials: int, z: float = Z95) -> Lift | None:
    """``p_t / p_c - 1`` with a delta-method interval on the log ratio:
    ``Var(log p) ≈ (1 - p) / (n p)`` per arm, the two added. None when an arm has no
    successes (the log ratio does not exist; the report prints "n/a", not a guess)."""
    _check_counts(control_successes, control_trials, "control")
    _check_counts(treatment_successes, treatment_trials, "treatment")
    if control_successes == 0 or treatment_successes == 0:
        return None
    pc = control_successes / control_trials
    pt = treatment_successes / treatment_trials
    log_ratio = math.log(pt / pc)
    se = math.sqrt((1 - pt) / treatment_successes + (1 - pc) / control_successes)
    return Lift(lift=pt / pc - 1, low=math.exp(log_ratio - z * se) - 1, high=math.exp(log_ratio + z * se) - 1)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with ``df`` (integer >= 1) degrees of freedom.

    Closed forms of the regularised upper incomplete gamma Q(df/2, x/2):
    even df = 2m: ``e^(-x/2) * sum_{j<m} (x/2)^j / j!``;
    odd df = 2m+1: ``erfc(sqrt(x/2)) + sqrt(2/pi) e^(-x/2) * sum_{j=1..m} x^(j-1/2) / (1*3*...*(2j-1))``.
    The terms are built by recurrence from the small factor e^(-x/2), so nothing
    overflows; accurate for the handful of arms an experiment has."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isnan(x):
        raise ValueError("x is NaN")
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    half = x / 2
    if df % 2 == 0:
        term = total = math.exp(-half)
        for j in range(1, df // 2):
            term *= half / j
            total += term
    else:
        total = math.erfc(math.sqrt(half))
        term = math.sqrt(2 / math.pi) * math.exp(-half) * math.sqrt(x)
        for j in range(1, df // 2 + 1):
            total += term
            term *= x / (2 * j + 1)
    return min(1.0, max(0.0, total))


def sample_ratio_mismatch(*, counts: Mapping[str, int], weights: Mapping[str, float],
                          alpha: float = SRM_ALPHA) -> SampleRatio:
    """Chi-square goodness of fit of the users per arm against the configured weights.

    ``counts`` and ``weights`` name the same arms (shadow variants take no traffic and
    are left out). An arm of weight 0 that received users is a mismatch outright."""
    if set(counts) != set(weights):
        raise ValueError(f"counts name arms {sorted(counts)}, weights name {sorted(weights)}")
    if any(c < 0 for c in counts.values()) or any(w < 0 or math.isnan(w) for w in weights.values()):
        raise ValueError("counts and weights must be >= 0")
    total, wsum = sum(counts.values()), sum(weights.values())
    if total == 0 or wsum <= 0:
        raise ValueError("no users, or no arm with a positive weight: nothing to test")
    expected = {arm: total * weights[arm] / wsum for arm in counts}
    chi2, arms = 0.0, 0
    for arm, n in counts.items():
        if expected[arm] > 0:
            chi2 += (n - expected[arm]) ** 2 / expected[arm]
            arms += 1
        elif n > 0:
            chi2 = math.inf
    df = max(1, arms - 1)
    p = 1.0 if arms < 2 and math.isfinite(chi2) else chi2_sf(chi2, df)
    return SampleRatio(chi2=chi2, df=df, p_value=p, mismatch=p < alpha, expected=expected)


def clustered_se(d: np.ndarray, groups: list[str]) -> float:
    """Standard error of ``d.mean()`` with observations clustered by group (CR1): a user's
    targets share their vector and session, so they are not independent draws."""
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_g = int(g.max()) + 1 if len(g) else 0
    if n_g < 2:
        return float("inf")
    resid = np.bincount(g, weights=d - d.mean(), minlength=n_g)
    return float(np.sqrt(n_g / (n_g - 1) * np.sum(resid ** 2)) / len(d))
