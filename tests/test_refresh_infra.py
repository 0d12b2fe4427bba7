"""The nightly refresh's infrastructure (issue 9): the interaction store, the Redis run lock,
resumable steps and the cron loop. Fast and deterministic: fake clocks, a throwaway Redis."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from offline.datasets import Interactions, order_key, synthetic_dataset, temporal_split
from offline.interactions import InteractionRows, InteractionStore
from offline.refresh.run_lock import RefreshLock
from offline.refresh.run_steps import RunDir
from offline.refresh.schedule import local_now, run_schedule
from towers.errors import ConfigError, DataError, FeatureStoreError, LockHeld, LockLost, TwoTowerError
from towers.store_format import Event

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400
T0 = 1_700_000_000 - 1_700_000_000 % DAY  # a UTC midnight: 2023-11-14


# --------------------------------------------------------------------------- interaction store


def ev(user: str, item: str, ts: int, typ: str = "view", rid: str = "") -> Event:
    return Event(user, item, typ, ts, rid)


def test_append_dedupes_against_the_store_and_within_the_batch(tmp_path: Path) -> None:
    store = InteractionStore(tmp_path / "store")
    events = [ev("u1", "i1", T0 + 5), ev("u1", "i1", T0 + 5, rid="retry"),  # a retried event: same identity
              ev("u1", "i1", T0 + 5, "click"),  # another type: another interaction
              ev("u2", "i3", T0 + DAY + 7), ev("u1", "i2", T0 + 9)]
    assert store.append(InteractionRows.from_events(events)) == 4
    assert len(store) == 4
    # A replay of the same log (a refresh that crashed before acking) stores nothing.
    assert store.append(InteractionRows.from_events(events)) == 0
    assert store.append(InteractionRows.from_events([*events[::-1], ev("u3", "i1", T0 + 2 * DAY)])) == 1
    assert len(store) == 5 and store.days() == ["2023-11-14", "2023-11-15", "2023-11-16"]
    parts = sorted(p.relative_to(store.root).parts[0] for p in store.root.rglob("part-*.parquet"))
    assert parts == ["day=2023-11-14", "day=2023-11-15", "day=2023-11-16"]
    rows = store.read()
    assert rows.user.dtype.kind == "U" and rows.timestamp.dtype == np.int64 and rows.rating.dtype == np.float32
    assert set(rows.identities()) == {("u1", "i1", "view", T0 + 5), ("u1", "i1", "click", T0 + 5),
                                      ("u1", "i2", "view", T0 + 9), ("u2", "i3", "view", T0 + DAY + 7),
                                      ("u3", "i1", "view", T0 + 2 * DAY)}
    assert (rows.rating == 1.0).all()


def test_retention_drops_whole_days_before_the_cutoff_and_keeps_the_rest(tmp_path: Path) -> None:
    store = InteractionStore(tmp_path / "store")
    events = [ev(f"u{d}", "i1", T0 + d * DAY + 60) for d in range(5)] + [ev("u9", "i2", T0 + 3 * DAY + 61)]
    store.append(InteractionRows.from_events(events))
    days = store.days()
    # The cutoff falls inside the fourth day: the three days before it go, that day stays whole.
    assert store.drop_before(T0 + 3 * DAY + 120) == {"days": 3, "rows": 3}
    assert store.days() == days[3:] and len(store) == 3
    assert {x[0] for x in store.read().identities()} == {"u3", "u4", "u9"}
    assert store.drop_before(T0 + 3 * DAY + 120) == {"days": 0, "rows": 0}  # idempotent
    assert not list(store.root.glob(".drop-*"))  # nothing half-deleted left behind


def test_reading_some_users_and_counting_items_match_a_plain_reference(tmp_path: Path) -> None:
    """A refresh reads only the users with new events (``read(users=...)``) and counts items
    one column at a time (``item_counts``): the same as filtering and counting the whole."""
    inter = synthetic_dataset(n_users=60, n_items=25, per_user=7, seed=5).interactions
    store = InteractionStore(tmp_path)
    store.append(InteractionRows.from_interactions(inter))
    whole = store.read()
    some = {"u3", "u17", "u42", "not-a-user"}
    got = store.read(users=some)
    keep = np.isin(whole.user, sorted(some))
    assert list(got.identities()) == list(whole.take(np.flatnonzero(keep)).identities()) and len(got) > 0
    assert len(store.read(users=[])) == 0
    ref: dict[str, int] = {}
    for item in whole.item.tolist():
        ref[item] = ref.get(item, 0) + 1
    assert store.item_counts() == ref


def test_read_is_ordered_like_temporal_split_and_filters_by_time(tmp_path: Path) -> None:
    inter = synthetic_dataset(n_users=40, n_items=30, per_user=6, seed=3).interactions
    # Ties in the same second (as in ML-100k): the crc32 rule decides, not the input order.
    ts = inter.timestamp.copy()
    ts[1::2] = ts[0::2]
    inter = Interactions(inter.user, inter.item, inter.rating, ts)
    store = InteractionStore(tmp_path)
    rows = InteractionRows.from_interactions(inter)
    n = store.append(rows.take(np.arange(len(rows))[::-1]))  # written in reverse: order must not matter
    got = store.read()
    assert len(got) == n == len(set(rows.identities()))
    key = list(zip(got.user.tolist(), got.timestamp.tolist(), order_key(got.user, got.item).tolist(), strict=True))
    assert key == sorted(key)
    back = got.to_interactions()
    assert isinstance(back, Interactions) and (back.rating == 4.0).all() and set(got.type.tolist()) == {"rating"}
    split = temporal_split(back)  # sorted input gives the same split as any other order
    ref = temporal_split(inter)
    assert sorted(zip(split.test.user.tolist(), split.test.item.tolist(), strict=True)) == \
        sorted(zip(ref.test.user.tolist(), ref.test.item.tolist(), strict=True))
    lo, hi = int(np.quantile(ts, 0.25)), int(np.quantile(ts, 0.75))
    part = store.read(since=lo, until=hi)
    assert len(part) == int(((got.timestamp >= lo) & (got.timestamp < hi)).sum()) > 0
    assert part.timestamp.min() >= lo and part.timestamp.max() < hi
    assert len(store.read(until=lo)) + len(store.read(since=lo)) == len(got)


def test_an_append_that_crashed_half_way_is_finished_by_running_it_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    events = [ev(f"u{k % 5}", f"i{k}", T0 + (k % 4) * DAY + k) for k in range(40)]
    rows = InteractionRows.from_events(events)
    clean = InteractionStore(tmp_path / "clean")
    assert clean.append(rows) == 40

    crashy = InteractionStore(tmp_path / "crashy")
    real_write = InteractionStore._write
    calls = {"n": 0}

    def write_then_die(self: InteractionStore, day_dir: Path, new: InteractionRows) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # two days written, the process dies before the third
            (day_dir).mkdir(parents=True, exist_ok=True)
            (day_dir / ".part-torn.parquet.x.tmp").write_bytes(b"half a file")  # what a crash leaves
            raise KeyboardInterrupt
        real_write(self, day_dir, new)

    monkeypatch.setattr(InteractionStore, "_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        crashy.append(rows)
    monkeypatch.setattr(InteractionStore, "_write", real_write)
    before = len(crashy)
    assert 0 < before < 40 and len(crashy.read()) == before  # the torn temporary file is not read
    assert crashy.append(rows) == 40 - before
    assert len(crashy) == 40 and crashy.append(rows) == 0
    # The re-run wrote the same files under the same content-hash names as an uninterrupted run.
    names = sorted(str(p.relative_to(tmp_path / "crashy")) for p in (tmp_path / "crashy").rglob("*.parquet"))
    assert names == sorted(str(p.relative_to(tmp_path / "clean")) for p in (tmp_path / "clean").rglob("*.parquet"))
    assert not list((tmp_path / "crashy").rglob(".*.tmp"))  # cleaned by the next write to that day
    assert list(crashy.read().identities()) == list(clean.read().identities())


def test_store_errors_name_the_problem(tmp_path: Path) -> None:
    store = InteractionStore(tmp_path)
    assert len(store) == 0 and store.days() == [] and len(store.read()) == 0
    with pytest.raises(DataError, match="empty user or item"):
        store.append(InteractionRows.from_events([ev("", "i1", T0)]))
    with pytest.raises(DataError, match="different lengths"):
        InteractionRows.build(user=["a"], item=["b", "c"], type=["view"], timestamp=[T0])
    store.append(InteractionRows.from_events([ev("u", "i", T0)]))
    bad = next(tmp_path.rglob("part-*.parquet"))
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=re.escape(bad.name)):
        store.read()
    assert issubclass(DataError, TwoTowerError)


# --------------------------------------------------------------------------- run lock


def lock(url: str, **kw: Any) -> RefreshLock:
    return RefreshLock(redis_url=url, key="tt:refresh:lock", **kw)


def test_two_locks_contend_and_the_error_names_the_holder(redis_proc: Any) -> None:
    a, b = lock(redis_proc.url, owner="host-a:1:x"), lock(redis_proc.url)
    a.acquire()
    with pytest.raises(LockHeld, match="host-a:1:x") as info:
        b.acquire()
    assert info.value.holder == "host-a:1:x" and isinstance(info.value, TwoTowerError)
    a.check()
    assert a.release() is True and a.holder() is None
    with b:
        assert b.holder() == b.owner and b.held
        b.check()
        with pytest.raises(LockHeld):
            a.acquire()
    assert b.holder() is None and not b.held
    with pytest.raises(LockLost, match="not held"):
        b.check()  # a released lock can never publish


def test_renewal_keeps_the_lease_past_its_ttl(redis_proc: Any) -> None:
    import redis

    a = lock(redis_proc.url, ttl_ms=300)
    with a:
        start = time.monotonic()

        def outlived_three_ttls() -> bool:
            assert a.holder() == a.owner  # at every poll: only renewal can keep the key
            return time.monotonic() - start > 1.0

        wait_until(outlived_three_ttls, 10, "three ttls to pass")
        assert a.holder() == a.owner and a.held
        a.check()
        assert 0 < redis.Redis(port=redis_proc.port).pttl("tt:refresh:lock") <= 300


def test_a_crashed_holder_expires_and_the_next_one_acquires(redis_proc: Any) -> None:
    """A real process takes the lock and dies without releasing it."""
    code = ("import os; from offline.refresh.run_lock import RefreshLock\n"
            f"RefreshLock(redis_url={redis_proc.url!r}, key='tt:refresh:lock', ttl_ms=800,\n"
            "            owner='dead:1:x').acquire()\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    b = lock(redis_proc.url)
    with pytest.raises(LockHeld, match="dead:1:x"):
        b.acquire()
    wait_until(lambda: b.holder() is None, 10, "the dead holder's lease to expire")
    b.acquire()
    b.check()
    b.release()


def test_a_holder_whose_key_was_taken_gets_lock_lost_and_does_not_delete_it(redis_proc: Any) -> None:
    import redis

    r = redis.Redis(port=redis_proc.port)
    a = lock(redis_proc.url, owner="slow:1:x")
    a.acquire()
    a.check()
    # The lease ran out while the holder stalled, and another refresh took it.
    r.set("tt:refresh:lock", "thief:2:y", px=5_000)
    with pytest.raises(LockLost, match="thief:2:y"):
        a.check()
    with pytest.raises(LockLost):  # sticky: the same acquisition never publishes again
        a.check()
    assert a.release() is False
    assert r.get("tt:refresh:lock") == b"thief:2:y"  # compare-and-delete left it alone
    assert 0 < r.pttl("tt:refresh:lock") <= 5_000  # nor extended it with its own ttl

    # The renewal thread finds out by itself too (no check needed to stop renewing).
    c = lock(redis_proc.url, ttl_ms=150)
    r.delete("tt:refresh:lock")
    c.acquire()
    r.set("tt:refresh:lock", "thief:3:z")
    wait_until(lambda: not c.held, 10, "the renewal thread to notice the theft")
    assert not c.held and r.get("tt:refresh:lock") == b"thief:3:z"
    with pytest.raises(LockLost):
        c.check()
    c.release()
    assert r.get("tt:refresh:lock") == b"thief:3:z"


def test_lock_translates_redis_failures(redis_proc: Any) -> None:
    a = lock(redis_proc.url, ttl_ms=5_000)
    a.acquire()
    redis_proc.kill()
    with pytest.raises(LockLost, match="cannot verify") as info:
        a.check()  # cannot prove we hold it: do not publish
    assert info.value.__cause__ is not None
    with pytest.raises(FeatureStoreError):
        lock(redis_proc.url).acquire()
    with pytest.raises(FeatureStoreError):
        a.release()
    with pytest.raises(ConfigError, match="ttl_ms"):
        lock(redis_proc.url, ttl_ms=1)


# --------------------------------------------------------------------------- resumable steps


class Crash(Exception):
    pass


STEPS = ("consume", "embed", "index", "publish")


def four_step_job(run: RunDir, effects: Path, crash_after: str | None = None) -> dict[str, Any]:
    """Each step appends one line to ``effects`` (its side effect, counted) and returns a result
    computed from the previous steps' results, so a resume must hand those back faithfully."""

    def step(name: str, value: int) -> dict[str, Any]:
        with open(effects, "a") as f:
            f.write(f"{name}\n")
        return {"name": name, "value": value}

    if crash_after == "":
        raise Crash("before the first step")
    results: dict[str, Any] = {}
    prev = int(run.params["seed"])
    for name in STEPS:
        res = run.run_step(name, lambda name=name, prev=prev: step(name, prev * 3 + len(name)))
        results[name] = res
        prev = int(res["value"])
        if crash_after == name:
            raise Crash(f"after {name}")
    return results


