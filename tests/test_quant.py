"""Quantized indexes and embeddings, calibration, the index tuner and the publish gates.

Every recall here is computed against a brute-force numpy reference on small data; no
test asserts on wall time (the tuner's µs/query are only compared with each other)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from offline.index_tune import tune_index
from offline.quantize import calibrate_user_embeddings, end_to_end
from offline.synth import clustered
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers import registry as registry_mod
from towers.errors import BundleError, FeatureStoreError
from towers.index import IndexSpec
from towers.quant import calibrate_int8, dequantize_int8, int8_scale, quantize_int8, scale_tag
from towers.ranking import RankModel, search
from towers.store_format import RedisKeys, decode_embedding, embedding_nbytes, encode_embedding


def _data(n: int = 4000, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items = clustered(n, centres, 0.8 / np.sqrt(d), rng)
    queries = clustered(200, centres, 1.6 / np.sqrt(d), rng)
    return items, queries


def brute_recall(got: np.ndarray, items: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Plain recall@k: the share of each query's exact top-k (numpy) among the returned rows."""
    truth = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth.tolist(), got.tolist(), strict=True)]))


QUANTIZED_SPECS = [
    IndexSpec("ivfpqfs", nlist=32, nprobe=8, pq_m=16, refine="sq8", k_factor=4.0),
    IndexSpec("ivfpqfs", nlist=32, nprobe=8, pq_m=16, refine="flat", k_factor=4.0, opq=True),
    IndexSpec("sq8", nlist=32, nprobe=8),
    IndexSpec("hnswsq8", hnsw_m=32, ef_search=128),
]


@pytest.mark.parametrize("spec", QUANTIZED_SPECS, ids=lambda s: s.label())
def test_quantized_indexes_find_the_brute_force_neighbours(spec: IndexSpec) -> None:
    items, queries = _data()
    index = faiss_index.build(items, spec)
    # Through the bundle's bytes and the spec, as a worker loads it; searched by the ranking path.
    loaded = faiss_index.from_bytes(faiss_index.to_bytes(index), spec)
    model = RankModel(combiner=None, item_emb=items, user_emb=items[:1], index=loaded,  # type: ignore[arg-type]
                      popularity=np.arange(len(items)))
    _, rows = search(model, queries, 100)
    recall = brute_recall(rows, items, queries, 100)
    assert recall >= 0.85, f"{spec.label()}: recall@100 {recall:.3f}"
    assert (rows >= 0).all()
    # The tie-aware measure the tuner uses agrees with the plain count here (no ties in random data).
    kth = faiss_index.exact_kth(items, queries, 100)
    assert faiss_index.recall_of(rows, items, queries, kth, 100) == pytest.approx(recall, abs=0.01)
    assert faiss_index.index_bytes(loaded) < 5 * items.nbytes


def test_search_parameters_come_from_the_spec_at_load() -> None:
    items, queries = _data()
    spec = IndexSpec("ivfpqfs", nlist=32, nprobe=16, pq_m=16, refine="sq8", k_factor=4.0)
    data = faiss_index.to_bytes(faiss_index.build(items, spec))

    def recall(s: IndexSpec) -> float:
        _, got = faiss_index.from_bytes(data, s).search(queries, 100)
        return brute_recall(got, items, queries, 100)

    narrow, wide = recall(IndexSpec(**{**spec.to_dict(), "nprobe": 1})), recall(spec)
    no_refine = recall(IndexSpec(**{**spec.to_dict(), "k_factor": 1.0}))
    assert narrow < wide  # nprobe reached the IVF behind the refine wrapper
    assert no_refine < wide  # k_factor re-ranks more candidates on the SQ8 codes
    # An old manifest's spec (no refine/opq fields) still loads.
    assert IndexSpec.from_dict({"type": "ivf", "nlist": 4, "nprobe": 2}).refine == ""


def test_clipped_sq_ranges_reconstruct_better_and_survive_the_bundle_bytes() -> None:
    items, queries = _data(6000, 32)
    # Heavy tails: a few items carry large values that min..max ranges would spend levels on.
    items = items.copy()
    items[:30] *= 4.0
    errs = {}
    for clip in (0.0, 3.0):
        spec = IndexSpec("ivfpqfs", nlist=16, nprobe=16, pq_m=16, refine="sq6", k_factor=8.0, sq_clip=clip)
        index = faiss_index.from_bytes(faiss_index.to_bytes(faiss_index.build(items, spec)), spec)
        sqs = faiss_index.scalar_quantizers(index)
        assert len(sqs) == 1  # the refine stage's codes
        refine = faiss.downcast_index(faiss.downcast_index(index).refine_index)
        body = items[30:]  # the error that matters: on the bulk of the catalog
        rec = refine.sa_decode(refine.sa_encode(body))
        errs[clip] = float(((rec - body) ** 2).sum(1).mean())
        _, got = index.search(queries, 50)
        assert brute_recall(got, items, queries, 50) >= 0.8
    assert errs[3.0] < 0.5 * errs[0.0], errs
    assert "sq_clip=3" in IndexSpec("sq8", nlist=4, nprobe=1, sq_clip=3.0).label()
    with pytest.raises(ValueError, match="sq_clip applies to scalar-quantized codes"):
        faiss_index.build(items, IndexSpec("ivf", nlist=4, nprobe=1, sq_clip=3.0))


