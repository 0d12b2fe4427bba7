"""FAISS indexes over item embeddings (inner product on unit vectors).

Types: ``flat`` (exact), ``ivf`` (IVF-Flat), ``hnsw``, ``ivfpq``, ``sq8``
(IVF with 8-bit scalar quantisation), and ``auto``, which picks by catalog size
and an ANN recall target. Builds run on the GPU when ``faiss.get_num_gpus() > 0``
and are stored as CPU indexes (portable; serving moves them if it wants).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq", "sq8")
FLAT_MAX_ITEMS = 50_000  # below this, exact search is cheap enough (≈2 ms/query at 50k × 64)


@dataclass
class IndexSpec:
    type: str
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int = 16
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSpec:
        return cls(**d)


class _BlasThreshold:
    """Batched exact search only uses BLAS above this many queries; the wheel's
    default (128000) means never. Lower it on offline/batch paths only: it makes
    single-query search 2-3x slower (MACHINE-FACTS)."""

    def __init__(self, value: int = 20) -> None:
        self.value = value
        self.old = 0

    def __enter__(self) -> None:
        self.old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = self.value

    def __exit__(self, *exc: object) -> None:
        faiss.cvar.distance_compute_blas_threshold = self.old


def offline_blas() -> _BlasThreshold:
    return _BlasThreshold()


def default_spec(kind: str, n: int) -> IndexSpec:
    nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 if n >= 39 else 1))
    if kind == "flat":
        return IndexSpec("flat")
    if kind == "hnsw":
        return IndexSpec("hnsw", hnsw_m=32, ef_search=128)
    if kind in ("ivf", "sq8", "ivfpq"):
        return IndexSpec(kind, nlist=nlist, nprobe=max(1, min(nlist, 32)))
    raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")


def _create(spec: IndexSpec, d: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if spec.type == "flat":
        return faiss.IndexFlatIP(d)
    if spec.type == "hnsw":
        idx = faiss.IndexHNSWFlat(d, spec.hnsw_m, ip)
        idx.hnsw.efConstruction = 80
        return idx
    quantizer = faiss.IndexFlatIP(d)
    if spec.type == "ivf":
        return faiss.IndexIVFFlat(quantizer, d, spec.nlist, ip)
    if spec.type == "sq8":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, spec.nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    if spec.type == "ivfpq":
        m = spec.pq_m if d % spec.pq_m == 0 else 8
        return faiss.IndexIVFPQ(quantizer, d, spec.nlist, m, 8, ip)
    raise ValueError(f"unknown index type {spec.type!r}")


def set_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search  # type: ignore[attr-defined]
    elif spec.type in ("ivf", "sq8", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = spec.nprobe


def search_params(spec: IndexSpec, *, nprobe: int | None = None, ef_search: int | None = None) -> Any:
    """Per-call search parameters for an index of ``spec``'s type (``index.search(...,
    params=...)``), or None when neither setting applies to it (flat search has no knob; an
    nprobe asked of an HNSW index is not an error: an experiment's override is per variant,
    not per index type)."""
    if spec.type == "hnsw" and ef_search is not None:
        return faiss.SearchParametersHNSW(efSearch=ef_search)  # type: ignore[attr-defined]
    if spec.type in ("ivf", "sq8", "ivfpq") and nprobe is not None:
        return faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
    return None


def build(emb: np.ndarray, spec: IndexSpec, *, seed: int = 0) -> faiss.Index:
    """Build and fill an index; item row ``i`` gets FAISS id ``i``."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    index = _create(spec, d)
    with offline_blas():
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            train = emb[rng.choice(n, size=min(n, max(spec.nlist * 64, 10_000)), replace=False)]
            if faiss.get_num_gpus() > 0 and spec.type in ("ivf", "sq8", "ivfpq"):
                # k-means on the GPU, then train the CPU index with the GPU's centroids.
                km = faiss.Kmeans(d, spec.nlist, niter=20, seed=seed, gpu=True, spherical=True)
                km.train(train)
                faiss.extract_index_ivf(index).quantizer.add(km.centroids)  # type: ignore[arg-type]
                faiss.extract_index_ivf(index).quantizer.is_trained = True
            index.train(train)
        index.add(emb)
    set_search_params(index, spec)
    return index


def ann_recall(index: faiss.Index, emb: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    """Recall@k of ``index`` against exact inner-product search over ``emb``.

    Tie-aware: a returned item counts when its exact score reaches the k-th exact
    score (within float rounding), so an exact index scores 1.0 even when items tied
    at the boundary come back in a different order than the reference's."""
    k = min(k, len(emb))
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    exact = faiss.IndexFlatIP(emb.shape[1])
    with offline_blas():
        exact.add(emb)
        truth_scores, _ = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = 0
    for q, kth, g in zip(queries, truth_scores[:, -1], got, strict=True):
        g = g[g >= 0]
        scores = emb[g] @ q
        hits += min(k, int(np.sum(scores >= kth - 1e-5 * max(1.0, abs(float(kth))))))
    return hits / float(k * len(queries))


def sample_queries(emb: np.ndarray, n: int = 500, seed: int = 0) -> np.ndarray:
    """Queries near the data: random items perturbed and renormalised."""
    rng = np.random.default_rng(seed)
    q = emb[rng.choice(len(emb), size=min(n, len(emb)), replace=False)]
    q = q + 0.3 * rng.standard_normal(q.shape).astype(np.float32) / math.sqrt(emb.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def build_with_recall(
    emb: np.ndarray, kind: str = "auto", *, recall_target: float = 0.95, seed: int = 0,
    queries: np.ndarray | None = None, progress: Callable[[str], None] | None = None,
) -> tuple[faiss.Index, IndexSpec, float]:
    """Build the index of ``kind`` and measure its recall@100.

    ``auto``: exact search up to ``FLAT_MAX_ITEMS`` items, else IVF-Flat with the
    smallest nprobe (doubling) whose recall@100 reaches ``recall_target``.
    For IVF-family kinds the same nprobe tuning applies.
    """
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")
    n = len(emb)
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_ITEMS else "ivf"
    spec = default_spec(kind, n)
    index = build(emb, spec, seed=seed)
    q = queries if queries is not None else sample_queries(emb, seed=seed)
    if spec.type not in ("ivf", "sq8", "ivfpq"):
        return index, spec, ann_recall(index, emb, q)
    spec.nprobe = 1
    while True:
        set_search_params(index, spec)
        recall = ann_recall(index, emb, q)
        if progress:
            progress(f"nprobe={spec.nprobe} recall@100={recall:.3f}")
        if recall >= recall_target or spec.nprobe >= spec.nlist:
            break
        spec.nprobe = min(spec.nprobe * 2, spec.nlist)
    return index, spec, recall


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes, spec: IndexSpec) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    set_search_params(index, spec)
    return index
