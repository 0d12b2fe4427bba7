"""``twotower train --engine ray``: the towers trained on Ray Train, data-parallel.

The driver splits the log, fits the feature pipeline and builds the training examples
exactly as the local engine does (``offline.train_loop.example_columns``), then writes them as
Parquet shards in a work directory, in one seeded random order. A ``TorchTrainer`` starts
``workers`` processes (DDP over gloo, CPU); Ray Data reads the shards, and each worker
iterates its own shard (``ray.train.get_dataset_shard``: an equal split, so every worker
takes the same number of steps and no all-reduce waits for a worker that has finished).
Every batch's loss is ``offline.train_loop.batch_loss``, the local engine's function: the model
and the loss are the same, only the data parallelism differs.

What differs, and why it is small:
- batch size is per worker: each worker's in-batch softmax has ``batch_size`` candidates,
  as locally, and DDP averages the workers' gradients, so a step sees ``workers x
  batch_size`` examples and an epoch has ``1/workers`` of the local engine's steps;
- order: the shards are written in a random permutation; each epoch Ray Data reads the
  blocks in a new random order and mixes rows in a local shuffle buffer (a full shuffle
  per epoch would move the whole example table through the object store every epoch).

Validation (Recall@20, exact scoring, the local engine's ``_validate``) runs on the rank-0
worker after each epoch, the others waiting at a broadcast of the result; early stopping
follows it on every worker alike. Rank 0 keeps the best weights and reports them once, at
the end, as a Ray Train checkpoint (``towers.npz`` + ``history.json``); the driver loads
them into ordinary towers, and ``offline.train.train`` writes an ordinary bundle.

Ray is imported only inside these functions (the ``[ray]`` extra: ``ray[data]`` carries Ray
Train's TorchTrainer). :func:`offline.ray_engine.local_ray` starts a local Ray on loopback; a
Ray already running (``ray.init`` by the caller, e.g. a cluster) is used as it is, and then
``work_dir`` must be storage every node can reach.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from offline.train_loop import LossSetup, batch_loss

if TYPE_CHECKING:
    from offline.datasets import Dataset, Split
    from offline.train_loop import TrainConfig
    from towers.features import FeaturePipeline
    from towers.model import ModelConfig, TwoTower

# Rows per Parquet shard of the examples: small enough that randomizing the block order
# shuffles, big enough that a read task is not mostly overhead.
SHARD_ROWS = 8192
# Rows a worker's local shuffle buffer mixes, in batches.
SHUFFLE_BATCHES = 8


def write_examples(out: Path, columns: dict[str, np.ndarray], *, seed: int, shard_rows: int = SHARD_ROWS) -> int:
    """``columns`` (``example_columns``: each E rows, 1-d or 2-d) as Parquet shards in one
    seeded random row order, with ``idx`` (the example's index) added; 2-d columns become
    fixed-size lists (Ray hands them to torch as (B, n) tensors). Returns the shard count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(columns["user"])
    order = np.random.default_rng(seed).permutation(n)
    out.mkdir(parents=True, exist_ok=True)
    shards = 0
    for shards, lo in enumerate(range(0, n, shard_rows), start=1):
        rows = order[lo:lo + shard_rows]
        cols: dict[str, pa.Array] = {"idx": pa.array(rows.astype(np.int64))}
        for name, v in columns.items():
            part = np.ascontiguousarray(v[rows])
            if part.ndim == 2:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), part.shape[1])
            elif part.ndim == 1:
                cols[name] = pa.array(part)
            else:
                raise ValueError(f"example column {name!r}: {part.ndim}-d arrays are not written")
        pq.write_table(pa.table(cols), out / f"part-{shards - 1:06d}.parquet")
    return shards