def test_the_tuner_sweeps_a_finer_ivf_only_where_the_catalog_allows_it() -> None:
    from offline.index_tune import family_specs, nlist_choices

    assert nlist_choices(1_000_000) == [4000, 16000]
    assert nlist_choices(2_000) == [51]  # 39 items a list at most: one choice
    sq6 = family_specs("ivfpqfs-sq6", n=1_000_000, d=64, nlist=16000)
    assert [(s.refine, s.sq_clip, s.nlist) for s in sq6] == [("sq6", 0.0, 16000), ("sq6", 3.0, 16000)]


def test_int8_scale_is_calibrated_on_held_out_users() -> None:
    rng = np.random.default_rng(1)
    users = rng.standard_normal((2000, 16)).astype(np.float32) * np.linspace(0.1, 2.0, 16, dtype=np.float32)
    users[0, 3] = 50.0  # one outlier: without clipping it would take most of dimension 3's levels
    items, _ = _data(500, 16)
    cal = calibrate_int8(fit=users[:1600], heldout=users[1600:], items=items)
    assert set(cal.rel_mse) == {"100", "99.99", "99.9", "99.5", "99", "98"}
    assert cal.rel_mse[f"{cal.clip_percentile:g}"] == min(cal.rel_mse.values())
    assert cal.clip_percentile < 100.0 and cal.rel_mse[f"{cal.clip_percentile:g}"] < cal.rel_mse["100"]
    per_dim = int8_scale(users, 99.9)
    assert per_dim.shape == (16,) and per_dim[0] < per_dim[-1]  # per dimension, not one global scale
    q = quantize_int8(users, per_dim)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert np.abs(dequantize_int8(q, per_dim) - np.clip(users, -127 * per_dim, 127 * per_dim)).max() <= \
        per_dim.max() / 2 + 1e-6


def test_store_encodings_round_trip_and_refuse_an_unknown_scale() -> None:
    rng = np.random.default_rng(2)
    v = rng.standard_normal(64).astype(np.float32) / 8
    scale = int8_scale(v[None, :] * 2, 100.0)
    raw = encode_embedding(v, dtype="int8", scale=scale)
    assert len(raw) == embedding_nbytes(64, "int8") == 68 and raw[:4] == scale_tag(scale)
    out = decode_embedding(raw, 64, scales={scale_tag(scale): scale})
    assert out is not None and np.abs(out - v).max() <= scale.max() / 2 + 1e-7
    assert np.allclose(decode_embedding(encode_embedding(v, dtype="float16"), 64), v, atol=1e-3)  # type: ignore[arg-type]
    assert np.array_equal(decode_embedding(encode_embedding(v), 64), v)  # type: ignore[arg-type]
    with pytest.raises(FeatureStoreError, match="scale tag"):
        decode_embedding(raw, 64, scales={})


