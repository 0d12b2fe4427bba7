"""A dataset spec → a :class:`offline.data.Dataset`: resolve the spec (RecBole
atomic headers, the shipped ML-100k files), read its tables, apply its columns and
policies, and report what was dropped or defaulted.

Columns go from Arrow to numpy without a Python object per row: strings are dictionary
encoded chunk by chunk (Python sees each distinct value once), numbers and times are
parsed by Arrow compute kernels; only a value Arrow cannot parse sends its chunk to a
Python loop, to name the offending row or to parse what Arrow does not (mixed ISO
offsets). Counting (the k-core filter, the report) runs on integer codes
(:func:`towers.encoders.factorize`).

The report (``Dataset.report``) counts the rows read, the rows dropped by each rule
(missing id or time, rating threshold, event type, minimum interactions), the users and
items without a row in their table (kept, with every feature's missing value) and the
interactions that repeat a (user, item) pair.

Bad input is a DataError that names the file, the column and, where it applies, the
first offending row ("FILE: column 'c' row N", N counting the data rows of that file);
a spec that does not validate is a ConfigError naming the field. Nothing is written by
loading, so a failed load leaves no half bundle behind.
"""

from __future__ import annotations

import datetime as dt
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from offline.data import Dataset, EntityTable, Interactions, fetch_recbole_wheel
from offline.tables import Parts, atomic_files, atomic_header, atomic_kind, read_parts
from towers.encoders import factorize
from towers.errors import ConfigError, DataError
from towers.spec import RESERVED, DatasetSpec, FeatureSpec, InteractionsSpec, TableSpec, parse_spec

_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
# Strings a numeric column may hold for "no value" (besides the spec's missing_values).
NUMERIC_NULLS = ("", "nan", "NaN", "NAN", "null", "NULL", "Null", "None", "none", "NA", "N/A", "n/a", "na", "#N/A")
# A categorical column's distinct values up to this many characters become a fixed-width
# numpy string array (the encoders factorise those without Python); longer ones (URLs,
# descriptions) an object array of references to the distinct values.
_MAX_FIXED_WIDTH = 64


def _path(p: str, *, base: Path, data_dir: Path) -> Path:
    q = Path(p.replace("{data_dir}", str(Path(data_dir).resolve()))).expanduser()
    return q if q.is_absolute() else base / q


def fetch_ml100k(data_dir: Path) -> Path:
    """The recbole wheel's ML-100k atomic files, extracted (as UTF-8) into ``data_dir/ml-100k``."""
    out = data_dir / "ml-100k"
    if all((out / f"ml-100k.{s}").is_file() for s in ("inter", "item", "user")):
        return out
    wheel = fetch_recbole_wheel(data_dir)
    try:
        zf = zipfile.ZipFile(wheel)
        out.mkdir(parents=True, exist_ok=True)
        for s in ("inter", "item", "user"):
            text = zf.read(f"{_RECBOLE_PREFIX}.{s}").decode("latin-1")
            tmp = out / f".ml-100k.{s}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out / f"ml-100k.{s}")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: cannot extract ML-100k ({e}); delete it to re-download") from e
    return out


def resolve(spec: DatasetSpec, *, base: Path, data_dir: Path, source: str = "dataset spec") -> DatasetSpec:
    """The explicit spec: absolute paths, atomic headers turned into tables and feature kinds
    (the spec's own entries override by column; ``drop`` removes inferred ones). The result
    is validated again (an inferred feature can clash with a declared one), as the bundle
    that saves it will validate it when it is loaded."""
    if spec.fetch == "recbole-ml-100k":
        fetch_ml100k(data_dir)
    inter = spec.interactions
    items, users = spec.items, spec.users
    if spec.atomic is not None:
        d = _path(spec.atomic, base=base, data_dir=data_dir)
        files = atomic_files(d)
        head = dict(atomic_header(files["inter"]))
        given = inter.model_fields_set
        auto: dict[str, Any] = {"path": str(files["inter"]), "format": "atomic"}
        for key in ("user", "item", "time"):
            if key not in given:
                auto[key] = _atomic_column(key, head, files)
        if "time" not in given and auto["time"] is None:
            auto.update(time="timestamp", time_format="row")  # no time column: file order is the order
        inter = inter.model_copy(update=auto)
        items = _atomic_table(files.get("item"), items, inter.item)
        users = _atomic_table(files.get("user"), users, inter.user)
    upd: dict[str, Any] = {"atomic": None, "fetch": None,
                           "interactions": inter.model_copy(update={"path": str(_path(inter.path or "", base=base,
                                                                                      data_dir=data_dir))})}
    for key, t in (("items", items), ("users", users)):
        if t is not None:
            if t.path is None:
                raise ConfigError(f"{source}: {key}.path", f"required: the atomic directory {spec.atomic} has no "
                                  f".{key[:-1]} file")
            upd[key] = t.model_copy(update={"path": str(_path(t.path, base=base, data_dir=data_dir))})
        else:
            upd[key] = None
    resolved = spec.model_copy(update=upd)
    where = f"{source} (with the atomic files of {spec.atomic})" if spec.atomic is not None else source
    return parse_spec(resolved.to_json(), source=where)


