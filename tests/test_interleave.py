"""Interleaving (``kind: interleave``): team-draft merging, its flags, the server answering
with both variants' lists merged and credited (real gRPC), and the report's preference."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_ab_serving import Expected, Version, registry, serve, versions, write_flags  # noqa: F401

from offline.ab_interleave import interleave_report, order_variants, sign_test
from online.client import RecommenderClient
from towers.assign import INTERLEAVED, assign
from towers.errors import ConfigError
from towers.flags import parse_flags
from towers.interleave import team_draft
from towers.store_format import Event, Impression, decode_impression, impression_fields


def _lists(rng: random.Random) -> tuple[list[str], list[str]]:
    pool = [f"i{j}" for j in range(30)]
    return rng.sample(pool, rng.randint(0, 15)), rng.sample(pool, rng.randint(0, 15))


def test_team_draft_keeps_each_list_order_balances_every_prefix_and_repeats_nothing() -> None:
    rng = random.Random(0)
    for trial in range(500):
        a, b = _lists(rng)
        k = rng.randint(1, 20)
        m = team_draft(a, b, k=k, key=f"r{trial}")
        assert len(m.items) == len(set(m.items)) == min(k, len(set(a) | set(b)))
        for team, src in ((0, a), (1, b)):
            mine = [it for it, t in zip(m.items, m.teams, strict=True) if t == team]
            assert all(src[p] == it for it, p, t in zip(m.items, m.positions, m.teams, strict=True) if t == team)
            assert [src.index(it) for it in mine] == sorted(src.index(it) for it in mine)
        # While both lists still have unshown items, the teams differ by at most one pick.
        for n in range(1, len(m.items) + 1):
            left = [any(x not in m.items[:n] for x in lst) for lst in (a, b)]
            if all(left):
                assert abs(m.teams[:n].count(0) - m.teams[:n].count(1)) <= 1
        assert team_draft(a, b, k=k, key=f"r{trial}") == m  # the same request merges the same way


def test_identical_lists_interleave_to_the_list_and_the_coin_is_fair() -> None:
    a = [f"i{j}" for j in range(10)]
    assert team_draft(a, a, k=10, key="x").items == a
    first = [team_draft(["a"], ["b"], k=1, key=f"req-{j}").teams[0] for j in range(2000)]
    assert 900 < sum(first) < 1100


FLAGS = {"experiments": [{"name": "il", "salt": "s1", "status": "running", "allocation": 1.0, "kind": "interleave",
                          "variants": [{"name": "a", "weight": 0.5},
                                       {"name": "b", "weight": 0.5, "overrides": {"max_session": 0}}]}]}


def test_flags_interleave_two_variants_only_and_no_shadows() -> None:
    three = {"experiments": [{**FLAGS["experiments"][0], "variants": [
        {"name": "a", "weight": 0.4}, {"name": "b", "weight": 0.3}, {"name": "c", "weight": 0.3}]}]}
    with pytest.raises(ConfigError, match=r"experiments\[il\]\.variants: interleaving merges exactly two variants"):
        parse_flags(three)
    shadowed = {"experiments": [{**FLAGS["experiments"][0], "variants": [
        {"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}, {"name": "s", "shadow": 0.1}]}]}
    with pytest.raises(ConfigError, match="no shadows"):
        parse_flags(shadowed)
    a = assign(parse_flags(FLAGS), "u1")
    assert a.label == f"il={INTERLEAVED}" and a.of("il").interleave == ("a", "b")
    forced = {"experiments": [{**FLAGS["experiments"][0], "force": {"qa": "b"}}]}
    assert assign(parse_flags(forced), "qa").label == "il=b"  # QA sees one variant alone


def test_impressions_carry_the_credits() -> None:
    imp = Impression("r", "u", "il=interleaved", "v1", ("x", "y"), ("a", "b"))
    assert decode_impression({k.encode(): v.encode() for k, v in impression_fields(imp).items()}) == imp
    plain = Impression("r", "u", "default", "v1", ("x",))
    assert decode_impression(impression_fields(plain)) == plain


def test_server_answers_an_interleaved_list_of_both_versions(tmp_path: Path, registry: Path,  # noqa: F811
                                                             versions: list[Version]) -> None:  # noqa: F811
    v0, v1 = versions[0], versions[1]
    flags = tmp_path / "flags.yaml"
    write_flags(flags, "experiments:\n  - {name: ranker, salt: il-1, status: running, allocation: 1.0, "
                       "kind: interleave, force: {qa: treatment},\n     variants: [{name: control, weight: 0.5}, "
                       f"{{name: treatment, weight: 0.5, version: {v1.id}}}]}}\n")
    srv = serve(registry, flags, impression_sample_rate=0.0)  # interleaved responses are logged anyway
    expected = Expected(registry)
    try:
        with RecommenderClient(srv.target) as c:
            answers = {u: c.recommend(u, k=10, request_id=f"req-{u}") for u in ("u1", "u2", "u3", "qa")}
        impressions = list(srv.running.service.store.impression_log)  # type: ignore[attr-defined]
    finally:
        srv.stop()
    for user in ("u1", "u2", "u3"):
        r = answers[user]
        assert r.variant == f"ranker={INTERLEAVED}" and len(r.contributed_by) == len(r.item_ids) == 10
        # Each team's items are its own version's ranking, in order, from the top.
        for team, v in (("control", v0), ("treatment", v1)):
            mine = [it for it, t in zip(r.item_ids, r.contributed_by, strict=True) if t == team]
            assert mine == expected(v.id, user, k=10)[:len(mine)] and all(it.startswith(v.prefix) for it in mine)
        assert {r.contributed_by[:2].count("control"), r.contributed_by[:2].count("treatment")} == {1}
    assert not answers["qa"].contributed_by and answers["qa"].variant == "ranker=treatment"
    logged = {i.request_id: i for i in impressions}
    assert set(logged) == {"req-u1", "req-u2", "req-u3"}  # the sample rate is 0: only the interleaved ones
    assert logged["req-u1"].teams == tuple(answers["u1"].contributed_by)


def _simulate(n_users: int, p_second: float, seed: int) -> tuple[list[Impression], list[Event]]:
    rng = random.Random(seed)
    imps, events = [], []
    for u in range(n_users):
        for j in range(3):
            m = team_draft([f"a{x}" for x in range(10)], [f"b{x}" for x in range(10)], k=10, key=f"{u}-{j}")
            names = tuple("ctl" if t == 0 else "trt" for t in m.teams)
            rid = f"r{u}-{j}"
            imps.append(Impression(rid, f"u{u}", f"il={INTERLEAVED}", "v", tuple(m.items), names))
            if rng.random() < 0.5:  # a click on an item of the team the user's taste picks
                team = "trt" if rng.random() < p_second else "ctl"
                item = next(it for it, t in zip(m.items, names, strict=True) if t == team)
                events.append(Event(f"u{u}", item, "click", 1, rid))
    events.append(Event("u0", "a0", "view", 1, "r0-0"))  # views credit nothing
    events.append(Event("u1", "a0", "click", 1, "r0-0"))  # another user's response: not credited
    return imps, events


def test_report_finds_the_preferred_variant_and_not_a_phantom_one() -> None:
    imps, events = _simulate(400, 0.65, seed=1)
    r = interleave_report(imps, events, experiment="il")
    assert r is not None and r.variants == ("ctl", "trt") and r.users == 400
    assert r.verdict == "users prefer trt" and r.share_second.low > 0.5 and r.p_value < 0.05
    same = interleave_report(*_simulate(400, 0.5, seed=2), experiment="il")
    assert same is not None and same.share_second.low < 0.5 < same.share_second.high
    flipped = order_variants(r, ("trt", "ctl"))
    assert flipped.share_second.rate == pytest.approx(1 - r.share_second.rate)
    assert interleave_report(imps, events, experiment="other") is None


def test_sign_test_matches_the_hand_computed_binomial() -> None:
    assert sign_test(1, 10) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test(5, 10) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(4000, 10_000) < 1e-80


def test_power_curves_rise_with_users_and_count_only_the_true_direction() -> None:
    from bench.interleave_power import GRID, power_curves, users_needed

    rng = np.random.default_rng(0)
    a = rng.poisson(0.30, 2000).astype(float)
    b = rng.poisson(0.36, 2000).astype(float)
    pref = rng.choice([1, -1, 0], size=2000, p=[0.2, 0.1, 0.7])
    curves = power_curves(a, b, pref, draws=40, seed=0)
    for method in ("ab", "interleave"):
        assert curves[method][-1] > 0.9 and curves[method][0] < 0.5
    assert users_needed(curves["interleave"]) in GRID
    wrong = power_curves(b, a, -pref, draws=40, seed=0)  # b is worse now: never "significant"
    assert max(wrong["ab"]) < 0.1 and max(wrong["interleave"]) < 0.1


def test_shared_fetch_asks_the_store_once_per_version_and_shares_failures() -> None:
    import asyncio

    from online.feature_store import BatchFeatures
    from online.shared_fetch import SharedFetch
    from towers.errors import FeatureStoreError

    calls: list[list[str]] = []

    async def fetch(users: Sequence[str]) -> BatchFeatures:
        # User "uN" has embedding [N, N] and a session of N events, items "uN-0", "uN-1", ...
        calls.append(list(users))
        await asyncio.sleep(0)
        n = [int(u[1:]) for u in users]
        sessions = [[f"{u}-{j}\tview\t{100 + j}".encode() for j in range(k)] for u, k in zip(users, n, strict=True)]
        return BatchFeatures.from_rows([np.full(2, k, np.float32) for k in n], sessions, dim=2)

    async def failing(users: Sequence[str]) -> BatchFeatures:
        raise FeatureStoreError("down")

    async def scenario() -> None:
        share = SharedFetch()
        a, b = await asyncio.gather(share.fetch("v1", ["u1", "u2"], fetch), share.fetch("v1", ["u2"], fetch))
        assert len(a) == 2 and len(b) == 1 and calls == [["u1", "u2"]]
        assert b.embedding.tolist() == [[2.0, 2.0]] and b.items == ["u2-0", "u2-1"] and b.offsets.tolist() == [0, 2]
        c = await share.fetch("v1", ["u3", "u2", "u1", "u3"], fetch)  # only the user not fetched yet
        assert c.embedding[:, 0].tolist() == [3, 2, 1, 3] and c.offsets.tolist() == [0, 3, 5, 6, 9]
        assert c.items == ["u3-0", "u3-1", "u3-2", "u2-0", "u2-1", "u1-0", "u3-0", "u3-1", "u3-2"]
        assert c.timestamps.tolist() == [100, 101, 102, 100, 101, 100, 100, 101, 102]
        await share.fetch("v2", ["u1"], fetch)  # another version: its own embeddings
        assert calls[1:] == [["u3"], ["u1"]] and share.fetches == 3
        broken = SharedFetch()
        results = await asyncio.gather(broken.fetch("v1", ["u1"], failing), broken.fetch("v1", ["u1"], fetch),
                                       return_exceptions=True)
        assert all(isinstance(r, FeatureStoreError) for r in results) and calls[3:] == []

    asyncio.run(scenario())


def test_interleaving_two_overrides_of_one_version_fetches_features_once(tmp_path: Path, registry: Path,  # noqa: F811
                                                                         versions: list[Version]) -> None:  # noqa: F811
    flags = tmp_path / "flags.yaml"
    write_flags(flags, "experiments:\n  - {name: sess, salt: il-2, status: running, allocation: 1.0, "
                       "kind: interleave,\n     variants: [{name: with, weight: 0.5}, "
                       "{name: without, weight: 0.5, overrides: {max_session: 0}}]}\n")
    srv = serve(registry, flags)
    try:
        store = srv.running.service.store
        real = store.fetch
        calls: list[int] = []

        async def counting(*a: object, **kw: object) -> object:
            calls.append(1)
            return await real(*a, **kw)  # type: ignore[arg-type]

        store.fetch = counting  # type: ignore[method-assign]
        v0 = versions[0]
        with RecommenderClient(srv.target) as c:
            r = c.recommend("u4", k=10, recent=[f"{v0.prefix}{j}" for j in (3, 9, 27)])
    finally:
        srv.stop()
    assert r.variant == f"sess={INTERLEAVED}" and set(r.contributed_by) == {"with", "without"}
    assert len(calls) == 1  # one feature fetch, two searches


def test_report_cli_reads_interleaved_impressions_from_a_real_redis(tmp_path: Path,
                                                                    redis_proc) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import json
    import subprocess

    from cli_entry import twotower_argv

    from offline.event_log import EventLog
    from online.config import RedisConfig
    from online.redis_store import RedisFeatureStore

    imps, events = _simulate(60, 0.9, seed=3)
    imps = [Impression(i.request_id, i.user_id, "il=interleaved", i.version, i.item_ids, i.teams) for i in imps]
    plain = Impression("r-plain", "u-x", "default", "v", ("a0",))

    async def log() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix="tt-il"))
        await store.log_impressions([*imps, plain], timeout=5.0)
        await store.record([replace(e, timestamp=1_700_000_000 + j) for j, e in enumerate(events)], timeout=5.0)
        await store.close()

    asyncio.run(log())
    read = EventLog(redis_url=redis_proc.url, prefix="tt-il")
    try:
        back = list(read.impressions())
    finally:
        read.close()
    assert back == [*imps, plain]  # the credits survive the stream, and plain impressions have none
    flags = tmp_path / "flags.yaml"
    write_flags(flags, "experiments:\n  - {name: il, salt: s, status: running, allocation: 1.0, kind: interleave,\n"
                       "     variants: [{name: trt, weight: 0.5}, {name: ctl, weight: 0.5}]}\n")
    out = subprocess.run([*twotower_argv(), "ab", "report", "--redis-url", redis_proc.url, "--prefix", "tt-il",
                          "--experiment", "il", "--flags", str(flags), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    il = json.loads(out.stdout)["interleave"]
    assert il["variants"] == ["trt", "ctl"]  # the flags' order
    assert il["wins"]["trt"] > il["wins"]["ctl"] and il["share_second"]["rate"] < 0.5
    text = subprocess.run([*twotower_argv(), "ab", "report", "--redis-url", redis_proc.url, "--prefix", "tt-il",
                           "--experiment", "il", "--control", "trt"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "interleaving il:" in text.stdout and "verdict: users prefer trt" in text.stdout
