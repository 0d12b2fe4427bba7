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

Per user as well (``offline.ab_effects``): a user is one observation (their clicks and purchases
per impression), so a heavy user is not many independent draws; users whose impressions name
more than one arm (a ramp, a forced user, a flags change) are left out and counted. Per arm and
metric: the difference against the control with its fixed-horizon and always-valid (mSPRT)
95% intervals, Benjamini-Hochberg across every (arm, metric) of the report, and a verdict line
(sample ratio mismatch / not enough data / ship / no difference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from offline.ab_effects import Effect, benjamini_hochberg, effect, verdict
from offline.ab_stats import Lift, Proportion, SampleRatio, proportion, relative_lift, sample_ratio_mismatch
from towers.assign import INTERLEAVED
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
class Guardrail:
    """One arm's serving guardrails from the servers' metrics (since they started)."""

    responses: int
    degraded: Proportion  # responses below the full rung
    p99_ms: float | None  # upper edge of the latency bucket holding the 99th percentile
    degraded_lift: Lift | None = None  # vs control
    harm: str = ""  # why this arm harms a guardrail ("" if it does not)


@dataclass(frozen=True)
class Report:
    experiment: str
    control: str
    arms: list[ArmOutcome]
    srm: SampleRatio | None  # None without weights
    unjoined_events: int  # events naming a request id that no logged impression has
    mixed_users: int = 0  # users whose impressions name more than one arm: left out per user
    effects: dict[str, dict[str, Effect]] | None = None  # arm -> metric -> per-user effect vs control
    bh_rejected: dict[str, dict[str, bool]] | None = None  # arm -> metric -> BH at q = 0.05
    verdicts: dict[str, str] | None = None  # arm -> verdict line
    users_from: str = "impressions"  # exposures (complete) | impressions (a sample)
    guardrails: dict[str, Guardrail] | None = None  # arm -> serving guardrails (from --metrics-url)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def outcome_report(impressions: Iterable[Impression], events: Iterable[Event], *, experiment: str,
                   control: str, weights: Mapping[str, float] | None = None,
                   exposures: Iterable[Impression] | None = None,
                   pre: Mapping[str, Mapping[str, float]] | None = None,
                   guards: Mapping[str, Guardrail] | None = None) -> Report:
    """The join and the statistics; pure (the CLI reads the logs and passes them in).
    ``exposures`` (the exposure log, complete): users per arm, the sample-ratio check and the
    per-user effects come from it (clicks and purchases per exposed user over the window);
    without it, from the sampled impressions (rates per impression). ``pre``: per metric of the
    exposure path, each user's value over a pre-period (``pre_period_counts``): CUPED."""
    events = list(events)
    shown: dict[str, str] = {}  # request id -> arm
    users: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    impressions_seen: list[tuple[str, str, str]] = []  # (request id, user, arm)
    for imp in impressions:
        arm = arm_of(imp.variant, experiment)
        if arm is None or arm == INTERLEAVED:  # interleaved responses: offline.ab_interleave's
            continue
        impressions_seen.append((imp.request_id, imp.user_id, arm))
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
    exposed: list[tuple[str, str, str]] | None = None
    if exposures is not None:
        exposed = [(x.request_id, x.user_id, xa) for x in exposures
                   if (xa := arm_of(x.variant, experiment)) is not None and xa != INTERLEAVED]
    # The control is an arm even before anyone is in it (its effects then need data).
    arms = sorted(set(counts) | set(weights or ()) | {x[2] for x in exposed or ()} | {control},
                  key=lambda a: (a != control, a))
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
    if exposed is not None:
        users = {}
        for _, exposed_user, exposed_arm in exposed:
            users.setdefault(exposed_arm, set()).add(exposed_user)
        out = [replace(o, users=len(users.get(o.arm, ()))) for o in out]
    srm = None
    if weights and any(users.get(a) for a in weights):  # no users in any arm: nothing to test
        srm = sample_ratio_mismatch(counts={a: len(users.get(a, ())) for a in weights}, weights=weights)
    broken = srm is not None and srm.mismatch
    if exposed is not None:
        mixed, effects, rejected, verdicts = _per_exposed_user(exposed, events, arms=arms, control=control,
                                                               srm=broken, pre=pre)
    else:
        mixed, effects, rejected, verdicts = _per_user(impressions_seen, clicked, converted, arms=arms,
                                                      control=control, srm=broken)
    if guards is not None and not broken:  # a broken split: nothing else is read
        for arm, g in guards.items():
            if g.harm and arm in verdicts:
                verdicts[arm] = f"harm on a guardrail ({g.harm})"
    return Report(experiment, control, out, srm, unjoined, mixed, effects, rejected, verdicts,
                  "exposures" if exposed is not None else "impressions", dict(guards) if guards is not None else None)


