"""The durable logs against a real, throwaway redis-server: every acknowledged RecordEvents
event is in the session and the event stream; sampled impressions; a consumer group that
acknowledges only when told, moves malformed entries to the dead letters and drops repeats;
and the A/B outcome report's arithmetic."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from offline.ab_report import arm_of, format_report, outcome_report
from offline.event_log import EventLog
from online.client import RecommenderClient
from online.config import RedisConfig, load_config
from online.server import ServerThread
from towers import registry as registry_mod
from towers.redis_load import load_bundle_into_redis
from towers.store_format import Event, Impression, RedisKeys


@pytest.fixture
def logged_server(served_registry: Path, redis_proc) -> Iterator[tuple[ServerThread, str]]:  # type: ignore[no-untyped-def]
    load_bundle_into_redis(registry_mod.current_path(served_registry), redis_url=redis_proc.url, prefix="tt-log",
                           progress=False)
    cfg = replace(load_config(port=0, feature_store="redis", impression_sample_rate=1.0),
                  redis=RedisConfig(url=redis_proc.url, prefix="tt-log"))
    srv = ServerThread(cfg, registry=served_registry)
    yield srv, redis_proc.url
    srv.stop()


def test_acknowledged_events_are_in_the_session_and_the_stream(logged_server) -> None:  # type: ignore[no-untyped-def]
    srv, url = logged_server
    r = redis.Redis.from_url(url)
    keys = RedisKeys("tt-log")
    with RecommenderClient(srv.target, timeout=5.0) as c:
        assert c.record_events([("7", "50", "click", 100), ("8", "181", "cart", 101), ("7", "1", "view", 102)]) == 3
    entries = r.xrange(keys.events())
    assert [(f[b"user"], f[b"item"], f[b"type"], f[b"ts"]) for _, f in entries] == [
        (b"7", b"50", b"click", b"100"), (b"8", b"181", b"cart", b"101"), (b"7", b"1", b"view", b"102")]
    assert {m.split(b"\t")[0] for m in r.zrange(keys.session("7"), 0, -1)} == {b"50", b"1"}
    # Trimmed by its consumers; a byte cap (not an entry count) bounds it if they stop.
    assert srv.cfg.redis.events_max_bytes == 1 << 30


def test_served_responses_are_sampled_into_the_impression_log(logged_server) -> None:  # type: ignore[no-untyped-def]
    srv, url = logged_server
    with RecommenderClient(srv.target, timeout=5.0) as c:
        resp = c.recommend("42", k=5, request_id="req-1")
    srv.call(srv.running.service.impressions.close())  # flush what is buffered
    log = EventLog(redis_url=url, prefix="tt-log")
    try:
        imps = [i for i in log.impressions() if i.request_id == "req-1"]
    finally:
        log.close()
    assert len(imps) == 1 and imps[0].user_id == "42" and imps[0].version == resp.model_version
    assert list(imps[0].item_ids) == list(resp.item_ids) and imps[0].variant == resp.variant


def test_a_consumer_group_acks_only_when_told_and_dead_letters_what_does_not_parse(redis_proc) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_proc.url)
    keys = RedisKeys("tt-cg")
    good = {"user": "u1", "item": "i1", "type": "click", "ts": "10", "rid": "r1"}
    r.xadd(keys.events(), good)
    r.xadd(keys.events(), {"user": "u2", "item": "i2", "type": "teleport", "ts": "11"})  # malformed
    r.xadd(keys.events(), good)  # a retried call landed twice: the same event
    r.xadd(keys.events(), {"user": "u3", "item": "i3", "type": "view", "ts": "12"})
    log = EventLog(redis_url=redis_proc.url, prefix="tt-cg")
    try:
        log.ensure_group("refresh")
        log.ensure_group("refresh")  # idempotent
        batch = log.read(group="refresh", consumer="c1")
        assert batch.events == [Event("u1", "i1", "click", 10, "r1"), Event("u3", "i3", "view", 12)]
        assert batch.dead == 1 and len(batch.ids) == 3
        dead = r.xrange(keys.dead_letters())
        assert len(dead) == 1 and b"teleport" in dead[0][1][b"reason"] and dead[0][1][b"user"] == b"u2"
        # Not acknowledged yet: a crash here means the same entries are read again.
        assert log.pending_count(group="refresh") == 3
        again = log.read(group="refresh", consumer="c1", pending=True)
        assert again.ids == batch.ids
        assert log.ack(group="refresh", ids=batch.ids) == 3
        assert log.pending_count(group="refresh") == 0
        assert log.read(group="refresh", consumer="c1").ids == []
    finally:
        log.close()


def test_the_outcome_report_against_a_hand_computed_example() -> None:
    def imp(rid: str, user: str, arm: str) -> Impression:
        return Impression(rid, user, f"other=x,ranker={arm}", "v1", ("a", "b"))

    # control: 4 impressions (users c1..c4), 2 clicked, 1 purchased; treatment: 4 impressions
    # (users t1, t1, t2, t3), 3 clicked (one impression clicked twice), 0 purchased.
    imps = [imp(f"c{j}", f"c{j}", "control") for j in range(1, 5)]
    imps += [imp("t1a", "t1", "treat"), imp("t1b", "t1", "treat"), imp("t2", "t2", "treat"), imp("t3", "t3", "treat")]
    imps.append(Impression("d1", "d1", "default", "v1", ("a",)))  # outside the experiment
    events = [Event("c1", "a", "click", 1, "c1"), Event("c2", "a", "click", 2, "c2"),
              Event("c2", "a", "purchase", 3, "c2"), Event("t1", "a", "click", 4, "t1a"),
              Event("t1", "b", "click", 5, "t1a"), Event("t2", "a", "click", 6, "t2"),
              Event("t3", "a", "click", 7, "t3"), Event("x", "a", "click", 8, "sampled-out"),
              Event("y", "a", "click", 9, "")]
    rep = outcome_report(imps, events, experiment="ranker", control="control",
                         weights={"control": 0.5, "treat": 0.5})
    control, treat = rep.arms
    assert (control.arm, control.users, control.impressions) == ("control", 4, 4)
    assert (treat.arm, treat.users, treat.impressions) == ("treat", 3, 4)
    assert control.ctr.rate == 0.5 and treat.ctr.rate == 0.75
    assert control.conversion.rate == 0.25 and treat.conversion.rate == 0.0
    assert treat.ctr_lift is not None and treat.ctr_lift.lift == pytest.approx(0.5)  # 0.75 / 0.5 - 1
    assert treat.conversion_lift is None  # no purchases in the treatment: no log ratio
    assert rep.unjoined_events == 1 and rep.srm is not None and not rep.srm.mismatch
    assert arm_of("a=1,ranker=treat", "ranker") == "treat" and arm_of("default", "ranker") is None


def test_the_outcome_report_flags_a_broken_split() -> None:
    imps = [Impression(f"c{j}", f"c{j}", "e=control", "v", ()) for j in range(1000)]
    imps += [Impression(f"t{j}", f"t{j}", "e=treat", "v", ()) for j in range(800)]  # a fifth of treat lost
    rep = outcome_report(imps, [], experiment="e", control="control", weights={"control": 0.5, "treat": 0.5})
    assert rep.srm is not None and rep.srm.mismatch


def test_the_report_compares_per_user_rates_and_leaves_out_users_seen_in_two_arms() -> None:
    def imp(rid: str, user: str, arm: str) -> Impression:
        return Impression(rid, user, f"ranker={arm}", "v1", ("a",))

    # control c1..c4: one impression each, c1 and c2 clicked -> per-user rates 1, 1, 0, 0.
    # treat: t1 two impressions, one clicked (0.5); t2, t3 one each, clicked (1, 1).
    # m1 saw both arms (a ramp): left out of the per-user comparison, still in the rates above.
    imps = [imp(f"c{j}", f"c{j}", "control") for j in range(1, 5)]
    imps += [imp("t1a", "t1", "treat"), imp("t1b", "t1", "treat"), imp("t2", "t2", "treat"), imp("t3", "t3", "treat")]
    imps += [imp("m1a", "m1", "control"), imp("m1b", "m1", "treat")]
    events = [Event(u, "a", "click", 1, rid) for rid, u in (("c1", "c1"), ("c2", "c2"), ("t1a", "t1"), ("t2", "t2"),
                                                             ("t3", "t3"), ("m1b", "m1"))]
    rep = outcome_report(imps, events, experiment="ranker", control="control")
    assert rep.mixed_users == 1 and rep.effects is not None and rep.verdicts is not None
    e = rep.effects["treat"]["clicks_per_impression"]
    assert (e.n_control, e.n_treatment) == (4, 3)
    assert e.control_mean == pytest.approx(0.5) and e.treatment_mean == pytest.approx(2.5 / 3)
    assert e.diff == pytest.approx(2.5 / 3 - 0.5) and e.seq_low < e.low < e.diff < e.high < e.seq_high
    assert rep.verdicts["treat"] == "not enough data"  # 3 and 4 users: far below the minimum
    assert "1 users saw more than one arm" in format_report(rep) and "verdict: not enough data" in format_report(rep)


def test_exposures_are_logged_once_per_user_label_and_day_and_the_report_counts_users_from_them(
        redis_proc) -> None:  # type: ignore[no-untyped-def]
    """Issue 21 item 1: every response of a user in an experiment is an exposure, written once
    per user, label and day (to Redis, read back by the report); users exposed to two arms are
    left out of the per-user effects and counted."""
    import asyncio

    from offline.ab_report import outcome_report
    from online.exposures import DAY_S, ExposureLog
    from online.redis_store import RedisFeatureStore
    from online.request import RecRequest, RecResult, StageTimings
    from towers.labels import Mode, Rung, Source

    now = [10 * DAY_S + 5.0]

    def served(user: str, label: str, rid: str) -> tuple[RecRequest, RecResult]:
        req = RecRequest(user, 5, (), (), (), Mode.AUTO, rid, False, 0.0)
        return req, RecResult([], [], "v1", label, Rung.FULL, [], Source.ONLINE, StageTimings(), 1, request_id=rid)

    async def main() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix="tt-exp"))
        log = ExposureLog(store, clock=lambda: now[0])
        for rid, user, label in [("r1", "u1", "rk=control"), ("r2", "u1", "rk=control"),  # same day: once
                                 ("r3", "u2", "rk=treat"), ("r4", "u3", "default"),  # not in an experiment
                                 ("r5", "u4", "rk=control"), ("r6", "u4", "rk=treat")]:  # a ramp: two arms
            log.offer(*served(user, label, rid))
        now[0] += DAY_S  # the next day: u1 is exposed again
        log.offer(*served("u1", "rk=control", "r7"))
        await log.close()
        await store.close()
        assert log.stats.written == 5 and log.stats.failed == 0

    asyncio.run(main())
    ev = EventLog(redis_url=redis_proc.url, prefix="tt-exp")
    try:
        exposures = list(ev.exposures())
    finally:
        ev.close()
    assert [(x.request_id, x.user_id, x.variant) for x in exposures] == [
        ("r1", "u1", "rk=control"), ("r3", "u2", "rk=treat"), ("r5", "u4", "rk=control"), ("r6", "u4", "rk=treat"),
        ("r7", "u1", "rk=control")]
    events = [Event("u1", "a", "click", 1, ""), Event("u1", "b", "click", 2, ""), Event("u2", "a", "click", 3, "")]
    rep = outcome_report([], events, experiment="rk", control="control", exposures=exposures)
    assert rep.users_from == "exposures" and rep.mixed_users == 1
    assert {a.arm: a.users for a in rep.arms} == {"control": 2, "treat": 2}  # u4 counted in both, as exposed
    assert rep.effects == {"treat": {}}  # one clean user per arm: too few to compare


def test_the_report_uses_each_users_pre_period_from_the_interaction_store_cuped(tmp_path: Path) -> None:
    """CUPED in the report: a user's clicks in the 14 days before the experiment (from the
    interaction store) explain most of their clicks during it; the adjusted comparison has a
    much smaller variance and the same effect."""
    from offline.ab_report import outcome_report, pre_period_counts
    from offline.interactions import InteractionRows, InteractionStore

    rng = np.random.default_rng(4)
    start = 1_700_000_000
    users = [f"u{j}" for j in range(800)]
    habit = rng.gamma(2.0, 3.0, len(users))  # clicks a user makes in two weeks
    pre_clicks = rng.poisson(habit)
    rows = [(u, "i", "click", start - 1 - int(t)) for u, n in zip(users, pre_clicks, strict=True)
            for t in rng.integers(0, 14 * 86_400, n)]
    store = InteractionStore(tmp_path / "store")
    store.append(InteractionRows(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                                 np.array([r[2] for r in rows]), np.array([r[3] for r in rows], np.int64),
                                 np.ones(len(rows), np.float32)))
    arm = {u: "control" if j % 2 else "treat" for j, u in enumerate(users)}
    during = rng.poisson(habit + np.array([0.8 if arm[u] == "treat" else 0.0 for u in users]))
    exposures = [Impression(f"r-{u}", u, f"rk={arm[u]}", "v1", ()) for u in users]
    events = [Event(u, "i", "click", start + 10, "") for u, n in zip(users, during, strict=True) for _ in range(n)]
    pre = pre_period_counts(tmp_path / "store", users=set(users), until=start, days=14)
    assert sum(pre["clicks_per_user"].values()) == len(rows)
    raw = outcome_report([], events, experiment="rk", control="control", exposures=exposures)
    cuped = outcome_report([], events, experiment="rk", control="control", exposures=exposures, pre=pre)
    assert raw.effects is not None and cuped.effects is not None
    r, c = raw.effects["treat"]["clicks_per_user"], cuped.effects["treat"]["clicks_per_user"]
    assert c.variance_reduction > 0.5 and c.se < 0.75 * r.se  # Poisson noise on both sides: about 0.57
    assert c.low <= 0.8 <= c.high and r.low <= 0.8 <= r.high


def test_guardrails_per_arm_from_the_latency_histogram_and_a_harmful_arm_is_named() -> None:
    """Issue 21 item 2's guardrails: the share of degraded responses and the p99 per arm, from
    the servers' request latency histogram; an arm that degrades more (interval above 0) or
    whose p99 is over 1.25x the control's is harm, and the verdict says so."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from offline.ab_report import guardrails
    from online.metrics import LATENCY_BUCKETS

    reg = CollectorRegistry()
    h = Histogram("twotower_request_latency_seconds", "latency", ["rung", "variant", "version"],
                  buckets=LATENCY_BUCKETS, registry=reg)
    for _ in range(2000):
        h.labels("full", "rk=control,other=x", "v1").observe(0.004)
        h.labels("full", "rk=slow", "v2").observe(0.004)
        h.labels("full", "rk=flaky", "v3").observe(0.004)
    for _ in range(10):
        h.labels("no_session", "rk=control,other=x", "v1").observe(0.004)
        h.labels("no_session", "rk=slow", "v2").observe(0.004)
    for _ in range(200):
        h.labels("no_session", "rk=flaky", "v3").observe(0.004)
    for _ in range(100):
        h.labels("full", "rk=slow", "v2").observe(0.09)  # 5% of slow's answers near 90 ms
    h.labels("full", "default", "v1").observe(5.0)  # outside the experiment
    g = guardrails(generate_latest(reg).decode(), experiment="rk", control="control")
    assert g["control"].responses == 2010 and g["control"].p99_ms == 5.0 and g["control"].harm == ""
    assert g["slow"].p99_ms == 100.0 and "p99 100.0 ms vs 5.0 ms" in g["slow"].harm
    assert g["flaky"].degraded.rate == pytest.approx(200 / 2200) and "degraded responses" in g["flaky"].harm
    exposures = [Impression(f"r{j}", f"u{j}", f"rk={('control', 'slow', 'flaky')[j % 3]}", "v", ()) for j in range(600)]
    events = [Event(f"u{j}", "a", "click", 1, "") for j in range(0, 600, 2)]
    rep = outcome_report([], events, experiment="rk", control="control", exposures=exposures, guards=g)
    assert rep.verdicts is not None and rep.verdicts["slow"].startswith("harm on a guardrail (p99")
    assert rep.verdicts["flaky"].startswith("harm on a guardrail (degraded")
    assert "guardrails: 2010 responses" in format_report(rep)


