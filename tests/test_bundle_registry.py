"""Bundle verification refuses corruption; publish is atomic under crashes; index rebuilds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from offline.index_build import rebuild_index
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.errors import BundleError, RegistryError


def test_a_good_bundle_verifies_and_loads(synth_bundle: Path) -> None:
    b = bundle_mod.load(synth_bundle)
    assert b.item_emb.shape == (3000, 32) and b.index.ntotal == 3000
    assert b.recs_items is not None and b.recs_items.shape == (400, 100)
    man = json.loads((synth_bundle / "manifest.json").read_text())
    assert {"version", "created", "files", "index", "shapes", "metrics"} <= man.keys()
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())


def test_flipped_byte_is_refused(synth_bundle: Path) -> None:
    p = synth_bundle / "item_embeddings.npy"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"item_embeddings\.npy: sha256 mismatch"):
        bundle_mod.verify(synth_bundle)
    with pytest.raises(BundleError):
        bundle_mod.load(synth_bundle)


def test_missing_file_is_refused(synth_bundle: Path) -> None:
    (synth_bundle / "index.faiss").unlink()
    with pytest.raises(BundleError, match=r"missing file index\.faiss"):
        bundle_mod.verify(synth_bundle)


def test_wrong_shape_is_refused_even_with_matching_checksum(synth_bundle: Path) -> None:
    # A consistent-looking manifest (checksums updated) with an embedding matrix of the wrong shape.
    bundle_mod.update_bundle(synth_bundle, {"user_embeddings.npy": np.zeros((399, 32), np.float32)}, {})
    with pytest.raises(BundleError, match=r"user_embeddings\.npy has shape \(399, 32\)"):
        bundle_mod.verify(synth_bundle)


def test_a_rebuilt_index_is_a_new_version_that_publishes_beside_the_old(synth_bundle: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    old = registry_mod.publish(synth_bundle, reg)
    assert bundle_mod.update_bundle(synth_bundle, {}, {})["version"] == old  # nothing changed: same id
    rebuild_index(synth_bundle, kind="ivf", recall_target=0.9, log=lambda *_: None)
    man = bundle_mod.verify(synth_bundle)
    assert man["version"] != old and man["derived_from"] == old
    assert registry_mod.publish(synth_bundle, reg) == man["version"]
    assert registry_mod.current_version(reg) == man["version"] and registry_mod.versions(reg) == sorted(
        [old, man["version"]])


def test_an_installed_version_is_immutable(synth_bundle: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    version = registry_mod.publish(synth_bundle, reg)
    # Same id, different content (a hand-edited manifest keeping the old id): refused, old copy untouched.
    bundle_mod.update_bundle(synth_bundle, {"extra.json": {"note": "changed"}}, {})
    man = json.loads((synth_bundle / "manifest.json").read_text())
    man["version"] = version
    (synth_bundle / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RegistryError, match="already installed with different content"):
        registry_mod.publish(synth_bundle, reg)
    assert "extra.json" not in bundle_mod.verify(reg / version)["files"]


def test_a_manifest_naming_a_path_outside_the_bundle_is_refused(synth_bundle: Path) -> None:
    man = json.loads((synth_bundle / "manifest.json").read_text())
    man["files"]["../escape.npy"] = {"sha256": "0" * 64, "bytes": 1}
    (synth_bundle / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="not a plain file name"):
        bundle_mod.verify(synth_bundle)


def test_publish_refuses_an_unverifiable_bundle(synth_bundle: Path, tmp_path: Path) -> None:
    (synth_bundle / "combiner.npz").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="refusing to publish"):
        registry_mod.publish(synth_bundle, tmp_path / "reg")
    assert registry_mod.current_version(tmp_path / "reg") is None


CRASH_POINTS = ["before_copy", "copied:item_embeddings.npy", "before_rename", "after_rename", "before_pointer",
                "after_pointer"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_publish_killed_at_any_point_leaves_current_on_a_complete_bundle(
    synth_bundle_factory, tmp_path: Path, point: str  # type: ignore[no-untyped-def]
) -> None:
    old, new = synth_bundle_factory(seed=0), synth_bundle_factory(seed=1)
    reg = tmp_path / "reg"
    v_old = registry_mod.publish(old, reg)
    v_new = bundle_mod.read_manifest(new)["version"]
    assert v_old != v_new
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from towers import registry
        def fault(p):
            if p == {point!r}:
                os._exit(137)  # as abrupt as SIGKILL: no cleanup, no finally
        registry.publish(Path({str(new)!r}), Path({str(reg)!r}), fault=fault)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    live = registry_mod.current_version(reg)
    assert live == (v_new if point == "after_pointer" else v_old)
    bundle_mod.verify(registry_mod.current_path(reg))  # the live bundle is complete
    # The next publish completes and cleans up the debris.
    assert registry_mod.publish(new, reg) == v_new
    assert registry_mod.current_version(reg) == v_new
    assert not list(reg.glob(".incoming-*"))
    assert set(registry_mod.versions(reg)) == {v_old, v_new}


def test_registry_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        registry_mod.current_path(tmp_path / "nope")
    (tmp_path / "reg").mkdir()
    with pytest.raises(RegistryError, match="nothing published"):
        registry_mod.current_path(tmp_path / "reg")


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "sq8"])
def test_index_rebuild_records_recall(synth_bundle: Path, kind: str) -> None:
    entry = rebuild_index(synth_bundle, kind=kind, recall_target=0.9, log=lambda *_: None)
    man = bundle_mod.verify(synth_bundle)
    assert man["index"] == entry and man["index"]["spec"]["type"] == kind
    assert 0.0 < entry["ann_recall@100"] <= 1.0
    if kind in ("flat",):
        assert entry["ann_recall@100"] == 1.0
    if kind in ("ivf", "sq8"):
        assert entry["ann_recall@100"] >= 0.9  # nprobe was tuned to the target
    b = bundle_mod.load(synth_bundle)
    assert b.index.ntotal == 3000


def test_ann_recall_is_tie_aware_and_matches_a_plain_count() -> None:
    import faiss

    from towers.index import ann_recall

    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 8)).astype(np.float32)
    emb = np.concatenate([base, base])  # every item has an exact twin: ties everywhere
    q = rng.standard_normal((20, 8)).astype(np.float32)
    # An exact index that breaks ties the other way (twins stored in reverse order). k=11 splits
    # a tied pair at the boundary, so a plain id-set comparison would score it below 1.0.
    rev = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    rev.add_with_ids(emb[::-1].copy(), np.arange(len(emb) - 1, -1, -1, dtype=np.int64))
    ref = faiss.IndexFlatIP(8)
    ref.add(emb)
    _, truth = ref.search(q, 11)
    _, got = rev.search(q, 11)
    assert np.mean([len(set(t) & set(g)) for t, g in zip(truth.tolist(), got.tolist(), strict=True)]) < 11
    assert ann_recall(rev, emb, q, k=11) == 1.0  # any twin is as good as the other

    # An "index" that only knows the first 40 rows: recall is the plain count of true top-10 it finds.
    partial = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    partial.add_with_ids(emb[:40], np.arange(40, dtype=np.int64))
    scores = q @ emb.T
    kth = np.sort(scores, axis=1)[:, -10]
    _, got = partial.search(q, 10)
    plain = np.mean([np.sum(scores[i, got[i]] >= kth[i] - 1e-5) for i in range(len(q))]) / 10
    assert ann_recall(partial, emb, q, k=10) == pytest.approx(plain)
    assert ann_recall(partial, emb, q, k=10) < 0.5


def test_concurrent_publishers_do_not_break_each_others_copies(synth_bundle_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import threading

    a, b = synth_bundle_factory(seed=11), synth_bundle_factory(seed=12)
    reg = tmp_path / "reg"
    a_copying, b_cleaned_up = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_a(point: str) -> None:
        if point == "before_rename":  # A's copy sits in .incoming-*: let B run its stale-copy cleanup now
            a_copying.set()
            b_cleaned_up.wait(timeout=2.0)  # with the lock B cannot get there: A goes on after the timeout

    def mark_b(point: str) -> None:
        if point == "before_copy":
            b_cleaned_up.set()

    def publish(bundle: Path, **kw: object) -> None:
        try:
            registry_mod.publish(bundle, reg, **kw)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    ta = threading.Thread(target=publish, args=(a,), kwargs={"fault": hold_a})
    ta.start()
    a_copying.wait(timeout=30)
    tb = threading.Thread(target=publish, args=(b,), kwargs={"fault": mark_b})
    tb.start()
    ta.join()
    tb.join()
    assert errors == []
    want = sorted(bundle_mod.read_manifest(x)["version"] for x in (a, b))
    assert registry_mod.versions(reg) == want
    for v in want:
        bundle_mod.verify(reg / v)


@pytest.mark.parametrize("version", ["*", "../x", "v1", "v20260101T000000-*", "v20260101T000000-abcdef/..", ""])
def test_a_manifest_version_that_is_not_a_version_id_is_refused(synth_bundle: Path, tmp_path: Path,
                                                                version: str) -> None:
    """A version names a registry directory and a Redis key prefix: ``../x`` would copy the
    bundle out of the registry, ``*`` would match every version's keys in GC's SCAN."""
    man = json.loads((synth_bundle / "manifest.json").read_text())
    man["version"] = version
    (synth_bundle / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="is not a version id"):
        bundle_mod.verify(synth_bundle)
    with pytest.raises(BundleError, match="is not a version id"):
        registry_mod.publish(synth_bundle, tmp_path / "reg")
    assert not (tmp_path / "x").exists() and not registry_mod.versions(tmp_path / "reg")


def test_current_naming_a_glob_is_refused(tmp_path: Path) -> None:
    (tmp_path / "CURRENT").write_text("*\n")
    with pytest.raises(RegistryError, match="is not a version id"):
        registry_mod.current_version(tmp_path)


def test_gc_deletes_only_the_keys_of_version_ids_it_listed(synth_bundle: Path, tmp_path: Path, redis_proc) -> None:  # type: ignore[no-untyped-def]
    import redis

    from offline.refresh import collect_garbage
    from towers.redis_load import load_bundle_into_redis
    from towers.store_format import RedisKeys

    reg = tmp_path / "reg"
    version = registry_mod.publish(synth_bundle, reg)
    load_bundle_into_redis(synth_bundle, redis_url=redis_proc.url, prefix="gc", progress=False)
    r = redis.Redis(port=redis_proc.port)
    keys = RedisKeys("gc")
    r.set(keys.ready("*"), 1)  # written by hand or by an old bug: a name GC must not glob with
    r.set(keys.ready("v20200101T000000-0000aaaa"), 1)  # a retired version id
    r.set(keys.user_embedding("v20200101T000000-0000aaaa", "u1"), b"x")
    n_current = len(r.keys(f"gc:v:{version}:*"))
    assert collect_garbage(registry=reg, redis_url=redis_proc.url, prefix="gc", grace_s=0) == [
        "v20200101T000000-0000aaaa"]
    assert len(r.keys(f"gc:v:{version}:*")) == n_current > 0  # CURRENT's keys untouched
    assert r.get(keys.ready("*")) is not None and r.get(keys.user_embedding("v20200101T000000-0000aaaa", "u1")) is None
