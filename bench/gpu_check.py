"""GPU check for the FAISS path (issue 11, item 7): build + search + a short load run on the
GPU when ``faiss.get_num_gpus() > 0``, beside the same index on the CPU, and the results
compared within tolerance. Without a GPU it says so and exits 0 (``--require-gpu``: exit 3).

    python -m bench.gpu_check --items 1000000 --out bench/results/gpu_check.json

What it does, on clustered synthetic data (``offline.synth.clustered``, d=64):
1. builds IVF-Flat / IVF-SQ8 / IVF-PQ / Flat on the CPU (``towers.index.build``; IVF
   training runs k-means on the GPU when there is one) and clones each to the GPU
   (``towers.index.to_gpu``); lists cuVS-backed classes the wheel has (CAGRA, IVF);
2. recall@100 against exact search for CPU and GPU, and the overlap of their top-100;
3. a short closed-loop load run per index: batches of 1 and 64 queries for ``--seconds``,
   QPS and p50/p99 per batch, and the same through ``towers.ranking.search``.
Writes one JSON file; nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from offline.synth import clustered
from towers import index as faiss_index
from towers.ranking import RankModel, search


def load_run(index: Any, queries: np.ndarray, *, batch: int, seconds: float, k: int = 100) -> dict[str, float]:
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    i = 0
    n = 0
    while time.perf_counter() < t_end:
        lo = (i * batch) % max(1, len(queries) - batch)
        t0 = time.perf_counter()
        index.search(queries[lo:lo + batch], k)
        lat.append(time.perf_counter() - t0)
        n += batch
        i += 1
    total = sum(lat)
    a = np.array(lat) * 1e3
    return {"qps": n / total if total else 0.0, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "batches": len(lat)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="load run per index and batch size")
    p.add_argument("--types", default="flat,ivf,sq8,ivfpq")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    p.add_argument("--require-gpu", action="store_true", help="exit 3 when there is no GPU")
    args = p.parse_args(argv)
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        print("no GPU (faiss.get_num_gpus() == 0): nothing to check; the CPU path is the default")
        return 3 if args.require_gpu else 0
    rng = np.random.default_rng(0)
    d = args.dim
    centres = rng.standard_normal((max(8, args.items // 100), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items = clustered(args.items, centres, 0.8 / np.sqrt(d), rng)
    queries = clustered(args.queries, centres, 1.6 / np.sqrt(d), rng)
    kth = faiss_index.exact_kth(items, queries, 100)
    cuvs = [name for name in ("GpuIndexCagra", "GpuIndexIVFFlat", "GpuIndexIVFPQ") if hasattr(faiss, name)]
    out: dict[str, Any] = {"gpus": gpus, "faiss": faiss.__version__, "items": args.items, "dim": d,
                           "queries": args.queries, "gpu_classes": cuvs, "indexes": {}}
    for kind in args.types.split(","):
        spec = faiss_index.default_spec(kind, args.items)
        if kind in faiss_index.IVF_TYPES:
            spec.nprobe = min(spec.nlist, 64)
        t0 = time.perf_counter()
        cpu = faiss_index.build(items, spec)
        build_s = time.perf_counter() - t0
        gpu, on_gpu = faiss_index.to_gpu(cpu, spec)
        _, got_cpu = cpu.search(queries, 100)
        _, got_gpu = gpu.search(queries, 100)
        overlap = float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got_cpu.tolist(), got_gpu.tolist(),
                                                                              strict=True)]))
        r_cpu = faiss_index.recall_of(got_cpu, items, queries, kth)
        r_gpu = faiss_index.recall_of(got_gpu, items, queries, kth)
        model = RankModel(combiner=None, item_emb=items, user_emb=items[:1], index=gpu,  # type: ignore[arg-type]
                          popularity=np.arange(len(items)))
        _, via_rank = search(model, queries[:64], 116)
        row = {"spec": spec.label(), "on_gpu": on_gpu, "build_s": build_s, "recall_cpu": r_cpu, "recall_gpu": r_gpu,
               "cpu_gpu_top100_overlap": overlap, "same_within_tolerance": abs(r_cpu - r_gpu) <= 0.02,
               "ranking_search_ok": bool((via_rank[:, :100] >= 0).all()),
               "load": {f"{dev}_batch{b}": load_run(ix, queries, batch=b, seconds=args.seconds)
                        for dev, ix in (("cpu", cpu), ("gpu", gpu)) for b in (1, 64)}}
        out["indexes"][kind] = row
        print(json.dumps({kind: row}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["same_within_tolerance"] for r in out["indexes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
