"""Feature encoders, one per kind of ``towers.spec``: fitted on train, saved as JSON,
applied by the same code in training, evaluation, refresh and serving (numpy only).

Each encoder turns raw values (strings, numbers, lists; ``None`` for missing) into one
integer or float array that the towers' matching layer reads::

    categorical        (n,) int64     vocab rows 0..V-1, hashed OOV rows V..V+oov-1
    multi_categorical  (n, L) int64   1..V known, V+1..V+oov hashed, 0 = padding
    text               (n, L) int64   1..buckets hashed words, 0 = padding
    bucketized         (n,) int64     0 = missing, 1..len(edges)+1
    numeric            (n, 2) float32 [standardised value (0 when missing), missing flag]

Missing values never crash: a categorical's missing value hashes like any unseen one,
a numeric or bucketized value that is not a number counts as missing, and any other
input (a list where a string was declared, a number for a tag) is read as its string.

Large string columns (a context feature has one value per interaction) are factorised
first (:func:`factorize`), so the Python work is per distinct value, not per row.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from towers.spec import FeatureSpec

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Arrays at least this long are factorised before per-value Python work (below it, a plain
# loop is as fast as the factorisation itself).
_FACTORIZE_MIN = 4096


def is_missing(v: Any) -> bool:
    return (v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))
            or (isinstance(v, str) and not v.strip()))


def _text(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))  # a CSV id read as float: 7.0 -> "7"
    return str(v).strip()


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniques, inverse)`` with ``uniques[inverse] == values`` (inverse int64); the uniques
    come in no particular order. A string array is keyed by packing (up to 3 characters) or
    hashing its code points column by column, so the sort is over integers: ``np.unique``
    sorts the strings themselves, several times slower on millions of rows."""
    a = np.asarray(values)
    if a.dtype.kind != "U" or len(a) == 0 or a.ndim != 1:
        u, inv = np.unique(a, return_inverse=True)
        return u, inv.reshape(-1).astype(np.int64)
    a = np.ascontiguousarray(a)
    width = a.dtype.itemsize // 4
    cps = a.view(np.uint32).reshape(len(a), width)
    exact = width <= 3  # code points are < 2**21: three fit one uint64 exactly
    if exact:
        key = np.zeros(len(a), np.uint64)
        for j in range(width):
            key |= cps[:, j].astype(np.uint64) << np.uint64(21 * j)
    else:  # FNV-1a over code points (uint64 arithmetic wraps)
        key = np.full(len(a), 14695981039346656037, np.uint64)
        prime = np.uint64(1099511628211)
        for j in range(width):
            key = (key ^ cps[:, j]) * prime
    # return_index would force a stable (merge) sort: any row of a key represents it.
    keys, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    rep = np.empty(len(keys), np.int64)
    rep[inv] = np.arange(len(a))
    uniq = a[rep]
    if not exact and not np.array_equal(uniq[inv], a):  # a hash collision: sort the strings
        u, inv2 = np.unique(a, return_inverse=True)
        return u, inv2.reshape(-1).astype(np.int64)
    return uniq, inv


