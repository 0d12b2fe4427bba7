"""One request's exclusions cost only that request: ``python -m bench.wide_exclusions
[--items 100000] [--exclude 10000] [--index flat] [--out bench/results/wide_exclusions.json]``.

A batch of 64 queries on a synthetic catalog (d=64), searched as the server's search stage
does (``towers.ranking.search_batch``), with and without one request that excludes
``--exclude`` items, beside the old behaviour (every row searched as deep as the widest
request). Reports the median of repeated timings as JSON; ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def run(*, n_items: int, n_exclude: int, index: str, repeats: int) -> dict[str, Any]:
    from towers import index as faiss_index
    from towers.combiner import CombinerParams
    from towers.ranking import QueryBatch, RankModel, combine_queries, search, search_batch

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n_items, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    users = rng.standard_normal((64, 64)).astype(np.float32)
    idx = faiss_index.build(emb, faiss_index.default_spec(index, n_items))
    d = 64
    zeros = np.zeros
    comb = CombinerParams(W_s=np.eye(d, dtype=np.float32), w_a=zeros(d, np.float32), pos_bias=zeros(4, np.float32),
                          w_g=zeros(2 * d, np.float32), b_g=zeros(1, np.float32))
    model = RankModel(combiner=comb, item_emb=emb, user_emb=users, index=idx, popularity=np.arange(n_items))

    def batch(wide: bool) -> QueryBatch:
        excl: list[list[int]] = [[] for _ in range(64)]
        if wide:
            excl[17] = rng.choice(n_items, n_exclude, replace=False).tolist()
        return QueryBatch.from_lists(model, user_rows=np.arange(64), sessions=[[] for _ in range(64)],
                                     excludes=excl, k=np.full(64, 10))

    import faiss

    from towers.ranking import merge_searches, plan_search

    # As the server searches: one OpenMP thread per search, two search threads.
    faiss.omp_set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=2, initializer=faiss.omp_set_num_threads, initargs=(1,))

    def concurrent(qb: QueryBatch, q: np.ndarray) -> Any:  # what RecommendService.run_batch does
        plan = plan_search(model, qb)
        first = pool.submit(search, model, q, plan.base)
        second = pool.submit(search, model, q[plan.wide], plan.deep) if len(plan.wide) else None
        return merge_searches(plan, first.result(), second.result() if second is not None else None)

    out: dict[str, Any] = {"items": n_items, "exclude": n_exclude, "index": index, "batch": 64,
                           "omp_threads": 1, "search_threads": 2}
    for name, wide in (("normal", False), ("one_wide", True)):
        qb = batch(wide)
        q = combine_queries(model, qb)[qb.queried]
        out[f"{name}_sequential_ms"] = round(_timed(lambda qb=qb, q=q: search_batch(model, qb, q), repeats), 2)
        out[f"{name}_server_ms"] = round(_timed(lambda qb=qb, q=q: concurrent(qb, q), repeats), 2)
        if wide:  # before: every row as deep as the widest
            old_depth = 10 + n_exclude + 16
            out["one_wide_before_ms"] = round(_timed(lambda q=q, w=old_depth: search(model, q, w), repeats), 2)
    pool.shutdown()
    base = out["normal_server_ms"]
    out["ratio_to_normal"] = {"before": round(out["one_wide_before_ms"] / base, 2),
                              "sequential": round(out["one_wide_sequential_ms"] / base, 2),
                              "server": round(out["one_wide_server_ms"] / base, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--exclude", type=int, default=10_000)
    p.add_argument("--index", default="flat")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("bench/results/wide_exclusions.json"))
    a = p.parse_args(argv)
    res = run(n_items=a.items, n_exclude=a.exclude, index=a.index, repeats=a.repeats)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
