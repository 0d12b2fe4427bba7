"""The events one refresh run has read from the log, on disk as Parquet pages, so that
reading a backlog holds one page in memory (not one Python object per event) and the later
steps read columns back (``offline.interactions.InteractionRows``: numpy arrays).

    RUN/events/
      page-00000.parquet   user, item, type, timestamp: the page's events (repeats of an
                           identity within the page dropped; the interaction store drops the rest)
      ids-00000.parquet    id: every stream entry id of the page, to acknowledge after publish

Each file is written whole (tmp + ``os.replace``). A read step that dies half way is run
again from scratch (its entries are still pending in the consumer group): ``reset`` clears
what it had written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from offline.interactions import InteractionRows
from towers.bundle import atomic_write_bytes
from towers.errors import DataError
from towers.store_format import Event


class EventPages:
    def __init__(self, root: Path) -> None:
        self.root = root

    def reset(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)

    def _pages(self, kind: str) -> list[Path]:
        return sorted(self.root.glob(f"{kind}-*.parquet")) if self.root.is_dir() else []

    def write(self, ids: Sequence[str], events: Sequence[Event]) -> None:
        """Append one page (its entry ids and its parsed events)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(self._pages("ids"))
        for name, table in ((f"page-{n:05d}.parquet", pa.table({
                "user": pa.array([e.user_id for e in events], pa.string()),
                "item": pa.array([e.item_id for e in events], pa.string()),
                "type": pa.array([e.type for e in events], pa.string()),
                "timestamp": pa.array([e.timestamp for e in events], pa.int64())})),
                            (f"ids-{n:05d}.parquet", pa.table({"id": pa.array(list(ids), pa.string())}))):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            atomic_write_bytes(self.root / name, sink.getvalue().to_pybytes())

    def rows(self) -> InteractionRows:
        """Every page's events as columns (repeats across pages kept: the store drops them)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = []
        for path in self._pages("page"):
            try:
                t = pq.read_table(path)
            except (OSError, ValueError, pa.ArrowException) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from e
            parts.append(InteractionRows.build(**{c: t.column(c).to_numpy(zero_copy_only=False)
                                                  for c in ("user", "item", "type", "timestamp")}))
        return InteractionRows.concat(parts)

    def id_pages(self) -> Iterator[list[str]]:
        """The entry ids, a page at a time."""
        import pyarrow.parquet as pq

        for path in self._pages("ids"):
            yield [str(i) for i in pq.read_table(path).column("id").to_pylist()]