METRICS = ("clicks_per_impression", "purchases_per_impression")
EXPOSED_METRICS = ("clicks_per_user", "purchases_per_user")


def _per_user(seen: list[tuple[str, str, str]], clicked: set[str], converted: set[str], *, arms: list[str],
              control: str, srm: bool) -> tuple[int, dict[str, dict[str, Effect]], dict[str, dict[str, bool]],
                                                dict[str, str]]:
    """Per-user rates from (request id, user, arm) impressions; users in several arms left out."""
    arms_of: dict[str, set[str]] = {}
    for _, user, arm in seen:
        arms_of.setdefault(user, set()).add(arm)
    mixed = {u for u, a in arms_of.items() if len(a) > 1}
    imps: dict[str, int] = {}
    hits: dict[str, dict[str, int]] = {m: {} for m in METRICS}
    for rid, user, _ in seen:
        if user in mixed:
            continue
        imps[user] = imps.get(user, 0) + 1
        for m, done in zip(METRICS, (clicked, converted), strict=True):
            if rid and rid in done:
                hits[m][user] = hits[m].get(user, 0) + 1
    values: dict[str, dict[str, np.ndarray]] = {}
    for a in arms:
        us = [u for u, arm in arms_of.items() if arm == {a}]
        values[a] = {m: np.array([hits[m].get(u, 0) / imps[u] for u in us]) for m in METRICS}
    return (len(mixed), *_compare(values, arms=arms, control=control, metrics=METRICS, srm=srm))


def _per_exposed_user(exposed: list[tuple[str, str, str]], events: list[Event], *, arms: list[str], control: str,
                      srm: bool, pre: Mapping[str, Mapping[str, float]] | None = None,
                      ) -> tuple[int, dict[str, dict[str, Effect]], dict[str, dict[str, bool]], dict[str, str]]:
    """Per exposed user: their clicks and purchases over the window; users exposed to more
    than one arm left out."""
    arms_of: dict[str, set[str]] = {}
    for _, user, arm in exposed:
        arms_of.setdefault(user, set()).add(arm)
    mixed = {u for u, a in arms_of.items() if len(a) > 1}
    counts: dict[str, dict[str, int]] = {m: {} for m in EXPOSED_METRICS}
    for e in events:
        m = {"click": EXPOSED_METRICS[0], "purchase": EXPOSED_METRICS[1]}.get(e.type)
        if m is not None and e.user_id in arms_of:
            counts[m][e.user_id] = counts[m].get(e.user_id, 0) + 1
    members = {a: [u for u, arm in arms_of.items() if arm == {a}] for a in arms}
    values = {a: {m: np.array([counts[m].get(u, 0) for u in members[a]], np.float64) for m in EXPOSED_METRICS}
              for a in arms}
    pre_values = None if pre is None else {
        a: {m: np.array([pre.get(m, {}).get(u, 0.0) for u in members[a]], np.float64) for m in EXPOSED_METRICS}
        for a in arms}
    return (len(mixed), *_compare(values, arms=arms, control=control, metrics=EXPOSED_METRICS, srm=srm,
                                  pre=pre_values))


