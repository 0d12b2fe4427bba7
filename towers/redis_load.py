"""Load a bundle's user embeddings and precomputed recs into Redis (``twotower
publish --redis``), pipelined in batches with bounded memory, then mark the
version ready. Runs before the registry pointer flips, so a serving version
never reads keys that are not there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from towers import bundle as bundle_mod
from towers.errors import FeatureStoreError
from towers.store_format import RedisKeys, encode_recs, is_cluster_url, parse_cluster_url


def sync_client(redis_url: str, *, socket_timeout: float) -> Any:
    """A blocking client for ``redis_url``: ``redis.Redis``, or ``redis.cluster.RedisCluster`` for
    ``redis+cluster://`` / ``rediss+cluster://`` URLs (a cluster pipeline is split per node)."""
    import redis

    if not is_cluster_url(redis_url):
        return redis.Redis.from_url(redis_url, socket_timeout=socket_timeout)
    from redis.cluster import ClusterNode, RedisCluster

    c = parse_cluster_url(redis_url)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in c.nodes], ssl=c.ssl, username=c.username,
                        password=c.password, socket_timeout=socket_timeout)


def load_bundle_into_redis(bundle_dir: Path, *, redis_url: str, prefix: str = "tt", batch: int = 5000,
                           float16: bool = False, progress: bool = True) -> int:
    """Returns the number of users loaded. Embeddings are stored little-endian
    float32 (or float16 with ``float16``: half the memory, ~1e-3 relative error).
    A ``redis+cluster://`` URL loads a cluster, with the cluster key layout (per-user
    hash tags, ``RedisKeys(cluster=True)``): each chunk's pipeline goes out as one
    pipeline per node."""
    import redis
    from tqdm import tqdm  # a job's progress bar: not needed by serving, which never imports this module

    b = bundle_mod.load(bundle_dir)
    keys = RedisKeys(prefix, cluster=is_cluster_url(redis_url))
    users = b.features.user_vocab.values
    dtype = "<f2" if float16 else "<f4"
    r = None
    try:
        r = sync_client(redis_url, socket_timeout=30)
        r.delete(keys.ready(b.version))
        for lo in tqdm(range(0, len(users), batch), desc=f"redis load {b.version}", unit="batch",
                       disable=not progress):
            hi = min(len(users), lo + batch)
            emb = np.asarray(b.user_emb[lo:hi]).astype(dtype)  # one chunk in memory at a time
            pipe = r.pipeline(transaction=False)
            for j in range(hi - lo):
                pipe.set(keys.user_embedding(b.version, users[lo + j]), emb[j].tobytes())
            if b.recs_items is not None and b.recs_scores is not None:
                items, scores = np.asarray(b.recs_items[lo:hi]), np.asarray(b.recs_scores[lo:hi])
                for j in range(hi - lo):
                    pipe.set(keys.recs(b.version, users[lo + j]), encode_recs(items[j], scores[j]))
            pipe.execute()
        r.set(keys.ready(b.version), len(users))
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
        raise FeatureStoreError(f"loading {b.version} into {redis_url} failed: {type(e).__name__}: {e}") from e
    finally:
        if r is not None:
            r.close()
    return len(users)
