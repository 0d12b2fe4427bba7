"""The interaction store: every interaction the refresh has consumed, as Parquet by day.

The event log in Redis is capped and acknowledged entries are gone from the consumer's view,
so the refresh copies what it consumes here before it acknowledges; retraining and
re-embedding users from history read it back. Layout::

    ROOT/
      day=YYYY-MM-DD/part-<hash>.parquet   user, item, type (string), timestamp (int64 s),
                                           rating (float32); the day is the UTC day of timestamp
      .lock                                flock held by an appender

An interaction's identity is (user, item, type, timestamp) — the event identity of
``towers.store_format.Event`` — and the store holds each identity at most once: the event log
is at least once, and a refresh that crashed before acknowledging reads the same events again.
``append`` drops rows already stored on their day and repeats within the batch, then writes
each day's new rows to one file named by a hash of those rows (tmp + ``os.replace``). So a
crash half way through an append is harmless: running it again finds the days already
written and writes the rest under the same names; a file is there whole or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from offline.datasets import Interactions, order_key
from towers.bundle import atomic_write_bytes, fsync_dir
from towers.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from towers.store_format import Event

COLUMNS = ("user", "item", "type", "timestamp", "rating")
DAY_PREFIX = "day="
_SECONDS_PER_DAY = 86_400


def _strings(values: Any) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    return arr if arr.dtype.kind == "U" else arr.astype(str)


@dataclass(frozen=True)
class InteractionRows:
    """Columnar interactions with an event type (``Interactions`` has none; the store keeps
    views, clicks and ratings apart). All arrays have the same length."""

    user: np.ndarray  # <U, raw user id
    item: np.ndarray  # <U, raw item id
    type: np.ndarray  # <U, event type ("view", "click", ..., "rating" for a seeded dataset)
    timestamp: np.ndarray  # int64, unix seconds
    rating: np.ndarray  # float32 (1.0 for implicit events)

    def __post_init__(self) -> None:
        n = len(self.user)
        if any(len(c) != n for c in (self.item, self.type, self.timestamp, self.rating)):
            raise DataError("interaction rows: columns of different lengths "
                            f"({', '.join(f'{c}={len(getattr(self, c))}' for c in COLUMNS)})")

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def build(cls, *, user: Any, item: Any, type: Any, timestamp: Any, rating: Any = None) -> InteractionRows:
        """Coerce the columns to their dtypes (rating defaults to 1.0)."""
        user_a = _strings(user)
        rating_a = (np.ones(len(user_a), dtype=np.float32) if rating is None
                    else np.asarray(rating, dtype=np.float32))
        return cls(user_a, _strings(item), _strings(type), np.asarray(timestamp, dtype=np.int64).reshape(-1),
                   rating_a.reshape(-1))

    @classmethod
    def empty(cls) -> InteractionRows:
        return cls.build(user=[], item=[], type=[], timestamp=[])

    @classmethod
    def from_events(cls, events: Sequence[Event]) -> InteractionRows:
        """Events from the log (rating 1.0; the request id is not part of an interaction)."""
        return cls.build(user=[e.user_id for e in events], item=[e.item_id for e in events],
                         type=[e.type for e in events], timestamp=[e.timestamp for e in events])

    @classmethod
    def from_interactions(cls, i: Interactions, *, type: str = "rating") -> InteractionRows:
        """A dataset's interactions (e.g. MovieLens ratings) to seed the store with."""
        return cls.build(user=i.user, item=i.item, type=np.full(len(i), type), timestamp=i.timestamp,
                         rating=i.rating)

    def to_interactions(self) -> Interactions:
        """Back to the training/evaluation shape (the type column is dropped)."""
        return Interactions(self.user, self.item, self.rating, self.timestamp)

    def take(self, idx: np.ndarray) -> InteractionRows:
        return InteractionRows(self.user[idx], self.item[idx], self.type[idx], self.timestamp[idx], self.rating[idx])

    @classmethod
    def concat(cls, parts: Sequence[InteractionRows]) -> InteractionRows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls.build(**{c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS})

    def identities(self) -> Iterator[tuple[str, str, str, int]]:
        return zip(self.user.tolist(), self.item.tolist(), self.type.tolist(), self.timestamp.tolist(), strict=True)

    def days(self) -> np.ndarray:
        """Each row's UTC day as ``YYYY-MM-DD`` (its partition)."""
        return (self.timestamp // _SECONDS_PER_DAY).astype("datetime64[D]").astype(str)

    def sorted(self) -> InteractionRows:
        """By (user, timestamp, crc32 tie rule of DESIGN §6) as ``offline.datasets.temporal_split``
        orders them; then item and type, so equal keys still come out in one order."""
        crc = order_key(self.user, self.item)
        return self.take(np.lexsort((self.type, self.item, crc, self.timestamp, self.user)))


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("user", pa.string()), ("item", pa.string()), ("type", pa.string()),
                      ("timestamp", pa.int64()), ("rating", pa.float32())])


