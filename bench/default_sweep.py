"""Choose a model default on the validation split only (DESIGN §6): train once per value
of one ModelConfig field on each dataset, record validation and test metrics, and pick
the value with the best mean validation Recall@20 across the datasets. The test split is
reported beside it, never used to choose.

    python -m bench.default_sweep --field history_staleness --values 0,1,2,4 \
        --datasets ml-100k,PATH/spec.yaml --out bench/results/default_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from towers.cliargs import default_data_dir


def sweep(*, field: str, values: list[Any], datasets: list[str], data_dir: Path, epochs: int,
          seed: int) -> dict[str, Any]:
    from offline.datasets import load_dataset, temporal_split
    from offline.evaluate import evaluate_model
    from offline.histories import user_histories
    from offline.train import TrainConfig, train_model
    from towers import index as faiss_index
    from towers.model import ModelConfig, embed_items, embed_users
    from towers.ranking import RankModel

    if field not in {f.name for f in fields(ModelConfig)}:
        raise SystemExit(f"--field: {field!r} is not a ModelConfig field")
    rows = []
    for name in datasets:
        ds = load_dataset(name, cache_dir=data_dir)
        split = temporal_split(ds.interactions)
        for v in values:
            cfg = replace(ModelConfig(), **{field: v})
            t0 = time.perf_counter()
            model, fp, split, hist = train_model(ds, model_cfg=cfg, train_cfg=TrainConfig(epochs=epochs, seed=seed),
                                                 split=split, progress=False)
            item_emb = embed_items(model, fp)
            user_emb = embed_users(model, fp, user_histories(fp, split.train, model.cfg.history_len), item_emb=item_emb)
            rm = RankModel(combiner=model.combiner.export(), item_emb=item_emb, user_emb=user_emb,
                           index=faiss_index.build(item_emb, faiss_index.IndexSpec("flat")),
                           popularity=item_emb[:0, 0].astype("int64"))
            m = evaluate_model(rm, fp, split, max_session=cfg.max_session)
            row = {"dataset": name, field: v, "epochs": len(hist), "seconds": round(time.perf_counter() - t0, 1),
                   "valid_recall@20": m["validation"]["recall@20"], "valid_ndcg@10": m["validation"]["ndcg@10"],
                   "test_recall@20": m["recall@20"], "test_ndcg@10": m["ndcg@10"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    mean = {str(v): sum(r["valid_recall@20"] for r in rows if r[field] == v) / len(datasets) for v in values}
    chosen = max(values, key=lambda v: mean[str(v)])
    return {"field": field, "values": values, "datasets": datasets, "seed": seed, "rows": rows,
            "mean_valid_recall@20": mean, "chosen_on_validation": chosen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--field", default="history_staleness")
    p.add_argument("--values", default="0,1,2,4")
    p.add_argument("--datasets", default="ml-100k")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    p.add_argument("--out", type=Path, default=Path("bench/results/default_sweep.json"))
    a = p.parse_args(argv)
    values = [json.loads(x) for x in a.values.split(",")]
    report = sweep(field=a.field, values=values, datasets=a.datasets.split(","), data_dir=a.data_dir,
                   epochs=a.epochs, seed=a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"chosen on validation: {a.field} = {report['chosen_on_validation']} ({report['mean_valid_recall@20']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
