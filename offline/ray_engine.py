"""``--engine ray``: the refresh's user embedding and batch scoring on Ray Data.

The same inputs and outputs as the single-process functions (``towers.model.embed_users``,
``offline.batch_score.batch_topk``), and the same numbers. The users are written as Parquet
shards in a work directory (one shard per chunk of the local engine: ``batch``/``chunk`` users
in input order, with their history / seen items and, for scoring, their embedding), read with
``ray.data.read_parquet`` and mapped by an actor pool whose actors build the towers (or the
ranking model) once from the arrays they are given; the results are collected by position.

Why groups and not plain ``map_batches`` batches: a user's result depends on the chunk it is
computed with, not on the user alone (the search asks FAISS for ``k + max(banned in the
chunk)`` candidates, FAISS takes its BLAS path only for 20+ queries, torch's kernels depend
on the batch shape). Ray Data decides its own block and batch boundaries (it packs several
small files into one block), so the shards' chunk id is the group key and
``groupby("chunk").map_groups`` (Ray's ``map_batches`` over whole groups) hands each actor
exactly one local-engine chunk, which it computes with the local function itself. The
results are then identical to the local engine's, bit for bit (tests/test_ray_engine.py).

Ray is imported only inside these functions: the serving path never imports it (nor torch).
:func:`local_ray` starts a local Ray on loopback; a Ray already running (``ray.init`` by the
caller, e.g. a cluster) is used as it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from towers.features import FeaturePipeline
    from towers.model import TwoTower
    from towers.ranking import RankModel

INSTALL_HINT = "install the [ray] extra: pip install 'twotower[ray]' (ray[data])"

# Ray's Unix sockets live under its temp dir: session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
# must fit AF_UNIX's 107 bytes, so a run dir deeper than this gets a short temp dir instead.
_SOCKET_SUFFIX = 72
_AF_UNIX_MAX = 107
# Keep Ray's internal traffic on loopback, unauthenticated (a private local cluster) and silent.
_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The head's GCS must write its port file within this; Ray's 30 s default ran out once on
    # a loaded 2-core machine (the whole test suite beside it) and failed the run.
    "RAY_gcs_server_port_wait_time_s": "120",
}


def ray_available() -> bool:
    """Whether ``ray`` can be imported (without importing it)."""
    return importlib.util.find_spec("ray") is not None


@contextlib.contextmanager
def local_ray(run_dir: Path, *, num_cpus: int = 2) -> Iterator[None]:
    """A local Ray for the block's duration: ``num_cpus`` CPUs, every address 127.0.0.1, no
    dashboard, temp dir (logs, sockets, object spill) ``run_dir/ray-tmp`` (a short directory
    under the system temp dir when that path is too long for Ray's sockets; removed after).
    When Ray is already initialized it is used and left running."""
    saved = {k: os.environ.get(k) for k in _LOCAL_ENV}
    os.environ.update(_LOCAL_ENV)  # before ray is imported: it reads them at import (and its workers do)
    import ray

    if ray.is_initialized():
        _restore(saved)
        yield
        return
    from ray._private import ray_constants

    # Ray imported before the variables were set read "cluster mode on", in which it picks the
    # machine's outward address for its RPCs; off, it uses loopback.
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp = Path(run_dir).resolve() / "ray-tmp"
    short: Path | None = None
    if len(str(temp)) + _SOCKET_SUFFIX > _AF_UNIX_MAX:
        short = temp = Path(tempfile.mkdtemp(prefix="tt-ray-"))
    temp.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in (1, 2, 3):  # a head that did not come up is shut down and started again
            try:
                ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", _temp_dir=str(temp),
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
                break
            # RuntimeError: the GCS did not start; a bare Exception: "The current node timed out
            # during startup" (the raylet did not register within Ray's fixed 30 s, seen on a
            # loaded 2-core machine).
            except Exception:
                ray.shutdown()
                if attempt == 3:
                    raise
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            yield
        finally:
            ray.shutdown()
    finally:
        _restore(saved)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _write_shards(out: Path, columns: dict[str, Any], n: int, chunk: int) -> None:
    """``columns`` (each n rows: 1-d arrays, 2-d arrays as fixed-size lists, or lists of
    sequences as variable lists) as one Parquet file per chunk of ``chunk`` rows, with ``pos``
    (the row's position) and ``chunk`` (its chunk id) added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for c, lo in enumerate(range(0, n, chunk)):
        hi = min(n, lo + chunk)
        cols: dict[str, pa.Array] = {"pos": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                     "chunk": pa.array(np.full(hi - lo, c, dtype=np.int64))}
        for name, v in columns.items():
            if isinstance(v, np.ndarray) and v.ndim == 2:
                flat = pa.array(np.ascontiguousarray(v[lo:hi]).reshape(-1))
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
            elif isinstance(v, np.ndarray):
                cols[name] = pa.array(v[lo:hi])
            else:
                cols[name] = pa.array([list(map(int, x)) for x in v[lo:hi]], type=pa.list_(pa.int64()))
        pq.write_table(pa.table(cols), out / f"part-{c:06d}.parquet")


def _matrix(col: Any, width: int, dtype: Any) -> np.ndarray:
    """A fixed-size list column as a (n, width) array, whatever numpy form Ray handed it in."""
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(x) for x in arr]) if len(arr) else np.zeros((0, width))
    return np.ascontiguousarray(arr.reshape(len(arr), width), dtype=dtype)


