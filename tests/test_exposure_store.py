"""The exposure log copied into the interaction store (``offline.exposure_store``): every
exposure once, across repeated and interrupted copies, with a trimmed stream reported; a real
Redis on a free port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis

from offline.event_log import EventLog
from offline.exposure_store import ExposureStore, copy_exposures
from online.config import RedisConfig
from online.redis_store import RedisFeatureStore
from towers.store_format import Impression, RedisKeys

PREFIX = "tt-xs"


def _expose(url: str, users: list[str]) -> None:
    async def go() -> None:
        store = RedisFeatureStore(RedisConfig(url=url, prefix=PREFIX))
        await store.log_impressions([Impression(f"r-{u}", u, "rk=treat", "v1", ()) for u in users], timeout=5.0,
                                    log="exposures")
        await store.close()

    asyncio.run(go())


def _stored(root: Path) -> list[str]:
    return [x.user_id for _, x in ExposureStore(root).read()]


def test_each_exposure_is_copied_once_across_runs_and_a_half_done_copy(tmp_path: Path,
                                                                       redis_proc) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "store"
    _expose(redis_proc.url, [f"u{j}" for j in range(5)])
    first = copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root)
    assert first["copied"] == 5 and first["lost"] == 0
    assert copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root)["copied"] == 0
    _expose(redis_proc.url, ["u5", "u6"])
    # A copy that wrote its part and died before its watermark: the next run writes the same
    # part again (named by its first entry), so nothing is stored twice.
    mark = ExposureStore(root).watermark()
    log = EventLog(redis_url=redis_proc.url, prefix=PREFIX)
    ExposureStore(root)._write_part(list(log.exposure_entries(after=mark)))
    log.close()
    assert ExposureStore(root).watermark() == mark
    again = copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root)
    assert again["copied"] == 2
    assert _stored(root) == [f"u{j}" for j in range(7)]
    # The report's view: the copy, then the stream after the watermark (nothing twice).
    _expose(redis_proc.url, ["u7"])
    log = EventLog(redis_url=redis_proc.url, prefix=PREFIX)
    newer = [x.user_id for _, x in log.timed_exposures(after=ExposureStore(root).watermark())]
    log.close()
    assert newer == ["u7"]


def test_entries_trimmed_before_the_copy_reached_them_are_reported(tmp_path: Path,
                                                                   redis_proc) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "store"
    _expose(redis_proc.url, ["a", "b"])
    assert copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root)["copied"] == 2
    _expose(redis_proc.url, ["c", "d", "e"])
    r = redis.Redis.from_url(redis_proc.url)
    r.xtrim(RedisKeys(PREFIX).exposures(), maxlen=1, approximate=False)  # c, d never copied
    said: list[str] = []
    got = copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root, log=said.append)
    assert got["copied"] == 1 and got["lost"] == 2 and "trimmed 2 entries" in said[0]
    assert _stored(root) == ["a", "b", "e"]
    # Trimming what was already copied is not a loss; new entries after it are copied.
    r.xtrim(RedisKeys(PREFIX).exposures(), maxlen=0, approximate=False)
    _expose(redis_proc.url, ["f"])
    again = copy_exposures(EventLog(redis_url=redis_proc.url, prefix=PREFIX), root)
    assert again["lost"] == 0 and again["copied"] == 1 and _stored(root)[-1] == "f"
