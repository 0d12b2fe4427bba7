"""Request-time context reaches the model (issue 18, item 5).

A dataset whose declared context decides what a user interacts with: the device picks the
half of the catalog, the hour of the event (derived from its time, never a column) picks the
quarter within it. A short training run learns that from the interaction rows; the same user
then gets different rankings for device=a and device=b, and for a morning and an evening
Context.timestamp, over real gRPC, exactly as ``towers.ranking.rank`` ranks them offline.
A context key the spec does not declare is INVALID_ARGUMENT naming it, unless the spec says
``unknown_context: ignore``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from offline.datasets import Dataset, load_dataset, temporal_split
from offline.evaluate import eval_set, metrics_from_ranks, model_ranks
from online.client import RecommenderClient
from online.config import load_config
from online.proto import recommender_pb2 as pb
from online.request import MAX_CONTEXT_VALUES, parse_recommend
from online.server import ServerThread
from towers import bundle as bundle_mod
from towers.combiner import CombinerParams, combine
from towers.context import ContextSchema, check, context_term, encode_requests, request_term
from towers.encoders import Encoder
from towers.errors import BundleError, InvalidRequest
from towers.features import FeaturePipeline, Vocabulary
from towers.ranking import QueryBatch, RankModel, rank
from towers.spec import FeatureSpec

QUARTER = 12  # items per (device, half-day) quarter of the catalog
DAY0 = 1_700_006_400  # 2023-11-15 00:00:00 UTC
MORNING, EVENING = DAY0 + 3 * 3600 + 120, DAY0 + 15 * 3600 + 120  # 03:02 and 15:02 UTC

SPEC = """
name: context-demo
interactions:
  path: log.csv
  context:
    - {{column: device, kind: categorical}}
    - {{column: hour, kind: bucketized, derive: hour_of_day, edges: [12]}}  # morning | afternoon
policies:
  exclude_seen: false
  unknown_context: {policy}