@pytest.mark.parametrize("crash_after", ["", *STEPS])
def test_a_run_resumed_after_a_crash_at_any_step_boundary_matches_an_uninterrupted_one(
        tmp_path: Path, crash_after: str) -> None:
    ref_run = RunDir.create(tmp_path / "ref", params={"seed": 7})
    expected = four_step_job(ref_run, tmp_path / "ref.effects")
    assert (tmp_path / "ref.effects").read_text().split() == list(STEPS)

    effects = tmp_path / "effects"
    run = RunDir.create(tmp_path / "runs", run_id="night-1", params={"seed": 7})
    with pytest.raises(Crash):
        four_step_job(run, effects, crash_after=crash_after)
    done = STEPS[: STEPS.index(crash_after) + 1] if crash_after else ()
    assert [s["name"] for s in run.report()["steps"]] == list(done)
    resumed = RunDir.open(tmp_path / "runs" / "night-1")
    assert resumed.params == {"seed": 7} and resumed.run_id == "night-1"
    assert four_step_job(resumed, effects) == expected
    # Every side effect happened exactly once, in order, across the crash and the resume.
    assert effects.read_text().split() == list(STEPS)
    assert four_step_job(RunDir.open(resumed.path), effects) == expected  # a third attempt does nothing
    assert effects.read_text().split() == list(STEPS)
    report = resumed.report()
    assert [s["name"] for s in report["steps"]] == list(STEPS)
    assert [s["result"] for s in report["steps"]] == [expected[n] for n in STEPS]
    assert all(s["duration_s"] >= 0 and s["started"] <= s["finished"] for s in report["steps"])
    assert len(json.loads((resumed.path / "run.json").read_text())["resumed"]) == 2


