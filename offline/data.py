"""The in-memory shape of a dataset (what every loader returns and every job reads):
columnar interactions, entity tables with raw feature columns, the resolved spec; and
the one download the shipped ML-100k spec needs (the recbole wheel)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from towers.errors import DataError
from towers.spec import DatasetSpec

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"


@dataclass(frozen=True)
class Interactions:
    """One row per interaction; all arrays have the same length."""

    user: np.ndarray  # <U, raw user id
    item: np.ndarray  # <U, raw item id
    rating: np.ndarray  # float32: the rating, 1.0 for implicit events
    timestamp: np.ndarray  # int64, seconds
    group: np.ndarray | None = None  # <U, order / basket / session id (the spec's group column)
    context: dict[str, Any] = field(default_factory=dict)  # raw context values by column
    weight: np.ndarray | None = None  # float32 training weight (the spec's event-type weights)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> Interactions:
        ctx = {k: v[idx] if isinstance(v, np.ndarray) else [v[i] for i in np.asarray(idx).tolist()]
               for k, v in self.context.items()}
        return Interactions(self.user[idx], self.item[idx], self.rating[idx], self.timestamp[idx],
                            None if self.group is None else self.group[idx], ctx,
                            None if self.weight is None else self.weight[idx])


@dataclass(frozen=True)
class EntityTable:
    """Users or items with their raw feature columns (by column name), aligned with ``ids``."""

    ids: np.ndarray  # <U, unique
    columns: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> list[Any]:
        v = self.columns[name]
        return v.tolist() if isinstance(v, np.ndarray) else list(v)


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: Interactions
    users: EntityTable
    items: EntityTable
    spec: DatasetSpec  # resolved: what the feature pipeline is built from (saved in the bundle)
    item_titles: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # rows dropped, ids without a table row, repeats

    def titles(self) -> dict[str, str]:
        return dict(self.item_titles)


def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """Return the recbole wheel in ``cache_dir``, downloading it with pip if absent."""
    wheel = cache_dir / RECBOLE_WHEEL
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "recbole==1.2.1", "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"could not fetch {RECBOLE_WHEEL} into {cache_dir}: {tail[0]}")
    return wheel
