"""A/B flags: the file's schema, the assignment's guarantees, the ``ab`` CLI.

Issue 12: assignment is a deterministic hash of (salt, user), the same in every
process; allocation and variant choice use independent hashes; raising a share
only moves users into it from the control; every invalid file is a ConfigError
that names the experiment, the field and the bad value.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from towers import assign as assign_mod
from towers.assign import assign, shadow_sampled, variant_for_bucket
from towers.errors import ConfigError
from towers.flags import CURRENT, N_BUCKETS, Experiment, Flags, load_flags, parse_flags

ISSUE_EXAMPLE = """\
experiments:
  - name: ranker-v2
    salt: "ranker-v2-2026-11"
    status: running            # running | paused | stopped
    allocation: 1.0            # share of users in the experiment
    variants:
      - {name: control, weight: 0.5, version: CURRENT}
      - {name: treatment, weight: 0.5, version: v20261201T030000-abc, overrides: {nprobe: 64, max_session: 5}}
      - {name: shadow-hnsw, shadow: 0.1, version: v20261201T040000-def}
    force: {"qa-user-1": treatment}
"""
V1, V2, V3 = "v20261201T030000-0123456789", "v20261202T030000-abcdef0123", "v20261203T030000-fedcba9876"
# Chi-square critical values at alpha = 0.001 (tables), by degrees of freedom.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 9: 27.877}
USERS = [f"user-{i}" for i in range(100_000)]


def experiment(weights: dict[str, float], **kw: Any) -> dict[str, Any]:
    """An experiment as the YAML would give it; the first weight is the control's."""
    name = kw.pop("name", "exp")
    exp = {"name": name, "salt": kw.pop("salt", f"{name}-salt"), "status": "running", "allocation": 1.0,
           "variants": [{"name": n, "weight": w} for n, w in weights.items()]}
    exp.update(kw)
    return exp


def flags_of(*experiments: dict[str, Any]) -> Flags:
    return parse_flags({"experiments": list(experiments)})


def chi2(counts: Counter[str], shares: dict[str, float]) -> float:
    total = sum(counts.values())
    return sum((counts[a] - total * s) ** 2 / (total * s) for a, s in shares.items())


def variants_of(flags: Flags, users: list[str], name: str = "exp") -> dict[str, str | None]:
    return {u: assign(flags, u).of(name).variant for u in users}


# -- the file -------------------------------------------------------------------------------------


def test_the_issue_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(ISSUE_EXAMPLE)
    flags = load_flags(path)
    exp = flags.experiment("ranker-v2")
    assert exp.control.name == "control"  # the first variant is the control
    assert [v.name for v in exp.treatments] == ["treatment"]
    assert [v.name for v in exp.shadows] == ["shadow-hnsw"]
    assert exp.variant("treatment").overrides.nprobe == 64
    assert exp.sets == {"version", "nprobe", "max_session"}
    # Shadows pin their version too: the server must keep it resident to score with it.
    assert flags.pinned_versions() == {"v20261201T030000-abc", "v20261201T040000-def"}


def test_only_running_experiments_pin_versions() -> None:
    running = experiment({"c": 0.5, "t": 0.5}, name="a")
    running["variants"][1]["version"] = V1
    paused = experiment({"c": 0.5, "t": 0.5}, name="b", status="paused")
    paused["variants"][1]["version"] = V2
    stopped = experiment({"c": 0.5, "t": 0.5}, name="c", status="stopped")
    stopped["variants"][0]["version"] = V3
    assert flags_of(running, paused, stopped).pinned_versions() == {V1}


def _issue() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(ISSUE_EXAMPLE))


def _exp(d: dict[str, Any]) -> dict[str, Any]:
    return d["experiments"][0]


def _var(d: dict[str, Any], i: int) -> dict[str, Any]:
    return d["experiments"][0]["variants"][i]


def _second_experiment(d: dict[str, Any], **kw: Any) -> None:
    d["experiments"].append(experiment({"c": 1.0}, name=kw.pop("name", "other"), **kw))


