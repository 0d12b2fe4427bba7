"""Loading a dataset spec (offline.loading, offline.tables): every table format, every
interactions column the spec can declare, RecBole atomic files, the load report, bad
input (an error naming the file, the column and the first offending row; nothing
written), and the no-skew invariant: the bundle's fitted features are the ones served."""

from __future__ import annotations

import gzip
import importlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tomllib
import yaml

from offline.datasets import Dataset, load_dataset, temporal_split
from offline.loading import min_count_filter
from offline.train import fit_pipeline
from towers.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def events(n: int = 40, seed: int = 0) -> pa.Table:
    """A small event log: 5 users, 8 items, every kind of interactions column."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "user_id": [f"u{k % 5}" for k in range(n)],
        "item_id": [f"{rng.integers(0, 8):03d}" for _ in range(n)],  # "007": the zeros are part of the id
        "ts": [T0 + 60 * k for k in range(n)],
        "event": [("view", "cart", "buy")[k % 3] for k in range(n)],
        "stars": [float(1 + k % 5) for k in range(n)],
        "order_id": [f"o{k // 4}" for k in range(n)],
        "device": [("ios", "web")[k % 2] for k in range(n)],
    })


def write_spec(d: Path, doc: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = d / name
    path.write_text(yaml.safe_dump({"name": "shop", **doc}, sort_keys=False))
    return path


def load(spec: Path) -> Dataset:
    return load_dataset(str(spec), cache_dir=spec.parent / "cache")


INTER = {"user": "user_id", "item": "item_id", "time": "ts"}


# --------------------------------------------------------------------------- formats


def test_parquet_file_and_directory_of_shards_read_the_same_rows(tmp_path: Path) -> None:
    t = events(40)
    pq.write_table(t, tmp_path / "one.parquet", row_group_size=7)  # several row groups
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, lo in enumerate(range(0, 40, 15)):
        pq.write_table(t.slice(lo, 15), shards / f"part-{k:05d}.parquet", row_group_size=4)
    (shards / "_SUCCESS").write_text("")  # a Spark marker is not a shard
    (shards / ".part-00000.parquet.crc").write_text("x")
    one = load(write_spec(tmp_path, {"interactions": {"path": "one.parquet", **INTER}}, "one.yaml"))
    many = load(write_spec(tmp_path, {"interactions": {"path": "shards", **INTER}}, "many.yaml"))
    for ds in (one, many):
        assert ds.interactions.user.tolist() == t.column("user_id").to_pylist()
        assert ds.interactions.item.tolist() == t.column("item_id").to_pylist()
        assert ds.interactions.timestamp.tolist() == t.column("ts").to_pylist()
        assert ds.report["rows_read"] == 40


def test_a_bad_value_in_a_shard_is_named_by_the_shard_and_its_row(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    t = events(20).set_column(2, "ts", pa.array([str(T0 + k) for k in range(20)]))
    pq.write_table(t.slice(0, 10), shards / "a.parquet")
    bad = t.slice(10, 10).to_pylist()
    bad[4]["ts"] = "yesterday"
    pq.write_table(pa.Table.from_pylist(bad), shards / "b.parquet")
    with pytest.raises(DataError, match=r"shards/b\.parquet: column 'ts' row 5: 'yesterday' is not a number "
                                        r"\(unix seconds; set interactions\.time_format"):
        load(write_spec(tmp_path, {"interactions": {"path": "shards", **INTER}}))


def test_csv_with_a_separator_keeps_string_ids(tmp_path: Path) -> None:
    pacsv.write_csv(events(12), tmp_path / "events.csv", pacsv.WriteOptions(delimiter=";"))
    items = pa.table({"item_id": [f"{k:03d}" for k in range(8)], "zip": ["02139", "10001"] * 4})
    pacsv.write_csv(items, tmp_path / "items.csv")
    ds = load(write_spec(tmp_path, {"interactions": {"path": "events.csv", "sep": ";", **INTER},
                                    "items": {"path": "items.csv", "features": [
                                        {"column": "zip", "kind": "categorical", "prefix": 3}]}}))
    assert set(ds.interactions.item.tolist()) <= {f"{k:03d}" for k in range(8)}  # "007", not 7
    assert ds.items.column("zip")[:2] == ["02139", "10001"]
    assert ds.report["items_without_table_row"] == 0


def test_compressed_csv(tmp_path: Path) -> None:
    buf = pa.BufferOutputStream()
    pacsv.write_csv(events(10), buf)
    (tmp_path / "events.csv.gz").write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
    ds = load(write_spec(tmp_path, {"interactions": {"path": "events.csv.gz", **INTER}}))
    assert len(ds.interactions) == 10


def test_json_lines_with_a_list_column(tmp_path: Path) -> None:
    rows = events(12).to_pylist()
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"item_id": f"{k:03d}", "tags": ["red", "sale"][: k % 3], "price": 10.0 + k}) + "\n"
        for k in range(8)))
    ds = load(write_spec(tmp_path, {"interactions": {"path": "events.jsonl", **INTER},
                                    "items": {"path": "items.jsonl", "features": [
                                        {"column": "tags", "kind": "multi_categorical"},
                                        {"column": "price", "kind": "numeric"}]}}))
    assert len(ds.interactions) == 12
    assert ds.items.column("tags")[:3] == [[], ["red"], ["red", "sale"]]
    fp = fit_pipeline(ds)
    f = fp.item_features(["001", "002"])
    vocab = {e.name: e for e in fp.item_encoders}["tags"].vocab
    assert vocab is not None and vocab.values == ["red", "sale"]
    assert f["tags"].tolist()[1][:3] == [1, 2, 0]
    pq.write_table(pa.table({"item_id": ["a", "b"], "tags": [["x", "y"], ["y", "z"]]}), tmp_path / "same.parquet")
    same = load(write_spec(tmp_path, {"interactions": {"path": "events.jsonl", **INTER}, "items": {
        "path": "same.parquet", "features": [{"column": "tags", "kind": "multi_categorical"}]}}, "same.yaml"))
    assert same.items.column("tags") == [["x", "y"], ["y", "z"]]  # equal lengths: still one list per row


TIMES: list[tuple[str, pa.Array]] = [
    ("unix", pa.array([T0, T0 + 90])),
    ("unix", pa.array([float(T0), T0 + 90.7])),  # fractions of a second are floored
    ("unix", pa.array([str(T0), f" {T0 + 90} "])),
    ("unix_ms", pa.array([T0 * 1000, (T0 + 90) * 1000 + 999])),
    ("iso", pa.array(["2023-11-14T22:13:20", "2023-11-14 22:14:50"])),
    ("iso", pa.array(["2023-11-14T22:13:20Z", "2023-11-14T23:14:50+01:00"])),
    ("iso", pa.array(["2023-11-14T22:13:20.25", "2023-11-14T22:14:50+00:00"])),  # mixed: parsed by Python
    ("%d/%m/%Y %H:%M:%S", pa.array(["14/11/2023 22:13:20", "14/11/2023 22:14:50"])),
    ("%Y%m%d%H%M%S", pa.array([20231114221320, 20231114221450])),  # digits read as a formatted time
    # Typed columns are read as what they are, whatever the declared format.
    ("unix", pa.array([T0, T0 + 90], pa.timestamp("s"))),
    ("iso", pa.array([T0 * 1000, (T0 + 90) * 1000 + 500], pa.timestamp("ms", tz="Europe/Paris"))),
    ("iso", pa.array([T0 * 10**9, (T0 + 90) * 10**9], pa.timestamp("ns"))),
]


@pytest.mark.parametrize(("fmt", "col"), TIMES, ids=[f"{t[0]}-{t[1].type}-{k}" for k, t in enumerate(TIMES)])
def test_time_formats(tmp_path: Path, fmt: str, col: pa.Array) -> None:
    t = pa.table({"user_id": ["a", "a"], "item_id": ["x", "y"], "ts": col})
    pq.write_table(t, tmp_path / "e.parquet")
    ds = load(write_spec(tmp_path, {"interactions": {"path": "e.parquet", "time_format": fmt, **INTER}}))
    assert ds.interactions.timestamp.tolist() == [T0, T0 + 90]


def test_date_column_and_csv_inferred_timestamps(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("user_id,item_id,ts\na,x,2023-11-14\na,y,2023-11-15T01:00:00Z\n")
    ds = load(write_spec(tmp_path, {"interactions": {"path": "e.csv", "time_format": "iso", **INTER}}))
    day = T0 - (T0 % 86400)
    assert ds.interactions.timestamp.tolist() == [day, day + 86400 + 3600]


def test_event_types_positives_and_weights(tmp_path: Path) -> None:
    t = events(30)
    pq.write_table(t, tmp_path / "e.parquet")
    ds = load(write_spec(tmp_path, {"interactions": {
        "path": "e.parquet", **INTER,
        "event_type": {"column": "event", "weights": {"cart": 2.5, "buy": 4}, "positives": ["cart", "buy"]}}}))
    kinds = t.column("event").to_pylist()
    kept = [k for k, e in enumerate(kinds) if e in ("cart", "buy")]
    assert ds.interactions.timestamp.tolist() == [t.column("ts")[k].as_py() for k in kept]
    assert ds.interactions.weight is not None
    assert ds.interactions.weight.tolist() == [2.5 if kinds[k] == "cart" else 4.0 for k in kept]
    assert ds.report["dropped_not_positive_type"] == kinds.count("view")
    assert ds.report["event_types"] == {"buy": kinds.count("buy"), "cart": kinds.count("cart")}
    assert ds.report["event_types_read"] == dict(sorted(Counter(kinds).items()))


def test_rating_threshold(tmp_path: Path) -> None:
    t = events(20)
    stars = t.column("stars").to_pylist()
    stars[3] = None  # no rating: below any threshold
    pq.write_table(t.set_column(4, "stars", pa.array(stars)), tmp_path / "e.parquet")
    ds = load(write_spec(tmp_path, {"interactions": {"path": "e.parquet", **INTER,
                                                     "rating": {"column": "stars", "threshold": 4}}}))
    kept = [s for s in stars if s is not None and s >= 4]
    assert ds.interactions.rating.tolist() == kept
    assert ds.report["dropped_below_rating_threshold"] == 20 - len(kept)


def test_group_and_context_columns(tmp_path: Path) -> None:
    t = events(16)
    pq.write_table(t, tmp_path / "e.parquet")
    ds = load(write_spec(tmp_path, {"interactions": {
        "path": "e.parquet", **INTER, "group": "order_id",
        "context": [{"column": "device", "kind": "categorical"},
                    {"column": "stars", "kind": "numeric"},
                    {"column": "ts", "name": "hour", "kind": "categorical", "derive": "hour_of_day"}]}}))
    inter = ds.interactions
    assert inter.group is not None and inter.group.tolist() == t.column("order_id").to_pylist()
    assert list(inter.context) == ["device", "stars"]  # a derived feature reads the time, not a column
    assert list(inter.context["device"]) == t.column("device").to_pylist()
    assert inter.context["stars"].tolist() == t.column("stars").to_pylist()
    split = temporal_split(inter)
    assert len(split.train.context["device"]) == len(split.train)
    fp = fit_pipeline(ds, split.train)
    ctx = fp.context_features({"device": ["ios", "tv"], "stars": [5.0, None]}, np.array([T0, T0 + 3600]))
    hour = {e.name: e for e in fp.context_encoders}["hour"]
    assert ctx["hour"].tolist() == hour.transform([22.0, 23.0]).tolist()
    assert ctx["stars"][1].tolist() == [0.0, 1.0]


def test_users_and_items_tables_with_ids_they_lack(tmp_path: Path) -> None:
    t = events(30)
    pq.write_table(t, tmp_path / "e.parquet")
    # Items 000-005 only (the log has 000-007); users u0-u3 and u9, who never interacted.
    pq.write_table(pa.table({"item_id": [f"{k:03d}" for k in range(6)], "brand": ["a", "b", "c"] * 2,
                             "price": [1.0, 2.0, None, 4.0, 5.0, 6.0],
                             "title": ["Red Shoe", "Blue Hat", "", None, "Green Tee", "Cap"]}),
                   tmp_path / "items.parquet")
    pq.write_table(pa.table({"uid": ["u0", "u1", "u2", "u3", "u9"], "country": ["FR", "DE", "FR", "NA", "US"]}),
                   tmp_path / "users.parquet")
    ds = load(write_spec(tmp_path, {
        "interactions": {"path": "e.parquet", **INTER},
        "items": {"path": "items.parquet", "title": "title", "features": [
            {"column": "brand", "kind": "categorical"}, {"column": "price", "kind": "numeric"}]},
        "users": {"path": "users.parquet", "id": "uid", "features": [{"column": "country", "kind": "categorical"}]}}))
    seen_items = set(t.column("item_id").to_pylist())
    lacking = sorted(seen_items - {f"{k:03d}" for k in range(6)})
    assert ds.report["items_without_table_row"] == len(lacking)
    assert ds.report["items_without_table_row_example"] == lacking[0]
    assert ds.report["users_without_table_row"] == 1 and ds.report["users_without_table_row_example"] == "u4"
    assert len(ds.interactions) == 30  # kept, not dropped
    assert ds.titles()["000"] == "Red Shoe" and ds.titles()["002"] == ""
    assert ds.users.column("country")[3] == "NA"  # a country, not a missing value
    fp = fit_pipeline(ds)
    f = fp.item_features([lacking[0], "000"])
    miss = {e.name: e.missing_row() for e in fp.item_encoders}
    assert f["brand"][0] == miss["brand"] and f["price"][0].tolist() == miss["price"].tolist() == [0.0, 1.0]
    assert f["price"][1].tolist()[1] == 0.0
    assert fp.user_features(["u4"])["country"][0] == {e.name: e for e in fp.user_encoders}["country"].missing_row()


def k_core_reference(pairs: list[tuple[str, str]], min_user: int, min_item: int) -> list[bool]:
    keep = [True] * len(pairs)
    while True:
        cu = Counter(u for (u, _), k in zip(pairs, keep, strict=True) if k)
        ci = Counter(i for (_, i), k in zip(pairs, keep, strict=True) if k)
        new = [k and cu[u] >= min_user and ci[i] >= min_item for (u, i), k in zip(pairs, keep, strict=True)]
        if new == keep:
            return keep
        keep = new


def test_min_interaction_counts_are_a_k_core() -> None:
    rng = np.random.default_rng(3)
    user = np.array([f"u{x}" for x in rng.zipf(1.6, 400) % 60])
    item = np.array([f"i{x}" for x in rng.zipf(1.4, 400) % 80])
    for mu, mi in ((1, 1), (3, 1), (1, 4), (3, 3), (5, 6)):
        got = min_count_filter(user, item, min_user=mu, min_item=mi)
        assert got.tolist() == k_core_reference(list(zip(user.tolist(), item.tolist(), strict=True)), mu, mi)


def test_the_load_report(tmp_path: Path) -> None:
    rows = [("a", "x", T0), ("a", "x", T0 + 1), ("a", "y", T0 + 2), ("b", "x", T0 + 3), ("b", None, T0 + 4),
            (None, "x", T0 + 5), ("c", "z", None), ("  ", "x", T0 + 6), ("c", "x", T0 + 7)]
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                             "ts": [r[2] for r in rows]}), tmp_path / "e.parquet")
    ds = load(write_spec(tmp_path, {"interactions": {"path": "e.parquet", **INTER},
                                    "policies": {"min_item_interactions": 2}}))
    assert ds.report == {"rows_read": 9, "dropped_missing_id_or_time": 4, "dropped_min_interactions": 1,
                         "interactions": 4, "users": 3, "items": 1, "repeated_pairs": 1}
    assert ds.interactions.user.tolist() == ["a", "a", "b", "c"]


# --------------------------------------------------------------------------- RecBole atomic files


def atomic(d: Path, *, with_time: bool = True) -> Path:
    d.mkdir(parents=True)
    time_h = "\ttimestamp:float" if with_time else ""
    (d / "shop.inter").write_text(f"user_id:token\titem_id:token\trating:float{time_h}\n" + "".join(
        f"u{k % 4}\ti{k % 6}\t{1 + k % 5}" + (f"\t{T0 + k}" if with_time else "") + "\n" for k in range(24)))
    (d / "shop.item").write_text(
        "item_id:token\tbrand:token\tgenre:token_seq\tmovie_title:token_seq\tprice:float\temb:float_seq\n" + "".join(
            f"i{k}\tb{k % 2}\tg{k % 3} g{(k + 1) % 3}\tThe Item {k}\t{9.5 + k}\t0.1 0.2\n" for k in range(6)))
    (d / "shop.user").write_text("user_id:token\tage:float\tzip:token\n" + "".join(
        f"u{k}\t{20 + k}\t0{k}123\n" for k in range(4)))
    return d


def test_atomic_files_zero_config(tmp_path: Path) -> None:
    ds = load_dataset(str(atomic(tmp_path / "shop")), cache_dir=tmp_path)
    kinds = {f.column: f.kind for f in ds.spec.features("item") + ds.spec.features("user")}
    assert kinds == {"brand": "categorical", "genre": "multi_categorical", "movie_title": "text",
                     "price": "numeric", "age": "numeric", "zip": "categorical"}  # float_seq: not a kind yet
    assert ds.name == "shop" and len(ds.interactions) == 24
    assert ds.interactions.timestamp.tolist() == [T0 + k for k in range(24)]
    assert ds.titles()["i3"] == "The Item 3"  # a title-like token_seq is the display title
    assert ds.users.column("zip")[0] == "00123"  # tokens stay strings
    fp = fit_pipeline(ds)
    genre = {e.name: e for e in fp.item_encoders}["genre"]
    assert genre.vocab is not None and genre.vocab.values == ["g0", "g1", "g2"]
    assert ds.spec.policies.exclude_seen and ds.spec.atomic is None  # resolved: explicit paths and kinds


def test_atomic_files_name_their_ids_as_recbole_datasets_do(tmp_path: Path) -> None:
    """Yelp-shaped atomic files: the item id is ``business_id`` (the first column of the .item
    file), the time a float ``date``, beside columns the interactions carry for nobody."""
    d = tmp_path / "yelp"
    d.mkdir()
    (d / "yelp.inter").write_text("review_id:token\tuser_id:token\tbusiness_id:token\tstars:float\tdate:float\n"
                                  + "".join(f"r{k}\tu{k % 3}\tb{k % 5}\t{1 + k % 5}\t{T0 + 10 * k}\n"
                                            for k in range(15)))
    (d / "yelp.item").write_text("business_id:token\tcity:token\n" + "".join(f"b{k}\tc{k % 2}\n" for k in range(5)))
    ds = load_dataset(str(d), cache_dir=tmp_path)
    inter = ds.spec.interactions
    assert (inter.user, inter.item, inter.time) == ("user_id", "business_id", "date")
    assert ds.interactions.item.tolist()[:3] == ["b0", "b1", "b2"]
    assert ds.interactions.timestamp.tolist() == [T0 + 10 * k for k in range(15)]
    assert [f.column for f in ds.spec.features("item")] == ["city"]
    (d / "yelp.item").unlink()  # nothing says which column the items are: a clear error, naming the way out
    with pytest.raises(DataError, match=r"no 'item_id' column.*interactions\.item"):
        load_dataset(str(d), cache_dir=tmp_path)


def test_atomic_files_without_a_time_column_keep_file_order(tmp_path: Path) -> None:
    ds = load_dataset(str(atomic(tmp_path / "shop", with_time=False)), cache_dir=tmp_path)
    assert ds.interactions.timestamp.tolist() == list(range(24))
    assert ds.spec.interactions.time_format == "row"


def test_a_spec_over_atomic_files_overrides_kinds_policies_and_drops(tmp_path: Path) -> None:
    d = atomic(tmp_path / "data" / "shop")
    spec = write_spec(tmp_path, {
        "atomic": "data/shop",
        "interactions": {"rating": {"column": "rating", "threshold": 3}},
        "items": {"drop": ["movie_title"], "features": [
            {"column": "price", "kind": "bucketized", "edges": [10, 12]},
            {"column": "genre", "kind": "multi_categorical", "pooling": "sum", "min_count": 3}]},
        "users": {"features": [{"column": "zip", "kind": "categorical", "prefix": 2}]},
        "policies": {"exclude_seen": False, "min_user_interactions": 2}})
    ds = load(spec)
    items = {f.column: f for f in ds.spec.features("item")}
    assert list(items) == ["brand", "genre", "price"]
    assert items["price"].kind == "bucketized" and items["price"].edges == [10.0, 12.0]
    assert items["genre"].pooling == "sum" and items["genre"].min_count == 3
    assert {f.column: f.prefix for f in ds.spec.features("user")} == {"age": None, "zip": 2}
    assert not ds.spec.policies.exclude_seen
    assert ds.report["dropped_below_rating_threshold"] == sum(1 + k % 5 < 3 for k in range(24))
    assert ds.spec.interactions.path == str(d / "shop.inter")


# --------------------------------------------------------------------------- bad input


def _base(tmp_path: Path) -> dict[str, Any]:
    pq.write_table(events(20), tmp_path / "e.parquet")
    pq.write_table(pa.table({"item_id": [f"{k:03d}" for k in range(8)], "price": [1.5] * 8,
                             "brand": list("abcdabcd")}), tmp_path / "items.parquet")
    return {"interactions": {"path": "e.parquet", **INTER},
            "items": {"path": "items.parquet", "features": [{"column": "price", "kind": "numeric"},
                                                            {"column": "brand", "kind": "categorical"}]}}


def _items(tmp_path: Path, **cols: list[Any]) -> None:
    base = pq.read_table(tmp_path / "items.parquet")
    for name, values in cols.items():
        i = base.schema.get_field_index(name)
        base = base.set_column(i, name, pa.array(values)) if i >= 0 else base.append_column(name, pa.array(values))
    pq.write_table(base, tmp_path / "items.parquet")


def _events(tmp_path: Path, **cols: list[Any]) -> None:
    base = pq.read_table(tmp_path / "e.parquet")
    for name, values in cols.items():
        base = base.set_column(base.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(base, tmp_path / "e.parquet")


Mutate = Callable[[Path, dict[str, Any]], None]


def _missing_file(p: Path, d: dict[str, Any]) -> None:
    d["interactions"]["path"] = "nope.parquet"


def _not_parquet(p: Path, d: dict[str, Any]) -> None:
    (p / "e.parquet").write_text("user_id,item_id,ts\nu1,i1,1\n")


def _parquet_named_csv(p: Path, d: dict[str, Any]) -> None:
    (p / "e.parquet").rename(p / "e.csv")
    d["interactions"]["path"] = "e.csv"


def _unknown_suffix(p: Path, d: dict[str, Any]) -> None:
    (p / "e.parquet").rename(p / "e.dat")
    d["interactions"]["path"] = "e.dat"


def _bad_utf8(p: Path, d: dict[str, Any]) -> None:
    (p / "e.csv").write_bytes(b"user_id,item_id,ts\nu1,\xff\xfe,1\n")
    d["interactions"]["path"] = "e.csv"


def _absent_column(p: Path, d: dict[str, Any]) -> None:
    d["interactions"]["time"] = "when"


def _absent_feature_column(p: Path, d: dict[str, Any]) -> None:
    d["items"]["features"].append({"column": "colour", "kind": "categorical"})


def _text_in_numeric(p: Path, d: dict[str, Any]) -> None:
    _items(p, price=["1", "2", "3", "cheap", "5", "6", "7", "8"])


def _list_as_id(p: Path, d: dict[str, Any]) -> None:
    _items(p, item_id=[[k] for k in range(8)])


def _fractional_id(p: Path, d: dict[str, Any]) -> None:
    _events(p, user_id=[float(k) + (0.5 if k == 6 else 0.0) for k in range(20)])


def _struct_feature(p: Path, d: dict[str, Any]) -> None:
    _items(p, brand=[{"a": 1}] * 8)


def _null_column(p: Path, d: dict[str, Any]) -> None:
    _items(p, brand=pa.nulls(8, pa.string()).to_pylist())


def _null_numeric(p: Path, d: dict[str, Any]) -> None:
    _items(p, price=["n/a"] * 8)


def _null_time(p: Path, d: dict[str, Any]) -> None:
    _events(p, ts=[None] * 20)


def _duplicate_item(p: Path, d: dict[str, Any]) -> None:
    _items(p, item_id=["000", "001", "002", "003", "001", "005", "006", "002"])


def _empty_item_id(p: Path, d: dict[str, Any]) -> None:
    _items(p, item_id=["000", "001", "002", " ", "004", "005", "006", "007"])


def _bad_time(p: Path, d: dict[str, Any]) -> None:
    _events(p, ts=[f"2023-11-{1 + k:02d}" if k != 12 else "2023-13-45" for k in range(20)])
    d["interactions"]["time_format"] = "%Y-%m-%d"


def _bad_iso(p: Path, d: dict[str, Any]) -> None:
    _events(p, ts=["2023-11-14T10:00:00"] * 7 + ["last tuesday"] + ["2023-11-14T10:00:00Z"] * 12)
    d["interactions"]["time_format"] = "iso"


def _nothing_left(p: Path, d: dict[str, Any]) -> None:
    d["interactions"]["event_type"] = {"column": "event", "positives": ["purchase"]}


def _nothing_left_k_core(p: Path, d: dict[str, Any]) -> None:
    d["policies"] = {"min_user_interactions": 50}


def _empty_table(p: Path, d: dict[str, Any]) -> None:
    pq.write_table(events(20).slice(0, 0), p / "e.parquet")


BAD_INPUT: list[tuple[str, Mutate, str]] = [
    ("missing file", _missing_file, r"nope\.parquet: file not found"),
    ("not parquet", _not_parquet, r"e\.parquet: not readable as Parquet \(Parquet magic bytes not found"),
    ("parquet named csv", _parquet_named_csv, r"e\.csv: not readable as CSV .*it is a Parquet file"),
    ("unknown suffix", _unknown_suffix, r"e\.dat: cannot tell the format from the suffix '\.dat'; set format:"),
    ("invalid utf-8", _bad_utf8, r"e\.csv: not readable as CSV with delimiter ',' \(.*invalid UTF8"),
    ("absent column", _absent_column, r"e\.parquet: interactions column 'when' not found \(columns: user_id, "),
    ("absent feature column", _absent_feature_column, r"items\.parquet: items? column 'colour' not found"),
    ("text in a numeric column", _text_in_numeric,
     r"items\.parquet: column 'price' row 4: 'cheap' is not a number \(feature 'price' is numeric; list such "
     r"strings in missing_values\)"),
    ("list as id", _list_as_id, r"items\.parquet: column 'item_id' of type list<\w+: int64> cannot be read as ids"),
    ("fractional id", _fractional_id, r"e\.parquet: column 'user_id' row 7: 6\.5 is not an id"),
    ("struct feature", _struct_feature, r"items\.parquet: column 'brand' has type struct<a: int64>, not strings"),
    ("entirely null", _null_column, r"items\.parquet: column 'brand' is entirely null"),
    ("entirely null numeric", _null_numeric, r"items\.parquet: column 'price' is entirely null"),
    ("entirely null time", _null_time, r"e\.parquet: column 'ts' is entirely null"),
    ("duplicate item ids", _duplicate_item,
     r"items\.parquet: column 'item_id' row 5: duplicate item id '001' \(first in row 2\); item ids must be unique"),
    ("empty item id", _empty_item_id, r"items\.parquet: column 'item_id' row 4: empty item id"),
    ("unparseable time", _bad_time,
     r"e\.parquet: column 'ts' row 13: time '2023-13-45' does not parse as '%Y-%m-%d'"),
    ("unparseable iso time", _bad_iso, r"e\.parquet: column 'ts' row 8: time 'last tuesday' does not parse as 'iso'"),
    ("no rows after filtering", _nothing_left,
     r"e\.parquet: no interactions left after filtering \(20 rows read; 20 not one of "
     r"interactions\.event_type\.positives; event types in the file: buy, cart, view\)"),
    ("no rows after the k-core", _nothing_left_k_core,
     r"e\.parquet: no interactions left after filtering \(20 rows read; 20 below policies\.min_user_interactions"),
    ("no rows at all", _empty_table, r"e\.parquet: the interactions table has no rows"),
]


@pytest.mark.parametrize(("mutate", "message"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_names_the_file_the_column_and_the_row(tmp_path: Path, mutate: Mutate, message: str) -> None:
    doc = _base(tmp_path)
    load(write_spec(tmp_path, doc, "good.yaml"))  # the unmodified data loads
    mutate(tmp_path, doc)
    with pytest.raises(DataError, match=message) as e:
        load(write_spec(tmp_path, doc))
    assert str(e.value).startswith(str(tmp_path))  # the full path of the file at fault
    assert "\n" not in str(e.value)


def test_a_bad_atomic_file_names_its_line(tmp_path: Path) -> None:
    d = atomic(tmp_path / "shop")
    with (d / "shop.inter").open("a") as fh:
        fh.write("u1\ti1\n")
    with pytest.raises(DataError, match=r"shop\.inter: not readable as a RecBole atomic file \(line 26: 2 fields, "
                                        r"the header has 4\)"):
        load_dataset(str(d), cache_dir=tmp_path)
    (d / "shop.inter").write_text("user_id\titem_id:token\nu1\ti1\n")
    with pytest.raises(DataError, match=r"shop\.inter:1: header field 1 'user_id' is not NAME:token"):
        load_dataset(str(d), cache_dir=tmp_path)


@pytest.mark.parametrize(("name", "message"), [
    ("empty", r"empty: neither RecBole atomic files \(NAME\.inter, .*\) nor GroupLens files"),
    ("events.csv", r"events\.csv: a data file is read through a dataset spec \(\.yaml\)"),
    ("no/such/dir", r"no/such/dir: not found"),
    ("missing.yaml", r"missing\.yaml: dataset spec not found"),
])
def test_load_dataset_says_what_it_cannot_read(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "events.csv").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / name), cache_dir=tmp_path)
    with pytest.raises(DataError, match="USERS and ITEMS must be positive"):
        load_dataset("synthetic:0x5", cache_dir=tmp_path)


def twotower_main() -> Callable[[list[str]], int]:
    """The console script's entry point named in pyproject.toml, imported in this process."""
    module, func = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["twotower"].split(":")
    return getattr(importlib.import_module(module), func)