def test_a_crash_inside_a_step_reruns_it_and_its_checkpoint_is_all_or_nothing(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, run_id="r")
    calls: list[str] = []

    def flaky() -> dict[str, Any]:
        calls.append("x")
        if len(calls) == 1:
            raise Crash("died before the checkpoint")
        return {"ok": True}

    with pytest.raises(Crash):
        run.run_step("flaky", flaky)
    assert not run.done("flaky") and run.result("flaky") is None
    (run.path / "steps" / ".flaky.json.abc.tmp").write_text("{torn")  # a checkpoint write cut short
    assert run.run_step("flaky", flaky) == {"ok": True} and calls == ["x", "x"]  # at least once
    assert run.run_step("flaky", flaky) == {"ok": True} and calls == ["x", "x"]
    assert [s["name"] for s in run.report()["steps"]] == ["flaky"]


def test_run_dir_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, run_id="r1")
    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create(tmp_path, run_id="r1")
    with pytest.raises(ConfigError, match="step"):
        run.run_step("../escape", dict)
    with pytest.raises(DataError, match="expected a dict"):
        run.run_step("bad", lambda: [1, 2])  # type: ignore[arg-type, return-value]
    with pytest.raises(DataError, match="JSON"):
        run.run_step("bad", lambda: {"x": object()})
    assert not run.done("bad")
    with pytest.raises(DataError, match="not a run directory"):
        RunDir.open(tmp_path / "nope")
    (run.path / "steps" / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json"):
        run.run_step("broken", dict)
    assert RunDir.create(tmp_path).run_id != RunDir.create(tmp_path).run_id  # generated ids are unique


# --------------------------------------------------------------------------- schedule


class FakeClock:
    """``now`` and a ``sleep`` that advances it; sleeping never takes real time."""

    def __init__(self, start: dt.datetime, stop: threading.Event) -> None:
        self.t = start
        self.stop = stop
        self.slept = 0.0

    def now(self) -> dt.datetime:
        return self.t

    def sleep(self, seconds: float) -> bool:
        assert seconds > 0
        self.t += dt.timedelta(seconds=seconds)
        self.slept += seconds
        return self.stop.is_set()


START = dt.datetime(2024, 3, 9, 12, 0, 0, tzinfo=dt.timezone.utc)


def test_schedule_runs_at_each_fire_time_and_writes_a_report_per_run(tmp_path: Path) -> None:
    stop = threading.Event()
    clock = FakeClock(START, stop)
    fired: list[dt.datetime] = []

    def job() -> dict[str, Any]:
        fired.append(clock.now())
        if len(fired) == 3:
            stop.set()
        return {"run": len(fired)}

    assert run_schedule(cron="0 2 * * *", job=job, stop=stop, now=clock.now, sleep=clock.sleep,
                        report_dir=tmp_path) == 3
    assert fired == [dt.datetime(2024, 3, d, 2, 0, tzinfo=dt.timezone.utc) for d in (10, 11, 12)]
    reports = sorted(tmp_path.glob("run-*.json"))
    assert [p.name for p in reports] == [f"run-202403{d}T020000+0000.json" for d in (10, 11, 12)]
    docs = [json.loads(p.read_text()) for p in reports]
    assert [d["result"] for d in docs] == [{"run": 1}, {"run": 2}, {"run": 3}]
    assert all(d["status"] == "ok" and d["cron"] == "0 2 * * *" for d in docs)
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporaries


def test_a_failing_job_is_reported_and_the_schedule_goes_on(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    clock = FakeClock(START, stop)
    runs: list[str] = []

    def job() -> dict[str, Any]:
        runs.append("x")
        if len(runs) == 1:
            raise RuntimeError("redis went away")
        stop.set()
        return {"ok": True}

    with caplog.at_level("ERROR", logger="offline.refresh.schedule"):
        assert run_schedule(cron="*/30 * * * *", job=job, stop=stop, now=clock.now, sleep=clock.sleep,
                            report_dir=tmp_path) == 2
    assert "failed" in caplog.text and "redis went away" in caplog.text
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("run-*.json"))]
    assert [d["status"] for d in docs] == ["failed", "ok"]
    assert docs[0]["error"] == "RuntimeError: redis went away" and "Traceback" in docs[0]["traceback"]
    assert [d["scheduled"] for d in docs] == ["2024-03-09T12:30:00+00:00", "2024-03-09T13:00:00+00:00"]


