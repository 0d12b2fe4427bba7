"""Loading a bundle never unpickles, and never reads outside the bundle directory:
object arrays, ``../`` names, absolute paths and symlinks out are refused at
verify, load and publish, with a BundleError that says why."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.errors import BundleError, RegistryError

ROOT = Path(__file__).resolve().parent.parent


class Trap:
    """Unpickling this creates ``marker``: the proof that an object array was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def object_npy(marker: Path, shape: tuple[int, ...]) -> bytes:
    arr = np.empty(shape, dtype=object)
    arr.flat[0] = Trap(marker)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def object_npz(marker: Path) -> bytes:
    arr = np.empty((1,), dtype=object)
    arr[0] = Trap(marker)
    buf = io.BytesIO()
    np.savez(buf, w=arr)  # np.savez pickles object arrays
    return buf.getvalue()


def replace_file(bundle: Path, name: str, data: bytes) -> None:
    """Swap a file and fix its checksum in the manifest: only the content check can catch it."""
    (bundle / name).write_bytes(data)
    man = json.loads((bundle / "manifest.json").read_text())
    man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(man))


def edit_manifest_files(bundle: Path, old: str, new: str) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    man["files"][new] = man["files"].pop(old)
    (bundle / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize(("name", "shape"), [
    ("popularity.npy", (3000,)),  # read whole
    ("user_embeddings.npy", (400, 32)),  # memory-mapped
    ("recs_items.npy", (400, 100)),  # memory-mapped, optional file
])
def test_object_array_is_refused_not_unpickled(synth_bundle: Path, tmp_path: Path, name: str,
                                               shape: tuple[int, ...]) -> None:
    marker = tmp_path / "unpickled"
    replace_file(synth_bundle, name, object_npy(marker, shape))
    with pytest.raises(BundleError, match=rf"{name}"):
        bundle_mod.verify(synth_bundle)
    with pytest.raises(BundleError, match=rf"{name}"):
        bundle_mod.load(synth_bundle)
    with pytest.raises(BundleError, match=rf"refusing to publish.*{name}"):
        registry_mod.publish(synth_bundle, tmp_path / "reg")
    assert not marker.exists()


def test_object_array_in_npz_is_refused_not_unpickled(synth_bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    replace_file(synth_bundle, "combiner.npz", object_npz(marker))
    with pytest.raises(BundleError, match=r"combiner\.npz"):
        bundle_mod.load(synth_bundle)
    assert not marker.exists()


def test_the_object_array_trap_would_fire_if_unpickled(tmp_path: Path) -> None:
    # The control for the tests above: with pickle allowed, loading does create the marker.
    marker = tmp_path / "unpickled"
    np.load(io.BytesIO(object_npy(marker, (2,))), allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(("bad_name", "needle"), [
    ("../popularity.npy", "not a plain file name: '..' leads out of the bundle"),
    ("sub/../../popularity.npy", "not a plain file name: '..' leads out of the bundle"),
    ("sub/popularity.npy", "not a plain file name"),
    (".hidden.npy", "not a plain file name"),
])
def test_manifest_names_outside_the_bundle_are_refused(synth_bundle: Path, tmp_path: Path, bad_name: str,
                                                       needle: str) -> None:
    # The named file exists where the name leads, with the right checksum: only the name is wrong.
    (synth_bundle / "sub").mkdir()
    dest = Path(os.path.normpath(synth_bundle / bad_name))
    dest.write_bytes((synth_bundle / "popularity.npy").read_bytes())
    edit_manifest_files(synth_bundle, "popularity.npy", bad_name)
    for call in (bundle_mod.verify, bundle_mod.load, lambda b: registry_mod.publish(b, tmp_path / "reg")):
        with pytest.raises(BundleError, match=rf"{needle}"):
            call(synth_bundle)


def test_absolute_path_in_manifest_is_refused(synth_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.npy"
    outside.write_bytes((synth_bundle / "popularity.npy").read_bytes())
    edit_manifest_files(synth_bundle, "popularity.npy", str(outside))
    with pytest.raises(BundleError, match=r"is not a plain file name: an absolute path"):
        bundle_mod.verify(synth_bundle)
    with pytest.raises(BundleError, match=r"is not a plain file name: an absolute path"):
        bundle_mod.load(synth_bundle)


def test_symlink_pointing_out_is_refused(synth_bundle: Path, tmp_path: Path) -> None:
    # An identical copy outside, so size and checksum match: only the link's target is wrong.
    outside = tmp_path / "outside" / "item_embeddings.npy"
    outside.parent.mkdir()
    os.replace(synth_bundle / "item_embeddings.npy", outside)
    (synth_bundle / "item_embeddings.npy").symlink_to(outside)
    with pytest.raises(BundleError, match=r"item_embeddings\.npy is a symlink to .*outside the bundle"):
        bundle_mod.verify(synth_bundle)
    with pytest.raises(BundleError, match=r"outside the bundle"):
        bundle_mod.load(synth_bundle)
    with pytest.raises(BundleError, match=r"refusing to publish.*outside the bundle"):
        registry_mod.publish(synth_bundle, tmp_path / "reg")


def test_symlinked_manifest_pointing_out_is_refused(synth_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "manifest.json"
    os.replace(synth_bundle / "manifest.json", outside)
    (synth_bundle / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"manifest\.json is a symlink to .*outside the bundle"):
        bundle_mod.load(synth_bundle)


def test_symlink_inside_the_bundle_is_allowed(synth_bundle: Path) -> None:
    # A link to a file in the bundle reads nothing outside it (content is still checksummed).
    os.replace(synth_bundle / "popularity.npy", synth_bundle / "popularity.data")
    (synth_bundle / "popularity.npy").symlink_to("popularity.data")
    assert bundle_mod.load(synth_bundle).popularity.shape == (3000,)


@pytest.mark.parametrize("pointer", ["../other", "/etc", "a/b", ".incoming-x"])
def test_current_pointer_outside_the_registry_is_refused(synth_bundle: Path, tmp_path: Path, pointer: str) -> None:
    reg = tmp_path / "reg"
    registry_mod.publish(synth_bundle, reg)
    (reg / "CURRENT").write_text(pointer + "\n")
    with pytest.raises(RegistryError, match=r"CURRENT: version"):
        registry_mod.current_path(reg)


def test_every_np_load_refuses_pickles() -> None:
    """A static guard for the code that reads bundles: each ``np.load``/``numpy.load`` call
    passes ``allow_pickle=False`` literally, and nothing imports pickle."""
    offenders = []
    for path in [*ROOT.glob("towers/**/*.py"), *ROOT.glob("online/**/*.py"), *ROOT.glob("offline/**/*.py")]:
        if "proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a pickle library")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
                kw = {k.arg: k.value for k in node.keywords}
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} np.load without allow_pickle=False")
    assert offenders == []
