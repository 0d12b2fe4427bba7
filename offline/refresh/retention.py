"""Retention: what a registry and its Redis keep as versions come and go, so that a nightly
loop runs for months on a fixed volume and a fixed Redis.

- **Redis keys** (``collect_garbage``): a version's user embeddings and recs are deleted
  ``grace_s`` after it stopped being CURRENT (servers may still be swapping), never CURRENT's
  nor a version a running or paused experiment pins (a paused one resumes with its arms).
- **Registry directories** (``prune_registry``): kept are CURRENT, the versions the flags
  pin, and the newest ``keep_last`` others (rollback targets: ``twotower publish`` of a kept
  version loads its keys again); the rest are removed, under the registry lock. Serving never
  reads a version it is not told to (CURRENT, or a flags arm), so removal needs no grace.
- **Run directories** are removed by the refresh itself once a run ends (its report is kept,
  ``RUNS/reports/RUN.json``); a crashed run's directory stays for ``--resume``.

At ~1.1 GB per 1M-user bundle, ``keep_last=2`` holds a registry at about four bundles (CURRENT,
two rollbacks, one candidate being installed) whatever the number of nights.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from offline.refresh.run_steps import write_json_atomic
from towers import bundle_paths
from towers import registry as registry_mod
from towers.bundle import fsync_dir
from towers.errors import FeatureStoreError
from towers.store_format import RedisKeys, is_cluster_url, redact_url

RETIRED_FILE = ".retired.json"  # in the registry: version -> unix time it stopped being CURRENT


def retained_by_flags(flags: Path | None) -> set[str]:
    """Versions a running or paused experiment of ``flags`` pins."""
    if flags is None:
        return set()
    from towers.flags import load_flags

    return set(load_flags(flags).retained_versions())


def mark_retired(registry: Path, version: str) -> None:
    """``version`` stopped being CURRENT now (its grace starts now, even if it was retired
    before: a rollback that served it again restarts the clock)."""
    path = registry / RETIRED_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[version] = time.time()
    write_json_atomic(path, data)


def collect_garbage(*, registry: Path, redis_url: str, prefix: str, grace_s: float, flags: Path | None = None,
                    now: float | None = None) -> list[str]:
    """Delete the Redis keys of versions retired more than ``grace_s`` ago; never CURRENT's,
    nor a version a running or paused experiment in ``flags`` pins. A version with keys but no
    retirement record is recorded as retired now (its grace starts). Returns deleted versions."""
    from towers.redis_load import sync_client

    now = time.time() if now is None else now
    current = registry_mod.current_version(registry)
    pinned = retained_by_flags(flags)
    path = registry / RETIRED_FILE
    retired: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    keys = RedisKeys(prefix, cluster=is_cluster_url(redis_url))
    r = sync_client(redis_url, socket_timeout=30)
    deleted: list[str] = []
    try:
        import redis

        try:
            head = f"{prefix}:v:"  # version ids hold no colon: the id is what follows the head
            # Only names that are version ids: GC builds a SCAN pattern from each, and a key
            # written under another name (``*``, ``[a-z]*``) would match other versions' keys.
            live = {v for k in r.scan_iter(match=f"{head}*:ready*", count=1000)
                    if bundle_paths.version_problem(v := k.decode()[len(head):].split(":", 1)[0]) is None}
            for version in (current, *pinned):  # serving again: a later retirement starts afresh
                retired.pop(str(version), None)
            for version in sorted(live - {current} - pinned):
                since = retired.setdefault(version, now)
                if now - since < grace_s:
                    continue
                batch = [k for k in r.scan_iter(match=f"{prefix}:v:{version}:*", count=5000)]
                for lo in range(0, len(batch), 5000):
                    r.unlink(*batch[lo:lo + 5000])
                r.unlink(keys.ready(version))
                deleted.append(version)
                retired.pop(version, None)
        except (redis.RedisError, OSError) as e:
            raise FeatureStoreError(f"refresh gc on {redact_url(redis_url)} failed: {type(e).__name__}: {e}") from e
    finally:
        r.close()
    write_json_atomic(path, retired)
    return deleted


def prune_registry(*, registry: Path, keep_last: int, flags: Path | None = None) -> list[str]:
    """Remove the version directories retention does not keep (module docstring); returns
    them. Version ids sort by creation time (``v<UTC time>-<hash>``)."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    removed: list[str] = []
    with registry_mod.locked(registry):  # never under a publish's copy or switch
        current = registry_mod.current_version(registry)
        keep = {current, *retained_by_flags(flags)}
        others = [v for v in registry_mod.versions(registry)
                  if v not in keep and bundle_paths.version_problem(v) is None]
        for version in others[:max(len(others) - keep_last, 0)]:
            shutil.rmtree(registry / version)
            removed.append(version)
    if removed:
        fsync_dir(registry)
    return removed
