"""``twotower train --engine ray`` (offline/ray_train.py): Ray Train's TorchTrainer, data-parallel
workers (DDP over gloo, CPU) fed by Ray Data from Parquet, train the local engine's model on the
local engine's loss and the result is an ordinary bundle. One training run on a local 2-worker
cluster on loopback, on a tiny e-commerce-shaped log whose context features travel through the
Parquet examples; skipped without the [ray] extra."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.train_scale import generate
from offline.datasets import Dataset, load_dataset, temporal_split
from offline.ray_train import write_examples
from offline.train import CTX, SoftTargets, TrainConfig, train
from towers import bundle as bundle_mod
from towers.errors import ConfigError
from towers.model import ModelConfig, TwoTower, embed_items, model_from_arrays

SMALL = ModelConfig(dim=16, id_dim=16, side_dim=4, hidden=32, history_len=4, history_staleness=1, max_session=4)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """~150 users, 300 items: every feature kind, a device column and the derived hour as context."""
    d = tmp_path_factory.mktemp("shop")
    generate(d, n_rows=3000, n_items=300, seed=1)
    return load_dataset(str(d / "spec.yaml"), cache_dir=d)


def test_examples_are_written_in_a_seeded_permutation_with_every_column_intact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cols: dict[str, np.ndarray] = {
        "user": np.arange(10, dtype=np.int64), "target": rng.integers(0, 50, 10),
        "hist": rng.integers(-1, 50, (10, 3)), CTX + "hour": rng.integers(0, 24, 10),
        CTX + "price": rng.random((10, 2)).astype(np.float32)}
    assert write_examples(tmp_path / "a", cols, seed=3, shard_rows=4) == 3
    t = pq.read_table(tmp_path / "a")
    idx = t.column("idx").to_numpy()
    assert sorted(idx.tolist()) == list(range(10)) and idx.tolist() != list(range(10))
    for name, v in cols.items():
        got = np.asarray(t.column(name).to_pylist())
        np.testing.assert_array_equal(got, v[idx], err_msg=name)
    write_examples(tmp_path / "b", cols, seed=3, shard_rows=4)
    assert pq.read_table(tmp_path / "b").column("idx").to_numpy().tolist() == idx.tolist()  # the seed fixes it


def test_an_unknown_engine_and_distillation_on_ray_are_refused_before_training(tmp_path: Path, shop: Dataset) -> None:
    with pytest.raises(ConfigError, match="--engine"):
        train(dataset=shop, out=tmp_path / "b", engine="spark", progress=False)
    teacher = SoftTargets(teacher=lambda idx, cands: np.zeros((len(idx), len(cands))))  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match=r"--engine.*distillation"):
        train(dataset=shop, out=tmp_path / "b", engine="ray", soft_targets=teacher, progress=False)
    assert not (tmp_path / "b").exists()


def test_the_cli_passes_engine_and_workers_to_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import offline.train
    from twotower.cli import main

    seen: dict[str, Any] = {}

    def fake_train(**kw: Any) -> dict[str, Any]:
        seen.update(kw)
        return {"metrics": {"recall@20": 0.5}}

    monkeypatch.setattr(offline.train, "train", fake_train)
    assert main(["train", "--dataset", "synthetic:30x20", "--out", str(tmp_path / "b"), "--engine", "ray",
                 "--workers", "3", "--json"]) == 0
    assert (seen["engine"], seen["workers"]) == ("ray", 3)
    assert json.loads(capsys.readouterr().out) == {"recall@20": 0.5}
    seen.clear()
    assert main(["train", "--dataset", "synthetic:30x20", "--out", str(tmp_path / "b"), "--json"]) == 0
    assert seen["engine"] == "local"  # the default


@pytest.mark.slow
def test_two_workers_on_loopback_train_a_bundle_that_loads(tmp_path: Path, shop: Dataset) -> None:
    ray = pytest.importorskip("ray")
    from offline.ray_engine import local_ray

    out = tmp_path / "bundle"
    batch, epochs = 64, 2
    # The cluster is started here so the test can look at it; train() uses a running Ray as it is.
    with local_ray(tmp_path, num_cpus=3):
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # loopback only
        man = train(dataset=shop, out=out, model_cfg=SMALL, engine="ray", workers=2, progress=False,
                    train_cfg=TrainConfig(epochs=epochs, batch_size=batch, patience=epochs, seed=5))
    b = bundle_mod.load(out)
    assert bundle_mod.verify(out)["version"] == b.version == man["version"]
    assert (man["engine"], man["ray_workers"], man["epochs_run"]) == ("ray", 2, epochs)
    assert math.isfinite(man["metrics"]["recall@20"])
    history = json.loads((out / "history.json").read_text())
    # Data-parallel: each worker stepped through its own half of the examples (an equal split).
    examples = len(temporal_split(shop.interactions).train)
    assert [h["steps"] for h in history] == [math.ceil((examples // 2) / batch)] * epochs
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(0.0 <= h["val_recall@20"] <= 1.0 for h in history)
    # The bundle's towers are the trained weights: they give its item embeddings back, and they
    # moved away from the initial weights (the context layers too: the examples carried context).
    cfg = ModelConfig.from_dict(man["model_config"])
    with np.load(out / "towers.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    model = model_from_arrays(cfg, b.features, arrays)
    np.testing.assert_allclose(embed_items(model, b.features), b.item_emb, atol=1e-5)
    import torch

    torch.manual_seed(5)
    init = TwoTower(cfg, b.features).state_arrays()
    ctx_keys = [k for k in init if "context" in k or "ctx" in k]
    assert ctx_keys, sorted(init)  # the spec's device and hour reached the model
    moved = [k for k in init if not np.array_equal(init[k], arrays[k])]
    assert set(ctx_keys) & set(moved)
    assert len(moved) > len(init) // 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []  # work files removed