TIME_NAMES = ("timestamp", "time", "date", "datetime", "ts")  # RecBole datasets name their time field so


def _atomic_column(key: str, head: dict[str, str], files: dict[str, Path]) -> str | None:
    """The interactions' user, item or time column of a RecBole atomic directory with no spec.
    RecBole's convention: ``user_id``/``item_id``, else the id field is the first column of the
    ``.user``/``.item`` file (Yelp's ``business_id``, LastFM's ``artist_id``); the time is a
    ``timestamp`` (or ``date``, ``time``...) float column, else file order (None)."""
    if key == "time":
        return next((c for c in TIME_NAMES if head.get(c) == "float"), None)
    default = f"{key}_id"
    if default in head:
        return default
    table = files.get(key)
    first = atomic_header(table)[0][0] if table is not None else None
    if first is not None and first in head:
        return first
    raise DataError(f"{files['inter']}: no {default!r} column, and no .{key} file whose first (id) column the "
                    f"interactions have ({', '.join(head)}); name it in a spec: interactions.{key}")


def _atomic_table(path: Path | None, declared: TableSpec | None, default_id: str) -> TableSpec | None:
    if path is None:
        return declared
    header = atomic_header(path)
    id_col = declared.id if declared is not None and declared.id else default_id
    if id_col not in dict(header):
        raise DataError(f"{path}: id column {id_col!r} not in the header ({', '.join(n for n, _ in header)})")
    own = {f.column: f for f in (declared.features if declared is not None else [])}
    drop = set(declared.drop if declared is not None else [])
    feats = []
    for col, typ in header:
        if col == id_col or col in drop:
            continue
        if col in own:
            feats.append(own.pop(col))
            continue
        kind = atomic_kind(col, typ)
        if kind is not None:
            # "user"/"item" name the id features: an inferred column of that name is renamed.
            name = f"{col}_feature" if col in RESERVED else None
            feats.append(FeatureSpec(column=col, kind=kind, name=name))  # type: ignore[arg-type]
    feats.extend(own.values())  # declared columns the header lacks: reported missing on read
    title = declared.title if declared is not None and declared.title else next(
        (c for c, t in header if t == "token_seq" and atomic_kind(c, t) == "text"), None)
    # Not validated here: resolve() validates the whole resolved spec, naming the spec file.
    return TableSpec.model_construct(path=str(path), format="atomic", id=id_col, title=title, features=feats,
                                     encoding=declared.encoding if declared is not None else "utf-8")


# --------------------------------------------------------------------------- columns


def _cell(parts: Parts, column: str, row: int) -> str:
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
                raise DataError(f"{_cell(parts, column, offset + j)}: {float(x[j])!r} is not an id")
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


