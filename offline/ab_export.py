"""An experiment's exposures and outcomes as Parquet, for the experimentation platform a team
already runs (``twotower ab export``).

Two files, the shapes GrowthBook's and Statsig's warehouse-native modes read (an assignment
source and a metric source, joined by the platform on the unit id and time):

- ``exposures.parquet``: one row per exposure (``online.exposures``: a user's first response
  in an arm per UTC day): ``unit_id``, ``experiment``, ``variant``, ``timestamp`` (UTC), and
  ``version`` and ``request_id`` for tracing. Users seen in more than one arm keep every row:
  the platforms find and handle them themselves (``ab report`` leaves them out).
- ``outcomes.parquet``: one row per event of an exposed user since the start:
  ``unit_id``, ``timestamp`` (the event's own time, UTC), ``metric`` (the event type:
  ``click``, ``purchase``, ...), ``value`` (1.0: a count; the platform sums or counts it),
  ``request_id`` (the response the event answers, "" if unknown).

Both are written atomically (a temporary file beside, then ``os.replace``): a reader never
sees half a file, and a failed export leaves the previous one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from offline.ab_report import arm_of
from towers.errors import ConfigError, DataError
from towers.store_format import Event, Impression

EXPOSURES_FILE = "exposures.parquet"
OUTCOMES_FILE = "outcomes.parquet"

_TS = pa.timestamp("ms", tz="UTC")  # Parquet has no seconds unit: ms round-trips exactly
EXPOSURE_SCHEMA = pa.schema([("unit_id", pa.string()), ("experiment", pa.string()), ("variant", pa.string()),
                             ("timestamp", _TS), ("version", pa.string()), ("request_id", pa.string())])
OUTCOME_SCHEMA = pa.schema([("unit_id", pa.string()), ("timestamp", _TS), ("metric", pa.string()),
                            ("value", pa.float64()), ("request_id", pa.string())])


@dataclass(frozen=True)
class ExportSummary:
    exposures: int  # rows written
    users: int  # distinct exposed users
    outcomes: int  # rows written
    multi_arm_users: int  # users exposed to more than one arm (kept; the platform decides)
    paths: tuple[Path, Path]


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export_experiment(timed_exposures: Iterable[tuple[int, Impression]], events: Iterable[Event], *,
                      experiment: str, out: Path) -> ExportSummary:
    """Write ``out/exposures.parquet`` and ``out/outcomes.parquet`` for ``experiment``
    (``timed_exposures``: (unix seconds logged, exposure), ``EventLog.timed_exposures``)."""
    cols: dict[str, list[object]] = {name: [] for name in EXPOSURE_SCHEMA.names}
    arms: dict[str, set[str]] = {}
    for t, x in timed_exposures:
        arm = arm_of(x.variant, experiment)
        if arm is None:
            continue
        arms.setdefault(x.user_id, set()).add(arm)
        for name, value in zip(EXPOSURE_SCHEMA.names, (x.user_id, experiment, arm, t * 1000, x.version, x.request_id),
                               strict=True):
            cols[name].append(value)
    if not arms:
        raise DataError(f"no exposures of experiment {experiment!r} in the log: nothing to export "
                        "(is it running, and is --since before its start?)")
    out_cols: dict[str, list[object]] = {name: [] for name in OUTCOME_SCHEMA.names}
    for e in events:
        if e.user_id in arms:
            for name, value in zip(OUTCOME_SCHEMA.names, (e.user_id, e.timestamp * 1000, e.type, 1.0, e.request_id),
                                   strict=True):
                out_cols[name].append(value)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / EXPOSURES_FILE, out / OUTCOMES_FILE)
        _write_atomic(pa.table(cols, schema=EXPOSURE_SCHEMA), paths[0])
        _write_atomic(pa.table(out_cols, schema=OUTCOME_SCHEMA), paths[1])
    except OSError as e:
        raise ConfigError("--out", f"cannot write the export to {out}: {e.strerror or e}") from e
    return ExportSummary(exposures=len(cols["unit_id"]), users=len(arms), outcomes=len(out_cols["unit_id"]),
                         multi_arm_users=sum(len(a) > 1 for a in arms.values()), paths=paths)
