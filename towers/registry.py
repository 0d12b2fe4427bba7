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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from towers import bundle as bundle_mod
from towers import bundle_paths
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
    if text and (bad := bundle_paths.name_problem(text, what="version")) is not None:  # ../elsewhere, /abs
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
    if not (registry / version).is_dir():
        raise RegistryError(f"{registry}: no version {version}")
    fault("before_pointer")
    bundle_mod.atomic_write_bytes(registry / POINTER, (version + "\n").encode())
    fault("after_pointer")


def install(bundle_dir: Path, registry: Path, *, fault: FaultHook = _noop) -> str:
    """Copy a verified bundle into the registry (not yet live); returns its version."""
    with locked(registry):
        return _install(bundle_dir, registry, fault)


def _install(bundle_dir: Path, registry: Path, fault: FaultHook) -> str:
    try:
        man = bundle_mod.verify(bundle_dir)
    except BundleError as e:
        raise BundleError(f"refusing to publish: {e}") from e
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
            before_switch: Callable[[str], None] | None = None) -> str:
    """Install ``bundle_dir`` and make it CURRENT.

    ``before_switch(version)`` runs after the copy is verified and before the
    pointer flips (the Redis load goes there, so a live version never reads
    keys that are not there yet). ``fault`` is a test hook called at named points.
    """
    with locked(registry):
        version = _install(bundle_dir, registry, fault)
        if before_switch is not None:
            before_switch(version)
        set_current(registry, version, fault=fault)
    return version
