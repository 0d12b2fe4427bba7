"""Reading a spec's tables: Parquet (a file or a directory of shards), CSV/TSV, JSON
lines and RecBole atomic files, into pyarrow Tables, with errors that name the file.

Only the declared columns are read: Parquet file by file with ``pyarrow.parquet`` (its
row groups decoded in pyarrow's threads), CSV with ``include_columns``; no Python object
per row. Columns named in ``strings`` (ids, categories) are read from CSV as strings, so
"007" and zip code "02139" keep their zeros; an empty CSV cell is null ("NA" stays a
string). CSV and JSON lines may be compressed (``events.csv.gz``). In a directory, hidden
and ``_``-prefixed files (``_SUCCESS``, ``.crc``) are not shards. RecBole atomic
files are tab-separated with a typed header (``user_id:token``, ``class:token_seq``,
``rating:float``, ``vec:float_seq``), read as string columns; :func:`atomic_kind` maps
those types to feature kinds (token → categorical, token_seq → multi_categorical, or text
for title-like names, float → numeric).

:func:`read_parts` also returns each file's row count, so a bad value in a directory of
shards is reported as "SHARD: column 'c' row N" of the shard it is in (:class:`Parts`).
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from towers.errors import DataError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "atomic")
_SUFFIX = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl",
           ".json": "jsonl", ".ndjson": "jsonl", ".inter": "atomic", ".item": "atomic", ".user": "atomic"}
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
# pyarrow decompresses CSV and JSON files by these suffixes ("events.csv.gz").
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
# Title-like token_seq columns are words, not tags: read them as text.
_TEXTY = ("title", "name", "description", "text", "review", "summary")


@dataclass(frozen=True)
class Parts:
    """Where the rows of a concatenated table came from: ``files[k]`` holds ``rows[k]`` rows."""

    path: Path  # what the spec named (a file, a directory, a glob)
    files: tuple[Path, ...]
    rows: tuple[int, ...]

    def locate(self, row: int) -> tuple[Path, int]:
        """(file, 1-based data row of that file) of a 0-based row of the concatenated table."""
        ends = np.cumsum(self.rows)
        k = min(int(np.searchsorted(ends, row, side="right")), len(self.files) - 1)
        return self.files[k], row - (int(ends[k - 1]) if k else 0) + 1

    def cell(self, column: str, row: int) -> str:
        """``FILE: column 'c' row N``: how an error names a bad value."""
        file, n = self.locate(row)
        return f"{file}: column {column!r} row {n}"


def files_of(path: Path) -> list[Path]:
    """A file, every data file in a directory (sorted: shards; hidden and ``_`` files such
    as ``_SUCCESS`` skipped), or the matches of a glob."""
    if any(c in str(path) for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _SUFFIX
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    elif path.is_file():
        found = [path]
    else:
        raise DataError(f"{path}: file not found")
    if not found:
        raise DataError(f"{path}: no data files (.parquet, .csv, .tsv, .jsonl, .inter/.item/.user)")
    return found


def _suffix(path: Path) -> str:
    """The suffix that names the format: ``.csv`` of ``events.csv.gz``."""
    sfx = [s.lower() for s in path.suffixes]
    if sfx and sfx[-1] in _COMPRESSED:
        sfx.pop()
    return sfx[-1] if sfx else ""


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    fmt = _SUFFIX.get(_suffix(path))
    if fmt is None or (fmt in ("parquet", "atomic") and path.suffix.lower() in _COMPRESSED):
        raise DataError(f"{path}: cannot tell the format from the suffix {''.join(path.suffixes)!r}; set format: "
                        f"({', '.join(FORMATS)}; CSV and JSON lines may be compressed: .csv.gz, .jsonl.gz)")
    return fmt


def read_table(path: Path, *, fmt: str = "auto", sep: str | None = None, encoding: str = "utf-8",
               columns: Sequence[str] | None = None, strings: Sequence[str] = (), what: str = "table") -> pa.Table:
    """The columns ``columns`` (all when None) of every file under ``path``, concatenated.
    ``what`` names the table in errors (``interactions``, ``items``)."""
    return read_parts(path, fmt=fmt, sep=sep, encoding=encoding, columns=columns, strings=strings, what=what)[0]


def read_parts(path: Path, *, fmt: str = "auto", sep: str | None = None, encoding: str = "utf-8",
               columns: Sequence[str] | None = None, strings: Sequence[str] = (),
               what: str = "table") -> tuple[pa.Table, Parts]:
    """:func:`read_table` and where its rows came from."""
    files = files_of(path)
    fmts = {detect_format(f, fmt) for f in files}
    if len(fmts) > 1:
        raise DataError(f"{path}: mixed formats {sorted(fmts)}; set format: or keep one kind of file")
    kind = fmts.pop()
    parts = [_read_one(f, kind, sep, encoding, columns, strings, what) for f in files]
    try:
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: its files do not share one schema ({_first_line(e)})") from e
    return table, Parts(path, tuple(files), tuple(p.num_rows for p in parts))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_columns(names: Sequence[str], wanted: Sequence[str] | None, path: Path, what: str) -> None:
    missing = [c for c in (wanted or []) if c not in names]
    if missing:
        raise DataError(f"{path}: {what} column {missing[0]!r} not found (columns: {', '.join(names)})")


def _read_one(f: Path, kind: str, sep: str | None, encoding: str, columns: Sequence[str] | None,
              strings: Sequence[str], what: str) -> pa.Table:
    cols = list(columns) if columns is not None else None
    if kind == "parquet":
        try:
            pf = pq.ParquetFile(f)
            _check_columns(pf.schema_arrow.names, cols, f, what)
            return pf.read(columns=cols, use_threads=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise DataError(f"{f}: not readable as Parquet ({_first_line(e)})") from e
    if kind == "atomic":
        t = read_atomic(f, encoding=encoding)[0]
    elif kind == "jsonl":
        try:
            t = pajson.read_json(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: not readable as JSON lines ({_first_line(e)}){_sniff(f)}") from e
    else:
        return _read_csv(f, sep or ("\t" if kind == "tsv" else ","), encoding, cols, strings, what)
    _check_columns(t.schema.names, cols, f, what)
    return t.select(cols) if cols is not None else t


def _read_csv(f: Path, delim: str, encoding: str, cols: list[str] | None, strings: Sequence[str],
              what: str) -> pa.Table:
    read = pacsv.ReadOptions(encoding=encoding)
    parse = pacsv.ParseOptions(delimiter=delim, newlines_in_values=True)

    def names() -> list[str]:
        with pacsv.open_csv(f, read_options=read, parse_options=parse) as r:
            return list(r.schema.names)

    # Only "" is null: "NA" is a country and "null" may be a category; numeric columns treat
    # the usual missing markers as missing when they are read (offline.loading).
    conv = pacsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in strings},
                                null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True)
    try:
        return pacsv.read_csv(f, read_options=read, parse_options=parse, convert_options=conv)
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError, UnicodeDecodeError, LookupError) as e:
        err = e
    with contextlib.suppress(pa.ArrowInvalid, OSError, UnicodeDecodeError, LookupError):
        _check_columns(names(), cols, f, what)  # a missing column is the likelier story: say so
    raise DataError(f"{f}: not readable as CSV with delimiter {delim!r} ({_first_line(err)}){_sniff(f)}") from err


def _sniff(f: Path) -> str:
    """A hint when a text reader failed on a file of another format (the error path only)."""
    try:
        with f.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if head == b"PAR1":
        return "; it is a Parquet file: name it .parquet or set format: parquet"
    if head[:2] in (b"\x1f\x8b", b"PK"):
        return "; it is compressed (gzip/zip): decompress it first"
    return ""


def atomic_header(path: Path, *, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """(column, type) pairs of a RecBole atomic file's header line."""
    try:
        with path.open(encoding=encoding) as fh:
            line = fh.readline().lstrip("\ufeff").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    out = []
    for j, cell in enumerate(line.split("\t"), start=1):
        name, _, typ = cell.partition(":")
        if not name or typ not in ATOMIC_TYPES:
            raise DataError(f"{path}:1: header field {j} {cell!r} is not NAME:token|token_seq|float|float_seq "
                            "(a RecBole atomic file)")
        out.append((name, typ))
    return out


