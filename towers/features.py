"""The feature pipeline: fitted offline, serialised as JSON (no pickle),
applied by the same code in training, evaluation and serving.

Index conventions (shared by the towers and the bundle):
- item catalog row ``i`` == ``item_vocab`` position ``i``; the bundle's item
  embeddings and FAISS ids use exactly these rows;
- user embedding row ``u`` == ``user_vocab`` position ``u``;
- unknown values of any field map to out-of-vocabulary buckets past the known
  values, so nothing unknown ever crashes a lookup.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AGE_BINS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups; one bucket below, one for unknown
YEAR_BINS = tuple(range(1930, 2001, 5))
TITLE_BUCKETS = 4096  # hashed title tokens; row 0 of the table is padding
TITLE_TOKENS = 8  # tokens kept per title
FORMAT_VERSION = 1


@dataclass
class Vocabulary:
    """Known values in a fixed order plus ``n_oov`` hashed buckets for the rest."""

    values: list[str]
    n_oov: int = 1
    # Values with a trained id row: the first ``id_rows`` values. A refresh appends values (new
    # users and items get embedding rows) without retraining, so their ids fall in the OOV
    # buckets of the id table, whose size stays what training made it. -1: all values.
    id_rows: int = -1
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_oov < 1:
            raise ValueError("n_oov must be >= 1")
        if self.id_rows < 0:
            self.id_rows = len(self.values)
        if self.id_rows > len(self.values):
            raise ValueError(f"id_rows {self.id_rows} > {len(self.values)} values")
        self._index = {v: i for i, v in enumerate(self.values)}
        if len(self._index) != len(self.values):
            raise ValueError("vocabulary values must be unique")

    @classmethod
    def fit(cls, values: Iterable[str], *, n_oov: int = 1, min_count: int = 1) -> Vocabulary:
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        # Sorted for determinism regardless of input order.
        return cls(sorted(v for v, c in counts.items() if c >= min_count), n_oov=n_oov)

    @property
    def size(self) -> int:
        """Rows an id embedding table needs: values with a trained row + OOV buckets."""
        return self.id_rows + self.n_oov

    def extend(self, values: Iterable[str]) -> Vocabulary:
        """This vocabulary with ``values`` not yet known appended (in the order given, first
        occurrence): existing positions never move, the id table keeps its size."""
        new = list(dict.fromkeys(v for v in values if v not in self._index))
        return Vocabulary(self.values + new, n_oov=self.n_oov, id_rows=self.id_rows)

    def __len__(self) -> int:
        return len(self.values)

    def known(self, value: str) -> int:
        """Position of a known value, or -1."""
        return self._index.get(value, -1)

    def lookup(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """Indices into an id embedding table; unknown values (and values appended after
        training) land in a hashed OOV bucket."""
        n = self.id_rows
        out = np.empty(len(values), dtype=np.int64)
        for j, v in enumerate(values):
            i = self._index.get(v)
            out[j] = i if i is not None and i < n else n + zlib.crc32(str(v).encode()) % self.n_oov
        return out

    def positions(self, values: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of known values, -1 for unknown ones (catalog/user-row lookups)."""
        return np.fromiter((self._index.get(v, -1) for v in values), dtype=np.int64, count=len(values))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"values": self.values, "n_oov": self.n_oov}
        if self.id_rows != len(self.values):
            out["id_rows"] = self.id_rows
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(list(d["values"]), n_oov=int(d["n_oov"]), id_rows=int(d.get("id_rows", -1)))


def bucketize(values: np.ndarray, bins: Sequence[int]) -> np.ndarray:
    """Bucket ids: 0 for unknown (negative), 1..len(bins)+1 by ``bins`` otherwise."""
    b = np.searchsorted(np.asarray(bins), values, side="right") + 1
    return np.where(values < 0, 0, b).astype(np.int64)


