"""Datasets: the user's own (a dataset spec or RecBole atomic files, ``offline.loading``),
MovieLens-100k (a shipped spec over the recbole wheel's atomic files; GroupLens' own
layout too), a synthetic generator, and the temporal leave-last-out split of DESIGN §6.

Everything is columnar numpy with raw string ids; integer indices are the
feature pipeline's business (``towers.features``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offline.data import RECBOLE_WHEEL, Dataset, EntityTable, Interactions, fetch_recbole_wheel
from towers.errors import DataError
from towers.spec import DatasetSpec, load_spec

__all__ = ["RECBOLE_WHEEL", "Dataset", "EntityTable", "Interactions", "Split", "fetch_recbole_wheel", "load_dataset",
           "load_grouplens", "synthetic_dataset", "temporal_split", "write_grouplens"]

GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
SPECS_DIR = Path(__file__).with_name("specs")
SHIPPED = {"ml-100k": SPECS_DIR / "ml-100k.yaml"}


# --------------------------------------------------------------------------- MovieLens


def movielens_spec(name: str = "ml-100k") -> DatasetSpec:
    """The shipped ML-100k spec's features and policies (the GroupLens loader and the
    synthetic generator produce the same columns)."""
    return load_spec(SHIPPED["ml-100k"]).model_copy(update={"name": name})


def _rows(text: str, source: str, sep: str, ncols: int) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
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


def ml_dataset(name: str, inter: Interactions, users: EntityTable, items: EntityTable) -> Dataset:
    """A dataset with ML-100k's columns, under the shipped spec's feature kinds."""
    titles = dict(zip(items.ids.tolist(), items.column("movie_title"), strict=True))
    return Dataset(name, inter, users, items, movielens_spec(name), titles)


def load_grouplens(directory: Path) -> Dataset:
    """GroupLens' own layout: ``u.data`` (tab), ``u.user`` and ``u.item`` (pipe), optional ``u.genre``."""

    def read(name: str) -> str:
        path = directory / name
        try:
            return path.read_text(encoding="latin-1")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from e

    src = str(directory / "u.data")
    cols: list[list[Any]] = [[], [], [], []]
    for lineno, p in _rows(read("u.data"), src, "\t", 4):
        cols[0].append(p[0].strip())
        cols[1].append(p[1].strip())
        cols[2].append(_int(p[2], src, lineno, "rating"))
        cols[3].append(_int(p[3], src, lineno, "timestamp"))
    if not cols[0]:
        raise DataError(f"{src}: no interactions")
    inter = Interactions(np.array(cols[0]), np.array(cols[1]), np.array(cols[2], dtype=np.float32),
                         np.array(cols[3], dtype=np.int64))
    src = str(directory / "u.user")
    urows = [(p[0].strip(), float(_int(p[1], src, n, "age")), p[2], p[3], p[4].strip())
             for n, p in _rows(read("u.user"), src, "|", 5)]
    users = EntityTable(np.array([r[0] for r in urows], dtype=str), {
        "age": np.array([r[1] for r in urows], dtype=np.float64), "gender": [r[2] for r in urows],
        "occupation": [r[3] for r in urows], "zip_code": [r[4] for r in urows]})
    genres: tuple[str, ...] = GROUPLENS_GENRES
    if (directory / "u.genre").is_file():
        genres = tuple(line.split("|")[0] for line in read("u.genre").splitlines() if line.strip())
    src = str(directory / "u.item")
    irows = []
    for _n, p in _rows(read("u.item"), src, "|", 5 + len(genres)):
        date = p[2].strip()
        year = float(date[-4:]) if date[-4:].isdigit() else np.nan
        title = p[1].strip()
        if title.endswith(")") and title[-6:-5] == "(":  # "Toy Story (1995)" -> "Toy Story"
            title = title[:-6].strip()
        flags = p[5:5 + len(genres)]
        irows.append((p[0].strip(), title, year, [g for g, f in zip(genres, flags, strict=True) if f == "1"]))
    items = EntityTable(np.array([r[0] for r in irows], dtype=str), {
        "movie_title": [r[1] for r in irows], "release_year": np.array([r[2] for r in irows], dtype=np.float64),
        "class": [r[3] for r in irows]})
    return ml_dataset(directory.name, inter, users, items)


