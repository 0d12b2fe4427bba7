"""FAISS indexes over item embeddings (inner product on unit vectors).

Types: ``flat`` (exact), ``ivf`` (IVF-Flat), ``hnsw``, ``ivfpq`` (8-bit PQ), ``sq8``
(IVF with 8-bit scalar quantisation), the quantized kinds ``ivfpqfs`` (IVF-PQ
fast-scan with 4-bit codes, ``IVF{nlist},PQ{M}x4fs``) and ``hnswsq8``
(``HNSW32,SQ8``), and ``auto``, which picks by catalog size and an ANN recall
target (``twotower index tune`` is the measured way to pick). Any non-flat kind
can carry a refine stage (``refine``: ``flat`` or ``sq8``/``sq6``/``sq4`` codes,
re-ranking ``k_factor`` x k candidates) and the PQ kinds an OPQ rotation.

Search parameters (nprobe, efSearch, k_factor) are not stored in ``index.faiss``
but in the spec (manifest), and set at load by :func:`set_search_params` through
``faiss.ParameterSpace``, which reaches through refine and pre-transform wrappers;
``towers.ranking.search`` calls ``index.search`` whatever the kind.
Builds run on the GPU when ``faiss.get_num_gpus() > 0`` and are stored as CPU
indexes (portable; serving moves them if it wants).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq", "sq8", "ivfpqfs", "hnswsq8")
IVF_TYPES = ("ivf", "sq8", "ivfpq", "ivfpqfs")
HNSW_TYPES = ("hnsw", "hnswsq8")
PQ_TYPES = ("ivfpq", "ivfpqfs")
REFINES = ("", "flat", "sq8", "sq6", "sq4")
# Bytes per stored element of each kind's codes (the tuner reports measured bytes; this is
# only for the docs and the manifest's ``arrays`` entry).
CODE_DTYPES = {"flat": "float32", "ivf": "float32", "hnsw": "float32", "ivfpq": "pq8", "sq8": "int8 (sq8)",
               "ivfpqfs": "pq4", "hnswsq8": "int8 (sq8)"}
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
    refine: str = ""  # "" none; "flat" exact float32 re-rank; "sq8"/"sq6"/"sq4" re-rank on SQ codes
    k_factor: float = 1.0  # the refine stage re-ranks k_factor * k candidates of the base index
    opq: bool = False  # OPQ rotation before PQ (PQ kinds only)
    # Range calibration of the scalar quantizers (``sq8`` codes, SQ refine codes): 0 = each
    # dimension's min..max over the calibration sample (FAISS's default); c > 0 = mean ± c
    # standard deviations, clipping the rare extremes so the 2^bits levels are spent where
    # the values are (at 6 bits, 3 sigma halves the reconstruction error on the 1M bench).
    sq_clip: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSpec:
        """Tolerates manifests written before a field existed (they get its default)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def quantized(self) -> bool:
        """Whether search scores are computed on lossy codes (what the publish gate checks)."""
        return self.type in ("ivfpq", "sq8", "ivfpqfs", "hnswsq8")

    def label(self) -> str:
        """Short human name with search params, for reports and logs."""
        parts = [factory_string(self, 0) if self.type != "flat" else "Flat"]
        if self.type in IVF_TYPES:
            parts.append(f"nprobe={self.nprobe}")
        if self.type in HNSW_TYPES:
            parts.append(f"efSearch={self.ef_search}")
        if self.refine:
            parts.append(f"k_factor={self.k_factor:g}")
        if self.sq_clip:
            parts.append(f"sq_clip={self.sq_clip:g}")
        return " ".join(parts)