CLI_BAD: list[tuple[str, Mutate | None, str]] = [
    ("invalid spec", None, r"BAD\.yaml: items\.features\.2: bucketized needs edges"),
    ("missing file", _missing_file, r"nope\.parquet: file not found"),
    ("duplicate item ids", _duplicate_item, r"column 'item_id' row 5: duplicate item id '001'"),
    ("unparseable time", _bad_time, r"column 'ts' row 13: time '2023-13-45' does not parse"),
    ("no rows after filtering", _nothing_left, r"no interactions left after filtering"),
]


@pytest.mark.parametrize(("mutate", "message"), [b[1:] for b in CLI_BAD], ids=[b[0] for b in CLI_BAD])
def test_train_on_bad_input_exits_2_with_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate: Mutate | None, message: str) -> None:
    doc = _base(tmp_path)
    if mutate is None:
        doc["items"]["features"].append({"column": "price", "name": "p2", "kind": "bucketized"})
    else:
        mutate(tmp_path, doc)
    spec = write_spec(tmp_path, doc, "BAD.yaml")
    out = tmp_path / "runs" / "DIR"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = twotower_main()(["train", "--dataset", str(spec), "--out", str(out), "--data-dir", str(tmp_path / "cache"),
                          "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("twotower train: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [n for n in before if n != "cache"]


def test_a_spec_error_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    doc = _base(tmp_path)
    doc["interactions"]["context"] = [{"column": "device", "kind": "text"}]
    spec = write_spec(tmp_path, doc)
    with pytest.raises(ConfigError, match=rf"^{spec}: interactions\.context: context feature 'device' is text"):
        load(spec)


def test_a_catalog_feed_is_read_in_the_items_schema(tmp_path: Path) -> None:
    from offline.loading import read_item_feed

    ds = load(shop(tmp_path / "v1", seed=0))
    feed = tmp_path / "feed.jsonl"
    feed.write_text(json.dumps({"item_id": "i99", "brand": "b1", "tags": ["eco"], "price": 12.5, "weight": 3.0,
                                "title": "Item 99 green shirt", "ignored": 1}) + "\n")
    ids, columns, titles = read_item_feed(feed, ds.spec)
    assert ids.tolist() == ["i99"] and titles == {"i99": "Item 99 green shirt"}
    assert sorted(columns) == ["brand", "price", "tags", "title", "weight"]
    fp = fit_pipeline(ds).with_rows("item", ids.tolist(), columns)
    assert fp.item_features(["i99"])["price"][0].tolist()[1] == 0.0  # present, encoded with the fitted stats
    (tmp_path / "bad.jsonl").write_text(json.dumps({"item_id": "i1", "brand": "b1"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: item column 'tags' not found"):
        read_item_feed(tmp_path / "bad.jsonl", ds.spec)


# --------------------------------------------------------------------------- no skew


def shop(d: Path, *, seed: int, price_scale: float = 1.0, brands: int = 4) -> Path:
    """A small generated catalog and event log (every feature kind, context, a users table)."""
    rng = np.random.default_rng(seed)
    n_users, n_items, n = 40, 30, 900
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "user_id": [f"u{x}" for x in rng.integers(0, n_users, n)],
        "item_id": [f"i{x}" for x in rng.zipf(1.3, n) % n_items],
        "ts": T0 + np.sort(rng.integers(0, 30 * 86400, n)),
        "device": rng.choice(["ios", "android", "web"], n).tolist()}), d / "events.parquet")
    pq.write_table(pa.table({
        "item_id": [f"i{k}" for k in range(n_items)],
        "brand": [f"b{k % brands}" for k in range(n_items)],
        "tags": [["sale", "new", "eco"][: 1 + k % 3] for k in range(n_items)],
        "price": (price_scale * rng.lognormal(3, 1, n_items)).tolist(),
        "weight": rng.uniform(0, 100, n_items).tolist(),
        "title": [f"Item {k} {'red' if k % 2 else 'blue'} shirt" for k in range(n_items)]}), d / "items.parquet")
    pq.write_table(pa.table({"user_id": [f"u{k}" for k in range(n_users)],
                             "country": [["FR", "DE", "US"][k % 3] for k in range(n_users)]}), d / "users.parquet")
    return write_spec(d, {
        "interactions": {"path": "events.parquet", **INTER, "context": [
            {"column": "device", "kind": "categorical"},
            {"column": "ts", "name": "hour", "kind": "bucketized", "derive": "hour_of_day"}]},
        "items": {"path": "items.parquet", "title": "title", "features": [
            {"column": "brand", "kind": "categorical"}, {"column": "tags", "kind": "multi_categorical"},
            {"column": "price", "kind": "numeric", "log": True},
            {"column": "weight", "kind": "bucketized", "quantiles": 4},
            {"column": "title", "kind": "text", "max_len": 6}]},
        "users": {"path": "users.parquet", "features": [{"column": "country", "kind": "categorical"}]},
        "policies": {"exclude_seen": False}})


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_bundle_carries_the_fitted_features_and_the_spec(tmp_path: Path) -> None:
    from offline.train import TrainConfig, train
    from towers import bundle as bundle_mod
    from towers.model import ModelConfig

    ds = load(shop(tmp_path / "v1", seed=0))
    out = tmp_path / "bundle"
    train(dataset=ds, out=out, model_cfg=ModelConfig(dim=16, id_dim=16, hidden=32, history_len=5),
          train_cfg=TrainConfig(epochs=1, patience=1), progress=False)
    served = bundle_mod.load(out).features
    trained = fit_pipeline(ds, temporal_split(ds.interactions).train)  # what train fitted (deterministic)
    assert served.spec == ds.spec.to_json()  # the resolved spec itself is in features.json
    assert served.exclude_seen is False
    items, users = [*ds.items.ids.tolist(), "ghost"], [*ds.users.ids.tolist(), "nobody"]
    ctx = ({"device": ["ios", "tv", None]}, np.array([T0, T0 + 7200, T0 + 86400 * 3 + 60]))
    assert _same(served.item_features(items), trained.item_features(items))
    assert _same(served.user_features(users), trained.user_features(users))
    assert _same(served.context_features(*ctx), trained.context_features(*ctx))

    # Changed data (prices x10, twice the brands): a refit would encode differently ...
    ds2 = load(shop(tmp_path / "v2", seed=0, price_scale=10.0, brands=8))
    refit = fit_pipeline(ds2, temporal_split(ds2.interactions).train)
    assert not _same(refit.item_features(items), served.item_features(items))
    # ... while the bundle's pipeline encodes the new rows (a catalog feed) with what it fitted:
    # the old price statistics and brand vocabulary, the new brands in OOV buckets.
    fed = served.with_rows("item", ds2.items.ids.tolist(), ds2.items.columns)
    by_name = {e.name: e for e in served.item_encoders}
    got = fed.item_features(ds2.items.ids.tolist())
    for name in ("brand", "price", "weight", "tags", "title"):
        assert np.array_equal(got[name], by_name[name].transform(ds2.items.columns[name])), name
    brand = by_name["brand"].vocab
    assert brand is not None and brand.values == ["b0", "b1", "b2", "b3"]
    assert (got["brand"][np.array(ds2.items.column("brand")) == "b7"] >= 4).all()