def test_int8_user_embeddings_round_trip_through_redis(synth_bundle: Path, redis_proc) -> None:  # type: ignore[no-untyped-def]
    import redis

    from towers.redis_load import load_bundle_into_redis

    report = calibrate_user_embeddings(synth_bundle, cache_dir=None, dtype="int8", log=lambda *_: None)
    assert report["bytes_ratio_int8"] >= 3.5 and report["int8"]["heldout_users"] > 0
    b = bundle_mod.load(synth_bundle)  # loading registers the version's scale with the decoder
    assert b.user_scale is not None and b.manifest["quant"]["user_embeddings"]["dtype"] == "int8"
    assert b.manifest["arrays"]["user_embeddings.npy"]["dtype"] == "float32"
    n = load_bundle_into_redis(synth_bundle, redis_url=redis_proc.url, progress=False)  # the declared dtype
    keys = RedisKeys()
    r = redis.Redis.from_url(redis_proc.url)
    assert r.get(keys.ready(b.version)) == str(n).encode()
    assert np.array_equal(np.frombuffer(r.get(keys.user_embedding_scale(b.version)), "<f4"), b.user_scale)
    users = b.features.user_vocab.values
    raws = r.mget([keys.user_embedding(b.version, u) for u in users])
    assert {len(x) for x in raws} == {b.dim + 4}
    got = np.stack([decode_embedding(x, b.dim) for x in raws])  # type: ignore[misc]  # the store's call
    want = np.asarray(b.user_emb)
    assert np.array_equal(got, dequantize_int8(quantize_int8(want, b.user_scale), b.user_scale))
    inside = np.abs(want) <= 127 * b.user_scale  # not clipped: off by at most half a level
    assert (np.abs(got - want) <= b.user_scale / 2 + 1e-6)[inside].all() and inside.mean() > 0.99
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.995 and np.median(cos) > 0.9999
    # The online Redis feature store reads them unchanged (one pipeline; decode by the tag).
    import asyncio

    from online.config import RedisConfig
    from online.redis_store import RedisFeatureStore

    async def fetch() -> np.ndarray:
        store = RedisFeatureStore(RedisConfig(url=redis_proc.url, socket_timeout_ms=2000.0))
        try:
            feats = await store.fetch(b.version, users[:20], dim=b.dim, n_recent=5, timeout=2.0)
        finally:
            await store.close()
        assert feats.has_user.all()
        return feats.embedding

    assert np.array_equal(asyncio.run(fetch()), got[:20])
    # float16 into the same Redis: half the bytes of float32, decoded by length.
    load_bundle_into_redis(synth_bundle, redis_url=redis_proc.url, dtype="float16", progress=False)
    assert len(r.get(keys.user_embedding(b.version, users[0]))) == 2 * b.dim


def test_tuner_that_cannot_meet_the_target_says_so_and_picks_nothing(synth_bundle: Path) -> None:
    before = bundle_mod.read_manifest(synth_bundle)
    report = tune_index(synth_bundle, recall_target=1.0, types=["ivfpqfs-raw"], n_queries=100,
                        log=lambda *_: None)
    assert report["chosen"] is None
    assert "no setting reaches recall@100 >= 1" in report["message"]
    assert max(p["recall@100"] for p in report["points"]) < 1.0
    after = bundle_mod.read_manifest(synth_bundle)
    assert after["version"] == before["version"] and after["index"] == before["index"]
    assert "index_tune.json" not in after["files"]


