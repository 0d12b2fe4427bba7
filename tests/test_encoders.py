"""Feature encoders (towers.encoders) and the towers' layers that read them (towers.model):
each kind against a plain-Python reference on small data, the JSON round trip, and inputs
that must never crash (unknown, missing, of another type)."""

from __future__ import annotations

import bisect
import json
import math
import re
import statistics
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from towers.encoders import Encoder, Vocabulary, factorize, to_float
from towers.model import FeatureLayer
from towers.spec import FeatureSpec


def spec(**kw: Any) -> FeatureSpec:
    return FeatureSpec.model_validate({"column": "c", **kw})


def crc(s: str, n: int) -> int:
    return zlib.crc32(s.encode()) % n


def blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


# --------------------------------------------------------------------------- references


def ref_categorical(train: list[Any], values: list[Any], *, min_count: int, oov: int,
                    prefix: int | None = None) -> list[int]:
    def key(v: Any) -> str:
        s = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()
        return s[:prefix] if prefix else s

    counts = Counter(key(v) for v in train if not blank(v))
    vocab = sorted(k for k, c in counts.items() if c >= min_count)
    out = []
    for v in values:
        k = "" if blank(v) else key(v)
        out.append(vocab.index(k) if k in vocab else len(vocab) + crc(k, oov))
    return out


def ref_multi(train: list[Any], values: list[Any], *, sep: str | None, min_count: int, oov: int,
              max_len: int) -> list[list[int]]:
    def tags(v: Any) -> list[str]:
        if blank(v):
            return []
        parts = list(v) if isinstance(v, list) else (v.split(sep) if sep else v.split())
        seen: list[str] = []
        for p in parts:
            p = str(p).strip()
            if p and p not in seen:
                seen.append(p)
        return seen

    counts = Counter(t for v in train for t in tags(v))  # rows: a tag counts once per row
    vocab = sorted(k for k, c in counts.items() if c >= min_count)
    rows = []
    for v in values:
        ids = [1 + (vocab.index(t) if t in vocab else len(vocab) + crc(t, oov)) for t in tags(v)][:max_len]
        rows.append(ids + [0] * (max_len - len(ids)))
    return rows


def ref_numeric(train: list[Any], values: list[Any], *, log: bool) -> list[tuple[float, float]]:
    def num(v: Any) -> float | None:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        return math.log1p(max(f, 0.0)) if log else f

    xs = [x for x in map(num, train) if x is not None]
    mean, std = statistics.fmean(xs), statistics.pstdev(xs)
    out = []
    for v in values:
        x = num(v)
        out.append((0.0, 1.0) if x is None else ((x - mean) / std, 0.0))
    return out


def ref_text(values: list[Any], *, buckets: int, max_len: int) -> list[list[int]]:
    rows = []
    for v in values:
        words = [] if blank(v) else re.findall(r"[^\W_]+", str(v).lower())
        ids = [1 + crc(w, buckets) for w in words[:max_len]]
        rows.append(ids + [0] * (max_len - len(ids)))
    return rows


def ref_bucket(values: list[Any], edges: list[float]) -> list[int]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(0 if not math.isfinite(f) else bisect.bisect_right(edges, f) + 1)
    return out


# --------------------------------------------------------------------------- per kind


def test_categorical_vocabulary_min_count_and_hashed_oov() -> None:
    train = ["red", "red", "blue", "blue", "blue", "green", None, " red ", 7.0, "7", ""]
    values = ["red", "blue", "green", "purple", None, "", "   ", 7, "7", 7.0, "orange"]
    s = spec(kind="categorical", min_count=2, oov_buckets=3)
    enc = Encoder.fit(s, train)
    assert enc.vocab is not None and enc.vocab.values == ["7", "blue", "red"]  # green was seen once
    assert enc.table_rows == 3 + 3
    assert enc.transform(values).tolist() == ref_categorical(train, values, min_count=2, oov=3)
    assert enc.transform(["purple", "purple"]).tolist()[0] == enc.transform(["purple"]).tolist()[0]  # deterministic


def test_categorical_prefix_merges_values_and_their_counts() -> None:
    train = ["94043", "94040", "10001", "10002", "10003", "30301"]
    s = spec(kind="categorical", prefix=3, min_count=2, oov_buckets=4)
    enc = Encoder.fit(s, train)
    assert enc.vocab is not None and enc.vocab.values == ["100", "940"]
    values = ["94099", "10099", "30301", "555"]
    assert enc.transform(values).tolist() == ref_categorical(train, values, min_count=2, oov=4, prefix=3)


