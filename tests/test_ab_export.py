"""``twotower ab export``: an experiment's exposures and outcomes as the Parquet sources
GrowthBook's and Statsig's warehouse-native modes read."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from offline.ab_export import EXPOSURE_SCHEMA, OUTCOME_SCHEMA, export_experiment
from towers.errors import ConfigError, DataError
from towers.store_format import Event, Impression

T0 = 1_700_000_000


def _exposures() -> list[tuple[int, Impression]]:
    return [
        (T0, Impression("r1", "alice", "rk=control", "v1", ())),
        (T0 + 5, Impression("r2", "bob", "rk=treat,other=x", "v2", ())),
        (T0 + 9, Impression("r3", "carol", "other=x", "v1", ())),  # another experiment only
        (T0 + 86_400, Impression("r4", "alice", "rk=treat", "v2", ())),  # a ramp moved her
    ]


def test_one_row_per_exposure_and_per_outcome_event_of_exposed_users(tmp_path: Path) -> None:
    events = [Event("alice", "i1", "click", T0 + 10, "r1"), Event("bob", "i2", "purchase", T0 + 20, "r2"),
              Event("bob", "i3", "click", T0 + 21, ""), Event("carol", "i1", "click", T0 + 30, "r3")]
    s = export_experiment(_exposures(), events, experiment="rk", out=tmp_path / "x")
    assert (s.exposures, s.users, s.outcomes, s.multi_arm_users) == (3, 2, 3, 1)
    exp = pq.read_table(s.paths[0])
    assert exp.schema == EXPOSURE_SCHEMA
    assert exp.to_pydict()["variant"] == ["control", "treat", "treat"]
    assert exp.to_pydict()["unit_id"] == ["alice", "bob", "alice"]
    assert [t.timestamp() for t in exp.to_pydict()["timestamp"]] == [T0, T0 + 5, T0 + 86_400]
    out = pq.read_table(s.paths[1])
    assert out.schema == OUTCOME_SCHEMA
    rows = out.to_pylist()
    assert [(r["unit_id"], r["metric"], r["value"], r["request_id"]) for r in rows] == [
        ("alice", "click", 1.0, "r1"), ("bob", "purchase", 1.0, "r2"), ("bob", "click", 1.0, "")]
    assert not list((tmp_path / "x").glob(".*.tmp"))  # written atomically: no leftovers


def test_no_exposures_is_an_error_naming_the_experiment(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'nope'"):
        export_experiment(_exposures(), [], experiment="nope", out=tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_unwritable_destination_names_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, even by root
    with pytest.raises(ConfigError, match="--out: cannot write the export"):
        export_experiment(_exposures(), [], experiment="rk", out=blocker / "x")


def test_cli_exports_from_a_real_redis(tmp_path: Path, redis_proc) -> None:  # type: ignore[no-untyped-def]
    from cli_entry import twotower_argv

    from online.config import RedisConfig
    from online.redis_store import RedisFeatureStore

    users = [f"u{j}" for j in range(10)]

    async def log() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix="tt-exp"))
        await store.log_impressions([Impression(f"r-{u}", u, f"rk={'treat' if j % 2 else 'control'}", "v1", ())
                                     for j, u in enumerate(users)], timeout=5.0, log="exposures")
        await store.record([Event(u, "a", "click", T0 + j, f"r-{u}") for j, u in enumerate(users[:4])], timeout=5.0)
        await store.close()

    asyncio.run(log())
    base = [*twotower_argv(), "ab", "export", "--redis-url", redis_proc.url, "--prefix", "tt-exp"]
    ok = subprocess.run([*base, "--experiment", "rk", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "10 exposures of 10 users" in ok.stdout and "4 outcome events" in ok.stdout
    exp = pq.read_table(tmp_path / "out" / "exposures.parquet").to_pydict()
    assert sorted(exp["variant"]).count("treat") == 5 and set(exp["experiment"]) == {"rk"}
    assert pq.read_table(tmp_path / "out" / "outcomes.parquet").num_rows == 4

    missing = subprocess.run([*base, "--experiment", "nope", "--out", str(tmp_path / "o2")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no exposures of experiment 'nope'" in missing.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = subprocess.run([*base, "--experiment", "rk", "--out", str(a_file)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--out: not a directory" in bad.stderr


def test_report_with_an_empty_pre_period_says_so_and_runs_without_cuped(tmp_path: Path,
                                                                        redis_proc) -> None:  # type: ignore[no-untyped-def]
    from cli_entry import twotower_argv

    from online.config import RedisConfig
    from online.redis_store import RedisFeatureStore

    async def log() -> None:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, prefix="tt-pre"))
        await store.log_impressions([Impression(f"r{j}", f"u{j}", f"rk={'treat' if j % 2 else 'control'}", "v1", ())
                                     for j in range(6)], timeout=5.0, log="exposures")
        await store.close()

    asyncio.run(log())
    (tmp_path / "store").mkdir()
    out = subprocess.run([*twotower_argv(), "ab", "report", "--redis-url", redis_proc.url, "--prefix", "tt-pre",
                          "--experiment", "rk", "--control", "control", "--since", "1", "--store",
                          str(tmp_path / "store")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CUPED off" in out.stderr and "no clicks or purchases in the 14 days" in out.stderr
