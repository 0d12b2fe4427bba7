"""Loaders, the synthetic generator and the temporal split (DESIGN §6)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from offline.datasets import Dataset, load_dataset, load_grouplens, synthetic_dataset, temporal_split
from towers.errors import DataError


def test_ml100k_from_the_recbole_wheel(ml100k: Dataset) -> None:
    assert len(ml100k.interactions) == 100_000
    assert len(set(ml100k.interactions.user.tolist())) == 943
    assert len(set(ml100k.interactions.item.tolist())) == 1682
    assert len(ml100k.users) == 943 and len(ml100k.items) == 1682
    titles = ml100k.titles()
    assert titles["1"] == "Toy Story"
    i = ml100k.items.ids.tolist().index("1")
    assert ml100k.items.column("class")[i] == "Animation Children's Comedy"
    assert ml100k.items.column("release_year")[i] == 1995
    u = ml100k.users.ids.tolist().index("1")
    us = ml100k.users
    assert (us.column("age")[u], us.column("gender")[u], us.column("occupation")[u]) == (24, "M", "technician")
    # The shipped spec: the kinds today's towers were tuned with.
    kinds = {f.column: f.kind for f in ml100k.spec.features("user") + ml100k.spec.features("item")}
    assert kinds == {"age": "bucketized", "gender": "categorical", "occupation": "categorical",
                     "zip_code": "categorical", "release_year": "bucketized", "class": "multi_categorical",
                     "movie_title": "text"}
    assert ml100k.spec.policies.exclude_seen


def _write_grouplens(d: Path) -> None:
    d.mkdir()
    (d / "u.data").write_text("1\t10\t4\t100\n1\t11\t3\t200\n2\t10\t5\t150\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    f1 = flags.copy()
    f1[3] = f1[5] = "1"
    (d / "u.item").write_text(
        "10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(f1) + "\n"
        "11|Unknown Film|||http://y|" + "|".join(flags) + "\n")


def test_grouplens_layout(tmp_path: Path) -> None:
    _write_grouplens(tmp_path / "ml")
    ds = load_grouplens(tmp_path / "ml")
    assert ds.interactions.user.tolist() == ["1", "1", "2"]
    assert ds.interactions.timestamp.tolist() == [100, 200, 150]
    assert ds.titles()["10"] == "Toy Story"
    assert ds.items.column("class")[0] == ["Animation", "Comedy"]
    assert ds.items.column("release_year")[0] == 1995 and np.isnan(ds.items.column("release_year")[1])
    assert load_dataset(str(tmp_path / "ml"), cache_dir=tmp_path).name == "ml"


def test_parse_error_names_file_and_line(tmp_path: Path) -> None:
    _write_grouplens(tmp_path / "ml")
    (tmp_path / "ml" / "u.data").write_text("1\t10\t4\t100\n1\t11\tbad\t200\n")
    with pytest.raises(DataError, match=r"u\.data:2: rating is not a number"):
        load_grouplens(tmp_path / "ml")
    (tmp_path / "ml" / "u.user").unlink()
    (tmp_path / "ml" / "u.data").write_text("1\t10\t4\t100\n")
    with pytest.raises(DataError, match=r"u\.user: cannot read"):
        load_grouplens(tmp_path / "ml")


def test_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not 'ml-100k'"):
        load_dataset("nope", cache_dir=tmp_path)


def test_split_is_temporal_leave_last_out_with_crc_ties(ml100k: Dataset) -> None:
    inter = ml100k.interactions
    split = temporal_split(inter)
    assert len(split.train) + len(split.valid) + len(split.test) == len(inter)
    assert len(split.test) == len(split.valid) == 943
    # Reference: per user, sort by (timestamp, crc32("user:item")) in plain Python.
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for u, i, t in zip(inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist(), strict=True):
        by_user.setdefault(u, []).append((t, zlib.crc32(f"{u}:{i}".encode()), i))
    test = dict(zip(split.test.user.tolist(), split.test.item.tolist(), strict=True))
    valid = dict(zip(split.valid.user.tolist(), split.valid.item.tolist(), strict=True))
    ties = 0
    for u, rows in by_user.items():
        rows.sort()
        assert test[u] == rows[-1][2] and valid[u] == rows[-2][2]
        ties += rows[-1][0] == rows[-2][0]
    assert ties > 300  # the tie rule matters: ~44% of users rate their last two in the same second
    # train is grouped by user and time-ordered within each user
    tr_u, tr_t = split.train.user, split.train.timestamp
    same = tr_u[1:] == tr_u[:-1]
    assert np.all(tr_t[1:][same] >= tr_t[:-1][same])


def test_synthetic_is_deterministic_clustered_and_power_law() -> None:
    a = synthetic_dataset(n_users=2000, n_items=5000, seed=3)
    b = synthetic_dataset(n_users=2000, n_items=5000, seed=3)
    c = synthetic_dataset(n_users=2000, n_items=5000, seed=4)
    assert np.array_equal(a.interactions.item, b.interactions.item)
    assert not np.array_equal(a.interactions.item, c.interactions.item)
    counts = np.sort(np.unique(a.interactions.item, return_counts=True)[1])[::-1]
    assert counts[: len(counts) // 100].sum() > 0.1 * counts.sum()  # top 1% of items hold >10% of interactions
    split = temporal_split(a.interactions)
    assert len(split.test) == 2000