def write_grouplens(ds: Dataset, directory: Path, *, keep_users: set[str] | None = None) -> Path:
    """Write an ML-shaped ``ds`` (ML-100k's columns) in GroupLens' layout (what
    ``load_grouplens`` reads): the replay's "everything known before DATE" dataset.
    ``keep_users``: the users listed in ``u.user`` (default: all); the others stay unknown
    to a pipeline fitted on it, i.e. new users later."""
    directory.mkdir(parents=True, exist_ok=True)
    i = ds.interactions
    (directory / "u.data").write_text("".join(
        f"{u}\t{it}\t{int(r)}\t{int(t)}\n" for u, it, r, t in zip(i.user.tolist(), i.item.tolist(),
                                                                  i.rating.tolist(), i.timestamp.tolist(),
                                                                  strict=True)), encoding="latin-1")
    us = ds.users
    ages = [int(a) if a == a else -1 for a in us.column("age")]
    (directory / "u.user").write_text("".join(
        f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in zip(us.ids.tolist(), ages, us.column("gender"),
                                                          us.column("occupation"), us.column("zip_code"), strict=True)
        if keep_users is None or u in keep_users), encoding="latin-1")
    item_genres = [_genre_list(g) for g in ds.items.column("class")]
    genres = sorted({g for gs in item_genres for g in gs}) or ["unknown"]
    (directory / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(genres)), encoding="latin-1")
    lines = []
    for it, title, year, gs in zip(ds.items.ids.tolist(), ds.items.column("movie_title"),
                                   ds.items.column("release_year"), item_genres, strict=True):
        y = _year(year)
        date = f"01-Jan-{y}" if y >= 0 else ""
        lines.append("|".join([it, title or "", date, "", "", *("1" if g in gs else "0" for g in genres)]) + "\n")
    (directory / "u.item").write_text("".join(lines), encoding="latin-1")
    return directory


def _genre_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v).split()


def _year(v: Any) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return -1
    return int(f) if f == f else -1


def load_dataset(name: str, *, cache_dir: Path) -> Dataset:
    """A dataset by name: ``ml-100k`` (the shipped spec), a spec file (``.yaml``/``.yml``), a
    directory of RecBole atomic files (zero-config), a GroupLens directory (``u.data``), or
    ``synthetic:USERSxITEMS[:SEED]``."""
    from offline.loading import dataset_from_spec

    if name in SHIPPED:
        return dataset_from_spec(load_spec(SHIPPED[name]), base=SPECS_DIR, data_dir=cache_dir)
    if name.startswith("synthetic:"):
        spec = name.split(":")
        try:
            n_users, n_items = (int(x) for x in spec[1].lower().split("x"))
            seed = int(spec[2]) if len(spec) > 2 else 0
        except ValueError as e:
            raise DataError(f"dataset {name!r}: expected synthetic:USERSxITEMS[:SEED]") from e
        if n_users < 1 or n_items < 1:
            raise DataError(f"dataset {name!r}: USERS and ITEMS must be positive")
        return synthetic_dataset(n_users=n_users, n_items=n_items, seed=seed)
    path = Path(name)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"{path}: dataset spec not found")
        return dataset_from_spec(load_spec(path), base=path.resolve().parent, data_dir=cache_dir, source=str(path))
    if path.is_dir() and any(path.glob("*.inter")):
        return dataset_from_spec(DatasetSpec(name=path.name, atomic=str(path.resolve())), base=path,
                                 data_dir=cache_dir)
    if path.is_dir() and (path / "u.data").is_file():
        return load_grouplens(path)
    if path.is_dir():
        raise DataError(f"{path}: neither RecBole atomic files (NAME.inter, NAME.item, NAME.user) nor GroupLens "
                        "files (u.data, u.item, u.user); for other tables write a dataset spec (.yaml) naming them")
    if path.is_file():
        raise DataError(f"{path}: a data file is read through a dataset spec (.yaml) that names its columns "
                        "(interactions: {path: ..., user: ..., item: ..., time: ...})")
    if len(path.parts) > 1 or path.suffix:
        raise DataError(f"{path}: not found")
    raise DataError(f"dataset {name!r}: not 'ml-100k', a spec file (.yaml), a directory of RecBole atomic files "
                    "(NAME.inter, ...), a GroupLens directory (u.data, ...) or 'synthetic:UxI[:SEED]'")


# --------------------------------------------------------------------------- synthetic


def synthetic_dataset(
    *, n_users: int, n_items: int, seed: int = 0, per_user: int = 20, n_clusters: int | None = None,
    zipf_a: float = 1.1, chunk: int = 100_000,
) -> Dataset:
    """Clustered users and items with power-law popularity, deterministic by ``seed``, in
    ML-100k's columns (so the shipped spec's features apply).

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
    users_t = EntityTable(user_ids, {
        "age": rng.integers(18, 70, size=n_users).astype(np.float64),
        "gender": rng.choice(np.array(["F", "M"]), size=n_users),
        "occupation": np.char.add("occ", rng.integers(0, 20, size=n_users).astype("U")),
        "zip_code": np.char.add("z", rng.integers(0, 100, size=n_users).astype("U"))})
    genre_names = np.array([f"g{g}" for g in range(16)])
    items_t = EntityTable(item_ids, {"movie_title": item_ids.copy(),
                                     "release_year": rng.integers(1950, 2000, size=n_items).astype(np.float64),
                                     "class": genre_names[item_cluster % 16]})
    return ml_dataset(f"synthetic-{n_users}x{n_items}-s{seed}", inter, users_t, items_t)


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
