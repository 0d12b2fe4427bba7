"""A registry: a directory of immutable bundle versions and one ``CURRENT``
pointer naming the live one.

    REGISTRY/
      CURRENT              the live version id (one line)
      <version>/           a complete, verified bundle
      .incoming-*/         a copy in progress (ignored; removed by the next publish)
      .lock                held (flock) by whoever installs or switches, so concurrent
                           publishers never clean up each other's copies in progress

Publishing copies the bundle in, verifies the copy, renames it into place and
only then switches ``CURRENT`` (write tmp, fsync, ``os.replace``, fsync dir),
so a crash at any point leaves ``CURRENT`` on a complete bundle.

Quality gates (:func:`quality_gate`, before anything is copied): a bundle is refused when
its index's recall@100 is below the target it declares (``index.recall_target``), or, for
trained bundles that serve through a quantized path (a lossy index, or int8/float16 user
embeddings), when that path's end-to-end Recall@20 (``quant.e2e``, measured through
``towers.ranking`` by ``index tune``/``index build``/``quantize``) is more than 1% (relative)
below the same bundle in float32, when that figure is missing, or when it was measured
for another index or dtype than the bundle now has. The gate reads the manifest only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from towers import bundle as bundle_mod
from towers import bundle_paths
from towers import index as faiss_index
from towers.errors import BundleError, RegistryError

POINTER = "CURRENT"
FaultHook = Callable[[str], None]


def _noop(_: str) -> None:
    return None


@contextlib.contextmanager
def locked(registry: Path) -> Iterator[None]:
    """Exclusive use of the registry for one install-and-switch (blocks other publishers;
    readers of CURRENT never need it: the pointer is replaced atomically)."""
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def current_version(registry: Path) -> str | None:
    try:
        text = (registry / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"{registry / POINTER}: unreadable ({e.strerror})") from e
    if text and (bad := bundle_paths.version_problem(text)) is not None:  # ../elsewhere, /abs, *
        raise RegistryError(f"{registry / POINTER}: {bad}")
    return text or None


def current_path(registry: Path) -> Path:
    """The live bundle's directory; ``RegistryError`` if nothing is published."""
    if not registry.is_dir():
        raise RegistryError(f"{registry}: registry directory does not exist")
    version = current_version(registry)
    if version is None:
        raise RegistryError(f"{registry}: nothing published yet (no {POINTER})")
    path = registry / version
    if not path.is_dir():
        raise RegistryError(f"{registry}: {POINTER} names {version}, which is not in the registry")
    return path


def versions(registry: Path) -> list[str]:
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and not p.name.startswith("."))


def set_current(registry: Path, version: str, *, fault: FaultHook = _noop) -> None:
    if (bad := bundle_paths.version_problem(version)) is not None:
        raise RegistryError(f"{registry}: {bad}")
    if not (registry / version).is_dir():
        raise RegistryError(f"{registry}: no version {version}")
    fault("before_pointer")
    bundle_mod.atomic_write_bytes(registry / POINTER, (version + "\n").encode())
    fault("after_pointer")


def install(bundle_dir: Path, registry: Path, *, fault: FaultHook = _noop) -> str:
    """Copy a verified bundle into the registry (not yet live); returns its version."""
    with locked(registry):
        return _install(bundle_dir, registry, fault)


MAX_E2E_RELATIVE_DROP = 0.01


def quality_gate(man: dict[str, Any]) -> None:
    """Raise ``BundleError`` naming the figure and the threshold when a bundle falls short."""
    version = man.get("version", "?")
    idx = man.get("index", {})
    target, recall = idx.get("recall_target"), idx.get("ann_recall@100")
    if target is not None and recall is not None and float(recall) < float(target):
        raise BundleError(f"refusing to publish {version}: index recall@100 {float(recall):.4f} is below its "
                          f"declared target {float(target):.4f}")
    spec = faiss_index.IndexSpec.from_dict(idx.get("spec", {"type": "flat"}))
    quant = man.get("quant", {})
    user_dtype = str(quant.get("user_embeddings", {}).get("dtype", "float32"))
    trained = "towers.npz" in man.get("files", {}) and not str(man.get("dataset", "")).startswith("synthetic")
    if not trained or not (spec.quantized or user_dtype != "float32"):
        return
    e2e = quant.get("e2e")
    path = f"index {spec.label()}, user embeddings {user_dtype}"
    if not e2e:
        raise BundleError(f"refusing to publish {version}: quantized serving path ({path}) has no end-to-end "
                          "Recall@20 check; run `twotower index tune` or `twotower quantize` on it")
    if e2e.get("index") != spec.label() or e2e.get("user_dtype", "float32") != user_dtype:
        raise BundleError(f"refusing to publish {version}: the end-to-end Recall@20 check was measured for "
                          f"index {e2e.get('index')}, user embeddings {e2e.get('user_dtype')}, but the bundle "
                          f"serves {path}; measure it again")
    ref, got = float(e2e["recall@20"]["float32"]), float(e2e["recall@20"]["quantized"])
    floor = ref * (1.0 - MAX_E2E_RELATIVE_DROP)
    if got < floor:
        raise BundleError(f"refusing to publish {version}: quantized Recall@20 {got:.4f} is more than "
                          f"{MAX_E2E_RELATIVE_DROP:.0%} below float32's {ref:.4f} (threshold {floor:.4f}; {path})")


def _install(bundle_dir: Path, registry: Path, fault: FaultHook) -> str:
    try:
        man = bundle_mod.verify(bundle_dir)
    except BundleError as e:
        raise BundleError(f"refusing to publish: {e}") from e
    quality_gate(man)
    version = str(man["version"])
    registry.mkdir(parents=True, exist_ok=True)
    for stale in registry.glob(".incoming-*"):
        shutil.rmtree(stale, ignore_errors=True)
    dest = registry / version
    if dest.is_dir():
        installed = bundle_mod.verify(dest)  # already installed: make sure it is intact
        if bundle_mod.content_id(installed) != bundle_mod.content_id(man):
            raise RegistryError(f"{registry}: version {version} is already installed with different content; "
                                "refusing to replace an immutable version")
        return version
    tmp = Path(tempfile.mkdtemp(dir=registry, prefix=f".incoming-{version}-"))
    fault("before_copy")
    for name in [*man["files"], bundle_mod.MANIFEST]:
        shutil.copy2(bundle_dir / name, tmp / name)
        fault(f"copied:{name}")
    bundle_mod.verify(tmp)
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fault("before_rename")
    tmp.rename(dest)
    bundle_mod.fsync_dir(registry)
    fault("after_rename")
    return version


def publish(bundle_dir: Path, registry: Path, *, fault: FaultHook = _noop,
            before_switch: Callable[[str], None] | None = None,
            expect_current: Collection[str | None] | None = None) -> str:
    """Install ``bundle_dir`` and make it CURRENT.

    ``before_switch(version)`` runs after the copy is verified and before the
    pointer flips (the Redis load goes there, so a live version never reads
    keys that are not there yet). ``expect_current``: refuse (``RegistryError``) unless
    CURRENT is one of these, checked under the registry lock — a job that built its
    bundle from CURRENT never replaces a version published since. ``fault`` is a test
    hook called at named points.
    """
    with locked(registry):
        now = current_version(registry)
        if expect_current is not None and now not in expect_current:
            raise RegistryError(f"{registry}: CURRENT is {now}, not {' or '.join(map(str, expect_current))} as "
                                "this publish expected: another version was published since; nothing changed")
        version = _install(bundle_dir, registry, fault)
        if before_switch is not None:
            before_switch(version)
        set_current(registry, version, fault=fault)
    return version
