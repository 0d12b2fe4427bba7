"""Datasets: MovieLens-100k (recbole wheel or GroupLens layout), a synthetic
generator, and the temporal leave-last-out split of DESIGN §6.

Everything is columnar numpy with raw string ids; integer indices are the
feature pipeline's business (``towers.features``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from towers.errors import DataError

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
_RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


@dataclass(frozen=True)
class Interactions:
    """One row per interaction; all arrays have the same length."""

    user: np.ndarray  # <U, raw user id
    item: np.ndarray  # <U, raw item id
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64, seconds

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> Interactions:
        return Interactions(self.user[idx], self.item[idx], self.rating[idx], self.timestamp[idx])


@dataclass(frozen=True)
class UserFeatures:
    user: np.ndarray  # <U
    age: np.ndarray  # int32, -1 when unknown
    gender: np.ndarray  # <U
    occupation: np.ndarray  # <U
    zip: np.ndarray  # <U


@dataclass(frozen=True)
class ItemFeatures:
    item: np.ndarray  # <U
    title: np.ndarray  # <U
    year: np.ndarray  # int32, -1 when unknown
    genres: list[tuple[str, ...]]


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: Interactions
    users: UserFeatures
    items: ItemFeatures

    def titles(self) -> dict[str, str]:
        return dict(zip(self.items.item.tolist(), self.items.title.tolist(), strict=True))


# --------------------------------------------------------------------------- MovieLens


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


def _rows(text: str, source: str, sep: str, ncols: int, skip_header: bool) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if (skip_header and lineno == 1) or not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < ncols:
            raise DataError(f"{source}:{lineno}: expected {ncols} fields separated by {sep!r}, got {len(parts)}")
        yield lineno, parts


def _int(value: str, source: str, lineno: int, field: str) -> int:
    try:
        return int(float(value))
    except ValueError as e:
        raise DataError(f"{source}:{lineno}: {field} is not a number: {value!r}") from e


def _parse_interactions(text: str, source: str, sep: str, skip_header: bool) -> Interactions:
    users, items, ratings, stamps = [], [], [], []
    for lineno, p in _rows(text, source, sep, 4, skip_header):
        users.append(p[0].strip())
        items.append(p[1].strip())
        ratings.append(_int(p[2], source, lineno, "rating"))
        stamps.append(_int(p[3], source, lineno, "timestamp"))
    if not users:
        raise DataError(f"{source}: no interactions")
    return Interactions(
        np.array(users), np.array(items), np.array(ratings, dtype=np.float32), np.array(stamps, dtype=np.int64)
    )


def _parse_users(text: str, source: str, sep: str, skip_header: bool) -> UserFeatures:
    rows = [(p[0].strip(), _int(p[1], source, n, "age"), p[2], p[3], p[4].strip())
            for n, p in _rows(text, source, sep, 5, skip_header)]
    cols = list(zip(*rows, strict=True))
    return UserFeatures(np.array(cols[0]), np.array(cols[1], dtype=np.int32), np.array(cols[2]),
                        np.array(cols[3]), np.array(cols[4]))


def _items(rows: list[tuple[str, str, int, tuple[str, ...]]]) -> ItemFeatures:
    return ItemFeatures(
        np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows], dtype=np.int32), [r[3] for r in rows],
    )


def load_movielens_100k(cache_dir: Path) -> Dataset:
    """MovieLens-100k from the recbole 1.2.1 wheel (atomic files, tab separated, with header)."""
    wheel = fetch_recbole_wheel(cache_dir)
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{wheel}: not a readable wheel ({e}); delete it to re-download") from e

    def read(suffix: str) -> tuple[str, str]:
        name = f"{_RECBOLE_PREFIX}.{suffix}"
        try:
            return zf.read(name).decode("latin-1"), f"{wheel.name}!{name}"
        except KeyError as e:
            raise DataError(f"{wheel}: missing {name}") from e

    text, src = read("inter")
    inter = _parse_interactions(text, src, "\t", skip_header=True)
    text, src = read("user")
    users = _parse_users(text, src, "\t", skip_header=True)
    text, src = read("item")
    rows = []
    for _n, p in _rows(text, src, "\t", 4, skip_header=True):
        year = int(p[2]) if p[2].strip().isdigit() else -1  # the wheel has 'unkonwn' for one movie
        rows.append((p[0].strip(), p[1].strip(), year, tuple(p[3].split())))
    return Dataset("ml-100k", inter, users, _items(rows))


def load_grouplens(directory: Path) -> Dataset:
    """GroupLens' own layout: ``u.data`` (tab), ``u.user`` and ``u.item`` (pipe), optional ``u.genre``."""

    def read(name: str) -> str:
        path = directory / name
        try:
            return path.read_text(encoding="latin-1")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from e

    inter = _parse_interactions(read("u.data"), str(directory / "u.data"), "\t", skip_header=False)
    users = _parse_users(read("u.user"), str(directory / "u.user"), "|", skip_header=False)
    genres: tuple[str, ...] = GROUPLENS_GENRES
    if (directory / "u.genre").is_file():
        genres = tuple(line.split("|")[0] for line in read("u.genre").splitlines() if line.strip())
    src = str(directory / "u.item")
    rows = []
    for _n, p in _rows(read("u.item"), src, "|", 5 + len(genres), skip_header=False):
        date = p[2].strip()
        year = int(date[-4:]) if date[-4:].isdigit() else -1
        title = p[1].strip()
        if title.endswith(")") and title[-6:-5] == "(":  # "Toy Story (1995)" -> "Toy Story"
            title = title[:-6].strip()
        flags = p[5:5 + len(genres)]
        rows.append((p[0].strip(), title, year, tuple(g for g, f in zip(genres, flags, strict=True) if f == "1")))
    return Dataset(directory.name, inter, users, _items(rows))


