"""Arrow columns into the arrays a dataset holds, without a Python object per row: strings
dictionary-encoded chunk by chunk (Python sees each distinct value once), numbers and times
parsed by Arrow compute kernels; only a value Arrow cannot parse sends its chunk to a Python
loop, to name the offending row or to parse what Arrow does not (mixed ISO offsets).

Bad input is a DataError naming the file, the column and the first offending row ("FILE:
column 'c' row N", N counting the data rows of that file).
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from offline.tables import Parts
from towers.errors import DataError
from towers.spec import FeatureSpec

# Strings a numeric column may hold for "no value" (besides the spec's missing_values).
NUMERIC_NULLS = ("", "nan", "NaN", "NAN", "null", "NULL", "Null", "None", "none", "NA", "N/A", "n/a", "na", "#N/A")
# A categorical column's distinct values up to this many characters become a fixed-width
# numpy string array (the encoders factorise those without Python); longer ones (URLs,
# descriptions) an object array of references to the distinct values.
_MAX_FIXED_WIDTH = 64


def cell(parts: Parts, column: str, row: int) -> str:
    """``FILE: column 'c' row N`` of a 0-based row of the concatenated table."""
    return parts.cell(column, row)


def _chunks(col: pa.ChunkedArray) -> list[pa.Array]:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return list(col.chunks)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _as_text(col: pa.ChunkedArray, *, parts: Parts, column: str, ids: bool) -> list[pa.Array]:
    """String chunks of a column: whole floats as integers ("7.0" is id "7"); lists joined by
    spaces (categories only). ``ids``: a fractional float is an error."""
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    out, offset = [], 0
    for c in _chunks(col):
        if pa.types.is_floating(t):
            x = c.to_numpy(zero_copy_only=False)
            nan = np.isnan(x)
            whole = nan | (np.isfinite(x) & (x == np.round(x)))
            if ids and not whole.all():
                j = int(np.flatnonzero(~whole)[0])
                raise DataError(f"{cell(parts, column, offset + j)}: {float(x[j])!r} is not an id")
            safe = np.where(whole & ~nan, x, 0.0)
            txt = np.where(whole, safe.astype(np.int64).astype(str), x.astype(str))
            out.append(pa.array(txt, mask=nan, type=pa.string()))
        elif _is_list(t) and not ids:
            try:
                out.append(pc.binary_join(c.cast(pa.list_(pa.string())), " "))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{parts.path}: column {column!r} of type {t} cannot be read as strings") from e
        else:
            try:
                out.append(c.cast(pa.string()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                what = "ids" if ids else "strings"
                raise DataError(f"{parts.path}: column {column!r} of type {t} cannot be read as {what}") from e
        offset += len(c)
    return out


def _dictionary(strings: pa.Array | pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(distinct strings, int64 codes) of a string column: one pass of Arrow's hash table over
    the rows; trimming (" 7" is "7") and missing values ("") are handled on the distinct
    values, which Python sees once each."""
    enc = strings.dictionary_encode()
    chunks = enc.chunks if isinstance(enc, pa.ChunkedArray) else [enc]
    if not chunks:
        return [""], np.zeros(0, np.int64)
    dictionary = chunks[0].dictionary  # one dictionary for all chunks
    trimmed = pc.utf8_trim_whitespace(dictionary)
    # A null index is -1: the last remap entry, the code of "".
    raw = np.concatenate([np.asarray(pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False)) for c in chunks])
    if len(dictionary) and not pc.any(pc.not_equal(trimmed, dictionary)).as_py():
        words = trimmed.to_pylist()  # nothing to trim (Parquet, clean CSV): the codes stand
        blank = pc.index(trimmed, "").as_py()
        if blank < 0:
            words.append("")
            blank = len(words) - 1
        remap = np.append(np.arange(len(dictionary), dtype=np.int64), blank)
        return words, remap[raw]
    pos: dict[str, int] = {}
    remap = np.array([pos.setdefault(w, len(pos)) for w in trimmed.to_pylist()] + [pos.setdefault("", len(pos))],
                     np.int64)
    return list(pos), remap[raw]