def factory_string(spec: IndexSpec, d: int) -> str:
    """The ``faiss.index_factory`` description of ``spec`` (``d`` only matters for OPQ)."""
    t = spec.type
    m = spec.pq_m
    if t == "flat":
        body = "Flat"
    elif t == "ivf":
        body = f"IVF{spec.nlist},Flat"
    elif t == "sq8":
        body = f"IVF{spec.nlist},SQ8"
    elif t == "ivfpq":
        body = f"IVF{spec.nlist},PQ{m}"
    elif t == "ivfpqfs":
        body = f"IVF{spec.nlist},PQ{m}x4fs"
    elif t == "hnsw":
        body = f"HNSW{spec.hnsw_m},Flat"
    elif t == "hnswsq8":
        body = f"HNSW{spec.hnsw_m},SQ8"
    else:
        raise ValueError(f"unknown index type {t!r}; choose one of {', '.join(INDEX_TYPES)}")
    if spec.opq:
        if t not in PQ_TYPES:
            raise ValueError(f"OPQ applies to PQ index types ({', '.join(PQ_TYPES)}), not {t!r}")
        body = f"OPQ{m}_{d}," + body if d else f"OPQ{m}," + body
    if spec.refine:
        if spec.refine not in REFINES:
            choices = ", ".join(r or "(none)" for r in REFINES)
            raise ValueError(f"unknown refine {spec.refine!r}; choose one of {choices}")
        if t == "flat":
            raise ValueError("a flat index needs no refine stage")
        body += ",RFlat" if spec.refine == "flat" else f",Refine({spec.refine.upper()})"
    return body


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
    if kind == "ivfpqfs":
        # 4-bit codes of d/2 sub-vectors (32 bytes at d=64) re-ranked on SQ8 codes: a quarter
        # of float32's bytes per item at recall near the uncompressed index's.
        return IndexSpec(kind, nlist=nlist, nprobe=max(1, min(nlist, 32)), pq_m=32, refine="sq8", k_factor=4.0)
    if kind == "hnswsq8":
        return IndexSpec(kind, hnsw_m=32, ef_search=128)
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


def _uses_factory(spec: IndexSpec) -> bool:
    return spec.type in ("ivfpqfs", "hnswsq8") or bool(spec.refine) or spec.opq