def write_grouplens(ds: Dataset, directory: Path, *, keep_users: set[str] | None = None) -> Path:
    """Write ``ds`` in GroupLens' layout (what ``load_grouplens`` reads): the replay's
    "everything known before DATE" dataset. ``keep_users``: the users listed in ``u.user``
    (default: all); the others stay unknown to a pipeline fitted on it, i.e. new users later."""
    directory.mkdir(parents=True, exist_ok=True)
    i = ds.interactions
    (directory / "u.data").write_text("".join(
        f"{u}\t{it}\t{int(r)}\t{int(t)}\n" for u, it, r, t in zip(i.user.tolist(), i.item.tolist(),
                                                                  i.rating.tolist(), i.timestamp.tolist(),
                                                                  strict=True)), encoding="latin-1")
    us = ds.users
    (directory / "u.user").write_text("".join(
        f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in zip(us.user.tolist(), us.age.tolist(), us.gender.tolist(),
                                                          us.occupation.tolist(), us.zip.tolist(), strict=True)
        if keep_users is None or u in keep_users), encoding="latin-1")
    genres = sorted({g for gs in ds.items.genres for g in gs}) or ["unknown"]
    (directory / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(genres)), encoding="latin-1")
    lines = []
    for it, title, year, gs in zip(ds.items.item.tolist(), ds.items.title.tolist(), ds.items.year.tolist(),
                                   ds.items.genres, strict=True):
        date = f"01-Jan-{year}" if year >= 0 else ""
        lines.append("|".join([it, title, date, "", "", *("1" if g in gs else "0" for g in genres)]) + "\n")
    (directory / "u.item").write_text("".join(lines), encoding="latin-1")
    return directory


def load_dataset(name: str, *, cache_dir: Path) -> Dataset:
    """``ml-100k`` (recbole wheel), a GroupLens directory path, or ``synthetic:USERSxITEMS[:SEED]``."""
    if name == "ml-100k":
        return load_movielens_100k(cache_dir)
    if name.startswith("synthetic:"):
        spec = name.split(":")
        try:
            n_users, n_items = (int(x) for x in spec[1].lower().split("x"))
            seed = int(spec[2]) if len(spec) > 2 else 0
        except ValueError as e:
            raise DataError(f"dataset {name!r}: expected synthetic:USERSxITEMS[:SEED]") from e
        return synthetic_dataset(n_users=n_users, n_items=n_items, seed=seed)
    path = Path(name)
    if path.is_dir():
        return load_grouplens(path)
    raise DataError(f"dataset {name!r}: not 'ml-100k', 'synthetic:UxI[:SEED]' or a GroupLens directory")


# --------------------------------------------------------------------------- synthetic


