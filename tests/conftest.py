from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.procs import RedisProcess
from offline.datasets import Dataset, load_dataset
from towers.cliargs import default_data_dir


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


@pytest.fixture
def redis_proc(tmp_path: Path):  # type: ignore[no-untyped-def]
    import shutil

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make setup installs it)")
    r = RedisProcess(tmp_path)
    yield r
    r.kill()


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path, data_dir: Path) -> Path:
    """The trained bundle with batch recs, published to a registry."""
    import shutil

    from offline.batch_score import batch_score_bundle, seen_rows
    from towers import registry

    b = tmp_path_factory.mktemp("served") / "bundle"
    shutil.copytree(trained_bundle, b)
    batch_score_bundle(b, k=100, seen=seen_rows(b, cache_dir=data_dir), progress=False)
    reg = tmp_path_factory.mktemp("registry")
    registry.publish(b, reg)
    return reg
