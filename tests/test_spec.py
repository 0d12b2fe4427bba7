"""The dataset spec (towers.spec): what validates, and errors that name the file and the
dotted field path (plus the feature's column) when it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from offline.datasets import SHIPPED, load_dataset
from towers.errors import ConfigError
from towers.spec import DatasetSpec, load_spec, parse_spec


def base(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "shop", "interactions": {"path": "events.parquet"}}
    d.update(over)
    return d


def items(*features: dict[str, Any], **table: Any) -> dict[str, Any]:
    return {"path": "items.csv", "features": list(features), **table}


BAD: list[tuple[dict[str, Any], str, str]] = [
    (base(items=items({"column": "price", "kind": "bucketized"})), "items.features.0",
     "bucketized needs edges (declared) or quantiles (fitted on train) (column 'price')"),
    (base(items=items({"column": "price", "kind": "bucketized", "edges": [1, 2], "quantiles": 4})),
     "items.features.0", "edges or quantiles, not both"),
    (base(items=items({"column": "price", "kind": "bucketized", "edges": [5, 5, 9]})), "items.features.0",
     "edges must be strictly increasing"),
    (base(items=items({"column": "price", "kind": "bucketized", "edges": []})), "items.features.0",
     "edges must not be empty"),
    (base(items=items({"column": "price", "kind": "numeric", "edges": [1.0]})), "items.features.0",
     "edges/quantiles apply to bucketized features, not numeric"),
    (base(items=items({"column": "a", "kind": "numeric"}, {"column": "brand", "kind": "categoricl"})),
     "items.features.1.kind", "Input should be 'categorical', 'multi_categorical', 'numeric', 'text' or "
     "'bucketized' (column 'brand')"),
    (base(items=items({"column": "item", "kind": "categorical"})), "items.features.0",
     "feature name 'item' is reserved for the id feature (set name: to rename it) (column 'item')"),
    (base(users=items({"column": "x", "kind": "numeric", "name": "user"})), "users.features.0", "reserved"),
    (base(items=items({"column": "brand", "kind": "categorical"}, {"column": "brand", "kind": "text"})),
     "items.features", "duplicate feature name 'brand'"),
    (base(items=items({"column": "a", "kind": "numeric", "name": "x"}, {"column": "x", "kind": "numeric"})),
     "items.features", "duplicate feature name 'x'"),
    (base(interactions={"path": "e.csv", "context": [{"column": "d", "kind": "categorical"},
                                                     {"column": "d", "kind": "categorical"}]}),
     "interactions.context", "duplicate feature name 'd'"),
    (base(interactions={"path": "e.csv", "context": [{"column": "q", "kind": "text"}]}), "interactions.context",
     "context feature 'q' is text"),
    (base(items=items({"column": "c", "kind": "categorical", "colour": "red"})), "items.features.0.colour",
     "Extra inputs are not permitted (column 'c')"),
    (base(interactions={"path": "e.csv", "usr": "u"}), "interactions.usr", "Extra inputs are not permitted"),
    (base(polices={"exclude_seen": False}), "polices", "Extra inputs are not permitted"),
    (base(policies={"exclude_seen": "sometimes"}), "policies.exclude_seen", "valid boolean"),
    (base(policies={"min_user_interactions": 0}), "policies.min_user_interactions", "greater than or equal to 1"),
    (base(interactions={"path": "e.csv", "time_format": "dd/mm/yyyy"}), "interactions.time_format",
     "is not one of unix, unix_ms, iso or a strptime format"),
    (base(interactions={"path": "e.csv", "event_type": {"column": "t", "positives": []}}),
     "interactions.event_type.positives", "an empty list keeps no interaction"),
    (base(interactions={"path": "e.csv", "event_type": {"column": "t", "weights": {"view": -1}}}),
     "interactions.event_type.weights", "weight of 'view' must be a finite number >= 0"),
    (base(items=items({"column": "h", "kind": "categorical", "derive": "hour_of_day"})), "items.features",
     "derive applies to interactions.context only"),
    ({"name": "shop"}, "interactions.path", "required (or atomic:"),
    (base(items={"features": []}), "items.path", "required"),
    ({"interactions": {"path": "e.csv"}}, "name", "Field required"),
    (base(items=items({"kind": "numeric"})), "items.features.0.column", "Field required"),
]


@pytest.mark.parametrize(("doc", "field", "message"), BAD, ids=[f"{b[1]}:{b[2][:24]}" for b in BAD])
def test_errors_name_the_file_and_the_field(tmp_path: Path, doc: dict[str, Any], field: str, message: str) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert e.value.field == f"{path}: {field}"
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: {field}: ")


def test_several_errors_report_the_first_and_count_the_rest() -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml: interactions\.usr: Extra inputs are not permitted "
                                          r"\(and 1 more\)"):
        parse_spec(base(interactions={"path": "e", "usr": 1, "itm": 2}), source="x.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("name: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "a dataset spec is a mapping"),
    ("", "a dataset spec is a mapping"),
])
def test_not_a_spec_document(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_spec(path)
    assert str(e.value).startswith(str(path))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset spec not found"):
        load_spec(tmp_path / "nope.yaml")


def test_load_dataset_refuses_an_invalid_spec_before_reading_data(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(base(items=items({"column": "p", "kind": "bucketized"}))))
    with pytest.raises(ConfigError, match=r"shop\.yaml: items\.features\.0: bucketized needs edges"):
        load_dataset(str(path), cache_dir=tmp_path)  # events.parquet does not exist: never read


def test_a_full_spec_round_trips_through_json() -> None:
    doc = base(
        interactions={"path": "events/", "format": "parquet", "user": "customer", "item": "sku", "time": "ts",
                      "time_format": "%Y-%m-%d %H:%M", "group": "order_id",
                      "event_type": {"column": "event", "weights": {"view": 0.2, "buy": 1.0}, "positives": ["buy"]},
                      "rating": {"column": "stars", "threshold": 4},
                      "context": [{"column": "device", "kind": "categorical"},
                                  {"column": "ts", "name": "hour", "kind": "bucketized", "derive": "hour_of_day"}]},
        items=items({"column": "brand", "kind": "categorical", "min_count": 3, "oov_buckets": 8},
                    {"column": "tags", "kind": "multi_categorical", "separator": "|", "pooling": "sum"},
                    {"column": "price", "kind": "numeric", "log": True},
                    {"column": "title", "kind": "text", "max_len": 12},
                    {"column": "weight_g", "kind": "bucketized", "quantiles": 5}, title="title", sep=";"),
        users={"path": "users.jsonl", "id": "customer", "features": [{"column": "country", "kind": "categorical"}]},
        ids={"item": False}, policies={"exclude_seen": False, "min_user_interactions": 3, "unknown_context": "ignore"})
    spec = parse_spec(doc, source="t")
    again = DatasetSpec.from_json(spec.to_json())
    assert again == spec
    assert [f.key for f in spec.features("context")] == ["device", "hour"]
    assert [f.key for f in spec.features("item")] == ["brand", "tags", "price", "title", "weight_g"]
    assert spec.features("user")[0].column == "country" and not spec.ids.item


def test_the_shipped_specs_validate() -> None:
    for path in SHIPPED.values():
        assert load_spec(path).policies.exclude_seen


def _atomic_dir(d: Path) -> Path:
    d.mkdir()
    (d / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\t2\n")
    (d / "shop.item").write_text("item_id:token\tbrand:token\tuser:token\ni1\tacme\tu9\ni2\tzeta\tu8\n")
    return d


def test_a_declared_name_clashing_with_an_inferred_column_names_the_field(tmp_path: Path) -> None:
    d = _atomic_dir(tmp_path / "shop")
    spec = tmp_path / "shop.yaml"
    # "brand" is inferred from the header; a second feature named "brand" clashes with it.
    spec.write_text(yaml.safe_dump({"name": "shop", "atomic": str(d),
                                    "items": {"features": [{"column": "user", "kind": "categorical",
                                                            "name": "brand"}]}}))
    with pytest.raises(ConfigError, match=r"shop\.yaml \(with the atomic files of .*\): items\.features: "
                                          r"duplicate feature name 'brand'"):
        load_dataset(str(spec), cache_dir=tmp_path)


def test_an_inferred_column_named_like_an_id_feature_is_renamed(tmp_path: Path) -> None:
    ds = load_dataset(str(_atomic_dir(tmp_path / "shop")), cache_dir=tmp_path)
    assert [f.key for f in ds.spec.features("item")] == ["brand", "user_feature"]
    DatasetSpec.from_json(ds.spec.to_json())  # the resolved spec, as a bundle saves it, validates