def test_categorical_large_array_takes_the_factorised_path_with_the_same_result() -> None:
    rng = np.random.default_rng(0)
    train = rng.choice(np.array(["ios", "android", "web", "tv", "x"]), size=10_000, p=[0.4, 0.3, 0.2, 0.0999, 0.0001])
    enc = Encoder.fit(spec(kind="categorical", min_count=5, oov_buckets=2), train)
    values = np.concatenate([train, np.array(["", "watch", " ios"])])
    fast = enc.transform(values)  # a <U array of >= 4096 rows: factorised
    slow = np.array([enc.transform([v])[0] for v in values.tolist()])
    assert np.array_equal(fast, slow)
    assert fast.tolist()[:200] == ref_categorical(train.tolist(), values.tolist()[:200], min_count=5, oov=2)


def test_multi_categorical_from_a_list_column() -> None:
    train: list[Any] = [["a", "b"], ["b", "c", "b"], ["b"], None, [], ["c"], ["d", "d"]]
    values: list[Any] = [["a", "b", "zz"], ["c", "c"], None, [], ["b", "a", "c", "q", "r"], ["new"]]
    s = spec(kind="multi_categorical", min_count=2, oov_buckets=2, max_len=4)
    enc = Encoder.fit(s, train)
    assert enc.vocab is not None and enc.vocab.values == ["b", "c"]  # "d" twice in one row counts once
    got = enc.transform(values)
    assert got.shape == (6, 4) and got.dtype == np.int64
    assert got.tolist() == ref_multi(train, values, sep=None, min_count=2, oov=2, max_len=4)


def test_multi_categorical_from_a_separator_string() -> None:
    train = ["Action|Comedy", "Comedy|Drama", "Drama", "Action| Drama", ""]
    values = ["Action|Drama", "Horror", "Comedy|Comedy|Action", None, "Drama|Western|Action"]
    s = spec(kind="multi_categorical", separator="|", oov_buckets=1, max_len=3)
    enc = Encoder.fit(s, train)
    assert enc.vocab is not None and enc.vocab.values == ["Action", "Comedy", "Drama"]
    assert enc.transform(values).tolist() == ref_multi(train, values, sep="|", min_count=1, oov=1, max_len=3)
    # Without a separator a string column splits on whitespace (RecBole token_seq).
    ws = Encoder.fit(spec(kind="multi_categorical"), ["Animation Children's Comedy"])
    assert ws.vocab is not None and ws.vocab.values == ["Animation", "Children's", "Comedy"]


@pytest.mark.parametrize("log", [False, True])
def test_numeric_standardised_with_log_and_missing_flag(log: bool) -> None:
    train: list[Any] = [1.0, 10.0, 100.0, None, "1000", float("nan"), "n/a", 3]
    values: list[Any] = [10.0, None, "abc", float("inf"), 0, "5.5", -2.0]
    enc = Encoder.fit(spec(kind="numeric", log=log), train)
    got = enc.transform(values)
    assert got.shape == (7, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.array(ref_numeric(train, values, log=log), dtype=np.float32), rtol=1e-6)
    assert enc.missing_row().tolist() == [0.0, 1.0]


def test_numeric_constant_or_empty_training_column_does_not_divide_by_zero() -> None:
    assert Encoder.fit(spec(kind="numeric"), [5.0, 5.0]).transform([5.0, 6.0]).tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert Encoder.fit(spec(kind="numeric"), [None, None]).transform([2.0]).tolist() == [[2.0, 0.0]]


def test_text_hashed_lowercased_word_tokens() -> None:
    values: list[Any] = ["Toy Story (1995)", "the GODFATHER, part II", None, "", "a b c d e f g h i j", ["x", "Y"]]
    enc = Encoder.fit(spec(kind="text", buckets=97, max_len=6), [])
    got = enc.transform(values)
    assert got.shape == (6, 6) and enc.table_rows == 98
    assert got.tolist() == ref_text([" ".join(v) if isinstance(v, list) else v for v in values], buckets=97, max_len=6)


