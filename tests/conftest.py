from __future__ import annotations

import os
from pathlib import Path

import pytest

from offline.datasets import Dataset, load_dataset
from towers.cli import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_DATA_DIR") or default_data_dir())


@pytest.fixture(scope="session")
def ml100k(data_dir: Path) -> Dataset:
    return load_dataset("ml-100k", cache_dir=data_dir)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, ml100k: Dataset) -> Path:
    """A short real training run on ML-100k (a few epochs), shared by the suite."""
    from offline.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "bundle"
    train(dataset=ml100k, dataset_spec="ml-100k", out=out, train_cfg=TrainConfig(epochs=3, patience=3),
          progress=False)
    return out


@pytest.fixture(scope="session")
def synth_bundle_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from offline.synth import make_synthetic_bundle

    def make(seed: int = 0, n_items: int = 3000, n_users: int = 400, index: str = "flat") -> Path:
        out = tmp_path_factory.mktemp(f"synth{seed}") / "bundle"
        make_synthetic_bundle(out, n_items=n_items, n_users=n_users, dim=32, seed=seed, index_type=index,
                              progress=False)
        return out

    return make


@pytest.fixture
def synth_bundle(synth_bundle_factory, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    import shutil

    src = synth_bundle_factory()
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst
