"""``twotower index tune``: measure index types and their search parameters on calibration
queries, keep the Pareto front, pick the cheapest setting that meets a recall target.

Why measured and not rule-of-thumb: recall and speed of IVF/PQ/HNSW depend on how the
catalog is clustered and on what queries look like (a combined user+session query is not
an item), and on this machine's memory bandwidth. So every candidate is built from a
sample of the catalog, searched with the queries serving would run
(``offline.quantize.calibration_queries``) in batches of ``batch_size`` on one thread
(serving gives each search one OpenMP thread), and scored by recall@100 against exact
search (tie-aware, ``towers.index.recall_of``). "Cheapest" is the fewest µs per query;
``max_bytes_per_item`` adds a memory bound. When no setting reaches the target the tuner
says so and picks nothing; the bundle is left as it was.

Output: ``index_tune.json`` (every point, the front, the choice) and ``index_pareto.png``
in the bundle; the chosen spec and its recall in the manifest's ``index`` (a new version
id); for trained bundles the end-to-end Recall@20 of the chosen path vs float32
(``quant.e2e``), which ``publish`` gates on.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import ConfigError
from towers.index import IndexSpec

K = 100
DEFAULT_TYPES = ("flat", "ivf", "sq8", "ivfpqfs", "ivfpqfs-sq6", "ivfpqfs-sq4", "ivfpqfs-opq", "hnswsq8")
TUNABLE = (*DEFAULT_TYPES, "ivfpqfs-raw", "ivfpqfs-rflat", "hnsw", "ivfpq")
# Range calibrations tried for SQ refine codes below 8 bits (``IndexSpec.sq_clip``): the
# catalog sample's min..max, and mean ± 3 sigma. At 1M items, 6-bit codes alone reach
# recall@100 0.943 with min..max and 0.953 with 3 sigma (2.5 sigma: 0.924, clipping too much).
SQ_CLIPS = (0.0, 3.0)
# At 1M items (held-out user queries) PQ4 + SQ8 refine was still gaining at k_factor 8,
# nprobe 1024 (0.914): wider re-ranks and deeper probes are in the sweep.
K_FACTORS = (4.0, 8.0, 16.0, 32.0)
EF_SEARCH = (16, 32, 64, 128, 256, 512)


@dataclass
class Point:
    """One measured setting."""

    family: str
    spec: IndexSpec
    recall: float
    bytes: int
    us_per_query: float
    build_s: float
    pareto: bool = False
    built: str = ""  # label of the built index it was measured on (search params aside)
    score_rel_mse: float = 0.0  # quantization error of the returned scores (see :func:`measure`)

    def row(self, n_items: int) -> dict[str, Any]:
        return {"family": self.family, "type": self.spec.type, "label": self.spec.label(),
                "spec": self.spec.to_dict(), "recall@100": round(self.recall, 5), "bytes": self.bytes,
                "bytes_per_item": round(self.bytes / max(n_items, 1), 2),
                "us_per_query": round(self.us_per_query, 2), "build_s": round(self.build_s, 2),
                "score_rel_mse": float(f"{self.score_rel_mse:.3g}"), "pareto": self.pareto}


def family_specs(family: str, *, n: int, d: int, nlist: int) -> list[IndexSpec]:
    """The build-time specs of a candidate family at one IVF list count (search params are
    swept afterwards); several when the family calibrates its SQ ranges more than one way."""
    base = replace(faiss_index.default_spec("ivf", n), nlist=nlist)
    pq_m = d // 2 if d % 2 == 0 else d
    if family == "flat":
        return [IndexSpec("flat")]
    if family in ("ivf", "sq8"):
        return [replace(base, type=family)]
    if family == "ivfpq":
        return [replace(base, type="ivfpq", pq_m=pq_m if d % pq_m == 0 else 8)]
    if family.startswith("ivfpqfs"):
        refine = {"ivfpqfs": "sq8", "ivfpqfs-sq6": "sq6", "ivfpqfs-sq4": "sq4", "ivfpqfs-opq": "sq8",
                  "ivfpqfs-raw": "", "ivfpqfs-rflat": "flat"}[family]
        spec = replace(base, type="ivfpqfs", pq_m=pq_m, refine=refine, k_factor=4.0 if refine else 1.0,
                       opq=family == "ivfpqfs-opq")
        clips = SQ_CLIPS if refine in ("sq6", "sq4") else (0.0,)
        return [replace(spec, sq_clip=c) for c in clips]
    if family in ("hnsw", "hnswsq8"):
        return [IndexSpec(family, hnsw_m=32, ef_search=64)]
    raise ConfigError("--types", f"unknown index family {family!r}; choose from {', '.join(TUNABLE)}")


def nlist_choices(n: int) -> list[int]:
    """IVF list counts swept: the default (4 sqrt n) and a finer one (16 sqrt n, at least 39
    items a list). Which is faster at a recall depends on how the catalog clusters: at 1M
    items with 10,000 clusters the finer lists need 1.6% of the lists probed instead of 17%."""
    coarse = faiss_index.default_spec("ivf", n).nlist
    return sorted({coarse, max(coarse, min(4 * coarse, n // 39))})


def _nprobes(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ...: steps of ~1.4x, so the cheapest nprobe over a target is
    found within ~40% (doubling alone would leave up to 2x on the table)."""
    out: list[int] = []
    p = 1
    while p < nlist:
        out.append(p)
        if p >= 2 and p * 3 // 2 < nlist:
            out.append(p * 3 // 2)
        p *= 2
    return [*out, nlist]


def search_settings(spec: IndexSpec) -> Iterator[list[IndexSpec]]:
    """Sweeps of increasing cost (each list is walked until recall saturates)."""
    if spec.type == "flat":
        yield [spec]
    elif spec.type in faiss_index.HNSW_TYPES:
        yield [replace(spec, ef_search=e) for e in EF_SEARCH]
    elif spec.refine:
        for kf in K_FACTORS:
            yield [replace(spec, nprobe=p, k_factor=kf) for p in _nprobes(spec.nlist)]
    else:
        yield [replace(spec, nprobe=p) for p in _nprobes(spec.nlist)]


class _OneThread:
    """Serving searches with one OpenMP thread per search; measure the same way."""

    def __enter__(self) -> None:
        self.old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        faiss.omp_set_num_threads(self.old)


def measure(index: Any, spec: IndexSpec, emb: np.ndarray, queries: np.ndarray, kth: np.ndarray, *,
            batch_size: int) -> tuple[float, float, float]:
    """(recall@100, µs per query, score error) of one setting: batched searches, timed, then
    scored. The score error is the quantization error of what the index returns: the
    relative MSE of its scores against the exact dot products of the same items,
    ``sum (s - s*)^2 / sum s*^2`` (0 for float32 codes)."""
    faiss_index.set_search_params(index, spec)
    got = np.empty((len(queries), K), dtype=np.int64)
    scores = np.empty((len(queries), K), dtype=np.float32)
    with _OneThread():
        index.search(queries[:batch_size], K)  # warm caches once
        t0 = time.perf_counter()
        for lo in range(0, len(queries), batch_size):
            scores[lo:lo + batch_size], got[lo:lo + batch_size] = index.search(queries[lo:lo + batch_size], K)
        elapsed = time.perf_counter() - t0
    return (faiss_index.recall_of(got, emb, queries, kth, K), 1e6 * elapsed / len(queries),
            score_rel_mse(got, scores, emb, queries))


def score_rel_mse(got: np.ndarray, scores: np.ndarray, emb: np.ndarray, queries: np.ndarray) -> float:
    """Relative MSE of returned scores (Q, k) against the exact ones; padding (-1) ignored."""
    valid = got >= 0
    exact = np.einsum("qkd,qd->qk", emb[np.where(valid, got, 0)], queries).astype(np.float64)
    # Padding slots carry -FLT_MAX scores: zero them before squaring.
    diff = np.where(valid, scores.astype(np.float64) - exact, 0.0)
    return float(np.sum(diff ** 2)) / max(float(np.sum(np.where(valid, exact, 0.0) ** 2)), 1e-30)


def pareto(points: Sequence[Point]) -> None:
    """Mark points no other point beats on both recall (higher) and µs/query (lower)."""
    for p in points:
        p.pareto = not any(o is not p and o.recall >= p.recall and o.us_per_query <= p.us_per_query
                           and (o.recall > p.recall or o.us_per_query < p.us_per_query) for o in points)


def choose(points: Sequence[Point], *, recall_target: float, max_bytes: float | None) -> Point | None:
    """The cheapest (µs/query, then bytes) setting meeting the target and the memory bound."""
    ok = [p for p in points if p.recall >= recall_target and (max_bytes is None or p.bytes <= max_bytes)]
    return min(ok, key=lambda p: (p.us_per_query, p.bytes)) if ok else None


def plot(points: Sequence[Point], chosen: Point | None, recall_target: float, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(p: Point) -> str:
        return f"{p.family} nlist {p.spec.nlist}" if p.spec.nlist else p.family

    fig, ax = plt.subplots(figsize=(10, 5.5))
    nlists = sorted({p.spec.nlist for p in points if p.spec.nlist})
    families = list(dict.fromkeys(p.family for p in points))
    cmap = plt.get_cmap("tab10")
    for g in dict.fromkeys(group(p) for p in points):
        ps = [p for p in points if group(p) == g]
        # Colour = family, marker = list count: 15+ groups stay tellable apart.
        marker = "os^D"[nlists.index(ps[0].spec.nlist) % 4] if ps[0].spec.nlist else "s"
        ax.scatter([p.us_per_query for p in ps], [p.recall for p in ps], label=g, s=16, alpha=0.7,
                   color=cmap(families.index(ps[0].family) % 10), marker=marker)
    front = sorted((p for p in points if p.pareto), key=lambda p: p.us_per_query)
    ax.plot([p.us_per_query for p in front], [p.recall for p in front], "k--", lw=1, label="Pareto front")
    ax.axhline(recall_target, color="tab:red", lw=0.8, label=f"target {recall_target:g}")
    if chosen is not None:
        ax.scatter([chosen.us_per_query], [chosen.recall], marker="*", s=250, color="gold", edgecolor="k",
                   label=f"chosen: {chosen.spec.label()}", zorder=5)
    ax.set(xscale="log", xlabel="µs per query (batched, 1 thread)", ylabel="recall@100 vs exact", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def tune_index(bundle_dir: Path, *, recall_target: float = 0.95, batch_size: int = 64,
               types: Sequence[str] | None = None, cache_dir: Path | None = None, seed: int = 0,
               n_queries: int = 1000, max_bytes_per_item: float | None = None, write: bool = True,
               nlists: Sequence[int] | None = None, log: Any = print) -> dict[str, Any]:
    """Sweep, report, choose; with ``write`` and a choice, install it in the bundle.
    Returns the report (``chosen`` is None when nothing meets the target). ``nlists``: the
    IVF list counts to sweep (default :func:`nlist_choices`)."""
    from offline.quantize import calibration_queries, end_to_end, is_trained

    if not 0.0 < recall_target <= 1.0:
        raise ConfigError("--recall-target", "must be in (0, 1]")
    families = list(types or DEFAULT_TYPES)
    for f in families:
        if f not in TUNABLE:
            raise ConfigError("--types", f"unknown index family {f!r}; choose from {', '.join(TUNABLE)}")
    b = bundle_mod.load(bundle_dir)
    emb = np.ascontiguousarray(b.item_emb, dtype=np.float32)
    n, d = emb.shape
    nlist_sweep = sorted(set(nlists)) if nlists else nlist_choices(n)
    bad = [nl for nl in nlist_sweep if not 1 <= nl <= n]
    if bad:
        raise ConfigError("--nlists", f"IVF list counts must be in 1..{n} (the catalog size), got {bad}")
    cal = calibration_queries(b, cache_dir=cache_dir, n=n_queries, seed=seed)
    queries = np.ascontiguousarray(cal.queries, dtype=np.float32)
    kth = faiss_index.exact_kth(emb, queries, K)
    log(f"tuning over {n:,} items x {d}: {len(queries)} calibration queries ({cal.source}), "
        f"recall@100 target {recall_target:g}, batch {batch_size}")
    ivf_families = [f for f in families if f not in ("flat", "hnsw", "hnswsq8")]
    centroids: dict[int, np.ndarray] = {}
    # OPQ trains its own (rotated) centroids; the other IVF families share these.
    for nl in nlist_sweep if any(f != "ivfpqfs-opq" for f in ivf_families) else []:
        t0 = time.perf_counter()
        centroids[nl] = faiss_index.coarse_centroids(emb, nl, seed=seed)
        log(f"coarse quantizer: {nl} centroids in {time.perf_counter() - t0:.1f} s (shared by IVF kinds)")
    points: list[Point] = []
    built: dict[str, Any] = {}
    max_bytes = None if max_bytes_per_item is None else max_bytes_per_item * n
    stop_at = min(0.999, recall_target + 0.03)
    for fam in families:
        for nl in nlist_sweep if fam in ivf_families else [0]:
            for spec0 in family_specs(fam, n=n, d=d, nlist=nl):
                t0 = time.perf_counter()
                # OPQ rotates the space the shared centroids live in: it trains its own.
                index = faiss_index.build(emb, spec0, seed=seed, centroids=None if spec0.opq else centroids.get(nl))
                build_s = time.perf_counter() - t0
                nbytes = faiss_index.index_bytes(index)
                built[spec0.label()] = index
                # Exact search on a big catalog is slow to time; a subset of queries tells its speed.
                q, kq = (queries[:256], kth[:256]) if fam == "flat" and n > 200_000 else (queries, kth)
                for sweep in search_settings(spec0):
                    prev = -1.0
                    for spec in sweep:
                        recall, us, err = measure(index, spec, emb, q, kq, batch_size=batch_size)
                        points.append(Point(fam, spec, recall, nbytes, us, build_s, built=spec0.label(),
                                            score_rel_mse=err))
                        log(f"  {spec.label():60s} recall@100 {recall:.4f}  {us:9.1f} µs/q  "
                            f"{nbytes / n:7.1f} B/item  score rel. MSE {err:.1e}")
                        if recall >= stop_at or recall - prev < 1e-4:
                            break
                        prev = recall
                # Keep only the index the choice so far was measured on (at 1M items each build
                # is 70-265 MB; holding all of them would cost gigabytes).
                best = choose(points, recall_target=recall_target, max_bytes=max_bytes)
                built = {k: v for k, v in built.items() if best is not None and k == best.built}
    pareto(points)
    chosen = choose(points, recall_target=recall_target, max_bytes=max_bytes)
    # "Today's" IVF-Flat is the default list count; the best IVF-Flat at any list count is
    # reported beside it, so a gain from finer lists is not credited to compression.
    today_nlist = faiss_index.default_spec("ivf", n).nlist
    ivf_flat = [p for p in points if p.family == "ivf" and p.recall >= recall_target and p.spec.nlist == today_nlist]
    any_ivf_flat = [p for p in points if p.family == "ivf" and p.recall >= recall_target]
    report: dict[str, Any] = {
        "bundle_version": b.version, "n_items": n, "dim": d, "recall_target": recall_target, "k": K,
        "batch_size": batch_size, "queries": len(queries), "query_source": cal.source, "threads": 1,
        "max_bytes_per_item": max_bytes_per_item, "points": [p.row(n) for p in points],
        "pareto": [p.row(n) for p in sorted((p for p in points if p.pareto), key=lambda p: p.us_per_query)],
        "chosen": chosen.row(n) if chosen else None,
    }
    if chosen is not None and ivf_flat:
        ref = min(ivf_flat, key=lambda p: p.us_per_query)
        report["vs_ivf_flat_at_target"] = {"ivf_flat": ref.row(n), "speedup": ref.us_per_query / chosen.us_per_query,
                                           "bytes_ratio": ref.bytes / chosen.bytes}
    if chosen is not None and any_ivf_flat:
        ref = min(any_ivf_flat, key=lambda p: p.us_per_query)
        report["vs_best_ivf_flat_at_target"] = {"ivf_flat": ref.row(n),
                                                "speedup": ref.us_per_query / chosen.us_per_query,
                                                "bytes_ratio": ref.bytes / chosen.bytes}
    if chosen is None:
        best = max(points, key=lambda p: p.recall) if points else None
        report["message"] = (f"no setting reaches recall@100 >= {recall_target:g}"
                             + (f" within {max_bytes_per_item:g} bytes/item" if max_bytes_per_item else "")
                             + (f"; the best was {best.recall:.4f} ({best.spec.label()})" if best else "")
                             + "; nothing chosen, the bundle's index is unchanged")
        log(report["message"])
        return report
    log(f"chosen: {chosen.spec.label()}: recall@100 {chosen.recall:.4f}, {chosen.us_per_query:.1f} µs/query, "
        f"{chosen.bytes / n:.1f} B/item")
    if not write:
        return report
    index = built[chosen.built]
    faiss_index.set_search_params(index, chosen.spec)
    entry = {"spec": chosen.spec.to_dict(), "ann_recall@100": chosen.recall, "recall_target": recall_target,
             "recall_queries": cal.source, "bytes": chosen.bytes, "us_per_query": chosen.us_per_query,
             "tuned": True, "gpus_used": faiss.get_num_gpus()}
    updates: dict[str, Any] = {"index": entry}
    if is_trained(b.manifest) and cache_dir is not None:
        quant = dict(b.manifest.get("quant", {}))
        quant["e2e"] = end_to_end(b, cache_dir=cache_dir, index=index, spec=chosen.spec)
        e = quant["e2e"]
        report["e2e"] = e
        log(f"end to end: Recall@20 {e['recall@20']['quantized']:.4f} vs float32 {e['recall@20']['float32']:.4f} "
            f"(relative drop {e['relative_drop']:+.2%})")
        updates["quant"] = quant
    png = plot(points, chosen, recall_target, f"{b.version}: {n:,} items, batch {batch_size}")
    man = bundle_mod.update_bundle(bundle_dir, {"index.faiss": faiss_index.to_bytes(index),
                                                "index_tune.json": json.dumps(report, indent=2),
                                                "index_pareto.png": png}, updates)
    report["version"] = man["version"]
    log(f"version {b.version} -> {man['version']}")
    return report


def format_pareto(report: dict[str, Any], *, all_points: bool = False) -> str:
    rows = report["points"] if all_points else report["pareto"]
    lines = [f"{'type':10s} {'params':62s} {'recall@100':>10s} {'B/item':>8s} {'µs/query':>9s} {'score err':>9s}"]
    for r in rows:
        mark = " *" if report.get("chosen") and r["label"] == report["chosen"]["label"] else ""
        lines.append(f"{r['type']:10s} {r['label']:62s} {r['recall@100']:10.4f} {r['bytes_per_item']:8.1f} "
                     f"{r['us_per_query']:9.1f} {r.get('score_rel_mse', 0.0):9.1e}{mark}")
    return "\n".join(lines)
