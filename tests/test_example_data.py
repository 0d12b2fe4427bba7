"""The worked example (``twotower example-data``): an e-commerce-shaped dataset and its spec.

It is deterministic by seed, its spec validates and declares every table, it loads through
``load_dataset`` in both event formats, it has the structure the README promises (coherent
baskets, device-dependent buying, repeat purchases), and a short training on a tiny instance
writes a bundle that beats popularity.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline.datasets import Dataset, load_dataset, temporal_split
from offline.evaluate import evaluate_bundle
from offline.example_data import write_example_data
from offline.train import TrainConfig, train
from towers.errors import ConfigError
from towers.model import ModelConfig
from towers.spec import load_spec
from twotower.cli import main

USERS, ITEMS = 500, 300  # tiny: a two-epoch training in seconds, yet enough to learn tastes


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    write_example_data(out, users=USERS, items=ITEMS, seed=0)
    return out


@pytest.fixture(scope="module")
def shop_ds(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(str(shop / "spec.yaml"), cache_dir=tmp_path_factory.mktemp("cache"))


def test_same_seed_writes_the_same_files_and_another_seed_other_data(tmp_path: Path) -> None:
    a, b, c = (write_example_data(tmp_path / name, users=40, items=60, seed=seed)
               for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    names = sorted(p.name for p in a.files)
    assert names == ["events.csv", "items.parquet", "spec.yaml", "users.csv"]
    for name in names:
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name
    assert (a.directory / "events.csv").read_bytes() != (c.directory / "events.csv").read_bytes()
    assert a.summary() == b.summary()


def test_the_spec_declares_every_table_kind_and_the_repeat_policy(shop: Path) -> None:
    spec = load_spec(shop / "spec.yaml")
    inter = spec.interactions
    assert (inter.path, inter.user, inter.item, inter.time, inter.group) == (
        "events.csv", "user_id", "item_id", "timestamp", "order_id")
    assert inter.event_type is not None and inter.event_type.positives == ["purchase"]
    assert {f.key: (f.kind, f.derive) for f in inter.context} == {
        "device": ("categorical", None), "hour": ("categorical", "hour_of_day")}
    assert spec.items is not None and spec.users is not None
    assert {f.column: f.kind for f in spec.items.features} == {
        "brand": "categorical", "category": "categorical", "price": "numeric", "title": "text",
        "tags": "multi_categorical"}
    assert spec.items.title == "title"
    assert {f.column: f.kind for f in spec.users.features} == {"country": "categorical", "age": "bucketized"}
    assert spec.policies.exclude_seen is False  # staples are bought again


def test_it_loads_through_load_dataset_with_every_column(shop_ds: Dataset) -> None:
    ds, report = shop_ds, shop_ds.report
    assert ds.name == "shop-example-s0"
    assert set(report["event_types_read"]) == {"view", "cart", "purchase"}
    assert report["event_types"] == {"purchase": len(ds.interactions) + report["dropped_min_interactions"]}
    assert report["dropped_not_positive_type"] > 0  # views and carts are in the log, not positives
    assert report["users_without_table_row"] == 0 and report["items_without_table_row"] == 0
    assert report["repeated_pairs"] > 0.1 * len(ds.interactions)  # staples come back
    inter = ds.interactions
    assert inter.group is not None and (inter.group != "").all()  # every purchase belongs to an order
    assert set(inter.context["device"]) == {"mobile", "desktop", "app"}
    # ISO times in the CSV, read as unix seconds in the generator's 120 days of 2024.
    assert inter.timestamp.min() >= 1_704_067_200 and inter.timestamp.max() < 1_704_067_200 + 121 * 86_400
    assert set(ds.items.columns) == {"brand", "category", "price", "title", "tags"}
    assert all(isinstance(t, list) for t in ds.items.columns["tags"])
    assert ds.item_titles[ds.items.ids[0]] == ds.items.column("title")[0]


def test_parquet_events_load_to_the_same_interactions(shop: Path, shop_ds: Dataset, tmp_path: Path) -> None:
    pq_dir = tmp_path / "pq"
    write_example_data(pq_dir, users=USERS, items=ITEMS, seed=0, events_format="parquet")
    assert not (pq_dir / "events.csv").exists()
    assert pa.types.is_timestamp(pq.read_schema(pq_dir / "events.parquet").field("timestamp").type)
    other = load_dataset(str(pq_dir / "spec.yaml"), cache_dir=tmp_path)
    a, b = shop_ds.interactions, other.interactions
    for name in ("user", "item", "timestamp", "group"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert list(a.context["device"]) == list(b.context["device"])


def test_baskets_are_coherent_and_the_device_shifts_what_is_bought(shop_ds: Dataset) -> None:
    inter = shop_ds.interactions
    category = dict(zip(shop_ds.items.ids.tolist(), shop_ds.items.column("category"), strict=True))
    cats = np.array([category[i] for i in inter.item.tolist()])
    assert inter.group is not None
    same, pairs = 0, 0
    for order in np.unique(inter.group):
        c = cats[inter.group == order]
        same += sum(int(a == b) for k, a in enumerate(c) for b in c[k + 1:])
        pairs += len(c) * (len(c) - 1) // 2
    share = Counter(cats.tolist())
    chance = sum((n / len(cats)) ** 2 for n in share.values())
    assert same / pairs > 2 * chance  # two items of one basket share a category far beyond chance
    device = np.asarray(inter.context["device"])
    bulky = np.isin(cats, ["household", "pet", "baby"])
    assert bulky[device == "desktop"].mean() > 1.5 * bulky[device == "mobile"].mean()


def test_tiny_training_writes_a_bundle_that_beats_popularity(shop_ds: Dataset, tmp_path: Path) -> None:
    # Small towers and a high learning rate, so that two short epochs learn the taste structure.
    cfg = ModelConfig(dim=16, id_dim=16, side_dim=4, hidden=32, history_len=10)
    man = train(dataset=shop_ds, out=tmp_path / "bundle", model_cfg=cfg,
                train_cfg=TrainConfig(epochs=2, batch_size=128, lr=0.01, threads=1), progress=False)
    assert man["shapes"]["n_items"] == len(shop_ds.items)
    m = evaluate_bundle(tmp_path / "bundle", cache_dir=tmp_path, dataset=shop_ds)  # the serving path
    assert m["protocol"] == "repeat_aware" and m["users"] == len(temporal_split(shop_ds.interactions).test)
    pop = m["popularity"]
    assert m["recall@20"] > 1.3 * pop["recall@20"] and m["ndcg@10"] > 1.3 * pop["ndcg@10"], (m, pop)


def test_cli_writes_the_dataset_and_refuses_a_tiny_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["example-data", "--out", str(tmp_path / "d"), "--users", "20", "--items", "30"]) == 0
    out = capsys.readouterr().out
    assert "20 users" in out and f"twotower train --dataset {tmp_path / 'd' / 'spec.yaml'}" in out
    assert load_spec(tmp_path / "d" / "spec.yaml").policies.exclude_seen is False
    assert main(["example-data", "--out", str(tmp_path / "e"), "--users", "5"]) == 2
    assert "--users: at least 10 users" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # nothing written
    with pytest.raises(ConfigError, match="--events-format"):
        write_example_data(tmp_path / "f", users=20, items=30, events_format="xlsx")