def coded(col: pa.ChunkedArray, *, parts: Parts, column: str, ids: bool = True,
           fixed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A column as (distinct strings, codes): ``uniques[codes]`` is the column, "" where missing.
    ``fixed``: the uniques are a ``<U`` array (ids, short categories) unless one is longer than
    _MAX_FIXED_WIDTH; otherwise an object array (rows of ``uniques[codes]`` share the objects)."""
    chunks = _as_text(col, parts=parts, column=column, ids=ids)
    words, codes = _dictionary(pa.chunked_array(chunks, type=pa.string()))
    uniq = np.empty(len(words), dtype=object)
    uniq[:] = words
    if fixed:
        u = uniq.astype(str)
        if u.dtype.itemsize // 4 <= _MAX_FIXED_WIDTH:
            return u, codes
    return uniq, codes


def strings(col: pa.ChunkedArray, *, parts: Parts, column: str, ids: bool = True,
             fixed: bool = True) -> np.ndarray:
    """A column as strings, "" where missing (see :func:`_coded`)."""
    uniq, codes = coded(col, parts=parts, column=column, ids=ids, fixed=fixed)
    return uniq[codes]


def numbers(col: pa.ChunkedArray, *, parts: Parts, column: str, what: str,
             missing: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, missing mask) of a numeric column; a string column must hold numbers
    or missing markers (NUMERIC_NULLS, ``missing``), the first other value is an error."""
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    nulls = pa.array(sorted(set(NUMERIC_NULLS) | {m.strip() for m in missing}), type=pa.string())
    xs, offset = [], 0
    for c in _chunks(col):
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
            xs.append(c.cast(pa.float64()).to_numpy(zero_copy_only=False))
        elif _is_string(t):
            s = pc.utf8_trim_whitespace(c)
            s = pc.if_else(pc.is_in(s, value_set=nulls), pa.scalar(None, pa.string()), s)
            try:
                xs.append(s.cast(pa.float64()).to_numpy(zero_copy_only=False))
            except pa.ArrowInvalid:
                j, v = _first_not_number(s)
                raise DataError(f"{cell(parts, column, offset + j)}: {v!r} is not a number ({what}; "
                                "list such strings in missing_values)") from None
        else:
            raise DataError(f"{parts.path}: column {column!r} has type {t}, not numbers ({what})")
        offset += len(c)
    x = np.concatenate(xs) if xs else np.zeros(0, np.float64)
    miss = ~np.isfinite(x)
    return np.where(miss, np.nan, x), miss


_NUMBER = r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[iI][nN][fF]([iI][nN][iI][tT][yY])?|[nN][aA][nN])$"


def _first_not_number(s: pa.Array) -> tuple[int, str]:
    """The first row Arrow's float parser refuses (the error path only)."""
    ok = pc.match_substring_regex(s, _NUMBER).fill_null(True)
    bad = np.flatnonzero(~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool))
    if len(bad):
        return int(bad[0]), str(s[int(bad[0])].as_py())
    for j, v in enumerate(s.to_pylist()):  # the pattern and Arrow disagree: ask Arrow row by row
        if v is not None:
            try:
                pa.array([v]).cast(pa.float64())
            except pa.ArrowInvalid:
                return j, v
    return 0, str(s[0].as_py())