def _coded(col: pa.ChunkedArray, *, parts: Parts, column: str, ids: bool = True,
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


def _strings(col: pa.ChunkedArray, *, parts: Parts, column: str, ids: bool = True,
             fixed: bool = True) -> np.ndarray:
    """A column as strings, "" where missing (see :func:`_coded`)."""
    uniq, codes = _coded(col, parts=parts, column=column, ids=ids, fixed=fixed)
    return uniq[codes]


def _numbers(col: pa.ChunkedArray, *, parts: Parts, column: str, what: str,
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
                raise DataError(f"{_cell(parts, column, offset + j)}: {v!r} is not a number ({what}; "
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


def _times(col: pa.ChunkedArray, fmt: str, *, parts: Parts, column: str) -> tuple[np.ndarray, np.ndarray]:
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
        x, miss = _numbers(col, parts=parts, column=column, what=f"unix {unit}; set interactions.time_format")
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
            raise DataError(f"{_cell(parts, column, offset + j)}: time {v!r} does not parse as {fmt!r} "
                            "(interactions.time_format: unix, unix_ms, iso or a strptime format)") from None
        d = d if d.tzinfo is not None else d.replace(tzinfo=dt.timezone.utc)  # naive times are UTC
        secs[k] = math.floor(d.timestamp())
    blank = np.array([v == "" for v in uniq], dtype=bool)
    return secs[codes], blank[codes]


def _raw(col: pa.ChunkedArray, f: FeatureSpec, *, parts: Parts) -> np.ndarray:
    """A feature column's raw values as its encoder reads them: float64 (NaN = missing) for
    numeric and bucketized, strings ("" = missing) otherwise, lists for list columns of a
    multi_categorical feature. Wrong types and entirely missing columns are errors."""
    what = f"feature {f.key!r} is {f.kind}"
    _require_values(col, parts=parts, column=f.column)
    if f.kind in ("numeric", "bucketized"):
        x, miss = _numbers(col, parts=parts, column=f.column, what=what, missing=tuple(f.missing_values))
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
    out = _strings(col, parts=parts, column=f.column, ids=False, fixed=f.kind == "categorical")
    if len(out) and not (out != "").any():
        raise DataError(f"{parts.path}: column {f.column!r} is entirely null")
    return out


def _require_values(col: pa.ChunkedArray, *, parts: Parts, column: str) -> None:
    if len(col) and col.null_count == len(col):
        raise DataError(f"{parts.path}: column {column!r} is entirely null")


def read_interactions(spec: InteractionsSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The interactions' columns and a report of what was dropped, as plain arrays: the ids as
    ``users``/``items`` (distinct strings) and ``user_codes``/``item_codes`` (rows), and
    timestamp, rating, weight, group and context by column."""
    path = Path(spec.path or "")
    cols = [spec.user, spec.item]
    if spec.time_format != "row":
        cols.append(spec.time)
    if spec.event_type is not None:
        cols.append(spec.event_type.column)
    if spec.rating is not None:
        cols.append(spec.rating.column)
    if spec.group is not None:
        cols.append(spec.group)
    context = [f for f in spec.context if f.derive is None]
    cols += [f.column for f in context]
    cols = list(dict.fromkeys(cols))
    strings = [spec.user, spec.item, *([spec.group] if spec.group else []),
               *([spec.event_type.column] if spec.event_type else []),
               *(f.column for f in context if f.kind == "categorical")]
    t, parts = read_parts(path, fmt=spec.format, sep=spec.sep, encoding=spec.encoding, columns=cols,
                          strings=strings, what="interactions")
    n0 = t.num_rows
    if n0 == 0:
        raise DataError(f"{path}: the interactions table has no rows")
    for c in cols:
        _require_values(t.column(c), parts=parts, column=c)
    users, u_codes = _coded(t.column(spec.user), parts=parts, column=spec.user)
    items, i_codes = _coded(t.column(spec.item), parts=parts, column=spec.item)
    if spec.time_format == "row":
        ts, no_time = np.arange(n0, dtype=np.int64), np.zeros(n0, bool)
    else:
        ts, no_time = _times(t.column(spec.time), spec.time_format, parts=parts, column=spec.time)
    keep = (users != "")[u_codes] & (items != "")[i_codes] & ~no_time
    report: dict[str, Any] = {"rows_read": n0, "dropped_missing_id_or_time": int((~keep).sum())}
    rating = np.ones(n0, np.float32)
    weight = np.ones(n0, np.float32)
    if spec.rating is not None:
        r, miss = _numbers(t.column(spec.rating.column), parts=parts, column=spec.rating.column,
                           what="interactions.rating")
        rating = r.astype(np.float32)  # NaN where a row has no rating
        if spec.rating.threshold is not None:
            low = miss | (r < spec.rating.threshold)
            report["dropped_below_rating_threshold"] = int((low & keep).sum())
            keep &= ~low
    if spec.event_type is not None:
        et = spec.event_type
        kinds, codes = _coded(t.column(et.column), parts=parts, column=et.column, ids=False)
        read_counts = np.bincount(codes, minlength=len(kinds))
        report["event_types_read"] = {str(k): int(n) for k, n in sorted(zip(kinds.tolist(), read_counts.tolist(),
                                                                            strict=True)) if k}
        if et.positives is not None:
            pos = np.isin(kinds, np.asarray(et.positives, dtype=str))[codes]
            report["dropped_not_positive_type"] = int((~pos & keep).sum())
            keep &= pos
        w_of = np.array([et.weights.get(k, 1.0) for k in kinds.tolist()], dtype=np.float32)
        weight = w_of[codes] if len(kinds) else weight
        kept = np.bincount(codes[keep], minlength=len(kinds))
        report["event_types"] = {str(k): int(n) for k, n in sorted(zip(kinds.tolist(), kept.tolist(), strict=True))
                                 if n}
    group = _strings(t.column(spec.group), parts=parts, column=spec.group, ids=False) if spec.group else None
    ctx = {f.column: _raw(t.column(f.column), f, parts=parts) for f in context}
    idx = None if keep.all() else np.flatnonzero(keep)
    del t  # the Arrow buffers: handed back to the OS before the rows are copied
    pa.default_memory_pool().release_unused()
    out: dict[str, Any] = {"users": users, "user_codes": _rows(u_codes, idx), "items": items,
                           "item_codes": _rows(i_codes, idx), "timestamp": _rows(ts, idx),
                           "rating": _rows(rating, idx), "weight": _rows(weight, idx),
                           "group": _rows(group, idx) if group is not None else None,
                           "context": {k: _rows(v, idx) for k, v in ctx.items()}}
    return out, report


def take_rows(v: Any, idx: np.ndarray) -> Any:
    return v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx.tolist()]


def _rows(v: Any, idx: np.ndarray | None) -> Any:
    return v if idx is None else take_rows(v, idx)


def read_entities(spec: TableSpec, *, what: str,
                  default_id: str) -> tuple[np.ndarray, dict[str, Any], list[str] | None]:
    """An entity table: (ids, raw feature columns by column name, display titles or None).
    Ids must be present and unique."""
    path = Path(spec.path or "")
    id_col = spec.id or default_id
    cols = list(dict.fromkeys([id_col, *(f.column for f in spec.features), *([spec.title] if spec.title else [])]))
    strings = [id_col, *(f.column for f in spec.features if f.kind in ("categorical", "multi_categorical", "text")),
               *([spec.title] if spec.title else [])]
    t, parts = read_parts(path, fmt=spec.format, sep=spec.sep, encoding=spec.encoding, columns=cols,
                          strings=strings, what=what)
    uniq, codes = _coded(t.column(id_col), parts=parts, column=id_col)
    ids = uniq[codes]
    if (ids == "").any():
        raise DataError(f"{_cell(parts, id_col, int(np.flatnonzero(ids == '')[0]))}: empty {what} id")
    counts = np.bincount(codes, minlength=len(uniq))
    if (counts > 1).any():
        # The first row whose id occurred before: name it and where the id first was.
        seen_before = np.ones(len(codes), bool)
        seen_before[np.unique(codes, return_index=True)[1]] = False
        second = int(np.flatnonzero(seen_before)[0])
        first = int(np.flatnonzero(codes == codes[second])[0])
        raise DataError(f"{_cell(parts, id_col, second)}: duplicate {what} id {str(ids[first])!r} (first in "
                        f"row {parts.locate(first)[1]}); {what} ids must be unique")
    columns = {f.column: _raw(t.column(f.column), f, parts=parts) for f in spec.features}
    titles = _strings(t.column(spec.title), parts=parts, column=spec.title, ids=False, fixed=False) \
        if spec.title else None
    return ids, columns, [str(x) for x in titles.tolist()] if titles is not None else None


def min_count_filter(user: np.ndarray, item: np.ndarray, *, min_user: int, min_item: int) -> np.ndarray:
    """Rows kept by the k-core rule (every user ≥ min_user rows, every item ≥ min_item),
    iterated to a fixed point as dropping one side can take the other below its minimum.
    ``user``/``item``: ids, or their integer codes (0..n-1)."""
    keep = np.ones(len(user), dtype=bool)
    if (min_user <= 1 and min_item <= 1) or not len(user):
        return keep
    u = user if user.dtype.kind == "i" else factorize(user)[1]
    i = item if item.dtype.kind == "i" else factorize(item)[1]
    while True:
        before = int(keep.sum())
        for codes, k in ((u, min_user), (i, min_item)):
            if k > 1:
                counts = np.bincount(codes[keep], minlength=int(codes.max()) + 1)
                keep &= counts[codes] >= k
        if int(keep.sum()) == before:
            return keep


def _nothing_left(path: str, report: dict[str, Any]) -> str:
    why = [f"{report['rows_read']} rows read"]
    for key, rule in (("dropped_missing_id_or_time", "without a user id, item id or time"),
                      ("dropped_below_rating_threshold", "below interactions.rating.threshold"),
                      ("dropped_not_positive_type", "not one of interactions.event_type.positives"),
                      ("dropped_min_interactions", "below policies.min_user_interactions / min_item_interactions")):
        if report.get(key):
            why.append(f"{report[key]} {rule}")
    if "dropped_not_positive_type" in report:
        why.append("event types in the file: " + (", ".join(report.get("event_types_read", {})) or "none"))
    return f"{path}: no interactions left after filtering ({'; '.join(why)})"


def dataset_from_spec(spec: DatasetSpec, *, base: Path, data_dir: Path, source: str = "dataset spec") -> Dataset:
    """Read everything ``spec`` declares (paths relative to ``base``) into a Dataset;
    ``source`` names the spec in configuration errors."""

    r = resolve(spec, base=base, data_dir=data_dir, source=source)
    cols, report = read_interactions(r.interactions)
    path = r.interactions.path or ""
    keep = min_count_filter(cols["user_codes"], cols["item_codes"], min_user=r.policies.min_user_interactions,
                            min_item=r.policies.min_item_interactions)
    report["dropped_min_interactions"] = int((~keep).sum())
    if not keep.any():
        raise DataError(_nothing_left(path, report))
    idx = None if keep.all() else np.flatnonzero(keep)
    del keep

    def take(key: str) -> Any:  # one column at a time: the unfiltered one is freed at once
        v = cols.pop(key)
        return None if v is None else _rows(v, idx)

    users, u_codes = _present(cols.pop("users"), take("user_codes"))
    items, i_codes = _present(cols.pop("items"), take("item_codes"))
    context = cols.pop("context")
    inter = Interactions(users[u_codes], items[i_codes], take("rating"), take("timestamp"), take("group"),
                         {k: _rows(context.pop(k), idx) for k in list(context)}, take("weight"))
    tables: dict[str, EntityTable] = {}
    titles: dict[str, str] = {}
    for side, t, default_id, seen in (("users", r.users, r.interactions.user, users),
                                      ("items", r.items, r.interactions.item, items)):
        if t is None:
            tables[side] = EntityTable(np.sort(seen))
            continue
        eids, columns, ttl = read_entities(t, what=side[:-1], default_id=default_id)
        tables[side] = EntityTable(eids, columns)
        missing = np.setdiff1d(seen, eids)
        # Kept, with every feature's missing value: an id the table lacks is not an error.
        report[f"{side}_without_table_row"] = len(missing)
        if len(missing):
            report[f"{side}_without_table_row_example"] = str(missing[0])
        if side == "items" and ttl is not None:
            titles = dict(zip(eids.tolist(), ttl, strict=True))
    pairs = np.sort(u_codes * max(len(items), 1) + i_codes)  # a sort beats np.unique's hash on int64 here
    report["interactions"] = len(inter)
    report["users"] = len(users)
    report["items"] = len(items)
    # rows that repeat a (user, item) pair
    report["repeated_pairs"] = int(len(pairs) - 1 - np.count_nonzero(np.diff(pairs))) if len(pairs) else 0
    return Dataset(r.name, inter, tables["users"], tables["items"], r, titles, report)


def _present(uniques: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the ids that still occur, the codes renumbered to index them): filtering leaves some of
    the dictionary's ids (and "", the missing id) without a row."""
    seen = np.bincount(codes, minlength=len(uniques)) > 0
    return uniques[seen], (np.cumsum(seen) - 1)[codes]


def read_item_feed(path: Path, spec: DatasetSpec) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """A catalog feed in the spec's item schema (any table format: the items table's id,
    feature and title columns): (ids, raw columns, titles). The refresh encodes it with the
    bundle's own fitted encoders."""
    table = spec.items or TableSpec(id=spec.interactions.item)
    feed = table.model_copy(update={"path": str(path), "format": "auto", "sep": None})
    ids, columns, titles = read_entities(feed, what="item", default_id=spec.interactions.item)
    return ids, columns, dict(zip(ids.tolist(), titles, strict=True)) if titles is not None else {}