def synthetic_dataset(
    *, n_users: int, n_items: int, seed: int = 0, per_user: int = 20, n_clusters: int | None = None,
    zipf_a: float = 1.1, chunk: int = 100_000,
) -> Dataset:
    """Clustered users and items with power-law popularity, deterministic by ``seed``.

    Each item belongs to a cluster; item popularity inside the catalog follows a
    Zipf law. Each user has a home cluster and draws ``per_user`` interactions:
    70% from the home cluster, the rest from the whole catalog by popularity,
    in a time order where consecutive items tend to share a cluster (a session
    signal). Users are generated in chunks so 1M x 1M stays within a few GB.
    """
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or max(4, int(np.sqrt(n_items) / 2))
    item_cluster = rng.integers(0, n_clusters, size=n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** zipf_a
    pop = pop[rng.permutation(n_items)]
    pop /= pop.sum()
    order = np.argsort(item_cluster, kind="stable")
    bounds = np.searchsorted(item_cluster[order], np.arange(n_clusters + 1))
    # Per cluster, a CDF of popularity so a within-cluster draw is one searchsorted.
    cdf_in = np.cumsum(pop[order])
    global_cdf = np.cumsum(pop)
    users, items, stamps = [], [], []
    t0 = 880_000_000
    for start in range(0, n_users, chunk):
        m = min(chunk, n_users - start)
        home = rng.integers(0, n_clusters, size=m)
        lo = np.where(bounds[home] > 0, cdf_in[np.maximum(bounds[home] - 1, 0)], 0.0)
        hi = cdf_in[np.maximum(bounds[home + 1] - 1, 0)]
        u = rng.random((m, per_user))
        in_home = order[np.minimum(np.searchsorted(cdf_in, lo[:, None] + u * (hi - lo)[:, None]),
                                   np.maximum(bounds[home + 1] - 1, 0)[:, None])]
        anywhere = np.minimum(np.searchsorted(global_cdf, rng.random((m, per_user))), n_items - 1)
        chosen = np.where(rng.random((m, per_user)) < 0.7, in_home, anywhere)
        # Empty home clusters fall back to popularity draws.
        chosen = np.where((bounds[home + 1] > bounds[home])[:, None], chosen, anywhere)
        users.append(np.repeat(np.arange(start, start + m), per_user))
        items.append(chosen.reshape(-1))
        stamps.append((t0 + rng.integers(0, 10_000_000, size=m)[:, None] + np.arange(per_user) * 60).reshape(-1))
    uidx = np.concatenate(users)
    iidx = np.concatenate(items)
    user_ids = np.char.add("u", np.arange(n_users).astype("U"))
    item_ids = np.char.add("i", np.arange(n_items).astype("U"))
    inter = Interactions(user_ids[uidx], item_ids[iidx], np.full(len(uidx), 4.0, dtype=np.float32),
                         np.concatenate(stamps).astype(np.int64))
    users_f = UserFeatures(user_ids, rng.integers(18, 70, size=n_users).astype(np.int32),
                           rng.choice(np.array(["F", "M"]), size=n_users),
                           np.char.add("occ", rng.integers(0, 20, size=n_users).astype("U")),
                           np.char.add("z", rng.integers(0, 100, size=n_users).astype("U")))
    genre_names = [f"g{g}" for g in range(16)]
    items_f = ItemFeatures(item_ids, item_ids.copy(), rng.integers(1950, 2000, size=n_items).astype(np.int32),
                           [(genre_names[c % 16],) for c in item_cluster.tolist()])
    return Dataset(f"synthetic-{n_users}x{n_items}-s{seed}", inter, users_f, items_f)


# --------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Temporal leave-last-out (DESIGN §6).

    ``train`` is sorted by (user, order key); ``valid`` and ``test`` hold one
    interaction per user with at least 3 interactions, in the same user order.
    """

    train: Interactions
    valid: Interactions
    test: Interactions


def order_key(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """The tie rule: crc32 of ``"user:item"`` on raw ids (uncorrelated with popularity)."""
    return np.fromiter((zlib.crc32(f"{u}:{i}".encode()) for u, i in zip(user.tolist(), item.tolist(), strict=True)),
                       dtype=np.uint32, count=len(user))


def temporal_split(inter: Interactions) -> Split:
    """Last interaction per user → test, second-last → validation, the rest → train."""
    crc = order_key(inter.user, inter.item)
    order = np.lexsort((crc, inter.timestamp, inter.user))
    user = inter.user[order]
    n = len(order)
    # Walk back from each user's end: position 0 is the last interaction.
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lengths = np.diff(np.r_[starts, n])
    pos_from_end = np.repeat(starts + lengths - 1, lengths) - np.arange(n)
    user_len = np.repeat(lengths, lengths)
    eligible = user_len >= 3
    test = order[eligible & (pos_from_end == 0)]
    valid = order[eligible & (pos_from_end == 1)]
    train = order[~eligible | (pos_from_end >= 2)]
    return Split(inter.take(train), inter.take(valid), inter.take(test))