INVALID = [
    # (what is wrong, mutation, field named, value named)
    ("unknown key", lambda d: _exp(d).update(colour="blue"), "experiments[ranker-v2].colour", "'blue'"),
    ("unknown top-level key", lambda d: d.update(experimentz=[]), "experimentz", "unknown key"),
    ("bad status", lambda d: _exp(d).update(status="paus"), "experiments[ranker-v2].status", "'paus'"),
    ("allocation > 1", lambda d: _exp(d).update(allocation=1.5), "experiments[ranker-v2].allocation", "1.5"),
    ("missing salt", lambda d: _exp(d).pop("salt"), "experiments[ranker-v2].salt", "missing"),
    ("numeric salt", lambda d: _exp(d).update(salt=2026), "experiments[ranker-v2].salt", "2026"),
    ("weights sum to 0.9", lambda d: _var(d, 1).update(weight=0.4), "experiments[ranker-v2].variants", "0.9"),
    ("negative weight", lambda d: _var(d, 1).update(weight=-0.5),
     "experiments[ranker-v2].variants[treatment].weight", "-0.5 is not >= 0"),
    ("duplicate variant", lambda d: _var(d, 1).update(name="control"),
     "experiments[ranker-v2].variants[control].name", "'control'"),
    ("duplicate experiment name", lambda d: _second_experiment(d, name="ranker-v2"),
     "experiments[ranker-v2].name", "'ranker-v2'"),
    ("duplicate salt", lambda d: _second_experiment(d, salt="ranker-v2-2026-11"),
     "experiments[other].salt", "'ranker-v2-2026-11'"),
    ("force to an unknown variant", lambda d: _exp(d)["force"].update({"qa-user-1": "nobody"}),
     "experiments[ranker-v2].force[qa-user-1]", "'nobody'"),
    ("force into a shadow", lambda d: _exp(d)["force"].update({"qa-user-1": "shadow-hnsw"}),
     "experiments[ranker-v2].force[qa-user-1]", "'shadow-hnsw'"),
    ("bad version id", lambda d: _var(d, 1).update(version="v2"),
     "experiments[ranker-v2].variants[treatment].version", "'v2'"),
    ("lowercase current", lambda d: _var(d, 0).update(version="current"),
     "experiments[ranker-v2].variants[control].version", "'current'"),
    ("nprobe 0", lambda d: _var(d, 1)["overrides"].update(nprobe=0),
     "experiments[ranker-v2].variants[treatment].overrides.nprobe", "0 is not >= 1"),
    ("nprobe true", lambda d: _var(d, 1)["overrides"].update(nprobe=True),
     "experiments[ranker-v2].variants[treatment].overrides.nprobe", "True"),
    ("budget 0", lambda d: _var(d, 1)["overrides"].update(budget_ms=0),
     "experiments[ranker-v2].variants[treatment].overrides.budget_ms", "0 is not > 0"),
    ("unknown rung", lambda d: _var(d, 1)["overrides"].update(allowed_rungs=["full", "turbo"]),
     "experiments[ranker-v2].variants[treatment].overrides.allowed_rungs[1]", "'turbo'"),
    ("ladder without popularity", lambda d: _var(d, 1)["overrides"].update(allowed_rungs=["full"]),
     "experiments[ranker-v2].variants[treatment].overrides.allowed_rungs", "['full']"),
    ("unknown override", lambda d: _var(d, 1)["overrides"].update(efsearch=64),
     "experiments[ranker-v2].variants[treatment].overrides.efsearch", "64"),
    ("shadow with a weight", lambda d: _var(d, 2).update(weight=0.1),
     "experiments[ranker-v2].variants[shadow-hnsw].weight", "0.1"),
    ("shadow rate 0", lambda d: _var(d, 2).update(shadow=0),
     "experiments[ranker-v2].variants[shadow-hnsw].shadow", "0 is not > 0"),
    ("control as a shadow", lambda d: _exp(d)["variants"].reverse(),
     "experiments[ranker-v2].variants[shadow-hnsw].shadow", "0.1"),
    ("no weight, no shadow", lambda d: _var(d, 1).pop("weight"),
     "experiments[ranker-v2].variants[treatment].weight", "missing"),
    ("bad experiment name", lambda d: _exp(d).update(name="ranker v2!"), "experiments[ranker v2!].name",
     "'ranker v2!'"),
    ("treatments over their ramp slot",
     lambda d: _exp(d).update(variants=[{"name": "c", "weight": 0.3}, {"name": "a", "weight": 0.3},
                                        {"name": "b", "weight": 0.3}, {"name": "x", "weight": 0.1}]),
     "experiments[ranker-v2].variants[a].weight", "a 0.3 + b 0.3"),
    ("one user forced into two exclusive experiments",
     lambda d: d["experiments"].append(
         {**experiment({"c": 0.5, "t": 0.5}, name="nprobe-test"), "force": {"qa-user-1": "t"},
          "variants": [{"name": "c", "weight": 0.5}, {"name": "t", "weight": 0.5, "overrides": {"nprobe": 8}}]}),
     "experiments[nprobe-test].force[qa-user-1]", "ranker-v2"),
]


