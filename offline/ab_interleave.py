"""An interleave experiment's outcome: which variant users prefer.

Every interleaved response is in the impression log with the variant behind each item
(``towers.interleave``: team-draft). An event that names the response (its ``request_id``)
and one of its items credits that item's variant. Per user, over all their interleaved
responses, the variant with more credits is preferred (equal credits: no preference). The
result is the share of users with a preference who prefer the second variant, with its
Wilson 95% interval, and an exact two-sided sign test against 1/2. Users are the unit, as in
the A/B report: one heavy user's clicks count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from offline.ab_report import arm_of
from offline.ab_stats import Proportion, proportion
from towers.assign import INTERLEAVED
from towers.store_format import Event, Impression

CREDITED = frozenset({"click", "cart", "purchase"})  # a view is not a choice
MIN_USERS = 20  # with a preference: below, "not enough data"
ALPHA = 0.05


@dataclass(frozen=True)
class InterleaveReport:
    experiment: str
    variants: tuple[str, str]
    impressions: int  # interleaved responses logged
    users: int  # users with at least one interleaved response
    credited_events: int  # events that credited a variant
    wins: dict[str, int]  # variant -> users preferring it
    ties: int  # users with credits but no preference
    share_second: Proportion  # of users with a preference, those preferring the second variant
    p_value: float  # exact two-sided sign test of share_second = 1/2
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign_test(wins: int, n: int) -> float:
    """Exact two-sided binomial test of ``wins`` out of ``n`` against p = 1/2."""
    if n == 0:
        return 1.0
    lo = min(wins, n - wins)
    # P(X <= lo) in log space (n can be large): sum of C(n, j) / 2^n.
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2) for j in range(lo + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


def interleave_report(impressions: Iterable[Impression], events: Iterable[Event], *,
                      experiment: str) -> InterleaveReport | None:
    """None when the log holds no interleaved response of ``experiment``."""
    credits_of: dict[str, tuple[str, dict[str, str]]] = {}  # request id -> (user, item -> variant)
    names: list[str] = []
    for imp in impressions:
        if not imp.teams or arm_of(imp.variant, experiment) != INTERLEAVED:
            continue
        credits_of[imp.request_id] = (imp.user_id, dict(zip(imp.item_ids, imp.teams, strict=False)))
        for t in imp.teams:
            if t not in names:
                names.append(t)
    if not credits_of:
        return None
    users = {u for u, _ in credits_of.values()}
    per_user: dict[str, dict[str, int]] = {}
    credited = 0
    for e in events:
        hit = credits_of.get(e.request_id) if e.request_id else None
        if hit is None or e.type not in CREDITED or hit[0] != e.user_id:
            continue
        team = hit[1].get(e.item_id)
        if team is None:
            continue
        credited += 1
        c = per_user.setdefault(e.user_id, {})
        c[team] = c.get(team, 0) + 1
    # Which team picks first is a coin per response, so the impressions give no order: sorted
    # here, the flags' (control first) through ``order_variants`` when the CLI has them.
    first, second = [*sorted(names), "?", "?"][:2]
    wins = {first: 0, second: 0}
    ties = 0
    for c in per_user.values():
        a, b = c.get(first, 0), c.get(second, 0)
        if a == b:
            ties += 1
        else:
            wins[first if a > b else second] += 1
    n = wins[first] + wins[second]
    share = proportion(successes=wins[second], trials=n)
    p = sign_test(wins[second], n)
    if n < MIN_USERS:
        verdict = f"not enough data ({n} users with a preference; {MIN_USERS} needed)"
    elif p < ALPHA:
        verdict = f"users prefer {second if share.rate > 0.5 else first}"
    else:
        verdict = "no difference"
    return InterleaveReport(experiment=experiment, variants=(first, second), impressions=len(credits_of),
                            users=len(users), credited_events=credited, wins=wins, ties=ties, share_second=share,
                            p_value=p, verdict=verdict)


def order_variants(report: InterleaveReport, variants: tuple[str, str]) -> InterleaveReport:
    """The report with ``variants`` in the flags' order (control first)."""
    if report.variants == variants or set(report.variants) != set(variants):
        return report
    n = sum(report.wins.values())
    share = proportion(successes=report.wins.get(variants[1], 0), trials=n)
    return replace(report, variants=variants, share_second=share)


def format_interleave(r: InterleaveReport) -> str:
    a, b = r.variants
    s = r.share_second
    return "\n".join([
        f"interleaving {r.experiment}: {r.impressions:,} responses, {r.users:,} users, "
        f"{r.credited_events:,} credited events",
        f"  users preferring {a}: {r.wins.get(a, 0):,}   {b}: {r.wins.get(b, 0):,}   no preference: {r.ties:,}",
        f"  share preferring {b}: {s.rate:.3f} [{s.low:.3f}, {s.high:.3f}]   sign test p = {r.p_value:.3g}",
        f"  verdict: {r.verdict}",
    ])