def _as_array(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """A 1-d array of ``values``; ragged or nested inputs become an object array."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return values
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 1 or len(arr) != len(values):
        arr = np.fromiter(iter(values), dtype=object, count=len(values))
    return arr


def _hash(v: str, n: int) -> int:
    return zlib.crc32(v.encode("utf-8", "surrogatepass")) % n


def to_float(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, missing mask); None, NaN, infinities and strings that are not numbers
    count as missing (their value is 0)."""
    arr = _as_array(values)
    if arr.dtype.kind in "fiub":
        x = arr.astype(np.float64)
        return np.where(np.isfinite(x), x, 0.0), ~np.isfinite(x)
    if arr.dtype.kind in "US":
        try:  # every string a number: one numpy cast, no Python loop
            x = arr.astype(np.float64)
            return np.where(np.isfinite(x), x, 0.0), ~np.isfinite(x)
        except ValueError:
            pass
    out = np.zeros(len(arr), np.float64)
    miss = np.ones(len(arr), bool)
    for j, v in enumerate(arr.tolist()):
        if is_missing(v):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[j], miss[j] = f, False
    return out, miss


def split_values(v: Any, separator: str | None) -> list[str]:
    """A multi-valued cell as its list of string values."""
    if is_missing(v):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_text(x) for x in v if not is_missing(x)]
    parts = str(v).split(separator) if separator else str(v).split()
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Vocabulary:
    """Known values in a fixed order plus ``n_oov`` hashed buckets for the rest."""

    values: list[str]
    n_oov: int = 1
    # Values with a trained id row: the first ``id_rows`` values. A refresh appends values (new
    # users and items get embedding rows) without retraining, so their ids fall in the OOV
    # buckets of the id table, whose size stays what training made it. -1: all values.
    id_rows: int = -1
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_oov < 1:
            raise ValueError("n_oov must be >= 1")
        if self.id_rows < 0:
            self.id_rows = len(self.values)
        if self.id_rows > len(self.values):
            raise ValueError(f"id_rows {self.id_rows} > {len(self.values)} values")
        self._index = {v: i for i, v in enumerate(self.values)}
        if len(self._index) != len(self.values):
            raise ValueError("vocabulary values must be unique")

    @classmethod
    def fit(cls, values: Iterable[str], *, n_oov: int = 1, min_count: int = 1,
            max_size: int | None = None) -> Vocabulary:
        return cls.from_counts(Counter(values), n_oov=n_oov, min_count=min_count, max_size=max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], *, n_oov: int = 1, min_count: int = 1,
                    max_size: int | None = None) -> Vocabulary:
        """The values counted at least ``min_count`` times (the ``max_size`` most frequent, ties
        by value), sorted."""
        kept = [v for v, c in counts.items() if c >= min_count]
        if max_size is not None and len(kept) > max_size:
            kept = sorted(kept, key=lambda v: (-counts[v], v))[:max_size]
        # Sorted for determinism regardless of input order.
        return cls(sorted(kept), n_oov=n_oov)

    @property
    def size(self) -> int:
        """Rows an id embedding table needs: values with a trained row + OOV buckets."""
        return self.id_rows + self.n_oov

    def extend(self, values: Iterable[str]) -> Vocabulary:
        """This vocabulary with ``values`` not yet known appended (in the order given, first
        occurrence): existing positions never move, the id table keeps its size."""
        new = list(dict.fromkeys(v for v in values if v not in self._index))
        return Vocabulary(self.values + new, n_oov=self.n_oov, id_rows=self.id_rows)

    def __len__(self) -> int:
        return len(self.values)

    def known(self, value: str) -> int:
        """Position of a known value, or -1."""
        return self._index.get(value, -1)

    def lookup(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """Indices into an id embedding table; unknown values (and values appended after
        training) land in a hashed OOV bucket."""
        if _large_strings(values):
            uniq, inv = factorize(np.asarray(values))
            return self.lookup(uniq.tolist())[inv]
        n, get = self.id_rows, self._index.get
        out = np.empty(len(values), dtype=np.int64)
        for j, v in enumerate(values.tolist() if isinstance(values, np.ndarray) else values):
            i = get(v) if isinstance(v, str) else None
            out[j] = i if i is not None and i < n else n + _hash(str(v), self.n_oov)
        return out

    def positions(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of known values, -1 for unknown ones (catalog/user-row lookups)."""
        if _large_strings(values):
            uniq, inv = factorize(np.asarray(values))
            return self.positions(uniq.tolist())[inv]
        get = self._index.get
        vals = values.tolist() if isinstance(values, np.ndarray) else values
        return np.fromiter((get(v, -1) if isinstance(v, str) else -1 for v in vals), dtype=np.int64,
                           count=len(values))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"values": self.values, "n_oov": self.n_oov}
        if self.id_rows != len(self.values):
            out["id_rows"] = self.id_rows
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(list(d["values"]), n_oov=int(d["n_oov"]), id_rows=int(d.get("id_rows", -1)))


def _large_strings(values: Sequence[Any] | np.ndarray) -> bool:
    return isinstance(values, np.ndarray) and values.dtype.kind == "U" and len(values) >= _FACTORIZE_MIN


def bucketize(values: np.ndarray, edges: Sequence[float], missing: np.ndarray | None = None) -> np.ndarray:
    """Bucket ids: 0 for missing (or negative, when no mask is given), 1..len(edges)+1 otherwise."""
    v = np.asarray(values, dtype=np.float64)
    b = np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right") + 1
    miss = (v < 0) if missing is None else missing
    return np.where(miss, 0, b).astype(np.int64)


@dataclass
class Encoder:
    """A fitted feature: the spec entry plus what fitting learned (vocabulary, moments, edges)."""

    spec: FeatureSpec
    vocab: Vocabulary | None = None
    mean: float = 0.0
    std: float = 1.0
    edges: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.key

    @property
    def kind(self) -> str:
        return self.spec.kind

    # -- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(cls, spec: FeatureSpec, values: Sequence[Any] | np.ndarray) -> Encoder:
        """Fit on the training rows' raw values."""
        values = _blank_missing(spec, values)
        if spec.kind == "categorical":
            counts: Counter[str] = Counter()
            for v, c in _value_counts(values):
                if not is_missing(v):
                    counts[_cat(v, spec)] += c  # a prefix merges values: their counts add up
            vocab = Vocabulary.from_counts(counts, n_oov=spec.oov_buckets, min_count=spec.min_count,
                                           max_size=spec.max_vocab)
            return cls(spec, vocab=vocab)
        if spec.kind == "multi_categorical":
            # min_count counts rows: a tag repeated inside one row counts once, as in transform.
            vocab = Vocabulary.fit((x for v in _iter(values) for x in dict.fromkeys(_tags(spec, v))),
                                   n_oov=spec.oov_buckets, min_count=spec.min_count, max_size=spec.max_vocab)
            return cls(spec, vocab=vocab)
        if spec.kind == "numeric":
            x, miss = to_float(values)
            x = np.log1p(np.maximum(x, 0.0)) if spec.log else x
            ok = x[~miss]
            mean = float(ok.mean()) if len(ok) else 0.0
            std = float(ok.std()) if len(ok) > 1 else 1.0
            return cls(spec, mean=mean, std=std if std > 1e-12 else 1.0)
        if spec.kind == "bucketized":
            if spec.edges is not None:
                return cls(spec, edges=[float(e) for e in spec.edges])
            if spec.derive is not None and spec.quantiles is None:
                hi = 24 if spec.derive == "hour_of_day" else 7
                return cls(spec, edges=[float(e) for e in range(1, hi)])
            x, miss = to_float(values)
            q = np.quantile(x[~miss], np.linspace(0, 1, int(spec.quantiles or 2) + 1)[1:-1]) if (~miss).any() \
                else np.zeros(0)
            return cls(spec, edges=sorted({float(e) for e in q.tolist()}))
        return cls(spec)  # text: hashing needs no fitting

    # -- applying -----------------------------------------------------------------------------

    @property
    def table_rows(self) -> int:
        """Rows of the embedding table this feature's layer needs (numeric: 0)."""
        s = self.spec
        if s.kind == "categorical":
            assert self.vocab is not None
            return self.vocab.size
        if s.kind == "multi_categorical":
            assert self.vocab is not None
            return 1 + self.vocab.size
        if s.kind == "text":
            return 1 + s.buckets
        if s.kind == "bucketized":
            return len(self.edges) + 2
        return 0

    def missing_row(self) -> np.ndarray:
        """The encoding of a missing value (an entity without a row in its table)."""
        return self.transform([None])[0]

    def transform(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        s = self.spec
        values = _blank_missing(s, values)
        if s.kind == "categorical":
            assert self.vocab is not None
            arr = values if isinstance(values, np.ndarray) else None
            if arr is not None and arr.ndim == 1 and arr.dtype.kind in "Uiufb" and len(arr) >= _FACTORIZE_MIN:
                uniq, inv = factorize(arr)
                return self.transform(uniq.tolist())[inv]
            return self.vocab.lookup([_cat(v, s) if not is_missing(v) else "" for v in _iter(values)])
        if s.kind in ("multi_categorical", "text"):
            n = len(values)
            out = np.zeros((n, s.max_len), np.int64)
            for j, v in enumerate(_iter(values)):
                toks = self._tokens(v)
                out[j, : len(toks)] = toks
            return out
        x, miss = to_float(values)
        if s.kind == "bucketized":
            return bucketize(x, self.edges, miss)
        x = np.log1p(np.maximum(x, 0.0)) if s.log else x
        z = np.where(miss, 0.0, (x - self.mean) / self.std)
        return np.stack([z, miss.astype(np.float64)], axis=1).astype(np.float32)

    def _tokens(self, v: Any) -> list[int]:
        s = self.spec
        if s.kind == "text":
            words = [] if is_missing(v) else _WORD.findall(" ".join(split_values(v, None)).lower())
            return [1 + _hash(w, s.buckets) for w in words[: s.max_len]]
        assert self.vocab is not None
        vocab, n = self.vocab, len(self.vocab)
        out = []
        for x in dict.fromkeys(_tags(s, v)):  # a tag counts once per row
            k = vocab.known(x)
            out.append(1 + (k if k >= 0 else n + _hash(x, vocab.n_oov)))
            if len(out) == s.max_len:
                break
        return out

    # -- persistence --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec.model_dump(mode="json", exclude_none=True)}
        if self.vocab is not None:
            out["vocab"] = self.vocab.to_json()
        if self.kind == "numeric":
            out["mean"], out["std"] = self.mean, self.std
        if self.kind == "bucketized":
            out["edges"] = self.edges
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Encoder:
        return cls(FeatureSpec.model_validate(d["spec"]),
                   vocab=Vocabulary.from_json(d["vocab"]) if "vocab" in d else None,
                   mean=float(d.get("mean", 0.0)), std=float(d.get("std", 1.0)),
                   edges=[float(e) for e in d.get("edges", [])])


def _blank_missing(spec: FeatureSpec, values: Sequence[Any] | np.ndarray) -> Sequence[Any] | np.ndarray:
    """``values`` with the spec's ``missing_values`` (whole cells: "n/a", or a numeric sentinel
    such as "-1") replaced by a missing value. Fitting and applying both do it, so a served
    value reads as the training rows did."""
    if not spec.missing_values:
        return values
    marks = {m.strip() for m in spec.missing_values}
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iuf":
        nums = []
        for m in marks:
            try:
                nums.append(float(m))
            except ValueError:
                continue
        x = values.astype(np.float64)
        return np.where(np.isin(x, nums), np.nan, x) if nums else values
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "U":
        return np.where(np.isin(np.char.strip(values), list(marks)), "", values)
    return [None if isinstance(v, str) and v.strip() in marks else v for v in _iter(values)]


def _tags(spec: FeatureSpec, v: Any) -> list[str]:
    """A multi-valued cell's values without the spec's ``missing_values``."""
    tags = split_values(v, spec.separator)
    return [t for t in tags if t not in spec.missing_values] if spec.missing_values else tags


def _iter(values: Sequence[Any] | np.ndarray) -> Iterable[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else values


def _value_counts(values: Sequence[Any] | np.ndarray) -> list[tuple[Any, int]]:
    """(value, count) pairs of a column, counted in numpy for large flat arrays."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "Uiufb" \
            and len(values) >= _FACTORIZE_MIN:
        uniq, inv = factorize(values)
        return list(zip(uniq.tolist(), np.bincount(inv, minlength=len(uniq)).tolist(), strict=True))
    counts: Counter[str | None] = Counter()
    for v in _iter(values):
        counts[None if is_missing(v) else _text(v)] += 1
    return list(counts.items())


def _cat(v: Any, spec: FeatureSpec) -> str:
    t = _text(v)
    return t[: spec.prefix] if spec.prefix else t


def derive_context(kind: str, timestamps: np.ndarray) -> np.ndarray:
    """Hour of day (0-23) or day of week (0 = Monday) in UTC, from unix seconds."""
    t = np.asarray(timestamps, dtype=np.int64)
    if kind == "hour_of_day":
        return ((t // 3600) % 24).astype(np.float64)
    return (((t // 86400) + 3) % 7).astype(np.float64)  # 1970-01-01 was a Thursday