def _content_hash(s: InteractionRows) -> str:
    """Of rows already in :meth:`InteractionRows.sorted` order, so the same new rows always get
    the same file name whatever order they came in."""
    h = hashlib.sha256()
    for u, i, t, ts, r in zip(s.user.tolist(), s.item.tolist(), s.type.tolist(), s.timestamp.tolist(),
                              s.rating.tolist(), strict=True):
        h.update(f"{u}\x1f{i}\x1f{t}\x1f{ts}\x1f{r!r}\x1e".encode())
    return h.hexdigest()[:20]


class InteractionStore:
    """Append-only, deduplicated, day-partitioned interactions under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- layout ------------------------------------------------------------------------------

    def _day_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(DAY_PREFIX))

    def _files(self, day_dir: Path) -> list[Path]:
        # Dot files are writes in progress (or left by a crash): never read.
        return sorted(p for p in day_dir.glob("part-*.parquet") if p.is_file())

    def days(self) -> list[str]:
        """The days (``YYYY-MM-DD``, UTC) that hold at least one interaction, oldest first."""
        return [d.name[len(DAY_PREFIX):] for d in self._day_dirs() if self._files(d)]

    def drop_before(self, cutoff: int) -> dict[str, int]:
        """Retention: delete every day partition that ends at or before ``cutoff`` (unix seconds;
        the day holding ``cutoff`` stays whole). Returns the days and rows removed. A day goes as
        one directory rename then delete, so a reader never sees half a day."""
        import shutil

        import pyarrow.parquet as pq

        keep_from = str(np.datetime64(cutoff // _SECONDS_PER_DAY, "D"))
        days = rows = 0
        for d in self._day_dirs():
            if d.name[len(DAY_PREFIX):] >= keep_from:
                continue
            rows += sum(pq.ParquetFile(f).metadata.num_rows for f in self._files(d))
            doomed = d.with_name(f".drop-{d.name}")
            d.rename(doomed)
            shutil.rmtree(doomed)
            days += 1
        return {"days": days, "rows": rows}

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        total = 0
        for d in self._day_dirs():
            for f in self._files(d):
                try:
                    total += pq.ParquetFile(f).metadata.num_rows
                except (OSError, ValueError) as e:  # pyarrow's errors derive from these
                    raise DataError(f"{f}: not a readable Parquet file ({e})") from e
        return total

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One appender at a time: two concurrent appends of the same events would each find
        them absent and store them twice."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- read --------------------------------------------------------------------------------

    def _read_file(self, path: Path, users: pa.Array | None = None) -> InteractionRows:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
            if users is not None:  # one file at a time: only these users' rows are kept
                table = table.filter(pc.is_in(table.column("user"), value_set=users))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
        try:
            return InteractionRows.build(**cols)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: bad column types ({e})") from e

    def _read_day(self, day_dir: Path, users: pa.Array | None = None) -> InteractionRows:
        return InteractionRows.concat([self._read_file(f, users) for f in self._files(day_dir)])

    def item_counts(self) -> dict[str, int]:
        """Interactions per item over the whole store, reading the item column one file at a
        time (memory: the distinct items, not the rows)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        counts: dict[str, int] = {}
        for d in self._day_dirs():
            for f in self._files(d):
                for vc in pc.value_counts(pq.read_table(f, columns=["item"]).column("item")).to_pylist():
                    counts[vc["values"]] = counts.get(vc["values"], 0) + int(vc["counts"])
        return counts

    def read(self, *, until: int | None = None, since: int | None = None,
             users: Collection[str] | None = None) -> InteractionRows:
        """Every stored interaction with ``since <= timestamp < until`` (either bound optional),
        of ``users`` only when given (a refresh that re-embeds the users with new events reads
        their history, not everyone's), sorted by (user, timestamp, crc32 tie rule) — the order
        ``temporal_split`` uses."""
        import pyarrow as pa

        wanted = None if users is None else pa.array(sorted(set(users)), pa.string())
        lo_day = None if since is None else str(np.datetime64(since // _SECONDS_PER_DAY, "D"))
        hi_day = None if until is None else str(np.datetime64((until - 1) // _SECONDS_PER_DAY, "D"))
        parts = []
        for d in self._day_dirs():
            day = d.name[len(DAY_PREFIX):]
            if (lo_day is not None and day < lo_day) or (hi_day is not None and day > hi_day):
                continue  # whole partition outside the range: not even opened
            parts.append(self._read_day(d, wanted))
        rows = InteractionRows.concat(parts)
        keep = np.ones(len(rows), dtype=bool)
        if since is not None:
            keep &= rows.timestamp >= since
        if until is not None:
            keep &= rows.timestamp < until
        return rows.take(np.flatnonzero(keep)).sorted()

    # -- append ------------------------------------------------------------------------------

    def append(self, rows: InteractionRows) -> int:
        """Store the rows whose identity (user, item, type, timestamp) is not stored yet; the
        first of repeats within ``rows`` wins. Returns how many rows were new. Idempotent:
        appending the same rows again (a replayed log, a re-run after a crash) stores nothing."""
        if not len(rows):
            return 0
        if bool((np.char.str_len(rows.user) == 0).any() | (np.char.str_len(rows.item) == 0).any()):
            raise DataError("interaction rows: empty user or item id")
        days = rows.days()
        written = 0
        with self._locked():
            for day in np.unique(days).tolist():
                day_rows = rows.take(np.flatnonzero(days == day))
                day_dir = self.root / f"{DAY_PREFIX}{day}"
                existing = set(self._read_day(day_dir).identities()) if day_dir.is_dir() else set()
                keep = []
                for j, ident in enumerate(day_rows.identities()):
                    if ident not in existing:
                        existing.add(ident)
                        keep.append(j)
                if not keep:
                    continue
                new = day_rows.take(np.asarray(keep, dtype=np.int64))
                self._write(day_dir, new)
                written += len(new)
        return written

    def _write(self, day_dir: Path, rows: InteractionRows) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        created = not day_dir.is_dir()
        day_dir.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(self.root)
        for stale in day_dir.glob(".part-*.tmp"):  # left by an append that crashed (we hold the lock)
            stale.unlink(missing_ok=True)
        rows = rows.sorted()
        schema = _schema()
        table = pa.Table.from_arrays([pa.array(getattr(rows, c), type=schema.field(c).type) for c in COLUMNS],
                                     schema=schema)
        dest = day_dir / f"part-{_content_hash(rows)}.parquet"
        sink = pa.BufferOutputStream()  # one day's new rows: small enough to write from memory
        pq.write_table(table, sink)
        atomic_write_bytes(dest, sink.getvalue().to_pybytes())
