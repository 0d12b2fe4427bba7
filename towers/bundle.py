"""The versioned bundle: one directory per model version, everything a worker
needs to serve it and nothing that needs torch or pickle to read.

Layout (``manifest.json`` lists every other file with its sha256)::

    manifest.json         version, created, git sha, configs, metrics, index spec + ANN recall, files
    features.json         the fitted feature pipeline
    combiner.npz          session combiner weights (arrays)
    towers.npz            tower weights (arrays; absent in synthetic bundles)
    item_embeddings.npy   (n_items, d) float32, row i == item_vocab position i == FAISS id i
    user_embeddings.npy   (n_users, d) float32, row u == user_vocab position u
    popularity.npy        item rows, most popular first (the last rung of degradation)
    index.faiss           the FAISS index over item_embeddings
    recs_items.npy        (n_users, K) int32 precomputed top-K item rows, -1 padded (batch path)
    recs_scores.npy       (n_users, K) float32
    titles.json           item id → display title (optional)
    index_tune.json       the index tuner's report: every setting measured, the Pareto front, the choice
    index_pareto.png      its plot (recall@100 vs µs/query)

The manifest records each array's dtype and shape (``arrays``), the index spec with its
measured recall@100 and declared target (``index``), and for quantized serving paths
``quant``: ``user_embeddings`` (the feature store's dtype; for int8 the calibrated
per-dimension scale and its tag) and ``e2e`` (Recall@20 of the quantized path vs float32,
which ``publish`` gates on).

A bundle directory is written to a temporary sibling and renamed into place;
updates (index rebuild, batch scoring) rewrite a file and then the manifest,
each by tmp + ``os.replace``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towers import bundle_paths
from towers import index as faiss_index
from towers.combiner import CombinerParams
from towers.context import check as context_check
from towers.errors import BundleError
from towers.features import FeaturePipeline

FORMAT = "twotower-bundle/1"
MANIFEST = "manifest.json"
REQUIRED = ("features.json", "combiner.npz", "item_embeddings.npy", "user_embeddings.npy", "popularity.npy",
            "index.faiss")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def encode_file(name: str, value: Any) -> bytes:
    """Serialise a bundle file by its extension (npy/npz arrays, json, raw bytes)."""
    if name.endswith(".npy"):
        return _npy_bytes(value)
    if name.endswith(".npz"):
        return _npz_bytes(value)
    if name.endswith(".json"):
        return (value if isinstance(value, str) else json.dumps(value, sort_keys=True)).encode()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise TypeError(f"cannot encode bundle file {name}")


def array_meta(name: str, value: Any) -> dict[str, Any] | None:
    """dtype and shape of an ``.npy`` file (the manifest's ``arrays``), so readers know what a
    file holds (float32 embeddings, int codes) without opening it."""
    if not name.endswith(".npy") or not hasattr(value, "dtype"):
        return None
    return {"dtype": str(np.asarray(value).dtype), "shape": [int(x) for x in np.shape(value)]}


def _arrays(files: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = dict(old or {})
    for name, value in files.items():
        if (meta := array_meta(name, value)) is not None:
            out[name] = meta
    return out


def write_bundle(out: Path, files: Mapping[str, Any], manifest: dict[str, Any]) -> str:
    """Write a new bundle directory atomically; returns its version id.

    The version id is the creation time plus a hash of the model's content (weights,
    embeddings, features), so two different models never share an id.
    """
    blobs = {name: encode_file(name, v) for name, v in files.items()}
    missing = [n for n in REQUIRED if n not in blobs]
    if missing:
        raise BundleError(f"cannot write bundle: missing {', '.join(missing)}")
    content = hashlib.sha256()
    for name in ("features.json", "combiner.npz", "towers.npz", "item_embeddings.npy", "user_embeddings.npy"):
        if name in blobs:
            content.update(hashlib.sha256(blobs[name]).digest())
    content.update(json.dumps(manifest.get("seed_tag", ""), sort_keys=True).encode())
    now = _dt.datetime.now(_dt.timezone.utc)
    version = manifest.get("version") or f"v{now:%Y%m%dT%H%M%S}-{content.hexdigest()[:10]}"
    if (bad := bundle_paths.version_problem(version)) is not None:
        raise BundleError(f"cannot write bundle: {bad}")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        man = dict(manifest)
        man.update(format=FORMAT, version=version, created=now.isoformat(), git_sha=git_sha(),
                   arrays=_arrays(files, man.get("arrays")),
                   files={n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in blobs.items()})
        man["content_id"] = content_id(man)
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        # Rename the old directory aside rather than deleting it first: the old bundle is never
        # destroyed before the new one is in place. A crash between the two renames leaves no
        # bundle at ``out`` but the old one complete in the dot-directory.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)  # put the old bundle back
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if (bad := bundle_paths.outside_problem(path, MANIFEST)) is not None:
        raise BundleError(f"{path}: {bad}")
    try:
        man: dict[str, Any] = json.loads(mpath.read_text())
    except FileNotFoundError as e:
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})") from e
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from e
    if man.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {man.get('format')!r}, expected {FORMAT!r}")
    return man


def content_id(man: Mapping[str, Any]) -> str:
    """What serving depends on: every file's checksum, the index's search settings
    (nprobe, efSearch, k_factor live in the manifest, not in index.faiss) and, once a bundle
    has one, the feature store's user-embedding encoding (dtype + int8 scale): re-encoding a
    version's users is a new version, never a silent change under the same Redis keys."""
    what: dict[str, Any] = {"files": {n: f["sha256"] for n, f in man["files"].items()},
                            "index": man.get("index", {}).get("spec")}
    if (ue := man.get("quant", {}).get("user_embeddings")) is not None:  # absent: the id old bundles had
        what["user_embeddings"] = ue
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def update_bundle(path: Path, files: Mapping[str, Any], manifest_updates: Mapping[str, Any]) -> dict[str, Any]:
    """Add or replace files of an existing bundle, then its manifest (each atomically).

    Changed content (``content_id``) is a new version (``derived_from`` keeps the old
    id), so publishing an updated bundle never looks like a no-op re-publish of the
    old id, and its Redis keys never collide with the old version's; an update that
    changes nothing keeps the id. A crash between files leaves a manifest that
    ``verify`` rejects.
    """
    man = read_manifest(path)
    for name, value in files.items():
        data = encode_file(name, value)
        atomic_write_bytes(path / name, data)
        man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    man["arrays"] = _arrays(files, man.get("arrays"))
    man.update(manifest_updates)
    content = content_id(man)
    if content != man.get("content_id"):
        now = _dt.datetime.now(_dt.timezone.utc)
        man["derived_from"] = man["version"]
        man.update(version=f"v{now:%Y%m%dT%H%M%S}-{content[:10]}", created=now.isoformat(), content_id=content)
    atomic_write_bytes(path / MANIFEST, json.dumps(man, indent=2, sort_keys=True).encode())
    return man


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        arr: np.ndarray = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable array ({e})") from e
    return arr