def set_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Apply the spec's search-time parameters (nprobe, efSearch, k_factor) to a loaded index.

    ``faiss.ParameterSpace`` finds the IVF/HNSW part behind refine and OPQ wrappers, so
    the same spec sets up a plain IVF and an ``OPQ,IVF,PQfs,Refine`` stack alike."""
    if not _uses_factory(spec):  # the original kinds: set directly (no wrapper to look through)
        if spec.type == "hnsw":
            faiss.downcast_index(index).hnsw.efSearch = spec.ef_search  # type: ignore[attr-defined]
        elif spec.type in ("ivf", "sq8", "ivfpq"):
            faiss.extract_index_ivf(index).nprobe = spec.nprobe
        return
    ps = faiss.ParameterSpace()
    if spec.type in IVF_TYPES:
        ps.set_index_parameter(index, "nprobe", float(spec.nprobe))
    if spec.type in HNSW_TYPES:
        ps.set_index_parameter(index, "efSearch", float(spec.ef_search))
    if spec.refine:
        ps.set_index_parameter(index, "k_factor_rf", float(spec.k_factor))


def search_params(spec: IndexSpec, *, nprobe: int | None = None, ef_search: int | None = None) -> Any:
    """Per-call search parameters for an index of ``spec`` (``index.search(..., params=...)``),
    or None when neither setting applies to it (see :func:`override_problem`).

    FAISS reads per-call parameters level by level, so they are nested like the index: the
    IVF or HNSW part's inside ``SearchParametersPreTransform`` (OPQ) inside
    ``IndexRefineSearchParameters`` (a refine stage, which then also needs its ``k_factor``:
    the per-call object replaces the index's own). A bare ``SearchParametersIVF`` on a refine
    or OPQ wrapper is ignored by FAISS without an error."""
    params: Any = None
    if spec.type in HNSW_TYPES and ef_search is not None:
        params = faiss.SearchParametersHNSW(efSearch=ef_search)  # type: ignore[attr-defined]
    elif spec.type in IVF_TYPES and nprobe is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
    if params is None:
        return None
    if spec.opq:
        params = _holding(faiss.SearchParametersPreTransform(index_params=params), params)  # type: ignore[call-arg]
    if spec.refine:
        params = _holding(faiss.IndexRefineSearchParameters(k_factor=spec.k_factor,  # type: ignore[call-arg]
                                                            base_index_params=params), params)
    return params


def _holding(outer: Any, inner: Any) -> Any:
    """``outer`` keeps a Python reference to ``inner``: SWIG stores only the C++ pointer, and
    the inner object must live as long as the outer one is used."""
    outer.inner = inner
    return outer


def override_problem(spec: IndexSpec, *, nprobe: int | None = None, ef_search: int | None = None) -> str | None:
    """Why an experiment's search override cannot apply to an index of ``spec`` (None: it
    can): ``nprobe`` is an IVF setting, ``ef_search`` an HNSW one."""
    if nprobe is not None and spec.type not in IVF_TYPES:
        return f"nprobe applies to IVF indexes; this version's index is {spec.label()}"
    if ef_search is not None and spec.type not in HNSW_TYPES:
        return f"ef_search applies to HNSW indexes; this version's index is {spec.label()}"
    return None


def _create_any(spec: IndexSpec, d: int) -> faiss.Index:
    if spec.sq_clip < 0:
        raise ValueError(f"sq_clip must be >= 0, not {spec.sq_clip}")
    if not _uses_factory(spec):
        index = _create(spec, d)
    else:
        if spec.type in PQ_TYPES and d % spec.pq_m:
            raise ValueError(f"pq_m={spec.pq_m} does not divide the dimension {d}")
        index = faiss.index_factory(d, factory_string(spec, d), faiss.METRIC_INNER_PRODUCT)
        if spec.type in HNSW_TYPES:
            base = faiss.downcast_index(index).base_index if spec.refine else index  # type: ignore[attr-defined]
            faiss.downcast_index(base).hnsw.efConstruction = 80  # type: ignore[attr-defined]
    if spec.sq_clip:
        sqs = scalar_quantizers(index)
        if not sqs:
            raise ValueError(f"sq_clip applies to scalar-quantized codes; {spec.label()} has none")
        for sq in sqs:  # set before training: the ranges are fitted then
            sq.rangestat = faiss.ScalarQuantizer.RS_meanstd
            sq.rangestat_arg = float(spec.sq_clip)
    return index


def scalar_quantizers(index: faiss.Index) -> list[Any]:
    """The ``ScalarQuantizer`` objects inside ``index`` (an IVF-SQ's codes, an SQ refine stage's)."""
    out: list[Any] = []
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        out += scalar_quantizers(idx.base_index) + scalar_quantizers(idx.refine_index)
    elif isinstance(idx, faiss.IndexPreTransform):
        out += scalar_quantizers(idx.index)
    elif hasattr(idx, "sq"):  # IndexScalarQuantizer, IndexIVFScalarQuantizer, IndexHNSWSQ's storage
        out.append(idx.sq)
    elif isinstance(idx, faiss.IndexHNSW):
        out += scalar_quantizers(idx.storage)
    return out


def train_sample(emb: np.ndarray, spec: IndexSpec, *, seed: int = 0) -> np.ndarray:
    """The catalog sample codebooks are calibrated on: 64 points per IVF list, at least 10k,
    at most 256k. k-means cost grows with points x lists: 16k lists on 256k points took 256 s
    on two cores, on 1M points it would take ~4x that. Below 39 points a list FAISS warns; the
    1M tuner's recall figures are measured with such centroids, not assumed."""
    n = len(emb)
    rng = np.random.default_rng(seed)
    return emb[rng.choice(n, size=min(n, max(min(spec.nlist * 64, 256_000), 10_000)), replace=False)]