def test_an_overrunning_job_skips_missed_fire_times_instead_of_bursting() -> None:
    stop = threading.Event()
    clock = FakeClock(START, stop)
    fired: list[dt.datetime] = []

    def job() -> dict[str, Any]:
        fired.append(clock.now())
        clock.t += dt.timedelta(hours=25)  # the job ran past tomorrow's fire time
        if len(fired) == 2:
            stop.set()
        return {}

    run_schedule(cron="0 2 * * *", job=job, stop=stop, now=clock.now, sleep=clock.sleep)
    assert fired == [dt.datetime(2024, 3, 10, 2, tzinfo=dt.timezone.utc),
                     dt.datetime(2024, 3, 12, 2, tzinfo=dt.timezone.utc)]


def test_schedule_stops_while_waiting_and_refuses_a_bad_cron() -> None:
    stop = threading.Event()
    clock = FakeClock(START, stop)
    calls: list[int] = []

    def sleep_then_stop(seconds: float) -> bool:
        stop.set()
        return clock.sleep(seconds)

    assert run_schedule(cron="0 2 * * *", job=lambda: calls.append(1) or {}, stop=stop, now=clock.now,
                        sleep=sleep_then_stop) == 0
    assert calls == []
    for bad in ("61 * * * *", "every night", ""):
        with pytest.raises(ConfigError, match="--schedule") as info:
            run_schedule(cron=bad, job=lambda: calls.append(1) or {}, stop=threading.Event(), now=clock.now,
                         sleep=clock.sleep)
        assert info.value.field == "--schedule"
    assert calls == []


def test_the_default_wait_is_interrupted_by_stop() -> None:
    """Real clock, real wait (an hour away at least): setting ``stop`` ends it at once."""
    stop = threading.Event()
    out: list[int] = []
    waiting = threading.Event()
    calls = [0]

    def now() -> dt.datetime:
        calls[0] += 1
        if calls[0] >= 2:  # the second reading is the one right before the wait
            waiting.set()
        return local_now()

    t = threading.Thread(target=lambda: out.append(run_schedule(cron="0 0 1 1 *", job=dict, stop=stop, now=now)))
    t.start()
    assert waiting.wait(10)
    stop.set()
    t.join(timeout=10)
    assert not t.is_alive() and out == [0]
