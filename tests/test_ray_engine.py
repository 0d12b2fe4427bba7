"""``--engine ray`` (offline/ray_engine.py): user embedding and batch scoring on Ray Data give
exactly the local engine's numbers, alone and inside a whole refresh. One local Ray (loopback,
2 CPUs) for the module; skipped without the [ray] extra."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_refresh as tr

from offline.datasets import Dataset
from offline.refresh import RefreshConfig, refresh
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.errors import ConfigError


@pytest.fixture(scope="module")
def ray_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    pytest.importorskip("ray")
    from offline.ray_engine import local_ray

    work = tmp_path_factory.mktemp("ray")
    with local_ray(work, num_cpus=2):
        yield work


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ml100k: Dataset) -> tr.World:
    return tr.World(tmp_path_factory.mktemp("ray-world"), ml100k)


@pytest.fixture(scope="module")
def base(world: tr.World) -> bundle_mod.Bundle:
    return bundle_mod.load(world.bundle)


def _towers(b: bundle_mod.Bundle) -> Any:
    from towers.model import ModelConfig, model_from_arrays

    cfg = ModelConfig.from_dict(b.manifest["model_config"])
    with np.load(b.path / "towers.npz", allow_pickle=False) as z:
        return model_from_arrays(cfg, b.features, {k: z[k] for k in z.files})


@pytest.mark.slow
def test_embed_users_ray_equals_the_local_engine(ray_dir: Path, world: tr.World, base: bundle_mod.Bundle) -> None:
    from offline.histories import user_histories
    from offline.ray_engine import embed_users_ray
    from towers.model import embed_items, embed_users

    fp, model = base.features, _towers(base)
    hist = user_histories(fp, world.after, model.cfg.history_len)
    item_emb = embed_items(model, fp)
    rng = np.random.default_rng(0)
    rows = rng.permutation(fp.n_users)[: fp.n_users - 7]  # any order, a last chunk that is not full
    local = embed_users(model, fp, hist[rows], rows=rows, item_emb=item_emb, batch=64)
    got = embed_users_ray(model, fp, hist[rows], rows=rows, item_emb=item_emb, batch=64, work_dir=ray_dir)
    assert got.dtype == np.float32 and got.shape == local.shape
    np.testing.assert_array_equal(got, local)
    # Defaults: every user, no history given, item embeddings computed.
    np.testing.assert_array_equal(embed_users_ray(model, fp, work_dir=ray_dir), embed_users(model, fp))
    assert not list(ray_dir.glob("embed-*"))  # the shards are cleaned up


@pytest.mark.slow
def test_batch_topk_ray_equals_the_local_engine(ray_dir: Path, world: tr.World, base: bundle_mod.Bundle) -> None:
    from offline.batch_score import batch_topk
    from offline.ray_engine import batch_topk_ray
    from towers import index as faiss_index
    from towers.ranking import RankModel

    model = RankModel.from_bundle(base)
    fp = base.features
    seen: list[list[int]] = [[] for _ in range(fp.n_users)]
    for u, i in zip(fp.user_vocab.positions(world.after.user).tolist(),
                    fp.item_vocab.positions(world.after.item).tolist(), strict=True):
        if u >= 0 and i >= 0:
            seen[u].append(i)
    ivf = faiss_index.build(np.asarray(base.item_emb), faiss_index.IndexSpec("ivf", nlist=16, nprobe=3))
    for m in (model, replace(model, index=ivf)):  # an IVF index keeps its nprobe on the workers
        local = batch_topk(m, k=20, seen=seen, chunk=50, progress=False)
        got = batch_topk_ray(m, k=20, seen=seen, chunk=50, work_dir=ray_dir)
        for g, want in zip(got, local, strict=True):
            assert g.dtype == want.dtype
            np.testing.assert_array_equal(g, want)


@pytest.mark.slow
def test_a_ray_refresh_publishes_what_a_local_refresh_publishes(ray_dir: Path, tmp_path: Path, world: tr.World,
                                                                redis_proc: Any) -> None:
    published = {}
    for engine in ("local", "ray"):
        s = tr.Setup(tmp_path / engine, world, redis_proc.url, engine)
        s.send(world.events)
        report = refresh(replace(s.cfg, engine=engine), progress=False, log=lambda _m: None)
        steps = {st["name"]: st["result"] for st in report["steps"]}
        assert steps["publish"]["published"], steps["evaluate"]["why"]
        assert steps["candidate"]["users_embedded"] > 0
        cur = str(registry_mod.current_version(s.registry))
        published[engine] = (bundle_mod.load(s.registry / cur), s.state()["values"])
    (b_local, redis_local), (b_ray, redis_ray) = published["local"], published["ray"]
    np.testing.assert_array_equal(np.asarray(b_ray.user_emb), np.asarray(b_local.user_emb))
    for name in ("recs_items.npy", "recs_scores.npy", "item_embeddings.npy"):
        np.testing.assert_array_equal(np.load(b_ray.path / name), np.load(b_local.path / name))
    assert redis_ray == redis_local and redis_ray  # the user embeddings the servers read


def test_the_ray_engine_without_ray_installed_is_a_clear_config_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_ray(name: str, *args: Any) -> Any:
        return None if name == "ray" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_ray)
    cfg = dict(registry=tmp_path, redis_url="redis://127.0.0.1:1/0", run_root=tmp_path, store_root=tmp_path,
               data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"--engine.*\[ray\] extra"):
        RefreshConfig(**cfg, engine="ray")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--engine"):
        RefreshConfig(**cfg, engine="spark")  # type: ignore[arg-type]
    assert RefreshConfig(**cfg).engine == "local"  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_local_ray_keeps_to_loopback(ray_dir: Path) -> None:
    import ray

    # ray was imported (importorskip) before local_ray set its variables: it still uses loopback.
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
