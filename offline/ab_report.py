"""``twotower ab report``: outcomes per variant, from the impression log joined with the event
log by request id (DESIGN §2: "outcomes join impressions and events per variant").

Per arm of one experiment: users, impressions, CTR (impressions with at least one click
naming them) and conversion (with at least one purchase), each with a 95% Wilson interval;
the relative lift of each against the control with a 95% interval; and a sample-ratio-mismatch
check (chi-square of users per arm against the configured weights) that flags a broken split.

An impression's variant is the response's label, ``exp=variant,...`` (towers.assign); a user
outside the experiment (label ``default`` or no ``exp=`` part) is not in any of its arms. The
impression log is a sample (``impression_sample_rate``): rates are unbiased, counts are scaled
down by the rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from offline.ab_stats import Lift, Proportion, SampleRatio, proportion, relative_lift, sample_ratio_mismatch
from towers.store_format import Event, Impression


def arm_of(label: str, experiment: str) -> str | None:
    """The variant of ``experiment`` in a response label (``exp=variant,...``), or None."""
    for part in label.split(","):
        name, _, variant = part.partition("=")
        if name == experiment and variant:
            return variant
    return None


@dataclass(frozen=True)
class ArmOutcome:
    arm: str
    users: int
    impressions: int
    ctr: Proportion
    conversion: Proportion
    ctr_lift: Lift | None  # vs control; None for the control itself or without successes
    conversion_lift: Lift | None


@dataclass(frozen=True)
class Report:
    experiment: str
    control: str
    arms: list[ArmOutcome]
    srm: SampleRatio | None  # None without weights
    unjoined_events: int  # events naming a request id that no logged impression has

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def outcome_report(impressions: Iterable[Impression], events: Iterable[Event], *, experiment: str,
                   control: str, weights: Mapping[str, float] | None = None) -> Report:
    """The join and the statistics; pure (the CLI reads the logs and passes them in)."""
    shown: dict[str, str] = {}  # request id -> arm
    users: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for imp in impressions:
        arm = arm_of(imp.variant, experiment)
        if arm is None:
            continue
        users.setdefault(arm, set()).add(imp.user_id)
        counts[arm] = counts.get(arm, 0) + 1
        if imp.request_id:
            shown[imp.request_id] = arm
    clicked: set[str] = set()
    converted: set[str] = set()
    unjoined = 0
    for e in events:
        if not e.request_id:
            continue
        if e.request_id not in shown:
            unjoined += 1
        elif e.type == "click":
            clicked.add(e.request_id)
        elif e.type == "purchase":
            converted.add(e.request_id)
    arms = sorted(set(counts) | set(weights or ()), key=lambda a: (a != control, a))
    clicks = {a: sum(1 for r in clicked if shown[r] == a) for a in arms}
    convs = {a: sum(1 for r in converted if shown[r] == a) for a in arms}
    out = []
    for a in arms:
        n = counts.get(a, 0)
        lifts: list[Lift | None] = [None, None]
        if a != control and counts.get(control):
            lifts = [relative_lift(control_successes=s[control], control_trials=counts[control],
                                   treatment_successes=s[a], treatment_trials=n) if n else None
                     for s in (clicks, convs)]
        out.append(ArmOutcome(a, len(users.get(a, ())), n, proportion(successes=clicks[a], trials=n),
                              proportion(successes=convs[a], trials=n), lifts[0], lifts[1]))
    srm = None
    if weights:
        srm = sample_ratio_mismatch(counts={a: len(users.get(a, ())) for a in weights}, weights=weights)
    return Report(experiment, control, out, srm, unjoined)


def format_report(r: Report) -> str:
    def pct(p: Proportion) -> str:
        return f"{100 * p.rate:6.2f}% [{100 * p.low:5.2f}, {100 * p.high:5.2f}]"

    def lift(x: Lift | None) -> str:
        return "        n/a" if x is None else f"{100 * x.lift:+6.1f}% [{100 * x.low:+.1f}, {100 * x.high:+.1f}]"

    lines = [f"experiment {r.experiment} (control: {r.control})",
             f"{'arm':14s} {'users':>7s} {'impr':>7s}  {'CTR [95% CI]':24s} {'lift vs control':24s} "
             f"{'conversion [95% CI]':24s} lift vs control"]
    for a in r.arms:
        lines.append(f"{a.arm:14s} {a.users:7d} {a.impressions:7d}  {pct(a.ctr):24s} {lift(a.ctr_lift):24s} "
                     f"{pct(a.conversion):24s} {lift(a.conversion_lift)}")
    if r.srm is not None:
        verdict = "MISMATCH: the split is broken" if r.srm.mismatch else "ok"
        lines.append(f"sample ratio: chi2 {r.srm.chi2:.2f} (df {r.srm.df}), p {r.srm.p_value:.4g}: {verdict}")
    else:
        lines.append("sample ratio: not checked (no --flags)")
    if r.unjoined_events:
        lines.append(f"{r.unjoined_events} events name a request id with no logged impression (sampled out)")
    return "\n".join(lines)
