"""Which file names a bundle manifest (or a registry pointer) may name.

A bundle is read by every serving worker and copied by every publish, from names
written in ``manifest.json``. A manifest that names ``../x``, an absolute path, or a
file that is a symlink to somewhere else would make a worker read (and checksum,
and copy into the registry) a file outside the bundle: whatever the bundle's author
points it at. So a name must be a plain file name inside the bundle directory, and
a symlink there must resolve inside the bundle too. ``verify`` (and so ``load`` and
``publish``) refuses anything else; the registry applies the same rule to the
version ``CURRENT`` names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

# A version id: ``v<UTC time>-<content hash prefix>`` (towers.bundle writes 10 hex digits). One
# fixed pattern, checked at write, verify (so load and publish), CURRENT, flags and Redis GC: a
# manifest's ``version`` names a registry directory and a Redis key prefix, so ``../x`` would
# copy a bundle out of the registry and ``*`` would match every version's keys in a SCAN.
VERSION_RE = re.compile(r"v\d{8}T\d{6}-[0-9a-f]{1,64}")


def version_problem(version: object) -> str | None:
    """Why ``version`` is not a version id, or ``None`` when it is one."""
    if isinstance(version, str) and VERSION_RE.fullmatch(version):
        return None
    return f"version {str(version)[:80]!r} is not a version id (v<yyyymmdd>T<hhmmss>-<hex>)"


def name_problem(name: object, *, what: str = "file name") -> str | None:
    """Why ``name`` is not a plain file name, or ``None`` when it is one."""
    if not isinstance(name, str) or not name:
        return f"{what} {name!r} is not a string"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"{what} {name!r} is not a plain file name: an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"{what} {name!r} is not a plain file name: '..' leads out of the bundle"
    if len(parts) != 1 or name.startswith(".") or "\x00" in name:
        return f"{what} {name!r} is not a plain file name"
    return None


def outside_problem(root: Path, name: str) -> str | None:
    """Why reading ``root / name`` would leave ``root``, or ``None``. ``name`` must already
    be a plain name (``name_problem``); what is left to check is a symlink pointing out."""
    p = root / name
    if not p.is_symlink():
        return None
    target = Path(os.path.realpath(p))
    if not target.is_relative_to(Path(os.path.realpath(root))):
        return f"{name} is a symlink to {target}, outside the bundle"
    return None


def file_problem(root: Path, name: object) -> str | None:
    """``name_problem`` then ``outside_problem``: ``None`` when ``root / name`` may be read."""
    problem = name_problem(name)
    if problem is None and isinstance(name, str):
        problem = outside_problem(root, name)
    return problem
