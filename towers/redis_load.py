"""Load a bundle's user embeddings and precomputed recs into Redis (``twotower
publish --redis``), pipelined in batches with bounded memory, then mark the
version ready. Runs before the registry pointer flips, so a serving version
never reads keys that are not there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from towers import bundle as bundle_mod
from towers.errors import BundleError, FeatureStoreError
from towers.quant import TAG_BYTES, quantize_int8, scale_tag
from towers.store_format import (
    DEFAULT_PREFIX,
    EMBEDDING_DTYPES,
    RedisKeys,
    embedding_nbytes,
    encode_recs,
    is_cluster_url,
    parse_cluster_url,
    redact_url,
)


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


def declared_dtype(manifest: dict[str, Any]) -> str:
    """The user-embedding dtype a bundle asks the feature store for (``quant.user_embeddings``)."""
    return str(manifest.get("quant", {}).get("user_embeddings", {}).get("dtype", "float32"))


def load_bundle_into_redis(bundle_dir: Path, *, redis_url: str, prefix: str = DEFAULT_PREFIX, batch: int = 5000,
                           float16: bool = False, dtype: str | None = None, progress: bool = True) -> int:
    """Returns the number of users loaded.

    ``dtype``: ``float32`` (4d bytes per user), ``float16`` (2d; ~1e-3 relative error) or
    ``int8`` (d + 4: the per-dimension scale calibrated by ``twotower quantize`` and recorded
    in the manifest; the scale is also stored once under ``ue_scale``). Default: what the
    bundle declares (``quant.user_embeddings.dtype``), else float32; ``float16=True`` is the
    old spelling of ``dtype="float16"``. A ``redis+cluster://`` URL loads a cluster, with the
    cluster key layout (per-user hash tags, ``RedisKeys(cluster=True)``): each chunk's pipeline
    goes out as one pipeline per node.
    """
    import redis
    from tqdm import tqdm  # a job's progress bar: not needed by serving, which never imports this module

    b = bundle_mod.load(bundle_dir)
    dtype = dtype or ("float16" if float16 else declared_dtype(b.manifest))
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"unknown embedding dtype {dtype!r}; choose one of {', '.join(EMBEDDING_DTYPES)}")
    scale = b.user_scale
    if dtype == "int8" and scale is None:
        raise BundleError(f"{bundle_dir}: int8 user embeddings need a calibrated scale; run "
                          f"`twotower quantize --bundle {bundle_dir}` first")
    keys = RedisKeys(prefix, cluster=is_cluster_url(redis_url))
    users = b.features.user_vocab.values
    r = None
    try:
        r = sync_client(redis_url, socket_timeout=30)
        r.delete(keys.ready(b.version))
        if dtype == "int8" and scale is not None:
            r.set(keys.user_embedding_scale(b.version), np.asarray(scale, dtype="<f4").tobytes())
        for lo in tqdm(range(0, len(users), batch), desc=f"redis load {b.version} ({dtype})", unit="batch",
                       disable=not progress):
            hi = min(len(users), lo + batch)
            chunk = np.asarray(b.user_emb[lo:hi], dtype=np.float32)  # one chunk in memory at a time
            values = _encode_rows(chunk, dtype, scale)
            pipe = r.pipeline(transaction=False)
            for j in range(hi - lo):
                pipe.set(keys.user_embedding(b.version, users[lo + j]), values[j])
            if b.recs_items is not None and b.recs_scores is not None:
                items, scores = np.asarray(b.recs_items[lo:hi]), np.asarray(b.recs_scores[lo:hi])
                for j in range(hi - lo):
                    pipe.set(keys.recs(b.version, users[lo + j]), encode_recs(items[j], scores[j]))
            pipe.execute()
        r.set(keys.ready(b.version), len(users))
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
        raise FeatureStoreError(f"loading {b.version} into {redact_url(redis_url)} failed: "
                                f"{type(e).__name__}: {e}") from e
    finally:
        if r is not None:
            r.close()
    return len(users)


def _encode_rows(chunk: np.ndarray, dtype: str, scale: np.ndarray | None) -> list[bytes]:
    """Values for a block of users, vectorised (the same bytes ``encode_embedding`` gives one row)."""
    if dtype == "int8":
        assert scale is not None
        tag = scale_tag(scale)
        width = embedding_nbytes(chunk.shape[1], "int8") - TAG_BYTES
        q = quantize_int8(chunk, scale).tobytes()
        return [tag + q[j * width:(j + 1) * width] for j in range(len(chunk))]
    arr = chunk.astype("<f2" if dtype == "float16" else "<f4")
    return [row.tobytes() for row in arr]
