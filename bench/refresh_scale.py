"""The refresh's user-scaled steps at a million users: ``python -m bench.refresh_scale
--bundle B [--users 1000000] [--out FILE]``.

ML-100k has 943 users, so the million are its users repeated (features and history of user
``u`` become those of ``u#j``), embedded by a trained bundle's towers. Timed, one after the
other, with the functions ``offline/refresh.py`` calls: the user tower over every user's
history (``embed`` re-embeds only users with events; ``train`` all of them: this is the
latter), writing the candidate bundle, batch-scoring top-100 per user, and loading the
version's keys into a throwaway Redis. Not timed here: the refresh's own reads of the
interaction store, its event bookkeeping and the gate. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def refresh_scale(*, bundle: Path, n_users: int, data_dir: Path, work: Path, k: int = 100,
                  log: Any = print) -> dict[str, Any]:
    import torch

    from bench.procs import RedisProcess
    from offline.batch_score import batch_score_bundle
    from offline.datasets import load_dataset, temporal_split
    from offline.histories import user_histories
    from towers import bundle as bundle_mod
    from towers.features import EncodedTable, Vocabulary
    from towers.model import ModelConfig, embed_users, model_from_arrays
    from towers.redis_load import load_bundle_into_redis

    torch.set_num_threads(1)
    b = bundle_mod.load(bundle)
    cfg = ModelConfig.from_dict(b.manifest["model_config"])
    with np.load(bundle / "towers.npz", allow_pickle=False) as z:
        model = model_from_arrays(cfg, b.features, {n: z[n] for n in z.files})
    split = temporal_split(load_dataset(str(b.manifest["dataset"]), cache_dir=data_dir).interactions)
    real = b.features.user_vocab.values
    hist_real = user_histories(b.features, split.train, cfg.history_len)
    reps = -(-n_users // len(real))
    src = np.tile(np.arange(len(real)), reps)[:n_users]
    ids = [f"{real[s]}#{j}" for j, s in enumerate(src.tolist())]
    fp = b.features.extended(user_ids=ids)
    # The copies carry their source user's encoded features.
    pos = b.features.user_table.ids.positions([real[s] for s in src.tolist()])
    have = np.flatnonzero(pos >= 0)
    copies = EncodedTable(Vocabulary([ids[j] for j in have.tolist()]),
                          {k: v[pos[have]] for k, v in b.features.user_table.arrays.items()})
    fp = replace(fp, user_table=fp.user_table.merged(copies))
    hist = np.concatenate([hist_real, hist_real[src]])
    rows = np.arange(fp.n_users)
    out: dict[str, Any] = {"users": n_users, "history_len": cfg.history_len, "threads": 1}
    t0 = time.perf_counter()
    user_emb = embed_users(model, fp, hist, rows=rows, item_emb=np.asarray(b.item_emb))
    out["embed_s"] = time.perf_counter() - t0
    out["embed_users_per_s"] = len(rows) / out["embed_s"]
    log(f"embed: {len(rows):,} users in {out['embed_s']:.1f} s ({out['embed_users_per_s']:,.0f}/s)")
    cand = work / "candidate"
    t0 = time.perf_counter()
    files: dict[str, Any] = {"index.faiss": (bundle / "index.faiss").read_bytes()}
    for name in ("combiner.npz", "towers.npz"):
        with np.load(bundle / name, allow_pickle=False) as z:
            files[name] = {n: z[n] for n in z.files}
    files.update({"features.json": fp.dumps(), "item_embeddings.npy": np.asarray(b.item_emb),
                  "user_embeddings.npy": user_emb, "popularity.npy": np.asarray(b.popularity)})
    man = {k_: b.manifest[k_] for k_ in ("dataset", "model_config", "index")}
    man["shapes"] = {"n_items": fp.n_items, "n_users": fp.n_users, "dim": cfg.dim}
    bundle_mod.write_bundle(cand, files, man)
    out["write_bundle_s"] = time.perf_counter() - t0
    log(f"write bundle: {out['write_bundle_s']:.1f} s")
    t0 = time.perf_counter()
    batch_score_bundle(cand, k=k, progress=False)
    out["batch_score_s"] = time.perf_counter() - t0
    log(f"batch-score top-{k}: {out['batch_score_s']:.1f} s")
    redis = RedisProcess(work)
    try:
        t0 = time.perf_counter()
        load_bundle_into_redis(cand, redis_url=redis.url, progress=False)
        out["redis_load_s"] = time.perf_counter() - t0
    finally:
        redis.stop()
    log(f"redis load (embeddings + recs): {out['redis_load_s']:.1f} s")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["total_s"] = sum(out[k_] for k_ in ("embed_s", "write_bundle_s", "batch_score_s", "redis_load_s"))
    return out


def main() -> None:
    from towers.cliargs import default_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--bundle", type=Path, required=True, help="a trained bundle (towers that read history)")
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    ap.add_argument("--out", type=Path, default=Path("bench/results/refresh_scale.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refresh-scale-"))
    try:
        report = refresh_scale(bundle=args.bundle, n_users=args.users, data_dir=args.data_dir, work=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
