"""A dataset spec → a :class:`offline.data.Dataset`: resolve the spec (RecBole
atomic headers, the shipped ML-100k files), read its tables, apply its columns and
policies, and report what was dropped or defaulted.

Columns go from Arrow to numpy without a Python object per row (``offline.columns``).
Counting (the k-core filter, the report) runs on integer codes
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

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from offline import columns as colconv
from offline.data import Dataset, EntityTable, Interactions, fetch_recbole_wheel
from offline.tables import atomic_files, atomic_header, atomic_kind, read_parts
from towers.encoders import factorize
from towers.errors import ConfigError, DataError
from towers.spec import RESERVED, DatasetSpec, FeatureSpec, InteractionsSpec, TableSpec, parse_spec

_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


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
        colconv.require_values(t.column(c), parts=parts, column=c)
    users, u_codes = colconv.coded(t.column(spec.user), parts=parts, column=spec.user)
    items, i_codes = colconv.coded(t.column(spec.item), parts=parts, column=spec.item)
    if spec.time_format == "row":
        ts, no_time = np.arange(n0, dtype=np.int64), np.zeros(n0, bool)
    else:
        ts, no_time = colconv.times(t.column(spec.time), spec.time_format, parts=parts, column=spec.time)
    keep = (users != "")[u_codes] & (items != "")[i_codes] & ~no_time
    report: dict[str, Any] = {"rows_read": n0, "dropped_missing_id_or_time": int((~keep).sum())}
    rating = np.ones(n0, np.float32)
    weight = np.ones(n0, np.float32)
    if spec.rating is not None:
        r, miss = colconv.numbers(t.column(spec.rating.column), parts=parts, column=spec.rating.column,
                           what="interactions.rating")
        rating = r.astype(np.float32)  # NaN where a row has no rating
        if spec.rating.threshold is not None:
            low = miss | (r < spec.rating.threshold)
            report["dropped_below_rating_threshold"] = int((low & keep).sum())
            keep &= ~low
    if spec.event_type is not None:
        et = spec.event_type
        kinds, codes = colconv.coded(t.column(et.column), parts=parts, column=et.column, ids=False)
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
    group = colconv.strings(t.column(spec.group), parts=parts, column=spec.group, ids=False) if spec.group else None
    ctx = {f.column: colconv.raw_feature(t.column(f.column), f, parts=parts) for f in context}
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
    uniq, codes = colconv.coded(t.column(id_col), parts=parts, column=id_col)
    ids = uniq[codes]
    if (ids == "").any():
        raise DataError(f"{colconv.cell(parts, id_col, int(np.flatnonzero(ids == '')[0]))}: empty {what} id")
    counts = np.bincount(codes, minlength=len(uniq))
    if (counts > 1).any():
        # The first row whose id occurred before: name it and where the id first was.
        seen_before = np.ones(len(codes), bool)
        seen_before[np.unique(codes, return_index=True)[1]] = False
        second = int(np.flatnonzero(seen_before)[0])
        first = int(np.flatnonzero(codes == codes[second])[0])
        raise DataError(f"{colconv.cell(parts, id_col, second)}: duplicate {what} id {str(ids[first])!r} (first in "
                        f"row {parts.locate(first)[1]}); {what} ids must be unique")
    columns = {f.column: colconv.raw_feature(t.column(f.column), f, parts=parts) for f in spec.features}
    titles = colconv.strings(t.column(spec.title), parts=parts, column=spec.title, ids=False, fixed=False) \
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