def coarse_centroids(emb: np.ndarray, nlist: int, *, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids for an IVF coarse quantizer; the tuner trains them once
    and shares them between IVF-Flat, IVF-SQ8 and IVF-PQ (the slow part of IVF training)."""
    sample = train_sample(emb, IndexSpec("ivf", nlist=nlist), seed=seed)
    km = faiss.Kmeans(emb.shape[1], nlist, niter=20, seed=seed, spherical=True, gpu=faiss.get_num_gpus() > 0)
    with offline_blas():
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def build(emb: np.ndarray, spec: IndexSpec, *, seed: int = 0, centroids: np.ndarray | None = None) -> faiss.Index:
    """Build and fill an index; item row ``i`` gets FAISS id ``i``. Codebooks (IVF centroids,
    PQ/SQ ranges, OPQ rotation) are fitted on a sample of the catalog (:func:`train_sample`);
    ``centroids`` reuses an IVF coarse quantizer trained before (not with OPQ, whose
    rotation changes the space the centroids live in)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    d = emb.shape[1]
    index = _create_any(spec, d)
    with offline_blas():
        if not index.is_trained:
            train = train_sample(emb, spec, seed=seed)
            if centroids is not None and spec.type in IVF_TYPES and not spec.opq:
                q = faiss.extract_index_ivf(index).quantizer
                q.add(np.ascontiguousarray(centroids, dtype=np.float32))
                q.is_trained = True
            elif faiss.get_num_gpus() > 0 and spec.type in IVF_TYPES and not spec.opq:
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
    return recall_of(got, emb, queries, truth_scores[:, -1], k)


def exact_kth(emb: np.ndarray, queries: np.ndarray, k: int = 100) -> np.ndarray:
    """The k-th best exact inner-product score per query (the bar :func:`recall_of` counts against)."""
    k = min(k, len(emb))
    exact = faiss.IndexFlatIP(emb.shape[1])
    with offline_blas():
        exact.add(np.ascontiguousarray(emb, dtype=np.float32))
        truth_scores, _ = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return truth_scores[:, -1].copy()


def recall_of(got: np.ndarray, emb: np.ndarray, queries: np.ndarray, kth: np.ndarray, k: int = 100) -> float:
    """Tie-aware recall@k of returned rows ``got`` (Q, >= k), given each query's exact k-th score."""
    k = min(k, len(emb))
    hits = 0
    for q, t, g in zip(queries, kth, got[:, :k], strict=True):
        g = g[g >= 0]
        scores = emb[g] @ q
        hits += min(k, int(np.sum(scores >= t - 1e-5 * max(1.0, abs(float(t))))))
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
    if spec.type not in IVF_TYPES:
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


GPU_TYPES = ("flat", "ivf", "sq8", "ivfpq")  # kinds faiss-gpu can clone (no 4-bit fast-scan, no HNSW)


def to_gpu(index: faiss.Index, spec: IndexSpec, *, device: int = 0) -> tuple[Any, bool]:
    """(index, on_gpu): a GPU clone of ``index`` when ``faiss.get_num_gpus() > 0`` and the kind
    has a GPU implementation, else the CPU index unchanged (the default build, and what CI
    runs). Search parameters are set on the clone from the spec, as at load."""
    if faiss.get_num_gpus() == 0 or spec.type not in GPU_TYPES or spec.refine or spec.opq:
        return index, False
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, device, index)
    gpu.referenced_resources = res  # type: ignore[attr-defined]  # keep the resources alive with the index
    if spec.type in IVF_TYPES:
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", float(spec.nprobe))
    return gpu, True


def index_bytes(index: faiss.Index) -> int:
    """Serialized size: what the index costs in memory and on disk (codes, ids, graph, codebooks)."""
    return int(faiss.serialize_index(index).size)


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes, spec: IndexSpec) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    set_search_params(index, spec)
    return index