@dataclass
class FeaturePipeline:
    user_vocab: Vocabulary
    item_vocab: Vocabulary
    gender_vocab: Vocabulary
    occupation_vocab: Vocabulary
    zip_vocab: Vocabulary
    genre_vocab: Vocabulary
    # Per-user and per-item raw features, kept so the towers can be re-run
    # (nightly refresh) from the bundle alone.
    user_rows: dict[str, tuple[int, str, str, str]] = field(default_factory=dict)
    item_rows: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    item_titles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(
        cls, *, user_ids: Iterable[str], item_ids: Iterable[str],
        users: dict[str, tuple[int, str, str, str]], items: dict[str, tuple[int, list[str]]],
        titles: dict[str, str] | None = None,
    ) -> FeaturePipeline:
        """``users``: id → (age, gender, occupation, zip); ``items``: id → (year, genres);
        ``titles``: id → title (hashed tokens feed the item tower)."""
        return cls(
            user_vocab=Vocabulary.fit(user_ids),
            item_vocab=Vocabulary.fit(item_ids),
            gender_vocab=Vocabulary.fit(g for _, g, _, _ in users.values()),
            occupation_vocab=Vocabulary.fit((o for _, _, o, _ in users.values()), n_oov=2),
            zip_vocab=Vocabulary.fit((_zip_prefix(z) for *_, z in users.values()), n_oov=4),
            genre_vocab=Vocabulary.fit(g for _, gs in items.values() for g in gs),
            user_rows=dict(users),
            item_rows={k: (int(y), list(g)) for k, (y, g) in items.items()},
            item_titles=dict(titles or {}),
        )

    def extended(self, *, user_ids: Iterable[str] = (), item_ids: Iterable[str] = ()) -> FeaturePipeline:
        """This pipeline with new users/items appended as rows (a refresh embeds them with the
        trained towers: their ids use OOV buckets, their features and history carry them)."""
        return FeaturePipeline(
            user_vocab=self.user_vocab.extend(user_ids), item_vocab=self.item_vocab.extend(item_ids),
            gender_vocab=self.gender_vocab, occupation_vocab=self.occupation_vocab, zip_vocab=self.zip_vocab,
            genre_vocab=self.genre_vocab, user_rows=self.user_rows, item_rows=self.item_rows,
            item_titles=self.item_titles)

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)

    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    @property
    def n_age_buckets(self) -> int:
        return len(AGE_BINS) + 2

    @property
    def n_year_buckets(self) -> int:
        return len(YEAR_BINS) + 2

    def user_features(self, user_ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """Integer features for the user tower; unknown users get OOV buckets everywhere."""
        rows = [self.user_rows.get(u, (-1, "", "", "")) for u in user_ids]
        return {
            "user": self.user_vocab.lookup(user_ids),
            "age": bucketize(np.array([r[0] for r in rows], dtype=np.int64), AGE_BINS),
            "gender": self.gender_vocab.lookup([r[1] for r in rows]),
            "occupation": self.occupation_vocab.lookup([r[2] for r in rows]),
            "zip": self.zip_vocab.lookup([_zip_prefix(r[3]) for r in rows]),
        }

    def item_features(self, item_ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """Integer/multi-hot features for the item tower; unknown genres are dropped."""
        rows = [self.item_rows.get(i, (-1, [])) for i in item_ids]
        genres = np.zeros((len(rows), len(self.genre_vocab)), dtype=np.float32)
        for j, (_, gs) in enumerate(rows):
            for g in gs:
                k = self.genre_vocab.known(g)
                if k >= 0:
                    genres[j, k] = 1.0
        return {
            "item": self.item_vocab.lookup(item_ids),
            "year": bucketize(np.array([r[0] for r in rows], dtype=np.int64), YEAR_BINS),
            "genres": genres,
            "title": title_tokens([self.item_titles.get(i, "") for i in item_ids]),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "user_vocab": self.user_vocab.to_json(),
            "item_vocab": self.item_vocab.to_json(),
            "gender_vocab": self.gender_vocab.to_json(),
            "occupation_vocab": self.occupation_vocab.to_json(),
            "zip_vocab": self.zip_vocab.to_json(),
            "genre_vocab": self.genre_vocab.to_json(),
            "user_rows": self.user_rows,
            "item_rows": self.item_rows,
            "item_titles": self.item_titles,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeaturePipeline:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature pipeline format_version {d.get('format_version')!r} != {FORMAT_VERSION}")
        return cls(
            user_vocab=Vocabulary.from_json(d["user_vocab"]),
            item_vocab=Vocabulary.from_json(d["item_vocab"]),
            gender_vocab=Vocabulary.from_json(d["gender_vocab"]),
            occupation_vocab=Vocabulary.from_json(d["occupation_vocab"]),
            zip_vocab=Vocabulary.from_json(d["zip_vocab"]),
            genre_vocab=Vocabulary.from_json(d["genre_vocab"]),
            user_rows={k: (int(v[0]), str(v[1]), str(v[2]), str(v[3])) for k, v in d["user_rows"].items()},
            item_rows={k: (int(v[0]), list(v[1])) for k, v in d["item_rows"].items()},
            item_titles={str(k): str(v) for k, v in d.get("item_titles", {}).items()},
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> FeaturePipeline:
        return cls.from_json(json.loads(text))


def title_tokens(titles: Sequence[str]) -> np.ndarray:
    """(n, TITLE_TOKENS) hashed word ids in 1..TITLE_BUCKETS, 0-padded. The release year in
    parentheses is dropped (the year feature has it); words are lower-cased alphanumerics."""
    out = np.zeros((len(titles), TITLE_TOKENS), dtype=np.int64)
    for j, t in enumerate(titles):
        words = re.findall(r"[a-z0-9]+", re.sub(r"\(\d{4}\)", " ", t.lower()))[:TITLE_TOKENS]
        for k, w in enumerate(words):
            out[j, k] = 1 + zlib.crc32(w.encode()) % TITLE_BUCKETS
    return out


def _zip_prefix(z: str) -> str:
    # 3-digit prefixes (sectional centers) generalise; full zips are nearly unique.
    return z[:3]