def _compare(values: dict[str, dict[str, np.ndarray]], *, arms: list[str], control: str, metrics: tuple[str, ...],
             srm: bool, pre: dict[str, dict[str, np.ndarray]] | None = None,
             ) -> tuple[dict[str, dict[str, Effect]], dict[str, dict[str, bool]], dict[str, str]]:
    """Each arm's per-user values against the control's: effects, BH across every (arm,
    metric), a verdict per arm (the first metric is the primary)."""
    effects: dict[str, dict[str, Effect]] = {}
    for a in arms:
        if a == control:
            continue
        effects[a] = {m: effect(values[control][m], values[a][m],
                                control_pre=None if pre is None else pre[control][m],
                                treatment_pre=None if pre is None else pre[a][m])
                      for m in metrics if len(values[control][m]) >= 2 and len(values[a][m]) >= 2}
    keys = [(a, m) for a, per in effects.items() for m in per]
    flags, _ = benjamini_hochberg([effects[a][m].p_value for a, m in keys])
    rejected: dict[str, dict[str, bool]] = {a: {} for a in effects}
    for (a, m), r in zip(keys, flags, strict=True):
        rejected[a][m] = r
    verdicts = {a: verdict(per, primary=metrics[0], rejected=rejected[a], srm=srm) if metrics[0] in per
                else "not enough data" for a, per in effects.items()}
    return effects, rejected, verdicts


def pre_period_counts(store_root: Path, *, users: set[str], until: int, days: float) -> dict[str, dict[str, float]]:
    """Each user's clicks and purchases in the interaction store over the ``days`` before
    ``until`` (unix seconds): CUPED's covariate, per metric of the exposure path."""
    from offline.interactions import InteractionStore

    rows = InteractionStore(store_root).read(since=until - int(days * 86_400), until=until, users=users)
    out: dict[str, dict[str, float]] = {m: {} for m in EXPOSED_METRICS}
    for m, kind in zip(EXPOSED_METRICS, ("click", "purchase"), strict=True):
        sel = rows.user[rows.type == kind]
        us, n = np.unique(sel, return_counts=True)
        out[m] = {str(u): float(c) for u, c in zip(us.tolist(), n.tolist(), strict=True)}
    return out


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
    lines.append(f"users per arm from the {r.users_from} log"
                 + (" (complete)" if r.users_from == "exposures" else " (a sample: no exposure log found)"))
    if r.mixed_users:
        lines.append(f"{r.mixed_users} users saw more than one arm: left out of the per-user effects")
    for arm, g in (r.guardrails or {}).items():
        p99 = "n/a" if g.p99_ms is None else f"{g.p99_ms:.1f} ms"
        lines.append(f"{arm:14s} guardrails: {g.responses} responses, degraded {100 * g.degraded.rate:.2f}% "
                     f"[{100 * g.degraded.low:.2f}, {100 * g.degraded.high:.2f}], p99 {p99}"
                     + (f"  HARM: {g.harm}" if g.harm else ""))
    for arm, per in (r.effects or {}).items():
        for m, e in per.items():
            bh = "BH: significant" if (r.bh_rejected or {}).get(arm, {}).get(m) else "BH: not significant"
            cuped = f"  CUPED: variance -{100 * e.variance_reduction:.0f}%" if e.variance_reduction else ""
            lines.append(f"{arm:14s} {m:26s} {e.diff:+.4f} per user vs control  95% [{e.low:+.4f}, {e.high:+.4f}]  "
                         f"always-valid [{e.seq_low:+.4f}, {e.seq_high:+.4f}]  p {e.p_value:.3g}  {bh}{cuped}")
        lines.append(f"{arm:14s} verdict: {(r.verdicts or {}).get(arm, 'not enough data')}")
    return "\n".join(lines)


P99_TOLERANCE = 1.25  # a p99 more than this x the control's is harm (histogram buckets give no interval)
LATENCY_METRIC = "twotower_request_latency_seconds"