@pytest.mark.parametrize(("mutate", "field", "value"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_every_invalid_file_names_experiment_field_and_value(mutate: Any, field: str, value: str,
                                                             tmp_path: Path) -> None:
    data = _issue()
    mutate(data)
    path = tmp_path / "flags.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_flags(path)
    assert info.value.field == field, str(info.value)
    assert value in str(info.value)


def test_the_error_reads_like_the_issue_asks() -> None:
    data = _issue()
    _var(data, 1)["weight"] = -0.5
    with pytest.raises(ConfigError) as info:
        parse_flags(data)
    assert str(info.value).startswith("experiments[ranker-v2].variants[treatment].weight: -0.5 is not >= 0")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("experiments:\n  - name: [unclosed\n", "not valid YAML at line"),
        ("experiments:\n  - name: a\n    name: b\n", "duplicate key 'name'"),
        ("", "empty"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
    ids=["bad yaml", "duplicate key", "empty file", "not a mapping"],
)
def test_unreadable_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_flags(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_flags(tmp_path / "nope.yaml")
    assert info.value.field == str(tmp_path / "nope.yaml")
    assert "not found" in str(info.value)


# -- the hash -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"c": 0.5, "t": 0.5}, {"c": 0.2, "t1": 0.3, "t2": 0.5}], ids=["50/50", "3-way"])
def test_split_is_uniform_over_100k_users(weights: dict[str, float]) -> None:
    flags = flags_of(experiment(weights))
    counts = Counter(assign(flags, u).of("exp").variant for u in USERS)
    for arm, share in weights.items():
        assert abs(counts[arm] / len(USERS) - share) <= 0.01, counts
    assert chi2(counts, weights) < CHI2_CRIT_001[len(weights) - 1], counts


def test_allocation_buckets_are_uniform() -> None:
    exp = flags_of(experiment({"c": 1.0})).experiment("exp")
    deciles = Counter(assign_mod.allocation_bucket(exp, u) * 10 // N_BUCKETS for u in USERS)
    assert chi2(Counter({str(k): v for k, v in deciles.items()}), {str(k): 0.1 for k in range(10)}) < CHI2_CRIT_001[9]


@pytest.mark.parametrize("allocation", [0.05, 0.2, 0.5])
def test_split_inside_a_partial_allocation_is_balanced(allocation: float) -> None:
    weights = {"c": 0.5, "t": 0.5}
    flags = flags_of(experiment(weights, allocation=allocation))
    counts = Counter(v for v in variants_of(flags, USERS).values() if v is not None)
    assert abs(sum(counts.values()) / len(USERS) - allocation) <= 0.01
    assert chi2(counts, weights) < CHI2_CRIT_001[1], counts


def test_a_shared_hash_would_fail_the_balance_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with the variant drawn from the allocation hash (the
    Unleash PHP bug), a 20% allocation is buckets 0..1999, all below the treatment's range."""
    monkeypatch.setattr(assign_mod, "variant_bucket", assign_mod.allocation_bucket)
    flags = flags_of(experiment({"c": 0.5, "t": 0.5}, allocation=0.2))
    counts = Counter(v for v in variants_of(flags, USERS[:20_000]).values() if v is not None)
    assert chi2(counts, {"c": 0.5, "t": 0.5}) > CHI2_CRIT_001[1]


STICKY_SCRIPT = """
import json, sys
from towers.flags import load_flags
from towers.assign import assign
flags = load_flags(sys.argv[1])
print(json.dumps([assign(flags, f"user-{i}").to_json() for i in range(2000)]))
"""


def test_assignment_is_the_same_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(ISSUE_EXAMPLE)
    here = [assign(load_flags(path), f"user-{i}").to_json() for i in range(2000)]
    for seed in ("1", "2"):  # Python's own hash() differs with PYTHONHASHSEED; ours must not
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", STICKY_SCRIPT, str(path)], capture_output=True, text=True,
                             env=env, check=True).stdout
        assert json.loads(out) == here


def test_buckets_are_pinned() -> None:
    """Changing the hash would reassign every user of every running experiment: pin it."""
    a = assign(load_flags_text(ISSUE_EXAMPLE), "42").of("ranker-v2")
    assert (a.allocation_bucket, a.variant_bucket) == (3536, 2403)
    a = assign(load_flags_text(ISSUE_EXAMPLE), "1").of("ranker-v2")
    assert (a.allocation_bucket, a.variant_bucket) == (9482, 5095)


def load_flags_text(text: str) -> Flags:
    return parse_flags(yaml.safe_load(text))


# -- ramping --------------------------------------------------------------------------------------


def owners(weights: dict[str, float]) -> list[str]:
    exp = Experiment.model_validate(experiment(weights))
    return [variant_for_bucket(exp, b) for b in range(N_BUCKETS)]


def assert_ramp(before: dict[str, float], after: dict[str, float], *, raised: str) -> None:
    """Every bucket that changes hands goes from the control to ``raised``."""
    control = next(iter(before))
    old, new = owners(before), owners(after)
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert moved, "the ramp moved nobody"
    assert set(moved) == {(control, raised)}
    assert Counter(new)[raised] == round(after[raised] * N_BUCKETS)


@pytest.mark.parametrize(
    ("schedule", "raised"),
    [
        ([{"c": 0.9, "t": 0.1}, {"c": 0.8, "t": 0.2}, {"c": 0.5, "t": 0.5}, {"c": 0.0, "t": 1.0}], "t"),
        ([{"c": 0.6, "t1": 0.1, "t2": 0.3}, {"c": 0.5, "t1": 0.2, "t2": 0.3}, {"c": 0.2, "t1": 0.5, "t2": 0.3}], "t1"),
        ([{"c": 0.6, "t1": 0.3, "t2": 0.1}, {"c": 0.5, "t1": 0.3, "t2": 0.2}, {"c": 0.2, "t1": 0.3, "t2": 0.5}], "t2"),
        ([{"c": 0.6, "a": 0.1, "b": 0.2, "x": 0.1}, {"c": 0.4, "a": 0.1, "b": 0.2, "x": 0.3},
          {"c": 0.2, "a": 0.1, "b": 0.2, "x": 0.5}], "x"),
        ([{"c": 0.6, "a": 0.1, "b": 0.2, "x": 0.1}, {"c": 0.4, "a": 0.3, "b": 0.2, "x": 0.1}], "a"),
    ],
    ids=["one treatment", "first of two", "second of two", "third of three", "first of three"],
)
def test_raising_a_treatment_only_takes_users_from_the_control(schedule: list[dict[str, float]], raised: str) -> None:
    for before, after in itertools.pairwise(schedule):
        assert_ramp(before, after, raised=raised)


def test_ramp_property_holds_for_random_weights() -> None:
    rng = random.Random(12)
    for _ in range(40):
        k = rng.randint(1, 4)
        slots = (k + 1) // 2
        cap = 1.0 / slots / 2  # each treatment at most half its slot: every pair fits
        treat = {f"t{i}": round(rng.uniform(0, cap), 3) for i in range(k)}
        raised = rng.choice(sorted(treat))
        bigger = {**treat, raised: round(min(cap, treat[raised] + rng.uniform(0.001, cap)), 3)}
        if bigger[raised] == treat[raised]:
            continue
        before = {"c": round(1 - sum(treat.values()), 6), **treat}
        after = {"c": round(1 - sum(bigger.values()), 6), **bigger}
        assert_ramp(before, after, raised=raised)


def test_users_follow_their_buckets_through_a_ramp_of_allocation_and_weight() -> None:
    users = USERS[:20_000]
    stages = [(0.1, {"c": 0.9, "t": 0.1}), (0.5, {"c": 0.8, "t": 0.2}), (1.0, {"c": 0.5, "t": 0.5})]
    seen = [variants_of(flags_of(experiment(w, allocation=a)), users) for a, w in stages]
    for old, new in itertools.pairwise(seen):
        for u in users:
            if old[u] is not None:  # nobody leaves the experiment, nobody leaves the treatment
                assert new[u] == old[u] or (old[u], new[u]) == ("c", "t"), u
    assert sum(v == "t" for v in seen[-1].values()) / len(users) == pytest.approx(0.5, abs=0.01)


# -- forcing, status, overlapping experiments ------------------------------------------------------


def test_forced_users_get_their_variant_even_outside_the_allocation() -> None:
    flags = flags_of(experiment({"c": 0.5, "t": 0.5}, allocation=0.0, force={"qa-1": "t", "qa-2": "c"}))
    assert assign(flags, "qa-1").of("exp").variant == "t"
    assert assign(flags, "qa-1").of("exp").reason == "forced"
    assert assign(flags, "qa-2").of("exp").variant == "c"
    assert assign(flags, "someone").of("exp").reason == "outside-allocation"


@pytest.mark.parametrize("status", ["paused", "stopped"])
def test_a_paused_or_stopped_experiment_serves_everyone_the_default(status: str) -> None:
    exp = experiment({"c": 0.5, "t": 0.5}, status=status, force={"qa-1": "t"})
    exp["variants"][1]["version"] = V1
    flags = flags_of(exp)
    for u in ["qa-1", *USERS[:500]]:
        a = assign(flags, u)
        assert (a.of("exp").variant, a.of("exp").reason, a.version, a.label) == (None, "not-running", CURRENT,
                                                                                 "default")


def test_experiments_pinning_versions_are_mutually_exclusive_in_file_order() -> None:
    first = experiment({"c": 0.5, "t": 0.5}, name="first", allocation=0.3)
    first["variants"][1]["version"] = V1
    second = experiment({"c": 0.5, "t": 0.5}, name="second")
    second["variants"][1]["version"] = V2
    flags = flags_of(first, second)
    users = USERS[:20_000]
    results = [assign(flags, u) for u in users]
    in_first = [r for r in results if r.of("first").variant is not None]
    assert abs(len(in_first) / len(users) - 0.3) < 0.015
    for r in results:
        one, two = r.of("first"), r.of("second")
        assert (one.variant is None) != (two.variant is None)  # exactly one experiment decides
        assert r.version == (V1 if one.variant == "t" else V2 if two.variant == "t" else CURRENT)
        if one.variant is not None:
            assert (two.reason, two.excluded_by) == ("excluded", "first")
    # The second experiment's split among the users left to it is still balanced.
    counts = Counter(r.of("second").variant for r in results if r.of("second").variant is not None)
    assert chi2(counts, {"c": 0.5, "t": 0.5}) < CHI2_CRIT_001[1]


def test_forcing_wins_over_an_earlier_exclusive_experiment() -> None:
    first = experiment({"c": 0.0, "t": 1.0}, name="first")  # takes every user it can
    first["variants"][1]["version"] = V1
    second = experiment({"c": 0.5, "t": 0.5}, name="second", force={"qa-1": "t"})
    second["variants"][1]["version"] = V2
    flags = flags_of(first, second)
    qa = assign(flags, "qa-1")
    assert (qa.of("second").reason, qa.of("first").reason, qa.of("first").excluded_by) == (
        "forced", "excluded", "second")
    assert qa.version == V2
    assert assign(flags, "user-1").version == V1


def test_experiments_on_different_settings_overlap_and_combine() -> None:
    a = experiment({"c": 0.5, "t": 0.5}, name="probe")
    a["variants"][1]["overrides"] = {"nprobe": 64}
    b = experiment({"c": 0.5, "t": 0.5}, name="k")
    b["variants"][1]["overrides"] = {"default_k": 20}
    flags = flags_of(a, b)
    both = [r for r in (assign(flags, u) for u in USERS[:4000])
            if r.of("probe").variant == "t" and r.of("k").variant == "t"]
    assert abs(len(both) / 4000 - 0.25) < 0.03  # independent salts: the arms cross evenly
    assert {(r.overrides.nprobe, r.overrides.default_k, r.label) for r in both} == {(64, 20, "probe=t,k=t")}


def test_shadow_sampling_is_per_request_at_its_rate() -> None:
    exp = load_flags_text(ISSUE_EXAMPLE).experiment("ranker-v2")
    sampled = [shadow_sampled(exp, "shadow-hnsw", request_id=f"req-{i}") for i in range(50_000)]
    assert abs(sum(sampled) / len(sampled) - 0.1) < 0.01
    assert sampled == [shadow_sampled(exp, "shadow-hnsw", request_id=f"req-{i}") for i in range(50_000)]
    assert assign(load_flags_text(ISSUE_EXAMPLE), "42").of("ranker-v2").shadows == ("shadow-hnsw",)


# -- the CLI --------------------------------------------------------------------------------------


def cli(*argv: str) -> int:
    from online.ab_cli import register

    parser = argparse.ArgumentParser(prog="twotower")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "flags.yaml"
    good.write_text(ISSUE_EXAMPLE)
    assert cli("ab", "validate", str(good)) == 0
    out = capsys.readouterr().out
    assert f"{good}: valid" in out
    assert "control (control): weight 0.5, version CURRENT" in out
    assert "pinned versions: v20261201T030000-abc, v20261201T040000-def" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("weight: 0.5, version: v2026", "weight: -0.5, version: v2026"))
    assert cli("ab", "validate", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"twotower ab validate: error: {bad}: experiments[ranker-v2].variants[treatment].weight: "
                   "-0.5 is not >= 0"]
    assert cli("ab", "validate", str(tmp_path / "none.yaml")) == 2
    assert "flags file not found" in capsys.readouterr().err


def test_cli_assign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(ISSUE_EXAMPLE)
    assert cli("ab", "assign", "--flags", str(path), "--user", "qa-user-1", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got == assign(load_flags(path), "qa-user-1").to_json()
    assert (got["version"], got["overrides"], got["experiments"][0]["reason"]) == (
        "v20261201T030000-abc", {"nprobe": 64, "max_session": 5}, "forced")
    assert cli("ab", "assign", "--flags", str(path), "--user", "42") == 0
    out = capsys.readouterr().out
    assert "user 42: version CURRENT, variant ranker-v2=control" in out
    assert "allocation bucket 3536, variant bucket 2403" in out
    assert cli("ab", "assign", "--flags", str(tmp_path / "none.yaml"), "--user", "42") == 2