def read_atomic(path: Path, *, encoding: str = "utf-8") -> tuple[pa.Table, dict[str, str]]:
    """An atomic file as a table of string columns (named without their type) and the types."""
    header = atomic_header(path, encoding=encoding)
    names = [n for n, _ in header]
    # Every column as a string: ids stay ids ("007" is not 7), floats are parsed by the loader.
    opts = pacsv.ReadOptions(encoding=encoding, skip_rows=1, column_names=names)
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                null_values=[""])
    try:
        t = pacsv.read_csv(path, read_options=opts, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                           convert_options=conv)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable as a RecBole atomic file "
                        f"({_bad_atomic_line(path, encoding, len(names)) or _first_line(e)})") from e
    return t, dict(header)


def _bad_atomic_line(path: Path, encoding: str, n: int) -> str | None:
    """The first line without ``n`` tab-separated fields (read on the error path only)."""
    try:
        with path.open(encoding=encoding, newline="") as fh:
            for lineno, line in enumerate(fh, start=1):
                got = len(line.rstrip("\r\n").split("\t"))
                if lineno > 1 and line.strip() and got != n:
                    return f"line {lineno}: {got} fields, the header has {n}"
    except (OSError, UnicodeDecodeError) as e:
        return f"{e}"
    return None


def atomic_files(directory: Path) -> dict[str, Path]:
    """``{"inter": p, "item": p, "user": p}`` of an atomic dataset directory (one of each)."""
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory of RecBole atomic files")
    out: dict[str, Path] = {}
    for suffix in ("inter", "item", "user"):
        found = sorted(directory.glob(f"*.{suffix}"))
        if len(found) > 1:
            raise DataError(f"{directory}: several .{suffix} files ({', '.join(p.name for p in found)}); keep one")
        if found:
            out[suffix] = found[0]
    if "inter" not in out:
        raise DataError(f"{directory}: no NAME.inter file (RecBole atomic layout: NAME.inter, NAME.item, NAME.user)")
    return out


def atomic_kind(column: str, typ: str) -> str | None:
    """The feature kind a header type gives (None: not usable as a feature yet)."""
    if typ == "token":
        return "categorical"
    if typ == "token_seq":
        return "text" if any(w in column.lower() for w in _TEXTY) else "multi_categorical"
    if typ == "float":
        return "numeric"
    return None  # float_seq: vectors are not a feature kind yet