def test_bucketized_with_declared_edges() -> None:
    edges = [18.0, 25.0, 35.0]
    enc = Encoder.fit(spec(kind="bucketized", edges=edges), [])
    values: list[Any] = [-5, 17.9, 18, 24, 25, 99, None, "30", "x", float("nan")]
    assert enc.transform(values).tolist() == ref_bucket(values, edges)
    assert enc.table_rows == len(edges) + 2


def test_bucketized_with_quantiles_fitted_on_train() -> None:
    rng = np.random.default_rng(1)
    train = [*rng.lognormal(3, 1, size=501).tolist(), None, "n/a"]
    enc = Encoder.fit(spec(kind="bucketized", quantiles=4), train)
    present = [x for x in train if isinstance(x, float)]
    ref_edges = statistics.quantiles(present, n=4, method="inclusive")  # numpy's linear = "inclusive"
    np.testing.assert_allclose(enc.edges, ref_edges)
    values = [0.0, ref_edges[0], ref_edges[1] + 1e-9, 1e9, None]
    assert enc.transform(values).tolist() == ref_bucket(values, ref_edges)
    # Only train is read: a value from elsewhere never moves an edge.
    assert Encoder.fit(spec(kind="bucketized", quantiles=4), train).edges == enc.edges


def test_missing_values_read_the_same_when_fitting_and_applying() -> None:
    s = spec(kind="categorical", missing_values=["unknown", "n/a"])
    enc = Encoder.fit(s, ["a", "unknown", "unknown", "n/a", "b"])
    assert enc.vocab is not None and enc.vocab.values == ["a", "b"]
    assert enc.transform(["unknown"]).tolist() == enc.transform([None]).tolist()
    num = Encoder.fit(spec(kind="numeric", missing_values=["-1"]), np.array([-1.0, 2.0, 4.0]))
    assert num.mean == 3.0 and num.transform(np.array([-1.0])).tolist() == [[0.0, 1.0]]
    tags = Encoder.fit(spec(kind="multi_categorical", missing_values=["unknown"]), ["unknown Drama"])
    assert tags.vocab is not None and tags.vocab.values == ["Drama"]


# --------------------------------------------------------------------------- round trip, robustness

KINDS: list[dict[str, Any]] = [
    {"kind": "categorical", "oov_buckets": 3, "prefix": 2},
    {"kind": "multi_categorical", "separator": ",", "pooling": "sum"},
    {"kind": "numeric", "log": True},
    {"kind": "text", "buckets": 50, "max_len": 4},
    {"kind": "bucketized", "edges": [0.0, 10.0]},
    {"kind": "bucketized", "quantiles": 3},
]
TRAIN: list[Any] = ["12", "34", "a,b", "5.5", None, "hello world", 7, 7.0, "c,a", "100", "-3"]
WEIRD: list[Any] = [None, float("nan"), np.float32("nan"), "", "   ", "unseen", 3.5, -1, ["x", "y"], {"k": 1},
                    b"bytes", True, "1e400", "١٢"]


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: kw["kind"])
def test_json_round_trip_gives_identical_transforms(kw: dict[str, Any]) -> None:
    enc = Encoder.fit(spec(**kw), TRAIN)
    back = Encoder.from_json(json.loads(json.dumps(enc.to_json())))
    assert back.to_json() == enc.to_json()
    for values in (TRAIN, WEIRD):
        assert np.array_equal(enc.transform(values), back.transform(values))
    assert back.table_rows == enc.table_rows


@pytest.mark.parametrize("kw", KINDS, ids=lambda kw: kw["kind"])
def test_unknown_missing_and_odd_values_never_crash(kw: dict[str, Any]) -> None:
    enc = Encoder.fit(spec(**kw), TRAIN)
    out = enc.transform(WEIRD)
    assert len(out) == len(WEIRD)
    if out.dtype == np.int64:  # every id indexes the feature's embedding table
        assert out.min() >= 0 and out.max() < enc.table_rows
    assert np.isfinite(out).all()
    assert enc.transform([]).shape[0] == 0
    Encoder.fit(spec(**kw), WEIRD).transform(TRAIN)  # fitting on them does not crash either


def test_to_float_reads_numbers_and_nothing_else() -> None:
    x, miss = to_float(["1.5", " 2 ", "x", None, float("inf"), 3])
    assert x.tolist() == [1.5, 2.0, 0.0, 0.0, 0.0, 3.0]
    assert miss.tolist() == [False, False, True, True, True, False]
    x, miss = to_float(np.array(["1", "2.5"]))  # the vectorised path
    assert x.tolist() == [1.0, 2.5] and not miss.any()