_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def times(col: pa.ChunkedArray, fmt: str, *, parts: Parts, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(unix seconds int64, missing mask) of a time column; the first unparseable row is named."""
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_date32(t):
            v, per = pc.cast(col, pa.int32()).cast(pa.int64()), 1
            scale = 86_400
        else:
            v = pc.cast(col, pa.int64())
            per, scale = (1_000, 1) if pa.types.is_date64(t) else (_UNIT[t.unit], 1)
        miss = np.asarray(pc.is_null(v).to_numpy(zero_copy_only=False), dtype=bool)
        raw = np.asarray(v.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.floor_divide(raw, per) * scale, miss
    if fmt in ("unix", "unix_ms"):
        unit = "milliseconds" if fmt == "unix_ms" else "seconds"
        x, miss = numbers(col, parts=parts, column=column, what=f"unix {unit}; set interactions.time_format")
        x = x / 1000.0 if fmt == "unix_ms" else x
        return np.where(miss, 0, np.floor(np.where(miss, 0.0, x))).astype(np.int64), miss
    secs, misses, offset = [], [], 0
    for c in _as_text(col, parts=parts, column=column, ids=False):
        s = pc.utf8_trim_whitespace(c)
        s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
        parsed = _arrow_times(s, fmt)
        if parsed is None:  # Arrow cannot parse every row: Python, per distinct value
            sec, miss = _python_times(s, fmt, parts=parts, column=column, offset=offset)
        else:
            miss = np.asarray(pc.is_null(parsed).to_numpy(zero_copy_only=False), dtype=bool)
            sec = np.floor_divide(np.asarray(parsed.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False),
                                             dtype=np.int64), _UNIT[parsed.type.unit])
        secs.append(sec)
        misses.append(miss)
        offset += len(c)
    if not secs:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(secs), np.concatenate(misses)


def _arrow_times(s: pa.Array, fmt: str) -> pa.Array | None:
    """Arrow's parse of every non-null string, or None when it fails on one of them."""
    if fmt == "iso":
        for typ in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):  # naive, then with offsets
            try:
                return s.cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        return None
    try:
        parsed = pc.strptime(s, format=fmt, unit="s", error_is_null=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return parsed if parsed.null_count == s.null_count else None


def _python_times(s: pa.Array, fmt: str, *, parts: Parts, column: str,
                  offset: int) -> tuple[np.ndarray, np.ndarray]:
    uniq, codes = _dictionary(s)
    secs = np.zeros(len(uniq), np.int64)
    for k, v in enumerate(uniq):
        if v == "":
            continue
        try:
            d = dt.datetime.fromisoformat(v) if fmt == "iso" else dt.datetime.strptime(v, fmt)
        except ValueError:
            j = int(np.flatnonzero(codes == k)[0])
            raise DataError(f"{cell(parts, column, offset + j)}: time {v!r} does not parse as {fmt!r} "
                            "(interactions.time_format: unix, unix_ms, iso or a strptime format)") from None
        d = d if d.tzinfo is not None else d.replace(tzinfo=dt.timezone.utc)  # naive times are UTC
        secs[k] = math.floor(d.timestamp())
    blank = np.array([v == "" for v in uniq], dtype=bool)
    return secs[codes], blank[codes]


def raw_feature(col: pa.ChunkedArray, f: FeatureSpec, *, parts: Parts) -> np.ndarray:
    """A feature column's raw values as its encoder reads them: float64 (NaN = missing) for
    numeric and bucketized, strings ("" = missing) otherwise, lists for list columns of a
    multi_categorical feature. Wrong types and entirely missing columns are errors."""
    what = f"feature {f.key!r} is {f.kind}"
    require_values(col, parts=parts, column=f.column)
    if f.kind in ("numeric", "bucketized"):
        x, miss = numbers(col, parts=parts, column=f.column, what=what, missing=tuple(f.missing_values))
        if len(x) and miss.all():
            raise DataError(f"{parts.path}: column {f.column!r} is entirely null (no value is a number; {what})")
        return x
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if not (_is_string(t) or _is_list(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            or pa.types.is_boolean(t)):
        raise DataError(f"{parts.path}: column {f.column!r} has type {t}, not strings ({what})")
    if f.kind == "multi_categorical" and _is_list(t):
        # A list per row (entity tables: one row per item or user); fromiter keeps equal-length
        # lists as objects instead of making a 2-d array of them.
        return np.fromiter(col.to_pylist(), dtype=object, count=len(col))
    out = strings(col, parts=parts, column=f.column, ids=False, fixed=f.kind == "categorical")
    if len(out) and not (out != "").any():
        raise DataError(f"{parts.path}: column {f.column!r} is entirely null")
    return out


def require_values(col: pa.ChunkedArray, *, parts: Parts, column: str) -> None:
    if len(col) and col.null_count == len(col):
        raise DataError(f"{parts.path}: column {column!r} is entirely null")