def guardrails(metrics_text: str, *, experiment: str, control: str) -> dict[str, Guardrail]:
    """Per arm: the share of degraded responses (with its lift against the control: harm when
    the 95% interval lies above 0) and the p99 latency (harm beyond ``P99_TOLERANCE`` x the
    control's), from the request latency histogram of a ``/metrics`` page (labels rung,
    variant, version; the variant label names the experiment's arm)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, dict[float, float]] = {}
    total: dict[str, float] = {}
    degraded: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != LATENCY_METRIC:
            continue
        for sm in fam.samples:
            arm = arm_of(sm.labels.get("variant", ""), experiment)
            if arm is None:
                continue
            if sm.name.endswith("_bucket"):
                le = float(sm.labels["le"])
                buckets.setdefault(arm, {})[le] = buckets.get(arm, {}).get(le, 0.0) + sm.value
            elif sm.name.endswith("_count"):
                total[arm] = total.get(arm, 0.0) + sm.value
                if sm.labels.get("rung") != "full":
                    degraded[arm] = degraded.get(arm, 0.0) + sm.value
    out: dict[str, Guardrail] = {}
    for arm, n in total.items():
        cum = sorted(buckets.get(arm, {}).items())
        p99 = next((le for le, c in cum if c >= 0.99 * n), None) if n else None
        out[arm] = Guardrail(int(n), proportion(successes=int(degraded.get(arm, 0)), trials=int(n)),
                             None if p99 is None or math.isinf(p99) else 1000 * p99)
    ctl = out.get(control)
    for arm, g in list(out.items()):
        if arm == control or ctl is None:
            continue
        lift = relative_lift(control_successes=ctl.degraded.successes, control_trials=ctl.degraded.trials,
                             treatment_successes=g.degraded.successes, treatment_trials=g.degraded.trials)
        why = []
        if lift is not None and lift.low > 0:
            why.append(f"degraded responses {100 * g.degraded.rate:.2f}% vs {100 * ctl.degraded.rate:.2f}%")
        elif lift is None and g.degraded.successes > 0 and ctl.degraded.successes == 0 and \
                g.degraded.low > ctl.degraded.high:
            why.append(f"degraded responses {100 * g.degraded.rate:.2f}% vs none")
        if g.p99_ms is not None and ctl.p99_ms is not None and g.p99_ms > P99_TOLERANCE * ctl.p99_ms:
            why.append(f"p99 {g.p99_ms:.1f} ms vs {ctl.p99_ms:.1f} ms")
        out[arm] = replace(g, degraded_lift=lift, harm="; ".join(why))
    return out


def lift_over_time(timed: list[tuple[int, Impression]], events: list[Event], *, experiment: str, control: str,
                   metric: str = EXPOSED_METRICS[0], day_s: int = 86_400) -> list[dict[str, Any]]:
    """The report as it would have read at the end of each day since the first exposure: per
    arm the difference in ``metric`` per exposed user, its fixed-horizon and always-valid 95%
    intervals (the always-valid one may be read every day; the fixed one may not)."""
    if not timed:
        return []
    kind = {"clicks_per_user": "click", "purchases_per_user": "purchase"}[metric]
    first = min(t for t, _ in timed)
    last = max([t for t, _ in timed] + [e.timestamp for e in events if e.type == kind])
    rows: list[dict[str, Any]] = []
    for end in range(first + day_s, last + 2 * day_s, day_s):
        exposed = [(x.request_id, x.user_id, a) for t, x in timed
                   if t < end and (a := arm_of(x.variant, experiment)) is not None]
        arms = sorted({a for *_, a in exposed}, key=lambda a: (a != control, a))
        if control not in arms:
            continue
        seen = [e for e in events if e.timestamp < end]
        _, effects, _, _ = _per_exposed_user(exposed, seen, arms=arms, control=control, srm=False)
        rows.append({"day": (end - first) // day_s, "arms": {
            a: {k: getattr(per[metric], k) for k in ("diff", "low", "high", "seq_low", "seq_high", "n_control",
                                                     "n_treatment")} for a, per in effects.items() if metric in per}})
        if end > last:
            break
    return rows


def plot_lift(rows: list[dict[str, Any]], path: Path, *, metric: str = EXPOSED_METRICS[0]) -> None:
    """The difference per exposed user by day, with the fixed-horizon and always-valid bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for arm in sorted({a for r in rows for a in r["arms"]}):
        pts = [(r["day"], r["arms"][arm]) for r in rows if arm in r["arms"]]
        days = [d for d, _ in pts]
        ax.plot(days, [e["diff"] for _, e in pts], marker="o", label=f"{arm} - control")
        ax.fill_between(days, [e["low"] for _, e in pts], [e["high"] for _, e in pts], alpha=0.25,
                        label=f"{arm}: fixed-horizon 95% (read once)")
        ax.fill_between(days, [e["seq_low"] for _, e in pts], [e["seq_high"] for _, e in pts], alpha=0.1,
                        label=f"{arm}: always-valid 95% (read daily)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="days since the first exposure", ylabel=f"{metric}: difference", title="lift over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