def test_the_lift_over_time_ends_where_the_report_ends_and_is_drawn(tmp_path: Path) -> None:
    from offline.ab_report import lift_over_time, plot_lift

    rng = np.random.default_rng(8)
    day, t0 = 86_400, 1_700_000_000
    timed = [(t0 + int(d) * day + 10, Impression(f"r{j}", f"u{j}", f"rk={'treat' if j % 2 else 'control'}", "v", ()))
             for j, d in enumerate(rng.integers(0, 6, 600))]
    events = [Event(x.user_id, "a", "click", t + 100 + k, "") for t, x in timed
              for k in range(rng.poisson(2.0 if x.variant.endswith("treat") else 1.5))]
    rows = lift_over_time(timed, events, experiment="rk", control="control")
    assert [r["day"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 6
    final = outcome_report([], events, experiment="rk", control="control", exposures=[x for _, x in timed])
    assert final.effects is not None
    whole = final.effects["treat"]["clicks_per_user"]
    assert rows[-1]["arms"]["treat"]["diff"] == pytest.approx(whole.diff)  # the last day is the report
    ns = [r["arms"]["treat"]["n_treatment"] for r in rows if "treat" in r["arms"]]
    assert ns == sorted(ns)  # users accumulate
    plot_lift(rows, tmp_path / "lift.png")
    assert (tmp_path / "lift.png").stat().st_size > 1000


def test_ab_report_cli_reads_exposures_the_store_and_metrics_and_draws_the_lift(redis_proc, tmp_path: Path,
                                                                                ) -> None:  # type: ignore[no-untyped-def]
    """The CLI end to end on a real Redis: exposures and events logged by a server's store, the
    pre-period from an interaction store, guardrails from a /metrics page (a file URL)."""
    import asyncio
    import json
    import subprocess

    from cli_entry import twotower_argv
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from offline.interactions import InteractionRows, InteractionStore
    from online.metrics import LATENCY_BUCKETS
    from online.redis_store import RedisFeatureStore

    t0 = 1_700_000_000
    users = [f"u{j}" for j in range(40)]
    arm = {u: "treat" if j % 2 else "control" for j, u in enumerate(users)}

    async def log() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix="tt-cli"))
        await store.log_impressions([Impression(f"r-{u}", u, f"rk={arm[u]}", "v1", ()) for u in users], timeout=5.0,
                                    log="exposures")
        await store.record([Event(u, "a", "click", t0 + 100 + j, "") for j, u in enumerate(users)], timeout=5.0)
        await store.close()

    asyncio.run(log())
    InteractionStore(tmp_path / "store").append(InteractionRows.build(
        user=users, item=["a"] * len(users), type=["click"] * len(users), timestamp=[t0 - 86_400] * len(users)))
    reg = CollectorRegistry()
    h = Histogram("twotower_request_latency_seconds", "l", ["rung", "variant", "version"], buckets=LATENCY_BUCKETS,
                  registry=reg)
    h.labels("full", "rk=control", "v1").observe(0.004)
    h.labels("full", "rk=treat", "v1").observe(0.004)
    metrics = tmp_path / "metrics.txt"
    metrics.write_bytes(generate_latest(reg))
    png = tmp_path / "lift.png"
    out = subprocess.run([*twotower_argv(), "ab", "report", "--redis-url", redis_proc.url, "--prefix", "tt-cli",
                          "--experiment", "rk", "--control", "control", "--since", "1", "--store",
                          str(tmp_path / "store"), "--metrics-url", metrics.as_uri(), "--plot", str(png), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["users_from"] == "exposures" and {a["arm"]: a["users"] for a in rep["arms"]} == {"control": 20,
                                                                                             "treat": 20}
    assert rep["guardrails"]["treat"]["responses"] == 1 and rep["verdicts"]["treat"] == "not enough data"
    assert png.stat().st_size > 1000