"""


def quarter(item_id: str) -> str:
    """The quarter an item belongs to: "a-am", "a-pm", "b-am" or "b-pm"."""
    return item_id.rsplit("-", 1)[0]


def write_dataset(d: Path, *, policy: str = "reject", users: int = 80, per_user: int = 40) -> Path:
    """A log where each row's device and hour of day decide which quarter its item is from
    (popular items first within a quarter); users have no taste of their own."""
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp,device"]
    for u in range(users):
        t = DAY0 - 30 * 86400 + int(rng.integers(0, 86400))
        for _ in range(per_user):
            t += int(rng.integers(600, 7200))
            device = "a" if rng.random() < 0.5 else "b"
            half = "am" if (t // 3600) % 24 < 12 else "pm"
            rank_in_quarter = min(int(rng.geometric(0.25)) - 1, QUARTER - 1)
            rows.append(f"u{u},{device}-{half}-{rank_in_quarter},{t},{device}")
    d.mkdir(parents=True, exist_ok=True)
    (d / "log.csv").write_text("\n".join(rows) + "\n")
    (d / "spec.yaml").write_text(SPEC.format(policy=policy))
    return d / "spec.yaml"


@pytest.fixture(scope="module")
def context_data(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    d = tmp_path_factory.mktemp("context-data")
    return load_dataset(str(write_dataset(d)), cache_dir=d)


@pytest.fixture(scope="module")
def context_bundle(tmp_path_factory: pytest.TempPathFactory, context_data: Dataset) -> Path:
    from offline.train import TrainConfig, train
    from towers.model import ModelConfig

    out = tmp_path_factory.mktemp("context-bundle") / "bundle"
    train(dataset=context_data, out=out, progress=False,
          model_cfg=ModelConfig(dim=16, id_dim=16, hidden=32, history_len=0, max_session=5),
          train_cfg=TrainConfig(epochs=3, patience=3, lr=1e-2, batch_size=128))
    return out


@pytest.fixture(scope="module")
def context_server(context_bundle: Path) -> Iterator[ServerThread]:
    srv = ServerThread(load_config(port=0), bundle_path=context_bundle)
    yield srv
    srv.stop()


@pytest.fixture
def client(context_server: ServerThread) -> Iterator[RecommenderClient]:
    with RecommenderClient(context_server.target, timeout=5.0) as c:
        yield c


def offline_ids(b: bundle_mod.Bundle, user: str, *, values: dict[str, str], ts: int, recent: list[str],
                k: int = 10) -> tuple[list[str], np.ndarray]:
    """What ``towers.ranking.rank`` returns for one request: the evaluate/batch-score path."""
    model, fp = RankModel.from_bundle(b), b.features
    term = request_term(fp, b.combiner, [values], np.array([ts]))
    batch = QueryBatch.from_lists(model, user_rows=[fp.user_vocab.known(user)],
                                  sessions=[fp.item_vocab.positions(recent).tolist()], excludes=[[]], k=k,
                                  context=term)
    rows, scores = rank(model, batch).items(0)
    return [b.item_ids[r] for r in rows.tolist()], scores


# -- the numpy context term --------------------------------------------------------------------


def _encoders() -> list[Encoder]:
    return [
        Encoder.fit(FeatureSpec(column="device", kind="categorical", oov_buckets=2), ["a", "b", "a", "c"]),
        Encoder.fit(FeatureSpec(column="hour", kind="bucketized", derive="hour_of_day", edges=[6, 12, 18]), []),
        Encoder.fit(FeatureSpec(column="basket_value", kind="numeric", log=True), [3.0, 10.0, 250.0, None]),
    ]


def _params(encoders: list[Encoder], d: int, rng: np.random.Generator) -> CombinerParams:
    from towers.context import table_shape

    return CombinerParams(
        W_s=rng.standard_normal((d, d)).astype(np.float32), w_a=rng.standard_normal(d).astype(np.float32),
        pos_bias=rng.standard_normal(4).astype(np.float32), w_g=rng.standard_normal(2 * d).astype(np.float32),
        b_g=np.zeros(1, np.float32),
        context={e.name: rng.standard_normal(table_shape(e.kind, e.table_rows, d)).astype(np.float32)
                 for e in encoders})


def test_the_context_term_is_one_learned_vector_per_feature_summed() -> None:
    """Checked against a plain loop: a categorical value (known, unseen, missing) and a
    bucketized hour pick a table row each; a numeric adds z * w, or m when it is missing."""
    encs = _encoders()
    fp = FeaturePipeline(user_vocab=Vocabulary([]), item_vocab=Vocabulary([]), context_encoders=encs)
    p = _params(encs, 8, np.random.default_rng(0))
    values = [{"device": "a", "basket_value": "10"}, {"device": "zzz"}, None, {"basket_value": "250"}]
    ts = np.array([DAY0 + 7 * 3600, DAY0 + 23 * 3600, DAY0, DAY0 + 12 * 3600])
    got = context_term(p, encode_requests(fp, values, ts))
    dev, _, basket = encs
    assert dev.vocab is not None
    for i, (v, t) in enumerate(zip(values, ts.tolist(), strict=True)):
        v = v or {}
        d = v.get("device")
        want = p.context["device"][dev.vocab.lookup([d])[0] if d else dev.vocab.lookup([""])[0]].copy()
        h = (t // 3600) % 24
        want += p.context["hour"][1 + sum(h >= e for e in (6, 12, 18))]
        if "basket_value" in v:
            z = (np.log1p(float(v["basket_value"])) - basket.mean) / basket.std
            want += np.float32(z) * p.context["basket_value"][0]
        else:
            want += p.context["basket_value"][1]
        assert got is not None
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_the_context_term_only_shifts_a_query_that_exists() -> None:
    encs = _encoders()
    p = _params(encs, 8, np.random.default_rng(1))
    user = np.zeros((2, 8), np.float32)
    user[0] = 1.0
    sess, mask = np.zeros((2, 4, 8), np.float32), np.zeros((2, 4), bool)
    c = np.full((2, 8), 0.5, np.float32)
    q = combine(p, user, np.array([True, False]), sess, mask, c)
    np.testing.assert_allclose(q[0], (user[0] + c[0]) / np.linalg.norm(user[0] + c[0]), rtol=1e-6)
    assert np.all(q[1] == 0.0)  # neither user nor session: still no query (popularity serves it)
    np.testing.assert_array_equal(combine(p, user, np.array([True, False]), sess, mask),
                                  combine(p, user, np.array([True, False]), sess, mask, np.zeros((2, 8), np.float32)))


def test_a_combiner_without_the_pipelines_context_tables_is_refused_at_load(context_bundle: Path,
                                                                            tmp_path: Path) -> None:
    b = bundle_mod.load(context_bundle)
    check(b.features, b.combiner)  # the trained bundle: one table per declared feature
    short = {**b.combiner.context, "device": b.combiner.context["device"][:-1]}
    with pytest.raises(ValueError, match="'device' has shape"):
        check(b.features, replace(b.combiner, context=short))
    with pytest.raises(ValueError, match=r"'country' for a feature the spec does not declare"):
        check(b.features, replace(b.combiner, context={**b.combiner.context, "country": np.zeros((3, 16))}))
    broken = tmp_path / "bundle"
    shutil.copytree(context_bundle, broken)
    arrays = b.combiner.arrays()
    del arrays["context.hour"]
    bundle_mod.update_bundle(broken, {"combiner.npz": arrays}, {})
    with pytest.raises(BundleError, match="no context array for the declared context feature 'hour'"):
        bundle_mod.load(broken)


# -- parsing: bounded, named ---------------------------------------------------------------------


def _parse(**context: object) -> object:
    msg = pb.RecommendRequest(user_id="u1", context=pb.Context(**context))  # type: ignore[arg-type]
    return parse_recommend(msg, load_config(), time_remaining=None)


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({"timestamp": -5}, "context.timestamp"),
        ({"timestamp": 1_700_000_000_000}, "context.timestamp"),  # milliseconds: a wrong hour, silently
        ({"values": {"": "x"}}, "context.values"),
        ({"values": {"k" * 200: "x"}}, "context.values"),
        ({"values": {"device": "x" * 300}}, "context.values[device]"),
        ({"values": {f"k{i}": "x" for i in range(MAX_CONTEXT_VALUES + 1)}}, "context.values"),
        ({"device": "a", "values": {"device": "b"}}, "context.device"),
    ],
)
def test_malformed_context_is_invalid_naming_the_field(context: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        _parse(**context)
    assert e.value.field == field


def test_an_unset_timestamp_is_the_servers_clock() -> None:
    before = int(time.time())
    req = _parse(values={"device": "a"})
    assert before <= req.timestamp <= int(time.time()) and req.context == {"device": "a"}  # type: ignore[attr-defined]
    assert _parse(timestamp=MORNING).timestamp == MORNING  # type: ignore[attr-defined]


def test_the_schema_names_undeclared_and_derived_keys(context_bundle: Path) -> None:
    schema = ContextSchema.of(bundle_mod.load(context_bundle).features)
    schema.check({"device": "a"})
    with pytest.raises(InvalidRequest) as e:
        schema.check({"device": "a", "country": "fr"})
    assert e.value.field == "context.values[country]" and "device" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        schema.check({"hour": "3"})
    assert e.value.field == "context.values[hour]" and "timestamp" in str(e.value)
    replace(schema, ignore_unknown=True).check({"country": "fr"})


# -- training and evaluation read the interaction rows' context ----------------------------------


def test_evaluation_reads_each_targets_own_context(context_bundle: Path, context_data: Dataset) -> None:
    """The validation and test targets carry their own rows' context, as a request would; the
    trained model needs it (users here have no taste of their own: only context tells)."""
    b = bundle_mod.load(context_bundle)
    split = temporal_split(context_data.interactions)
    es = eval_set(split, b.features, max_session=b.combiner.max_session)
    assert set(es.context) == {"device", "hour"} and len(es.context["device"]) == len(es)
    model = RankModel.from_bundle(b)
    with_ctx = metrics_from_ranks(model_ranks(model, es))["recall@10"]
    without = metrics_from_ranks(model_ranks(model, replace(es, context={})))["recall@10"]
    assert with_ctx > without + 0.2, (with_ctx, without)
    assert b.manifest["metrics"]["recall@10"] == pytest.approx(with_ctx)  # what train recorded: the same path


# -- serving: over real gRPC ---------------------------------------------------------------------


def test_the_declared_device_changes_the_ranking_as_offline(client: RecommenderClient, context_bundle: Path) -> None:
    b = bundle_mod.load(context_bundle)
    lists = {}
    for device in ("a", "b"):
        resp = client.recommend("u3", k=10, context={"device": device}, timestamp=MORNING)
        ids = list(resp.item_ids)
        lists[device] = ids
        assert resp.rung == pb.RUNG_FULL and len(ids) == 10
        assert sum(quarter(i) == f"{device}-am" for i in ids) >= 8, ids
        want, scores = offline_ids(b, "u3", values={"device": device}, ts=MORNING, recent=[])
        assert ids == want
        np.testing.assert_allclose(resp.scores, scores, rtol=1e-5, atol=1e-6)
    assert not set(lists["a"]) & set(lists["b"])
    # With a session too, still the offline ranking.
    recent = ["b-pm-0", "a-am-3"]
    resp = client.recommend("u7", k=10, recent=recent, context={"device": "b"}, timestamp=EVENING)
    assert list(resp.item_ids) == offline_ids(b, "u7", values={"device": "b"}, ts=EVENING, recent=recent)[0]


def test_the_hour_is_derived_from_the_request_timestamp(client: RecommenderClient, context_bundle: Path) -> None:
    b = bundle_mod.load(context_bundle)
    morning = list(client.recommend("u5", k=10, context={"device": "a"}, timestamp=MORNING).item_ids)
    evening = list(client.recommend("u5", k=10, context={"device": "a"}, timestamp=EVENING).item_ids)
    assert sum(quarter(i) == "a-am" for i in morning) >= 8, morning
    assert sum(quarter(i) == "a-pm" for i in evening) >= 8, evening
    assert evening == offline_ids(b, "u5", values={"device": "a"}, ts=EVENING, recent=[])[0]
    # The same hour another day is the same context.
    assert list(client.recommend("u5", k=10, context={"device": "a"},
                                 timestamp=EVENING - 7 * 86400).item_ids) == evening


def test_the_legacy_device_field_feeds_the_declared_device(client: RecommenderClient) -> None:
    by_field = client.recommend("u3", k=10, device="b", timestamp=MORNING)
    by_value = client.recommend("u3", k=10, context={"device": "b"}, timestamp=MORNING)
    assert list(by_field.item_ids) == list(by_value.item_ids)
    assert list(by_field.scores) == list(by_value.scores)


def test_an_undeclared_context_key_is_invalid_argument_naming_it(client: RecommenderClient) -> None:
    for values, field in (({"device": "a", "country": "fr"}, "context.values[country]"),
                          ({"hour": "3"}, "context.values[hour]")):
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("u3", k=10, context=values)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":"), e.value.details()
    assert client.health() == "SERVING" and len(client.recommend("u3", context={"device": "a"}).item_ids) == 10


def test_unknown_context_ignore_accepts_and_drops_undeclared_keys(context_bundle: Path, tmp_path: Path) -> None:
    """The same model, its spec saying ``unknown_context: ignore``."""
    ignoring = tmp_path / "bundle"
    shutil.copytree(context_bundle, ignoring)
    fp = FeaturePipeline.loads((ignoring / "features.json").read_text())
    spec = {**fp.spec, "policies": {**fp.spec.get("policies", {}), "unknown_context": "ignore"}}
    bundle_mod.update_bundle(ignoring, {"features.json": replace(fp, spec=spec).dumps()}, {})
    srv = ServerThread(load_config(port=0), bundle_path=ignoring)
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            plain = c.recommend("u3", k=10, context={"device": "a"}, timestamp=MORNING)
            extra = c.recommend("u3", k=10, context={"device": "a", "country": "fr"}, timestamp=MORNING)
            assert list(extra.item_ids) == list(plain.item_ids) and list(extra.scores) == list(plain.scores)
            with pytest.raises(grpc.RpcError) as e:  # a derived feature is declared: still not settable
                c.recommend("u3", k=10, context={"hour": "3"})
            assert e.value.details().startswith("context.values[hour]:")
    finally:
        srv.stop()


def test_a_spec_without_context_ignores_the_device_and_refuses_values(tmp_path: Path) -> None:
    from offline.synth import make_synthetic_bundle

    make_synthetic_bundle(tmp_path / "b", n_items=200, n_users=20, dim=16, seed=0, index_type="flat", progress=False)
    srv = ServerThread(load_config(port=0), bundle_path=tmp_path / "b")
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            user = bundle_mod.load(tmp_path / "b").features.user_vocab.values[0]
            assert list(c.recommend(user, device="mobile").item_ids) == list(c.recommend(user).item_ids)
            with pytest.raises(grpc.RpcError) as e:
                c.recommend(user, context={"device": "mobile"})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("context.values[device]:")
    finally:
        srv.stop()


def test_the_cli_sends_context(context_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    from twotower.cli import main

    argv = ["recommend", "--user", "u3", "--k", "5", "--target", context_server.target, "--timestamp", str(MORNING)]
    assert main([*argv, "--context", "device=b"]) == 0
    out = capsys.readouterr().out
    with RecommenderClient(context_server.target, timeout=5.0) as c:
        want = c.recommend("u3", k=5, context={"device": "b"}, timestamp=MORNING).item_ids
    assert [line.split()[1] for line in out.splitlines()[1:]] == list(want)
    assert main([*argv, "--context", "country=fr"]) == 2
    assert "context.values[country]" in capsys.readouterr().err
    assert main([*argv, "--context", "device"]) == 2
    assert "--context" in capsys.readouterr().err
