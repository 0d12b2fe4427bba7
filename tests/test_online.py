"""The online service over real gRPC on loopback (in-memory feature store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from offline.datasets import Dataset, temporal_split
from offline.evaluate import MAX_K, eval_set
from online.client import RecommenderClient
from online.config import load_config
from online.proto import recommender_pb2 as pb
from online.server import ServerThread, load_and_serve
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.labels import Mode, Rung, Source
from towers.ranking import RankModel, rank


@pytest.fixture
def server(served_registry: Path) -> Iterator[ServerThread]:
    srv = ServerThread(load_config(port=0, max_k=100), registry=served_registry)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[RecommenderClient]:
    with RecommenderClient(server.target, timeout=5.0) as c:
        yield c


def test_health_goes_from_not_serving_to_serving(served_registry: Path) -> None:
    srv = ServerThread(load_config(port=0))  # bound, but no bundle yet
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            assert c.health() == "NOT_SERVING"
            assert c.health("twotower.v1.Recommender") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.recommend("1", timeout=0.5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            srv.call(load_and_serve(srv.running, registry_mod.current_path(served_registry)))
            assert c.health() == "SERVING" and c.health("twotower.v1.Recommender") == "SERVING"
            assert len(c.recommend("1").item_ids) == 10
    finally:
        srv.stop()


def test_the_server_ranks_exactly_like_twotower_evaluate(client: RecommenderClient, served_registry: Path,
                                                         ml100k: Dataset) -> None:
    """Offline/online parity: the test-split inputs that ``twotower evaluate`` ranks, sent to the
    gRPC server as requests (session = the user's recent items, exclusions = their history),
    come back as the same item lists with the same scores."""
    b = bundle_mod.load(registry_mod.current_path(served_registry))
    es = eval_set(temporal_split(ml100k.interactions), b.features, max_session=b.combiner.max_session)
    users = list(range(0, len(es), 47))  # 21 users across the split
    model = RankModel.from_bundle(b)
    for i in users:
        want = rank(model, es.batch(model, i, i + 1))
        rows, scores = want.items(0)
        resp = client.recommend(str(es.users[i]), k=MAX_K, recent=[b.item_ids[r] for r in es.sessions[i]],
                                exclude=[b.item_ids[r] for r in es.excludes[i]])
        assert resp.rung == pb.RUNG_FULL and resp.model_version == b.version
        assert list(resp.item_ids) == [b.item_ids[r] for r in rows.tolist()], es.users[i]
        np.testing.assert_allclose(resp.scores, scores, rtol=1e-5, atol=1e-6)


def test_recorded_events_change_the_next_recommendation_and_are_excluded(client: RecommenderClient) -> None:
    before = client.recommend("7", k=10)
    assert before.source == "user_only"
    events = [("7", "184", "click", 1), ("7", "200", "view", 2), ("7", "219", "cart", 3)]
    assert client.record_events(events) == 3
    after = client.recommend("7", k=10)
    assert after.source == "online" and after.rung == pb.RUNG_FULL
    assert list(after.item_ids) != list(before.item_ids)
    assert not {"184", "200", "219"} & set(after.item_ids)
    assert len(after.item_ids) == 10


def test_unknown_users(client: RecommenderClient) -> None:
    r = client.recommend("never-seen", k=5, recent=["50", "no-such-item"])
    assert r.source == "session_only" and r.rung == pb.RUNG_FULL and len(r.item_ids) == 5
    assert "50" not in r.item_ids
    r = client.recommend("never-seen-either", k=5)
    assert r.source == "popularity" and r.rung == pb.RUNG_POPULARITY
    assert any("cold start" in x for x in r.reasons) and len(r.item_ids) == 5


def test_batch_mode_equals_the_precomputed_list(client: RecommenderClient, served_registry: Path) -> None:
    b = bundle_mod.load(registry_mod.current_path(served_registry))
    assert b.recs_items is not None
    for user in ["1", "42", "900"]:
        row = b.features.user_vocab.known(user)
        want = [b.item_ids[r] for r in b.recs_items[row][:10].tolist()]
        r = client.recommend(user, k=10, mode="batch")
        assert list(r.item_ids) == want and r.rung == pb.RUNG_BATCH and r.source == "batch"


def test_exclusions_and_k(client: RecommenderClient) -> None:
    full = client.recommend("5", k=20)
    excluded = list(full.item_ids[:5])
    r = client.recommend("5", k=20, exclude=excluded, cart=[full.item_ids[5]])
    assert len(r.item_ids) == 20 and not set([*excluded, full.item_ids[5]]) & set(r.item_ids)
    assert len(client.recommend("5").item_ids) == 10  # default k


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u" * 300}, "user_id"),
        ({"k": 0}, "k"),
        ({"k": 101}, "k"),
        ({"recent": [str(i) for i in range(100_000)]}, "session"),
        ({"recent": ["50", ""]}, "session.recent_item_ids"),
        ({"cart": ["x" * 300]}, "session.cart_item_ids"),
        ({"exclude": [""]}, "exclude_item_ids"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client: RecommenderClient, kwargs: dict[str, object],
                                                        field: str) -> None:
    user = str(kwargs.pop("user_id", "1"))
    with pytest.raises(grpc.RpcError) as e:
        client.recommend(user, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":")
    assert client.health() == "SERVING" and len(client.recommend("1").item_ids) == 10


def test_a_session_that_repeats_an_item_is_deduplicated_keeping_the_most_recent_position(
        client: RecommenderClient) -> None:
    # most recent first: 50 was viewed last and also earlier; 181 in between
    repeated = client.recommend("1", k=10, recent=["50", "181", "50", "181", "1"])
    deduped = client.recommend("1", k=10, recent=["50", "181", "1"])
    other_order = client.recommend("1", k=10, recent=["181", "50", "1"])
    assert repeated.rung == pb.RUNG_FULL and list(repeated.item_ids) == list(deduped.item_ids)
    assert list(repeated.scores) == list(deduped.scores)
    assert list(other_order.scores) != list(deduped.scores)  # position matters, so keeping the first one does
    assert not {"50", "181", "1"} & set(repeated.item_ids)


def test_bad_events_and_oversized_messages(client: RecommenderClient) -> None:
    with pytest.raises(grpc.RpcError) as e:
        client.stub.RecordEvents(pb.RecordEventsRequest(events=[pb.Event(user_id="1", item_id="5")]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "events[0].type" in e.value.details()
    millis = 1_700_000_000_000  # milliseconds, not seconds: would pin the item at the session's head
    with pytest.raises(grpc.RpcError) as e:
        client.record_events([("1", "50", "click", 5), ("1", "181", "click", millis)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "events[1].timestamp" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Recommend(pb.RecommendRequest(user_id="1", exclude_item_ids=["x" * 200] * 50_000))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # above the 8 MiB message cap: gRPC refuses
    assert client.health() == "SERVING"
    r = client.recommend("1")
    assert len(r.item_ids) == 10 and r.timings.total_us > 0


def test_concurrent_requests_are_batched(server: ServerThread) -> None:
    import asyncio

    from online.client import request
    from online.proto import recommender_pb2_grpc as pb_grpc

    async def burst() -> list[pb.RecommendResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            return list(await asyncio.gather(*(stub.Recommend(request(str(1 + i), k=10), timeout=10)
                                               for i in range(64))))

    resps = asyncio.run(burst())
    assert all(len(r.item_ids) == 10 for r in resps)
    assert max(r.batch_size for r in resps) > 1  # 64 concurrent calls did not run one by one
    stats = server.running.service.batcher.stats
    assert stats.items >= 64 and stats.batches < stats.items


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_lists_and_describes_the_services_under_both_names(server: ServerThread, package: str) -> None:
    """Newer clients (grpcurl >= 1.9, Postman, Kreya) ask for v1 first; older ones for v1alpha.
    The messages are the same fields, so v1alpha's classes encode a v1 client's bytes."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.target) as ch:
        call = ch.stream_stream(f"/{package}.ServerReflection/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed, described = list(call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="twotower.v1.Recommender")]), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"twotower.v1.Recommender", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    assert any(svc.name == "Recommender" for f in files for svc in f.service)


def test_an_exhausted_budget_degrades_instead_of_failing(served_registry: Path) -> None:
    from dataclasses import replace

    from online.config import BudgetConfig

    cfg = replace(load_config(port=0), budget=BudgetConfig(total_ms=1.0))  # far less than a search needs
    srv = ServerThread(cfg, registry=served_registry)
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            r = c.recommend("1", recent=["50"])
            assert r.rung == pb.RUNG_BATCH and len(r.item_ids) == 10
            assert "too little time left for the search" in r.reasons
            assert "50" not in r.item_ids
            r = c.recommend("unknown-user-x", recent=["50"])  # nothing precomputed: the last rung
            assert r.rung == pb.RUNG_POPULARITY and len(r.item_ids) == 10
    finally:
        srv.stop()


def test_the_client_deadline_caps_the_budget(served_registry: Path) -> None:
    """A client deadline shorter than the configured budget leaves too little time for the
    search (min_search_ms is set high so the outcome does not depend on machine speed)."""
    from dataclasses import replace

    from online.config import BudgetConfig

    budget = BudgetConfig(total_ms=5000.0, min_search_ms=500.0)
    srv = ServerThread(replace(load_config(port=0), budget=budget), registry=served_registry)
    try:
        with RecommenderClient(srv.target) as c:
            relaxed = c.recommend("1", timeout=4.0)  # budget ≈ 4 s: plenty for the search
            assert relaxed.rung == pb.RUNG_FULL
            hurried = c.recommend("1", timeout=0.4)  # budget capped at ≈ 0.4 s < min_search_ms
            assert hurried.rung == pb.RUNG_BATCH and "too little time left for the search" in hurried.reasons
            assert len(hurried.item_ids) == 10
    finally:
        srv.stop()


def test_serving_settings_are_scoped_to_the_server(served_registry: Path) -> None:
    import socket

    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    srv = ServerThread(load_config(port=0, search_blas_threshold=33, search_omp_threads=1), registry=served_registry)
    try:
        assert faiss.cvar.distance_compute_blas_threshold == 33
        # OpenMP thread counts are per thread: the search threads carry the setting themselves.
        assert srv.running.service.search_pool.submit(faiss.omp_get_max_threads).result() == 1
        # Without SO_REUSEPORT a second single-process server cannot share the port silently.
        with pytest.raises(Exception, match="cannot bind"):
            ServerThread(load_config(port=srv.running.port), registry=served_registry)
    finally:
        srv.stop()
    assert faiss.cvar.distance_compute_blas_threshold == before
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", srv.running.port))


def test_record_events_is_refused_where_workers_would_not_share_sessions(served_registry: Path) -> None:
    srv = ServerThread(load_config(port=0, workers__workers=2), registry=served_registry)
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.record_events([("7", "184", "click", 1)])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--redis-url" in (e.value.details() or "")
            assert len(c.recommend("7", k=5, recent=["184"]).item_ids) == 5  # recommending still works
    finally:
        srv.stop()


def test_one_tight_deadline_does_not_cost_the_batch_its_features(synth_bundle: Path) -> None:
    import asyncio
    import time

    from online.feature_store import InMemoryFeatureStore
    from online.lifecycle import LoadedModel
    from online.request import RecRequest
    from online.service import RecommendService

    timeouts: list[float] = []

    class RecordingStore(InMemoryFeatureStore):

        async def fetch(self, version, user_ids, *, dim, n_recent, timeout):  # type: ignore[no-untyped-def]
            timeouts.append(timeout)
            return await super().fetch(version, user_ids, dim=dim, n_recent=n_recent, timeout=timeout)

    async def main() -> None:
        cfg = load_config(port=0)
        svc = RecommendService(cfg, RecordingStore())
        model = LoadedModel.load(synth_bundle)
        await svc.lifecycle.prepare(model)
        users = model.bundle.features.user_vocab.values
        now = time.monotonic()

        def req(user: str, deadline: float) -> RecRequest:
            return RecRequest(user_id=user, k=5, recent=(), cart=(), exclude=(), mode=Mode.AUTO, request_id="",
                              include_titles=False, deadline=deadline)

        tight, relaxed = req(users[0], now + 0.0001), req(users[1], now + 5.0)
        out = await svc.run_batch(model, [tight, relaxed], [0.0, 0.0])
        assert timeouts == [cfg.budget.fetch_ms / 1000.0]  # the relaxed caller's budget, not ~0
        assert out[1].rung is Rung.FULL and out[1].source is Source.USER_ONLY  # type: ignore[union-attr]
        assert out[0].rung is Rung.BATCH and "too little time left" in " ".join(out[0].reasons)  # type: ignore[union-attr]
        await svc.close()

    asyncio.run(main())


def test_sessions_are_newest_first_and_idempotent_in_the_memory_store() -> None:
    import asyncio

    from online.feature_store import EVENT_TYPES, Event, InMemoryFeatureStore

    async def main() -> None:
        store = InMemoryFeatureStore(session_cap=3)
        same_second = [Event("u", "50", "click", 100), Event("u", "181", "cart", 100)]  # 181 came later
        await store.record(same_second, timeout=1.0)
        await store.record(same_second, timeout=1.0)  # a retried call
        await store.record([Event("u", "7", "view", 99)], timeout=1.0)
        f = await store.fetch("none", ["u"], dim=4, n_recent=10, timeout=1.0)
        assert f.items == ["181", "50", "7"] and f.timestamps.tolist() == [100, 100, 99]
        assert [EVENT_TYPES[t] for t in f.types] == ["cart", "click", "view"] and f.offsets.tolist() == [0, 3]
        await store.record([Event("u", "9", "view", 101)], timeout=1.0)  # over the cap: the oldest goes
        f = await store.fetch("none", ["u"], dim=4, n_recent=10, timeout=1.0)
        assert f.items == ["9", "181", "50"] and not f.has_user.any()

    asyncio.run(main())


def test_an_old_version_stays_in_the_embedded_store_until_its_last_batch_is_done(synth_bundle_factory) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import time
    from dataclasses import replace

    from online.feature_store import InMemoryFeatureStore
    from online.lifecycle import LoadedModel
    from online.request import RecRequest
    from online.service import RecommendService

    class HeldStore(InMemoryFeatureStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.entered = asyncio.Event()
            self.hold: str | None = None

        async def fetch(self, version, user_ids, *, dim, n_recent, timeout):  # type: ignore[no-untyped-def]
            if version == self.hold:
                self.entered.set()
                await self.gate.wait()
            return await super().fetch(version, user_ids, dim=dim, n_recent=n_recent, timeout=timeout)

    async def main() -> None:
        store = HeldStore()
        svc = RecommendService(load_config(port=0, warmup=False), store)
        old, new = (LoadedModel.load(synth_bundle_factory(seed=s)) for s in (21, 22))
        await svc.lifecycle.prepare(old)
        svc.lifecycle.install(old)
        user = old.bundle.features.user_vocab.values[0]
        req = RecRequest(user_id=user, k=5, recent=(), cart=(), exclude=(), mode=Mode.BATCH, request_id="",
                         include_titles=False, deadline=time.monotonic() + 30)
        store.hold = old.version
        # an online request holds the batch at its fetch; the batch-mode one then needs old's recs
        online = replace(req, mode=Mode.ONLINE)
        running = asyncio.ensure_future(svc.run_batch(old, [online, req], [0.0, 0.0]))
        await store.entered.wait()
        await svc.lifecycle.prepare(new)
        svc.lifecycle.install(new)
        assert store.versions() == {old.version, new.version}  # old still has a batch running
        store.gate.set()
        res = await running
        assert [r.rung for r in res] == [Rung.FULL, Rung.BATCH] and res[1].source is Source.BATCH  # type: ignore[union-attr]
        assert store.versions() == {new.version}  # its last batch done: the old version is dropped
        await svc.close()

    asyncio.run(main())


def test_the_sync_transport_gives_the_same_answers_and_errors(served_registry: Path) -> None:
    """``transport: sync`` (grpc.server with a thread pool) runs the same parsing, service and
    status mapping as grpc.aio: same lists, same INVALID_ARGUMENT, same health."""
    aio = ServerThread(load_config(port=0), registry=served_registry)
    sync = ServerThread(load_config(port=0, transport="sync", sync_threads=8), registry=served_registry)
    try:
        with RecommenderClient(aio.target, timeout=5.0) as a, RecommenderClient(sync.target, timeout=5.0) as s:
            assert s.health() == "SERVING"
            for user, recent in [("1", ["50", "181"]), ("77", []), ("nobody", ["50"])]:
                ra, rs = a.recommend(user, k=10, recent=recent), s.recommend(user, k=10, recent=recent)
                assert list(ra.item_ids) == list(rs.item_ids) and ra.source == rs.source and ra.rung == rs.rung
            with pytest.raises(grpc.RpcError) as e:
                s.recommend("1", k=0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("k:")
            assert s.record_events([("5", "50", "click", 1)]) == 1
            assert "50" not in s.recommend("5", k=10).item_ids
    finally:
        sync.stop()
        aio.stop()


def test_a_full_worker_answers_from_memory_on_a_cheaper_rung_labelled_overloaded(server: ServerThread) -> None:
    """Admission control's default answer (issue 20 item 1): a request refused at admission is
    answered at once, never queued, from the bundle's precomputed list for the user (popularity
    for a user without one), its exclusions applied, and labelled with why."""
    service = server.running.service
    bundle = service.model.bundle  # type: ignore[union-attr]
    assert bundle.recs_items is not None
    user = "1"
    precomputed = [service.model.item_ids[r] for r in bundle.recs_items[bundle.features.user_vocab.known(user)]
                   if r >= 0]  # type: ignore[union-attr]
    with RecommenderClient(server.target, timeout=5.0) as client:
        service.batcher._pending = service.cfg.batching.max_pending  # as if the worker were full
        try:
            known = client.recommend(user, k=5, exclude=[precomputed[0]])
            cold = client.recommend("nobody-at-all", k=5)
        finally:
            service.batcher._pending = 0
        assert known.rung == pb.RUNG_BATCH and known.source == "batch"
        assert list(known.item_ids) == [i for i in precomputed if i != precomputed[0]][:5]
        assert any(r.startswith("overloaded:") for r in known.reasons)
        assert cold.rung == pb.RUNG_POPULARITY and len(cold.item_ids) == 5
        assert any(r.startswith("overloaded:") for r in cold.reasons)
        assert client.recommend(user, k=5).rung == pb.RUNG_FULL  # drained: the full rung again


def test_a_full_worker_refusing_answers_resource_exhausted_with_retry_pushback(served_registry: Path) -> None:
    """With ``batching.shed_answer: refuse``, a worker holding batching.max_pending requests
    refuses the next at once, RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``, and counts
    it; once it drains, it answers again. (The shipped client does not retry this code: a
    refused request must not come back at once and deepen the overload.)"""
    server = ServerThread(load_config(port=0, batching__shed_answer="refuse"), registry=served_registry)
    try:
        _refused_with_pushback(server)
    finally:
        server.stop()


def _refused_with_pushback(server: ServerThread) -> None:
    service = server.running.service
    limit = server.running.service.cfg.batching.max_pending
    assert limit > 0
    stub_channel = grpc.insecure_channel(server.target)
    try:
        call = stub_channel.unary_unary("/twotower.v1.Recommender/Recommend",
                                        request_serializer=pb.RecommendRequest.SerializeToString,
                                        response_deserializer=pb.RecommendResponse.FromString)
        service.batcher._pending = limit  # as if `limit` requests were queued or in flight
        try:
            with pytest.raises(grpc.RpcError) as refused:
                call(pb.RecommendRequest(user_id="1", k=5), timeout=5)
        finally:
            service.batcher._pending = 0
        err = refused.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details().startswith("overloaded:")
        pushback = dict(err.trailing_metadata() or ())
        assert int(pushback["grpc-retry-pushback-ms"]) >= 1
        assert len(call(pb.RecommendRequest(user_id="1", k=5), timeout=5).item_ids) == 5
    finally:
        stub_channel.close()
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    shed = {s.labels["reason"]: s.value for fam in text_string_to_metric_families(
        generate_latest(service.metrics.registry).decode()) for s in fam.samples
        if s.name == "twotower_shed_requests_total"}
    assert shed == {"queue_full": 1.0, "deadline": 0.0}


def test_serve_settings_that_bound_overload_are_checked_by_name(served_registry: Path) -> None:
    from towers.errors import ConfigError

    for overrides, field in (({"batching__shed_answer": "drop"}, "batching.shed_answer"),
                             ({"max_concurrent_streams": -1}, "max_concurrent_streams"),
                             ({"workers__max_age_s": -1.0}, "workers.max_age_s"),
                             ({"workers__check_interval_s": 0.0}, "workers.check_interval_s")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(port=0, **overrides)  # type: ignore[arg-type]
    # A per-connection stream cap queues a client's extra calls in its own channel: all answered.
    srv = ServerThread(load_config(port=0, max_concurrent_streams=2), registry=served_registry)
    try:
        with RecommenderClient(srv.target, timeout=10.0) as c:
            futures = [c.stub.Recommend.future(pb.RecommendRequest(user_id=str(u), k=5), timeout=10.0)
                       for u in range(1, 17)]
            assert [len(f.result().item_ids) for f in futures] == [5] * 16
    finally:
        srv.stop()
