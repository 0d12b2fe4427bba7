"""``twotower publish``: install a bundle in a registry, load what the online
feature store needs (when a Redis URL is given), then flip ``CURRENT``."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

from towers import registry as registry_mod
from towers.store_format import DEFAULT_PREFIX


def publish(bundle_dir: Path, *, registry: Path, redis_url: str | None = None,
            fault: registry_mod.FaultHook | None = None, redis_dtype: str | None = None,
            redis_prefix: str = DEFAULT_PREFIX, expect_current: Collection[str | None] | None = None) -> str:
    """Copy + verify (and gate: ``towers.registry.quality_gate``) into the registry; with
    ``redis_url``, load the version's user embeddings (``redis_dtype``, default the bundle's
    declared dtype) and precomputed recs into Redis before the pointer flips. The refresh's
    consumer group is created on the event log then too (if missing), so that everything
    logged from the first served event on is tracked: entries trimmed before a group existed
    could not be told apart from entries nobody needed."""
    before = None
    if redis_url is not None:
        from offline.event_log import EventLog
        from towers.redis_load import load_bundle_into_redis
        from towers.store_format import REFRESH_GROUP

        def before(version: str) -> None:
            load_bundle_into_redis(registry / version, redis_url=redis_url, dtype=redis_dtype, prefix=redis_prefix,
                                   progress=False)
            log = EventLog(redis_url=redis_url, prefix=redis_prefix)
            try:
                log.ensure_group(REFRESH_GROUP)
                log.start_refresh_clock(now=time.time())
            finally:
                log.close()

    kwargs = {"fault": fault} if fault is not None else {}
    return registry_mod.publish(bundle_dir, registry, before_switch=before, expect_current=expect_current, **kwargs)