class _BatchLoss(nn.Module):
    """The module DDP wraps: its forward is ``batch_loss``, so the towers run inside DDP's
    forward and their gradients are all-reduced in backward (calling the towers directly
    would bypass DDP)."""

    def __init__(self, model: TwoTower, setup: LossSetup) -> None:
        super().__init__()
        self.model = model
        self.setup = setup

    def forward(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        return batch_loss(self.model, self.setup, batch, gen)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the local engine's epoch loop over this worker's shard."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from offline.train_loop import TrainConfig, _validate, loss_setup, make_optimizer
    from towers.features import FeaturePipeline
    from towers.model import ModelConfig, TwoTower

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model_cfg = ModelConfig.from_dict(config["model_config"])
    train_cfg = TrainConfig(**config["train_config"])
    split: Split = config["split"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(train_cfg.seed)  # the local engine's initial weights (DDP then copies rank 0's)
    fp = FeaturePipeline.loads(config["features"])
    model = TwoTower(model_cfg, fp)
    if config["init"] is not None:
        model.load_arrays(config["init"])
    setup = loss_setup(model_cfg, train_cfg, fp, split)
    # Parameters a batch may not reach (e.g. a context layer's missing-value row) must not
    # stall DDP's reducer, so it looks for unused ones each step (a cheap graph walk).
    net = ray.train.torch.prepare_model(_BatchLoss(model, setup), move_to_device=False,
                                        parallel_strategy_kwargs={"find_unused_parameters": True})
    torch.manual_seed(train_cfg.seed + 7919 * rank)  # dropout masks differ between workers
    gen = torch.Generator().manual_seed(train_cfg.seed + 7919 * rank)
    opt = make_optimizer(net.parameters(), train_cfg)
    shard = ray.train.get_dataset_shard("train")
    history: list[dict[str, float]] = []
    best, bad = -1.0, 0
    best_state = model.state_arrays() if rank == 0 else None
    for epoch in range(1, train_cfg.epochs + 1):
        net.train()
        total, batches = 0.0, 0
        t_epoch = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=train_cfg.batch_size,
                                              local_shuffle_buffer_size=SHUFFLE_BATCHES * train_cfg.batch_size,
                                              local_shuffle_seed=train_cfg.seed * 100_003 + epoch * 101 + rank):
            if train_cfg.max_steps is not None and batches >= train_cfg.max_steps:
                break  # every worker at the same step: their shards are equal
            loss = net(batch, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        sums = torch.tensor([total, batches], dtype=torch.float64)
        dist.all_reduce(sums)
        entry: dict[str, float] = {"epoch": epoch, "loss": float(sums[0] / max(float(sums[1]), 1.0)),
                                   "train_s": round(time.perf_counter() - t_epoch, 3),
                                   "steps": int(sums[1]) // ctx.get_world_size()}
        if train_cfg.validate:
            val = torch.zeros(1, dtype=torch.float64)
            if rank == 0:
                val[0] = _validate(model, fp, split, model_cfg)
            dist.broadcast(val, 0)
            entry["val_recall@20"] = float(val[0])
        history.append(entry)
        if not train_cfg.validate or entry["val_recall@20"] > best:  # without validation: the last epoch
            best, bad = entry.get("val_recall@20", best), 0
            if rank == 0:
                best_state = model.state_arrays()
        else:
            bad += 1
        stop = bad >= train_cfg.patience or epoch == train_cfg.epochs
        if not stop:
            ray.train.report(entry)
            continue
        if rank != 0:
            ray.train.report(entry)
            break
        with tempfile.TemporaryDirectory() as d:
            assert best_state is not None
            np.savez(Path(d) / "towers.npz", **best_state)  # type: ignore[arg-type]
            (Path(d) / "history.json").write_text(json.dumps(history))
            ray.train.report(entry, checkpoint=ray.train.Checkpoint.from_directory(d))
        break


def train_model_ray(ds: Dataset, *, model_cfg: ModelConfig, train_cfg: TrainConfig, work_dir: Path,
                    workers: int = 2, progress: bool = True, split: Split | None = None,
                    fp: FeaturePipeline | None = None,
                    init: dict[str, np.ndarray] | None = None) -> tuple[TwoTower, FeaturePipeline, Split,
                                                                       list[dict[str, float]]]:
    """``offline.train_loop.train_model`` on Ray Train with ``workers`` data-parallel workers: the
    same arguments (no distillation) and the same result, the best towers by validation
    Recall@20. ``work_dir``: where the example shards, Ray Train's results and, when Ray is
    started here, its temp dir go (removed after)."""
    from offline.datasets import temporal_split
    from offline.ray_engine import local_ray
    from offline.train_loop import example_columns, fit_pipeline, spec_model_config
    from towers.errors import ConfigError
    from towers.model import TwoTower

    if workers < 1:
        raise ConfigError("--workers", f"must be >= 1, not {workers}")
    model_cfg = spec_model_config(ds, model_cfg)
    split = split or temporal_split(ds.interactions)
    fp = fp or fit_pipeline(ds, split.train)
    run = Path(work_dir) / f"ray-train-{uuid.uuid4().hex[:8]}"
    try:
        write_examples(run / "examples", example_columns(split, fp, model_cfg), seed=train_cfg.seed)
        config = {"model_config": model_cfg.to_dict(), "train_config": asdict(train_cfg), "features": fp.dumps(),
                  "split": split, "init": init, "threads": max(1, train_cfg.threads // workers)}
        with local_ray(run, num_cpus=workers + 1):  # + 1: Ray Data's read tasks beside the workers
            arrays, history = _fit(run, config, workers, progress=progress)
    finally:
        shutil.rmtree(run, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(work_dir).rmdir()  # when nothing else is in it (train()'s own work dir)
    model = TwoTower(model_cfg, fp)
    model.load_arrays(arrays)
    model.eval()
    return model, fp, split, history


def _fit(run: Path, config: dict[str, Any], workers: int, *,
         progress: bool) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from towers.errors import ConfigError

    del progress  # Ray's own progress output stays off: off a terminal it is a log line a second
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus < workers:  # Ray Train would wait for them forever
        raise ConfigError("--workers", f"{workers} workers need a CPU each; the running Ray has {cpus:g}")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Read once into the object store: each epoch then only re-orders and splits those blocks
    # (a fresh read per epoch costs seconds of task start-up for every epoch).
    data = ray.data.read_parquet(str(run / "examples"),
                                 override_num_blocks=len(list((run / "examples").iterdir()))).materialize()
    trainer = TorchTrainer(
        _worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
        datasets={"train": data.randomize_block_order()},
        run_config=ray.train.RunConfig(name="train", storage_path=str((run / "results").resolve())))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"ray train: the run ended without the best weights ({result.error or 'no error'})")
    with result.checkpoint.as_directory() as d:
        with np.load(Path(d) / "towers.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        history = json.loads((Path(d) / "history.json").read_text())
    return arrays, history
