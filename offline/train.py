"""``twotower train``: train the towers (``offline.train_loop``, or Ray Train with
``--engine ray``: ``offline.ray_train``) and write a complete, verified bundle: embeddings,
the FAISS index, the serving-path metrics beside the baselines, the training curve."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from offline.datasets import Dataset
from offline.evaluate import evaluate_model, item_counts
from offline.histories import user_histories
from offline.train_loop import (
    CTX,
    NEGATIVES,
    LossSetup,
    SoftTargets,
    TrainConfig,
    batch_loss,
    example_columns,
    fit_pipeline,
    loss_setup,
    make_optimizer,
    spec_model_config,
    train_model,
    training_examples,
)
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import ConfigError
from towers.model import ModelConfig, embed_items, embed_users
from towers.ranking import RankModel

# The names jobs import from here (the loop's live in offline.train_loop).
__all__ = ["CTX", "ENGINES", "NEGATIVES", "LossSetup", "SoftTargets", "TrainConfig", "batch_loss", "example_columns",
           "fit_pipeline", "history_json", "loss_setup", "make_optimizer", "spec_model_config", "train",
           "train_model", "training_examples"]

ENGINES = ("local", "ray")


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h.get("loss", float("nan")) for h in history], marker="o")
    ax[0].set(title="training loss (in-batch softmax, logQ)", xlabel="epoch")
    ax[1].plot(ep, [h.get("val_recall@20", float("nan")) for h in history], marker="o", color="tab:green")
    ax[1].set(title="validation Recall@20", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(
    *, dataset: Dataset, out: Path, dataset_spec: str | None = None, model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    index_type: str = "auto", progress: bool = True, soft_targets: SoftTargets | None = None,
    engine: str = "local", workers: int = 2,
) -> dict[str, Any]:
    """Train on ``dataset`` and write a verified bundle to ``out``; returns its manifest.

    Modes: ``index_type`` is any of ``towers.index.INDEX_TYPES`` (``auto`` picks
    exact search for small catalogs). The bundle's manifest carries the test and
    validation metrics (serving path) beside the popularity baseline. ``soft_targets``:
    distill from a teacher (``offline.distill``); the bundle is an ordinary one.
    ``engine``: ``local`` (this process) or ``ray`` (Ray Train, ``workers`` data-parallel
    workers: ``offline.ray_train``; its work files go beside ``out`` and are removed after).
    """
    if engine not in ENGINES:
        raise ConfigError("--engine", f"must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray" and soft_targets is not None:
        raise ConfigError("--engine", "distillation trains on the local engine")
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    t0 = time.perf_counter()
    ds = dataset
    out = Path(out)
    if engine == "ray":
        from offline.ray_train import train_model_ray

        model, fp, split, history = train_model_ray(ds, model_cfg=model_cfg, train_cfg=train_cfg, progress=progress,
                                                    work_dir=out.parent / f".{out.name}.ray", workers=workers)
    else:
        model, fp, split, history = train_model(ds, model_cfg=model_cfg, train_cfg=train_cfg, progress=progress,
                                                soft_targets=soft_targets)
    model_cfg = model.cfg  # as trained (the spec may have switched the id embeddings off)
    train_s = time.perf_counter() - t0
    item_emb = embed_items(model, fp)
    user_emb = embed_users(model, fp, user_histories(fp, split.train, model_cfg.history_len), item_emb=item_emb)
    index, spec, recall = faiss_index.build_with_recall(item_emb, index_type, seed=train_cfg.seed)
    popularity = np.argsort(-item_counts([split.train], fp), kind="stable").astype(np.int64)
    combiner = model.combiner.export()
    rm = RankModel(combiner=combiner, item_emb=item_emb, user_emb=user_emb, index=index, popularity=popularity)
    metrics = evaluate_model(rm, fp, split, max_session=model_cfg.max_session)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curve = out.parent / f".{out.name}.curve.png"
    _plot(history, curve)
    files: dict[str, Any] = {
        "features.json": fp.dumps(), "combiner.npz": combiner.arrays(), "towers.npz": model.state_arrays(),
        "item_embeddings.npy": item_emb, "user_embeddings.npy": user_emb, "popularity.npy": popularity,
        "index.faiss": faiss_index.to_bytes(index), "titles.json": ds.titles(),
        "history.json": history, "training_curve.png": curve.read_bytes(),
    }
    curve.unlink()
    manifest = {
        "dataset": dataset_spec or ds.name, "model_config": model_cfg.to_dict(), "train_config": asdict(train_cfg),
        "shapes": {"n_items": fp.n_items, "n_users": fp.n_users, "dim": model_cfg.dim},
        "index": {"spec": spec.to_dict(), "ann_recall@100": recall},
        "metrics": metrics, "train_seconds": round(train_s, 1), "epochs_run": len(history),
        "engine": engine, **({"ray_workers": workers} if engine == "ray" else {}),
    }
    if len(ds.interactions.timestamp):
        # The refresh gate never scores a model on what it trained on (offline.refresh.gate).
        manifest["trained_until"] = int(ds.interactions.timestamp.max()) + 1
    bundle_mod.write_bundle(out, files, manifest)
    if spec.quantized:  # the figure publish gates on: this index vs exact search, same bundle
        from offline.quantize import end_to_end

        e2e = end_to_end(bundle_mod.load(out), cache_dir=None, dataset=ds)
        bundle_mod.update_bundle(out, {}, {"quant": {"e2e": e2e}})  # same content, same version
    return bundle_mod.verify(out)


def history_json(path: Path) -> list[dict[str, float]]:
    data: list[dict[str, float]] = json.loads((path / "history.json").read_text())
    return data