def verify(path: Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check a bundle's files, checksums and shapes; return its manifest.

    Raises ``BundleError`` listing every problem found (missing file, checksum
    mismatch, inconsistent shapes), so an operator sees all of them at once.
    """
    man = read_manifest(path)
    problems: list[str] = []
    if (bad := bundle_paths.version_problem(man.get("version"))) is not None:  # names a registry dir
        problems.append(bad)
    files: dict[str, Any] = man.get("files", {})
    for name in REQUIRED:
        if name not in files:
            problems.append(f"manifest does not list required file {name}")
    for name, meta in files.items():
        p = path / name
        if (bad := bundle_paths.file_problem(path, name)) is not None:  # ../x, /abs, a symlink out
            problems.append(bad)
        elif not p.is_file():
            problems.append(f"missing file {name}")
        elif p.stat().st_size != meta.get("bytes"):
            problems.append(f"{name}: size {p.stat().st_size} != manifest {meta.get('bytes')}")
        elif checksums and sha256_file(p) != meta.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (corrupt or modified)")
    if problems:
        raise BundleError(f"bundle {path} is invalid: " + "; ".join(problems))
    try:
        _check_shapes(path, man, problems)
    except BundleError as e:
        problems.append(str(e))
    if problems:
        raise BundleError(f"bundle {path} is invalid: " + "; ".join(problems))
    return man


def _check_shapes(path: Path, man: dict[str, Any], problems: list[str]) -> None:
    shape = man.get("shapes", {})
    n_items, n_users, dim = shape.get("n_items"), shape.get("n_users"), shape.get("dim")
    item = _load_npy(path / "item_embeddings.npy", mmap=True)
    user = _load_npy(path / "user_embeddings.npy", mmap=True)
    if item.shape != (n_items, dim):
        problems.append(f"item_embeddings.npy has shape {item.shape}, manifest says ({n_items}, {dim})")
    if user.shape != (n_users, dim):
        problems.append(f"user_embeddings.npy has shape {user.shape}, manifest says ({n_users}, {dim})")
    pop = _load_npy(path / "popularity.npy")
    if pop.ndim != 1 or (len(pop) and (pop.min() < 0 or pop.max() >= (n_items or 0))):
        problems.append("popularity.npy does not hold item rows")
    if "recs_items.npy" in man["files"]:
        recs = _load_npy(path / "recs_items.npy", mmap=True)
        if recs.ndim != 2 or recs.shape[0] != n_users:
            problems.append(f"recs_items.npy has shape {recs.shape}, expected ({n_users}, K)")
    with np.load(path / "combiner.npz", allow_pickle=False) as z:
        try:
            comb = CombinerParams.from_arrays(dict(z))
            if comb.dim != dim:
                problems.append(f"combiner dim {comb.dim} != embedding dim {dim}")
        except (KeyError, ValueError) as e:
            problems.append(f"combiner.npz: {e}")
    import faiss

    try:
        idx = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as e:
        problems.append(f"index.faiss unreadable: {str(e).splitlines()[0]}")
    else:
        if idx.ntotal != n_items or idx.d != dim:
            problems.append(f"index.faiss holds {idx.ntotal} vectors of dim {idx.d}, expected {n_items} of {dim}")


@dataclass
class Bundle:
    """A verified, loaded bundle: the arrays and index the scoring path needs."""

    path: Path
    manifest: dict[str, Any]
    features: FeaturePipeline
    combiner: CombinerParams
    item_emb: np.ndarray
    user_emb: np.ndarray
    popularity: np.ndarray
    index: Any  # faiss.Index
    index_spec: faiss_index.IndexSpec
    recs_items: np.ndarray | None
    recs_scores: np.ndarray | None
    titles: dict[str, str]
    user_scale: np.ndarray | None = None  # int8 per-dimension scale of the feature store's user embeddings

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def item_ids(self) -> list[str]:
        return self.features.item_vocab.values

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])


def load(path: Path, *, verify_checksums: bool = True) -> Bundle:
    """Verify then load a bundle. Large arrays are memory-mapped (read-only)."""
    path = Path(path)
    man = verify(path, checksums=verify_checksums)
    try:
        features = FeaturePipeline.loads((path / "features.json").read_text())
    except (ValueError, KeyError) as e:
        raise BundleError(f"{path / 'features.json'}: {e}") from e
    if len(features.item_vocab) != man["shapes"]["n_items"] or len(features.user_vocab) != man["shapes"]["n_users"]:
        raise BundleError(f"{path}: feature vocabularies do not match the embedding shapes")
    with np.load(path / "combiner.npz", allow_pickle=False) as z:
        combiner = CombinerParams.from_arrays(dict(z))
    try:  # one context array per declared context feature, sized by its fitted encoder
        context_check(features, combiner)
    except ValueError as e:
        raise BundleError(f"{path / 'combiner.npz'}: {e}") from e
    spec = faiss_index.IndexSpec.from_dict(man["index"]["spec"])
    idx = faiss_index.from_bytes((path / "index.faiss").read_bytes(), spec)
    has_recs = "recs_items.npy" in man["files"]
    user_scale = _user_scale(path, man)
    titles: dict[str, str] = {}
    if "titles.json" in man["files"]:
        titles = json.loads((path / "titles.json").read_text())
    return Bundle(
        path=path, manifest=man, features=features, combiner=combiner,
        item_emb=np.ascontiguousarray(_load_npy(path / "item_embeddings.npy")),
        user_emb=_load_npy(path / "user_embeddings.npy", mmap=True),
        popularity=_load_npy(path / "popularity.npy").astype(np.int64),
        index=idx, index_spec=spec,
        recs_items=_load_npy(path / "recs_items.npy", mmap=True) if has_recs else None,
        recs_scores=_load_npy(path / "recs_scores.npy", mmap=True) if has_recs else None,
        titles=titles, user_scale=user_scale,
    )


def _user_scale(path: Path, man: dict[str, Any]) -> np.ndarray | None:
    """An int8 version's user-embedding scale, registered with the store decoder so a worker
    that loads this version can read its int8 values from Redis (store_format)."""
    entry = man.get("quant", {}).get("user_embeddings")
    if not entry or entry.get("dtype") != "int8":
        return None
    from towers.quant import calibration_from_manifest
    from towers.store_format import register_int8_scale

    try:
        scale = calibration_from_manifest(entry)
    except (KeyError, ValueError, TypeError) as e:
        raise BundleError(f"{path}: manifest quant.user_embeddings: {e}") from e
    if scale.shape != (man["shapes"]["dim"],):
        raise BundleError(f"{path}: int8 scale has shape {scale.shape}, expected ({man['shapes']['dim']},)")
    register_int8_scale(scale)
    return scale
