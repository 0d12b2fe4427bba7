"""The exposure log kept beside the interaction store, so an experiment's exposures outlive
the Redis stream's caps (``online.exposures`` writes the stream; the stream is trimmed by
entries and bytes like the impressions).

    STORE/exposures/
      part-<first id>.parquet   id, ts, rid, user, variant, version: one copy's entries
      watermark.json            {"id": the newest stream id copied, "seen": stream entries up to it}

The refresh copies what is new after each merge (``copy_from``): a page at a time into a part
named by its first entry id, then the watermark, each written whole (tmp + ``os.replace``).
A copy that dies between the two writes the same part again on the next run (same name, same
entries), so nothing is stored twice. Entries the stream's caps trimmed before a copy reached
them are counted: the stream's ``entries-added`` (Redis 7) less the entries up to the last
watermark and those copied now (None on a server that does not keep the counter).
``ab report --store`` reads the copy and then the stream after the watermark.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offline.event_log import EventLog
from towers.bundle import atomic_write_bytes
from towers.errors import DataError
from towers.store_format import Impression

START = "0-0"
COLUMNS = ("id", "ts", "rid", "user", "variant", "version")


class ExposureStore:
    def __init__(self, store_root: Path) -> None:
        self.root = store_root / "exposures"

    def _mark(self) -> tuple[str, int]:
        path = self.root / "watermark.json"
        if not path.is_file():
            return START, 0
        try:
            d = json.loads(path.read_text())
            return str(d["id"]), int(d["seen"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a watermark ({e})") from e

    def watermark(self) -> str:
        """The newest stream id copied (``0-0``: none)."""
        return self._mark()[0]

    def _write_part(self, rows: list[tuple[str, int, Impression]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": [r[0] for r in rows], "ts": pa.array([r[1] for r in rows], pa.int64()),
                          "rid": [r[2].request_id for r in rows], "user": [r[2].user_id for r in rows],
                          "variant": [r[2].variant for r in rows], "version": [r[2].version for r in rows]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.root / f"part-{rows[0][0]}.parquet", sink.getvalue().to_pybytes())

    def copy_from(self, log: EventLog, *, page: int = 50_000) -> dict[str, Any]:
        """Copy every exposure newer than the watermark; returns how many, and how many the
        stream lost before a copy reached them (None: this Redis does not say)."""
        self.root.mkdir(parents=True, exist_ok=True)
        mark, seen = self._mark()
        added, last = log.exposure_counts()  # first: entries added while copying wait for the next run
        if last is None:
            return {"copied": 0, "lost": 0, "watermark": mark}
        copied, rows = 0, []
        for entry in log.exposure_entries(after=mark, until=last):
            rows.append(entry)
            if len(rows) >= page:  # a watermark per page: a crash costs at most one page again
                copied += self._flush(rows[-1][0], seen + copied + len(rows), rows)
                rows = []
        copied += len(rows)
        lost = None if added is None else added - seen - copied
        self._flush(last, added if added is not None else seen + copied, rows)
        return {"copied": copied, "lost": lost, "watermark": last}

    def _flush(self, mark: str, seen: int, rows: list[tuple[str, int, Impression]]) -> int:
        if rows:
            self._write_part(rows)
        atomic_write_bytes(self.root / "watermark.json", json.dumps({"id": mark, "seen": seen}).encode())
        return len(rows)

    def read(self, *, since_s: int = 0) -> Iterator[tuple[int, Impression]]:
        """(unix seconds logged, exposure) of every stored exposure from ``since_s`` on, oldest first."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = sorted(self.root.glob("part-*.parquet"),
                       key=lambda p: tuple(int(x) for x in p.stem.removeprefix("part-").split("-")))
        for path in parts:
            try:
                t = pq.read_table(path, columns=list(COLUMNS)).to_pydict()
            except (OSError, ValueError, pa.ArrowException) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from e
            for ts, rid, user, variant, version in zip(t["ts"], t["rid"], t["user"], t["variant"], t["version"],
                                                       strict=True):
                if ts >= since_s:
                    yield int(ts), Impression(rid, user, variant, version, ())


def copy_exposures(events: EventLog, store_root: Path, *, log: Any = print) -> dict[str, Any]:
    """The refresh's copy (after its merge): the stream's new exposures into the store (closes ``events``)."""
    try:
        result = ExposureStore(store_root).copy_from(events)
    finally:
        events.close()
    if result["lost"] != 0:
        n = "an unknown number of" if result["lost"] is None else f"{result['lost']:,}"
        log(f"refresh: EXPOSURES LOST: the exposure stream's caps trimmed {n} entries this store had not copied "
            "(run the refresh more often, or raise redis.stream_maxlen / impressions_max_bytes)")
    return result