def _one_chunk(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The group's rows in position order (a group is one shard, i.e. one local chunk)."""
    if len(np.unique(batch["chunk"])) != 1:
        raise RuntimeError("ray engine: a group holds more than one chunk")
    order = np.argsort(batch["pos"], kind="stable")
    if not np.array_equal(np.diff(batch["pos"][order]), np.ones(len(order) - 1, np.int64)):
        raise RuntimeError("ray engine: a chunk arrived incomplete")
    return order


def _run_chunks(work_dir: Path, name: str, columns: dict[str, Any], n: int, chunk: int, fn: type,
                kwargs: dict[str, Any], num_cpus: int, *, missing: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Write ``columns`` as Parquet shards of ``chunk`` rows, run ``fn`` over them on a local Ray,
    and yield (row positions, result batch); the shards are removed after. Every row must come
    back, or the run fails (naming what was ``missing``)."""
    shards = work_dir / f"{name}-{uuid.uuid4().hex[:8]}"
    _write_shards(shards, columns, n, max(1, chunk))
    got = np.zeros(n, bool)
    try:
        with local_ray(work_dir, num_cpus=num_cpus):
            for b in _map_chunks(shards, -(-n // max(1, chunk)), fn, kwargs):
                pos = np.asarray(b["pos"], np.int64)
                got[pos] = True
                yield pos, b
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    if not got.all():
        raise RuntimeError(f"ray engine: {int((~got).sum())} of {n} users came back without {missing}")


def _map_chunks(shards: Path, n_chunks: int, fn: type, kwargs: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Each chunk of the shards through an actor pool of ``fn`` (one CPU an actor, up to the
    cluster's CPUs); yields the result batches."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.read_parquet(str(shards)).groupby("chunk", num_partitions=min(n_chunks, 200)).map_groups(
        fn, batch_format="numpy", fn_constructor_kwargs=kwargs, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus))
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


class _UserEmbedder:
    """A Ray actor: the towers built once from their arrays; ``__call__`` embeds one chunk
    with ``towers.model.embed_users`` (the chunk is one of its batches)."""

    def __init__(self, model_config: dict[str, Any], features: str, arrays: dict[str, np.ndarray],
                 item_emb: np.ndarray | None) -> None:
        from towers.features import FeaturePipeline
        from towers.model import ModelConfig, model_from_arrays

        self.fp = FeaturePipeline.loads(features)
        self.model = model_from_arrays(ModelConfig.from_dict(model_config), self.fp, arrays)
        self.item_emb = item_emb

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from towers.model import embed_users

        order = _one_chunk(batch)
        rows = np.asarray(batch["row"], dtype=np.int64)[order]
        L = self.model.cfg.history_len
        hist = _matrix(batch["hist"], L, np.int64)[order] if L > 0 else None
        emb = embed_users(self.model, self.fp, hist, rows=rows, item_emb=self.item_emb, batch=max(1, len(rows)))
        return {"pos": np.asarray(batch["pos"])[order], "emb": emb}


def embed_users_ray(model: TwoTower, fp: FeaturePipeline, histories: np.ndarray | None = None, *,
                    rows: np.ndarray | None = None, item_emb: np.ndarray | None = None, batch: int = 16384,
                    work_dir: Path, num_cpus: int = 2) -> np.ndarray:
    """``towers.model.embed_users`` on Ray Data: same arguments, same (n, dim) float32 result.
    ``work_dir``: where the shards (removed after) and, when Ray is started here, its temp dir go."""
    from towers.model import embed_items

    rows = np.arange(fp.n_users) if rows is None else np.asarray(rows, dtype=np.int64)
    L = model.cfg.history_len
    if L > 0 and histories is not None and len(histories) != len(rows):
        raise ValueError(f"histories has {len(histories)} rows for {len(rows)} users")
    n, dim = len(rows), model.cfg.dim
    if n == 0:
        return np.zeros((0, dim), np.float32)
    if L > 0 and item_emb is None:
        item_emb = embed_items(model, fp)
    hist = np.full((n, L), -1, np.int64)
    if L > 0 and histories is not None:
        part = np.asarray(histories)[:, :L]
        hist[:, :part.shape[1]] = part
    columns: dict[str, Any] = {"row": rows, **({"hist": hist} if L > 0 else {})}
    out = np.zeros((n, dim), np.float32)
    kwargs = {"model_config": model.cfg.to_dict(), "features": fp.dumps(), "arrays": model.state_arrays(),
              "item_emb": None if L == 0 else np.asarray(item_emb, np.float32)}
    for pos, b in _run_chunks(Path(work_dir), "embed", columns, n, batch, _UserEmbedder, kwargs, num_cpus,
                              missing="an embedding"):
        out[pos] = _matrix(b["emb"], dim, np.float32)
    return out


class _TopKScorer:
    """A Ray actor: the ranking model (combiner, item embeddings, index) built once;
    ``__call__`` ranks one chunk with ``offline.batch_score.batch_topk`` (the chunk is one of
    its chunks), the users' vectors coming with the rows. FAISS runs with the caller's OpenMP
    thread count (``threads``): its BLAS splits the work by thread count, and that moves the
    last bit of some scores (Ray starts a one-CPU actor with one thread)."""

    def __init__(self, combiner: dict[str, np.ndarray], item_emb: np.ndarray, index: bytes,
                 popularity: np.ndarray, k: int, threads: int) -> None:
        import faiss

        from towers.combiner import CombinerParams

        faiss.omp_set_num_threads(threads)
        self.combiner = CombinerParams.from_arrays(combiner)
        self.item_emb, self.popularity, self.k = item_emb, popularity, k
        self.index = faiss.deserialize_index(np.frombuffer(index, dtype=np.uint8))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from offline.batch_score import batch_topk
        from towers.ranking import RankModel

        order = _one_chunk(batch)
        d = self.item_emb.shape[1]
        model = RankModel(combiner=self.combiner, item_emb=self.item_emb, index=self.index,
                          user_emb=_matrix(batch["user"], d, np.float32)[order], popularity=self.popularity)
        seen = [np.asarray(s, np.int64).tolist() for s in np.asarray(batch["seen"], dtype=object)[order]]
        rows, scores = batch_topk(model, k=self.k, seen=seen, chunk=max(1, len(order)), progress=False)
        return {"pos": np.asarray(batch["pos"])[order], "rows": rows, "scores": scores}


def batch_topk_ray(model: RankModel, *, k: int, seen: Sequence[Sequence[int]] | None = None, chunk: int = 4096,
                   progress: bool = True, work_dir: Path, num_cpus: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``offline.batch_score.batch_topk`` on Ray Data: same arguments, same (n_users, k) int32
    rows and float32 scores. ``progress`` is accepted for the same signature (Ray's progress
    output is off). ``work_dir`` as for :func:`embed_users_ray`."""
    import faiss

    from towers import index as faiss_index

    del progress
    n = len(model.user_emb)
    rows_out = np.full((n, k), -1, dtype=np.int32)
    scores_out = np.zeros((n, k), dtype=np.float32)
    if n == 0:
        return rows_out, scores_out
    if seen is not None and len(seen) < n:
        raise ValueError(f"seen has {len(seen)} lists for {n} users")
    seen_lists: Sequence[Sequence[int]] = seen if seen is not None else [()] * n
    columns = {"user": np.asarray(model.user_emb, np.float32), "seen": seen_lists}
    kwargs = {"combiner": model.combiner.arrays(), "item_emb": np.asarray(model.item_emb, np.float32),
              "index": faiss_index.to_bytes(model.index), "popularity": np.asarray(model.popularity), "k": k,
              "threads": faiss.omp_get_max_threads()}
    for pos, b in _run_chunks(Path(work_dir), "topk", columns, n, chunk, _TopKScorer, kwargs, num_cpus,
                              missing="recommendations"):
        rows_out[pos] = _matrix(b["rows"], k, np.int32)
        scores_out[pos] = _matrix(b["scores"], k, np.float32)
    return rows_out, scores_out