@pytest.mark.parametrize("width", [1, 3, 4, 12])
def test_factorize_is_exact(width: int) -> None:
    rng = np.random.default_rng(width)
    alphabet = list("aé€𝄞b")  # code points from 1 to 4 UTF-8 bytes
    a = np.array(["".join(rng.choice(alphabet, size=rng.integers(0, width + 1))) for _ in range(3000)])
    uniq, inv = factorize(a)
    assert np.array_equal(uniq[inv], a)
    assert sorted(uniq.tolist()) == sorted(set(a.tolist()))


def test_vocabulary_lookup_large_arrays_match_the_plain_loop() -> None:
    v = Vocabulary([f"u{i}" for i in range(100)], n_oov=7, id_rows=90)
    ids = np.array([f"u{i}" for i in range(120)] * 50)
    plain = [v.known(x) if 0 <= v.known(x) < 90 else 90 + crc(x, 7) for x in ids.tolist()]
    assert v.lookup(ids).tolist() == plain
    assert v.positions(ids).tolist() == [v.known(x) for x in ids.tolist()]


# --------------------------------------------------------------------------- the towers' layers


def layer(enc: Encoder, width: int = 4, seed: int = 0) -> FeatureLayer:
    torch.manual_seed(seed)
    lay = FeatureLayer(enc, width)
    with torch.no_grad():
        for p in lay.parameters():
            p.copy_(torch.randn_like(p))  # every row, padding too: the mask must ignore row 0
    return lay.eval()


@pytest.mark.parametrize("kind", ["categorical", "bucketized"])
def test_feature_layer_single_valued_is_an_embedding_row(kind: str) -> None:
    kw = {"edges": [1.0, 2.0]} if kind == "bucketized" else {}
    enc = Encoder.fit(spec(kind=kind, **kw), ["a", "b", "1", "3"])
    lay = layer(enc)
    x = enc.transform(["a", "zzz", None, "3", "1.5"])
    table = lay.table.weight.detach().numpy()
    with torch.no_grad():
        got = lay(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, table[x], rtol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_feature_layer_pools_multi_values_ignoring_padding(pooling: str) -> None:
    enc = Encoder.fit(spec(kind="multi_categorical", pooling=pooling, max_len=5), [["a", "b", "c"], ["d"]])
    lay = layer(enc)
    x = enc.transform([["a", "b"], ["c"], [], ["a", "b", "c", "d", "new"]])
    table = lay.table.weight.detach().numpy()
    ref = []
    for row in x.tolist():
        real = [table[i] for i in row if i > 0]
        total = np.sum(real, axis=0) if real else np.zeros(table.shape[1], np.float32)
        ref.append(total / max(len(real), 1) if pooling == "mean" else total)
    with torch.no_grad():
        got = lay(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-6)
    assert np.allclose(got[2], 0.0)  # no values: nothing, whatever the padding row holds


def test_feature_layer_text_is_mean_pooled() -> None:
    enc = Encoder.fit(spec(kind="text", buckets=31, max_len=4, pooling="sum"), [])
    lay = layer(enc)
    x = enc.transform(["Toy Story", "one two three four five"])
    table = lay.table.weight.detach().numpy()
    ref = [np.mean([table[i] for i in row if i > 0], axis=0) for row in x.tolist()]
    with torch.no_grad():
        got = lay(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-6)


def test_feature_layer_numeric_missing_takes_the_learned_value() -> None:
    enc = Encoder.fit(spec(kind="numeric"), [1.0, 2.0, 3.0])
    lay = layer(enc, width=3)
    x = enc.transform([1.0, None, 3.0, "junk"])
    w = lay.linear.weight.detach().numpy()[:, 0]
    b = lay.linear.bias.detach().numpy()
    learned = float(lay.missing.detach().numpy()[0])
    ref = [w * (learned if miss else z) + b for z, miss in x.tolist()]
    with torch.no_grad():
        got = lay(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-6)
    # The missing value is a trained parameter: it gets a gradient only from missing rows.
    lay.train()
    lay(torch.from_numpy(x[[1]])).sum().backward()
    assert lay.missing.grad is not None and lay.missing.grad.abs().item() > 0
    lay.zero_grad()
    lay(torch.from_numpy(x[[0]])).sum().backward()
    assert lay.missing.grad is None or lay.missing.grad.abs().item() == 0
