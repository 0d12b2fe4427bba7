"""The feature pipeline: built from a dataset spec (``towers.spec``), fitted offline,
serialised as JSON (no pickle) with the spec inside, applied by the same code in
training, evaluation, refresh and serving.

Index conventions (shared by the towers and the bundle):
- item catalog row ``i`` == ``item_vocab`` position ``i``; the bundle's item
  embeddings and FAISS ids use exactly these rows;
- user embedding row ``u`` == ``user_vocab`` position ``u``;
- unknown values of any field map to out-of-vocabulary buckets past the known
  values, so nothing unknown ever crashes a lookup.

Each entity's features are encoded once, when the pipeline is fitted (or when a
catalog feed adds rows), into an :class:`EncodedTable` keyed by id: the towers read
rows of it, so the pipeline alone re-runs them (nightly refresh, distillation). An id
without a row (a user with no profile) gets every feature's missing encoding.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from towers.encoders import Encoder, Vocabulary, bucketize, derive_context
from towers.spec import DatasetSpec

FORMAT_VERSION = 2
SIDES = ("user", "item", "context")

__all__ = ["FORMAT_VERSION", "EncodedTable", "FeaturePipeline", "Vocabulary", "bucketize"]


def _pack(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    i32 = np.iinfo(np.int32)
    if a.dtype == np.int64 and (a.size == 0 or (a.min() >= i32.min and a.max() <= i32.max)):
        a = a.astype(np.int32)  # half the bytes; read back as int64
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "data": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode("ascii")}


def _unpack(d: dict[str, Any]) -> np.ndarray:
    a = np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype=np.dtype(d["dtype"]))
    a = a.reshape(d["shape"])
    return a.astype(np.int64) if a.dtype.kind == "i" else a.astype(np.float32)


@dataclass
class EncodedTable:
    """Encoded feature rows of one entity table, keyed by id (``ids`` position == row)."""

    ids: Vocabulary
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def encode(cls, encoders: Sequence[Encoder], ids: Sequence[str], columns: Mapping[str, Any]) -> EncodedTable:
        """``columns``: raw values per feature *column*, aligned with ``ids`` (unique)."""
        return cls(Vocabulary(list(ids)), {e.name: e.transform(columns[e.spec.column]) for e in encoders})

    def rows(self, encoders: Sequence[Encoder], ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        pos = self.ids.positions(ids)
        have = pos >= 0
        out = {}
        for e in encoders:
            miss = e.missing_row()
            arr = self.arrays.get(e.name)
            if arr is None or len(arr) == 0:
                out[e.name] = np.broadcast_to(miss, (len(pos), *miss.shape)).copy()
                continue
            x = arr[np.maximum(pos, 0)]
            if not have.all():
                x[~have] = miss
            out[e.name] = x
        return out

    def merged(self, other: EncodedTable) -> EncodedTable:
        """This table with ``other``'s rows added; an id in both takes ``other``'s row."""
        if len(other) == 0:
            return self
        ids = self.ids.extend(other.ids.values)
        pos = ids.positions(other.ids.values)
        arrays = {}
        for name, a in self.arrays.items():
            b = other.arrays[name]
            grown = np.concatenate([a, np.zeros((len(ids) - len(a), *a.shape[1:]), a.dtype)])
            grown[pos] = b
            arrays[name] = grown
        return EncodedTable(ids, arrays)

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids.values, "arrays": {k: _pack(v) for k, v in self.arrays.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncodedTable:
        return cls(Vocabulary(list(d["ids"])), {k: _unpack(v) for k, v in d["arrays"].items()})


@dataclass
class FeaturePipeline:
    user_vocab: Vocabulary
    item_vocab: Vocabulary
    user_encoders: list[Encoder] = field(default_factory=list)
    item_encoders: list[Encoder] = field(default_factory=list)
    context_encoders: list[Encoder] = field(default_factory=list)
    user_table: EncodedTable = field(default_factory=lambda: EncodedTable(Vocabulary([])))
    item_table: EncodedTable = field(default_factory=lambda: EncodedTable(Vocabulary([])))
    spec: dict[str, Any] = field(default_factory=dict)  # the resolved DatasetSpec (JSON)

    @classmethod
    def fit(
        cls, *, spec: DatasetSpec, user_ids: Iterable[str], item_ids: Iterable[str],
        users: tuple[Sequence[str], Mapping[str, Any]] | None = None,
        items: tuple[Sequence[str], Mapping[str, Any]] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> FeaturePipeline:
        """``users`` / ``items``: (ids, raw columns) of the entity tables; ``context``: raw
        context columns of the training interactions (derived features: the key ``"__time__"``
        holds their unix seconds). Vocabularies and statistics are fitted on these rows."""
        enc: dict[str, list[Encoder]] = {}
        tables: dict[str, EncodedTable] = {}
        for side, table in (("user", users), ("item", items)):
            feats = spec.features(side)
            if table is None:
                enc[side], tables[side] = [Encoder.fit(f, []) for f in feats], EncodedTable(Vocabulary([]))
                continue
            ids, cols = table
            enc[side] = [Encoder.fit(f, cols[f.column]) for f in feats]
            tables[side] = EncodedTable.encode(enc[side], ids, cols)
        ctx = context or {}
        enc["context"] = [Encoder.fit(f, _context_values(f.derive, f.column, ctx)) for f in spec.features("context")]
        return cls(user_vocab=Vocabulary.fit(user_ids), item_vocab=Vocabulary.fit(item_ids),
                   user_encoders=enc["user"], item_encoders=enc["item"], context_encoders=enc["context"],
                   user_table=tables["user"], item_table=tables["item"], spec=spec.to_json())

    def extended(self, *, user_ids: Iterable[str] = (), item_ids: Iterable[str] = ()) -> FeaturePipeline:
        """This pipeline with new users/items appended as rows (a refresh embeds them with the
        trained towers: their ids use OOV buckets, their features and history carry them)."""
        return replace(self, user_vocab=self.user_vocab.extend(user_ids), item_vocab=self.item_vocab.extend(item_ids))

    def with_rows(self, side: str, ids: Sequence[str], columns: Mapping[str, Any]) -> FeaturePipeline:
        """This pipeline with entity rows added or replaced (a catalog feed), encoded by this
        pipeline's own fitted encoders: a feed never refits a vocabulary."""
        encoders = self.item_encoders if side == "item" else self.user_encoders
        table = self.item_table if side == "item" else self.user_table
        merged = table.merged(EncodedTable.encode(encoders, ids, columns))
        return replace(self, item_table=merged) if side == "item" else replace(self, user_table=merged)

    @property
    def dataset_spec(self) -> DatasetSpec | None:
        return DatasetSpec.from_json(self.spec) if self.spec else None

    @property
    def exclude_seen(self) -> bool:
        return bool(self.spec.get("policies", {}).get("exclude_seen", True))

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)

    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    def encoders(self, side: str) -> list[Encoder]:
        return {"user": self.user_encoders, "item": self.item_encoders, "context": self.context_encoders}[side]

    def user_features(self, user_ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """The user tower's inputs: the id (OOV bucket when unknown) and each feature's rows."""
        return {"user": self.user_vocab.lookup(user_ids), **self.user_table.rows(self.user_encoders, user_ids)}

    def item_features(self, item_ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        return {"item": self.item_vocab.lookup(item_ids), **self.item_table.rows(self.item_encoders, item_ids)}

    def context_features(self, columns: Mapping[str, Any], timestamps: np.ndarray) -> dict[str, np.ndarray]:
        """Encoded context: ``columns`` holds raw values per context *feature name* (or column),
        ``timestamps`` the event times (unix seconds) the derived features read."""
        n = len(timestamps)
        out = {}
        for e in self.context_encoders:
            if e.spec.derive is not None:
                out[e.name] = e.transform(derive_context(e.spec.derive, timestamps))
            else:
                vals = columns.get(e.name, columns.get(e.spec.column))
                out[e.name] = e.transform([None] * n if vals is None else vals)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec,
            "user_vocab": self.user_vocab.to_json(),
            "item_vocab": self.item_vocab.to_json(),
            "encoders": {s: [e.to_json() for e in self.encoders(s)] for s in SIDES},
            "user_table": self.user_table.to_json(),
            "item_table": self.item_table.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeaturePipeline:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature pipeline format_version {d.get('format_version')!r} != {FORMAT_VERSION} "
                             "(a bundle from before dataset specs: retrain it)")
        enc = {s: [Encoder.from_json(e) for e in d["encoders"].get(s, [])] for s in SIDES}
        return cls(user_vocab=Vocabulary.from_json(d["user_vocab"]), item_vocab=Vocabulary.from_json(d["item_vocab"]),
                   user_encoders=enc["user"], item_encoders=enc["item"], context_encoders=enc["context"],
                   user_table=EncodedTable.from_json(d["user_table"]),
                   item_table=EncodedTable.from_json(d["item_table"]), spec=dict(d.get("spec") or {}))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> FeaturePipeline:
        return cls.from_json(json.loads(text))


def _context_values(derive: str | None, column: str, ctx: Mapping[str, Any]) -> Any:
    if derive is not None:
        t = ctx.get("__time__")
        return derive_context(derive, np.asarray(t if t is not None else [], dtype=np.int64))
    return ctx.get(column, [])