def test_tuner_picks_the_cheapest_setting_that_meets_the_target(synth_bundle: Path) -> None:
    old = bundle_mod.read_manifest(synth_bundle)["version"]
    report = tune_index(synth_bundle, recall_target=0.9, types=["flat", "sq8", "ivfpqfs"], n_queries=150,
                        nlists=[8, 32], log=lambda *_: None)
    chosen = report["chosen"]
    assert chosen is not None and chosen["recall@100"] >= 0.9
    # Both list counts were built and measured for each IVF family.
    assert {(p["type"], p["spec"]["nlist"]) for p in report["points"]} == {
        ("flat", 0), ("sq8", 8), ("sq8", 32), ("ivfpqfs", 8), ("ivfpqfs", 32)}
    # Each setting's score error: float32 codes return exact scores, SQ8 codes do not.
    err = {p["type"]: p["score_rel_mse"] for p in report["points"]}
    assert err["flat"] < 1e-10 and 0 < err["sq8"] < 1e-2
    meeting = [p for p in report["points"] if p["recall@100"] >= 0.9]
    assert chosen["us_per_query"] == min(p["us_per_query"] for p in meeting)
    assert all(p["pareto"] for p in report["pareto"]) and report["pareto"]
    man = bundle_mod.verify(synth_bundle)
    assert man["version"] != old and man["derived_from"] == old
    assert man["index"]["spec"] == chosen["spec"] and man["index"]["recall_target"] == 0.9
    assert json.loads((synth_bundle / "index_tune.json").read_text())["chosen"]["label"] == chosen["label"]
    assert (synth_bundle / "index_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The installed index, loaded as a worker loads it, has the recall the tuner measured.
    b = bundle_mod.load(synth_bundle)
    from offline.quantize import calibration_queries

    q = calibration_queries(b, cache_dir=None, n=150).queries
    _, got = b.index.search(q, 100)
    kth = faiss_index.exact_kth(b.item_emb, q, 100)
    assert faiss_index.recall_of(got, b.item_emb, q, kth, 100) == pytest.approx(chosen["recall@100"], abs=1e-4)


def test_publish_refuses_an_index_below_its_declared_target(synth_bundle: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    good = registry_mod.publish(synth_bundle, reg)
    emb = np.asarray(bundle_mod.load(synth_bundle).item_emb)
    spec = IndexSpec("ivf", nlist=64, nprobe=1)  # a real index, measured: one probe of 64 lists
    index = faiss_index.build(emb, spec)
    recall = faiss_index.ann_recall(index, emb, faiss_index.sample_queries(emb))
    assert recall < 0.95
    entry = {"spec": spec.to_dict(), "ann_recall@100": recall, "recall_target": 0.95}
    bad = bundle_mod.update_bundle(synth_bundle, {"index.faiss": faiss_index.to_bytes(index)}, {"index": entry})
    with pytest.raises(BundleError, match=rf"index recall@100 {recall:.4f} is below its declared target 0\.9500"):
        registry_mod.publish(synth_bundle, reg)
    assert registry_mod.current_version(reg) == good
    assert not (reg / bad["version"]).exists()


@pytest.mark.slow
def test_publish_gate_refuses_a_degraded_quantized_trained_bundle(trained_bundle: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    bdir = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bdir)
    reg = tmp_path / "reg"
    good = registry_mod.publish(bdir, reg)
    b = bundle_mod.load(bdir)
    # A real, badly tuned quantized index: 4-bit PQ without refine, one probe of many.
    spec = IndexSpec("ivfpqfs", nlist=32, nprobe=1, pq_m=32)
    index = faiss_index.build(np.asarray(b.item_emb), spec)
    e2e = end_to_end(b, cache_dir=data_dir, index=index, spec=spec)
    assert e2e["recall@20"]["quantized"] < 0.99 * e2e["recall@20"]["float32"]  # measured, through rank()
    entry = {"spec": spec.to_dict(), "ann_recall@100": 0.5}
    bundle_mod.update_bundle(bdir, {"index.faiss": faiss_index.to_bytes(index)},
                             {"index": entry, "quant": {"e2e": e2e}})
    with pytest.raises(BundleError, match=r"quantized Recall@20 0\.\d{4} is more than 1% below float32's") as err:
        registry_mod.publish(bdir, reg)
    assert f"{e2e['recall@20']['float32']:.4f}" in str(err.value) and "threshold" in str(err.value)
    assert registry_mod.current_version(reg) == good
    # Without a measurement (or with one for another index) the quantized path is refused too.
    bundle_mod.update_bundle(bdir, {}, {"quant": {}})
    with pytest.raises(BundleError, match="no end-to-end Recall@20 check"):
        registry_mod.publish(bdir, reg)
    assert registry_mod.current_version(reg) == good
    # int8 user embeddings with the exact index: calibrated, measured, within 1%: published.
    shutil.rmtree(bdir)
    shutil.copytree(trained_bundle, bdir)
    rep = calibrate_user_embeddings(bdir, cache_dir=data_dir, dtype="int8", log=lambda *_: None)
    assert set(rep["recall@20_by_user_dtype"]) == {"float32", "float16", "int8"}
    e = bundle_mod.read_manifest(bdir)["quant"]["e2e"]
    assert e["user_dtype"] == "int8" and e["relative_drop"] <= 0.01
    assert registry_mod.publish(bdir, reg) == bundle_mod.read_manifest(bdir)["version"] != good


@pytest.mark.slow
def test_int8_towers_keep_the_recommendations(trained_bundle: Path, data_dir: Path) -> None:
    pytest.importorskip("torch")
    from offline.quantize import int8_embedding_report

    rep = int8_embedding_report(trained_bundle, n_users=5000, batch=2048, cache_dir=data_dir, log=lambda *_: None)
    assert rep["top100_overlap"] >= 0.9  # measured overlap of exact top-100 lists, int8 vs float32 towers
    assert rep["users_per_s"]["int8"] > 0 and rep["users_per_s"]["float32"] > 0
    assert rep["history"] == "train split"  # the tower read each user's real history
    plain = int8_embedding_report(trained_bundle, n_users=5000, batch=2048, cache_dir=data_dir, calibrated=False,
                                  log=lambda *_: None)
    # Calibration (input-channel smoothing) keeps more of float32's lists than plain dynamic int8.
    assert rep["top100_overlap"] > plain["top100_overlap"]
    assert rep["user_embedding_rel_mse"] < plain["user_embedding_rel_mse"]


def test_input_channel_smoothing_keeps_the_float_function(trained_bundle: Path, data_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    import copy

    from offline.datasets import load_dataset, temporal_split
    from offline.histories import user_histories
    from offline.quantize import _smooth_linears
    from towers.model import ModelConfig, TwoTower, embed_items, embed_users

    b = bundle_mod.load(trained_bundle)
    cfg = ModelConfig.from_dict(b.manifest["model_config"])
    model = TwoTower(cfg, b.features)
    with np.load(trained_bundle / "towers.npz", allow_pickle=False) as z:
        model.load_arrays({k: z[k] for k in z.files})
    model.eval()
    split = temporal_split(load_dataset(str(b.manifest["dataset"]), cache_dir=data_dir).interactions)
    hist = user_histories(b.features, split.train, cfg.history_len)
    n = len(hist)
    smoothed = copy.deepcopy(model)
    # Calibrated on the first half of the users with their histories...
    _smooth_linears(smoothed, lambda m: embed_users(m, b.features, hist[: n // 2], rows=np.arange(n // 2)),
                    alpha=0.8)
    assert any(isinstance(mod, torch.nn.Sequential) and type(mod[0]).__name__ == "InputScale"
               for mod in smoothed.modules())
    # ...and evaluated on every user and the catalog: x / s through W * s is the same float
    # function (up to rounding), also on inputs the calibration never saw.
    items = embed_items(model, b.features)
    np.testing.assert_allclose(embed_items(smoothed, b.features), items, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed_users(smoothed, b.features, hist, item_emb=items),
                               embed_users(model, b.features, hist, item_emb=items), rtol=1e-4, atol=1e-5)


def test_smoothing_leaves_a_channel_the_calibration_never_saw_move_alone() -> None:
    torch = pytest.importorskip("torch")
    import copy

    from offline.quantize import _smooth_linears

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    ref = copy.deepcopy(lin)
    calib = torch.randn(64, 8)
    calib[:, 7] = 0.0  # channel 7 is always zero in the calibration data
    _smooth_linears(lin, lambda m: m(calib), alpha=0.8)
    inv = lin[0][0].inv
    assert float(inv[7]) == 1.0  # scale 1: not blown up by a zero range
    assert float(inv[:7].max()) != 1.0  # the observed channels were smoothed
    x = torch.randn(16, 8)  # channel 7 moves now
    with torch.no_grad():
        assert torch.allclose(lin(x), ref(x), atol=1e-5)


def test_quality_gate_reads_the_manifest_and_names_what_is_stale() -> None:
    spec = IndexSpec("sq8", nlist=16, nprobe=4)
    man = {"version": "v1", "dataset": "ml-100k", "files": {"towers.npz": {}},
           "index": {"spec": spec.to_dict(), "ann_recall@100": 0.97, "recall_target": 0.95},
           "quant": {"e2e": {"recall@20": {"float32": 0.3457, "quantized": 0.3440}, "index": spec.label(),
                             "user_dtype": "float32"}}}
    registry_mod.quality_gate(man)  # -0.5%: within the 1% bound
    other = {**man, "index": {**man["index"], "spec": IndexSpec("sq8", nlist=16, nprobe=2).to_dict()}}
    with pytest.raises(BundleError, match=r"measured for index IVF16,SQ8 nprobe=4.*serves index IVF16,SQ8 nprobe=2"):
        registry_mod.quality_gate(other)
    int8 = {**man, "quant": {**man["quant"], "user_embeddings": {"dtype": "int8"}}}
    with pytest.raises(BundleError, match=r"user embeddings float32, but the bundle serves .* user embeddings int8"):
        registry_mod.quality_gate(int8)
    synthetic = {**man, "dataset": "synthetic-embeddings:1x1", "quant": {}}
    registry_mod.quality_gate(synthetic)  # no end-to-end metric to protect; the recall target still applies
    with pytest.raises(BundleError, match=r"recall@100 0\.9000 is below its declared target 0\.9500"):
        registry_mod.quality_gate({**synthetic, "index": {**man["index"], "ann_recall@100": 0.9}})


def test_index_build_auto_runs_the_tuner(synth_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offline import index_tune
    from offline.index_build import rebuild_index

    entry = rebuild_index(synth_bundle, kind="auto", recall_target=0.9, log=lambda *_: None)
    man = bundle_mod.verify(synth_bundle)
    assert entry == man["index"] and entry["tuned"] and entry["ann_recall@100"] >= 0.9
    assert "index_tune.json" in man["files"]
    # Nothing reaches the target (4-bit codes without a refine never reach 1.0): an error, no change.
    monkeypatch.setattr(index_tune, "DEFAULT_TYPES", ("ivfpqfs-raw",))
    with pytest.raises(BundleError, match="no setting reaches recall@100 >= 1"):
        rebuild_index(synth_bundle, kind="auto", recall_target=1.0, log=lambda *_: None)
    assert bundle_mod.read_manifest(synth_bundle)["version"] == man["version"]
