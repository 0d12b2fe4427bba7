"""A/B flags in the server (``serve --flags``): several versions served at once with no
skew, sticky and forced assignment, overrides, hot reload that keeps the old flags on
any bad file, warm-before-switch, shadows that never touch a primary response, and a
hot swap of CURRENT that leaves pinned versions alone. Real gRPC over loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from waiting import wait_until

from offline.synth import make_synthetic_bundle
from online.client import RecommenderClient
from online.config import ServeConfig, load_config
from online.lifecycle import Lifecycle
from online.proto import recommender_pb2 as pb
from online.proto import recommender_pb2_grpc as pb_grpc
from online.server import ServerThread
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.assign import assign
from towers.errors import TwoTowerError
from towers.flags import load_flags
from towers.ranking import QueryBatch, RankModel, rank


@dataclass(frozen=True)
class Version:
    path: Path
    id: str
    prefix: str


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[Version]:
    """Three distinct synthetic versions whose item ids name them (a mixed list would show)."""
    root = tmp_path_factory.mktemp("abversions")
    out = []
    for seed in (10, 11, 12):
        prefix = f"s{seed}-"
        man = make_synthetic_bundle(root / f"b{seed}", n_items=1500, n_users=200, dim=16, seed=seed,
                                    index_type="flat", progress=False, item_prefix=prefix)
        out.append(Version(root / f"b{seed}", str(man["version"]), prefix))
    return out


@pytest.fixture
def registry(tmp_path: Path, versions: list[Version]) -> Path:
    """v0 is CURRENT; v1 and v2 are installed (pinnable), not CURRENT."""
    reg = tmp_path / "registry"
    registry_mod.publish(versions[0].path, reg)
    for v in versions[1:]:
        registry_mod.install(v.path, reg)
    return reg


def write_flags(path: Path, text: str) -> None:
    """Replace the file atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ab_flags(treatment: str, *, shadow: str = "", force: str = "", extra: str = "") -> str:
    lines = ["experiments:", "  - name: ranker", "    salt: ranker-salt-1", "    status: running",
             "    allocation: 1.0", "    variants:", "      - {name: control, weight: 0.5, version: CURRENT}",
             f"      - {{name: treatment, weight: 0.5, version: {treatment}}}"]
    if shadow:
        lines.append(f"      - {{name: shadowed, shadow: 1.0, version: {shadow}}}")
    if force:
        lines.append(f"    force: {{{force}}}")
    return "\n".join(lines) + "\n" + extra



def serve(registry: Path, flags: Path, **kw: Any) -> ServerThread:
    cfg: ServeConfig = replace(load_config(port=0), registry_poll_s=0.05, admin_port=0, flags_file=str(flags), **kw)
    return ServerThread(cfg, registry=registry)


def admin(srv: ServerThread) -> pb.StatusResponse:
    with grpc.insecure_channel(f"127.0.0.1:{srv.running.admin_port}") as ch:
        return pb_grpc.AdminStub(ch).Status(pb.StatusRequest(), timeout=5)


class Expected:
    """What each version's own bundle ranks for a user (no session): the reference every
    served list must equal, as in tests/test_hotswap.py."""

    def __init__(self, registry: Path) -> None:
        self.registry = registry
        self._bundles: dict[str, Any] = {}
        self._cache: dict[tuple[str, str, int], list[str]] = {}

    def bundle(self, version: str) -> Any:
        if version not in self._bundles:
            self._bundles[version] = bundle_mod.load(self.registry / version)
        return self._bundles[version]

    def __call__(self, version: str, user: str, k: int = 10, session: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> list[str]:
        key = (version, user, k)
        if session or exclude or key not in self._cache:
            b = self.bundle(version)
            m = RankModel.from_bundle(b)
            rows = b.features.item_vocab.positions
            qb = QueryBatch.from_lists(m, user_rows=[b.features.user_vocab.known(user)],
                                       sessions=[rows(list(session)).tolist()], excludes=[rows(list(exclude)).tolist()],
                                       k=k)
            top, _ = rank(m, qb).items(0)
            out = [b.item_ids[r] for r in top.tolist()]
            if session or exclude:
                return out
            self._cache[key] = out
        return self._cache[key]


class Load:
    """Closed-loop load from client threads; every answer recorded (one append each)."""

    def __init__(self, target: str, *, threads: int = 3, users: int = 200,
                 check: Callable[[pb.RecommendResponse], None] | None = None) -> None:
        self.stop = threading.Event()
        self.answers: list[tuple[str, str, str, int, list[str]]] = []  # (user, version, variant, rung, items)
        self.errors: list[str] = []
        self.users = users
        self.check = check
        self.threads = [threading.Thread(target=self._run, args=(target, j)) for j in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, target: str, j: int) -> None:
        with RecommenderClient(target, timeout=5.0) as c:
            i = 0
            while not self.stop.is_set():
                user = f"u{(i * 7 + j) % self.users}"
                try:
                    r = c.recommend(user, k=10)
                    if self.check is not None:
                        self.check(r)
                    self.answers.append((user, r.model_version, r.variant, r.rung, list(r.item_ids)))
                except grpc.RpcError as e:
                    self.errors.append(e.code().name)
                except AssertionError as e:
                    self.errors.append(f"check: {e}")
                i += 1

    def wait(self, n: int) -> None:
        start = len(self.answers)
        wait_until(lambda: len(self.answers) >= start + n)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture
def warmed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every version the service warms, appended when its warmup is done."""
    done: list[str] = []
    real = Lifecycle.warm

    async def warm(self: Lifecycle, model: Any) -> int:
        n = await real(self, model)
        done.append(model.version)
        return n

    monkeypatch.setattr(Lifecycle, "warm", warm)
    yield done


def test_two_versions_served_concurrently_sticky_forced_and_each_from_its_own_version(
        tmp_path: Path, registry: Path, versions: list[Version], warmed: list[str]) -> None:
    v0, v1 = versions[0], versions[1]
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, ab_flags(v1.id, force='"u5": treatment, "u6": control, "qa-new": treatment'))
    flags = load_flags(flags_path)
    srv = serve(registry, flags_path)

    def served_warm(r: pb.RecommendResponse) -> None:
        assert r.model_version in warmed, f"{r.model_version} served before it was warmed"

    load = Load(srv.target, check=served_warm)
    try:
        load.wait(600)
        with RecommenderClient(srv.target) as c:
            forced = {u: c.recommend(u, k=10) for u in ("u5", "u6", "qa-new")}
        st = admin(srv)
    finally:
        load.finish()
        srv.stop()
    # The exposure log (issue 21): every user served once per label and day, however many calls.
    exposures = list(srv.running.service.store.exposure_log)  # type: ignore[attr-defined]
    by_user = {(x.user_id, x.variant) for x in exposures}
    assert len(exposures) == len(by_user) == len({u for u, *_ in load.answers} | {"u5", "u6", "qa-new"})
    assert all(x.variant == assign(flags, x.user_id).label for x in exposures)
    assert load.errors == []
    assert sorted(st.resident_versions) == sorted([v0.id, v1.id]) and st.flags_error == ""
    assert st.flags_sha256 and st.flags_reloads == 1 and st.resident_bytes > 0
    prefix = {v.id: v.prefix for v in versions}
    arm_version = {"ranker=control": v0.id, "ranker=treatment": v1.id}
    expected = Expected(registry)
    per_user: dict[str, set[tuple[str, str]]] = {}
    full = 0
    for user, version, variant, rung, items in load.answers:
        per_user.setdefault(user, set()).add((version, variant))
        assert variant == assign(flags, user).label  # the label is the assignment's
        assert version == arm_version[variant]  # and the version that arm pins
        assert len(items) == 10 and all(i.startswith(prefix[version]) for i in items)
        if rung == pb.RUNG_FULL:
            full += 1
            assert items == expected(version, user), (version, user)
    assert full > 0.9 * len(load.answers)
    assert all(len(s) == 1 for s in per_user.values())  # sticky: one (version, variant) per user
    arms = {next(iter(s))[1] for s in per_user.values()}
    assert arms == {"ranker=control", "ranker=treatment"}  # both arms served under the same load
    assert (forced["u5"].variant, forced["u5"].model_version) == ("ranker=treatment", v1.id)
    assert (forced["u6"].variant, forced["u6"].model_version) == ("ranker=control", v0.id)
    assert forced["u5"].item_ids[:] == expected(v1.id, "u5")
    # An unknown forced user (QA) gets the treatment's version too: its popularity list.
    assert forced["qa-new"].model_version == v1.id and forced["qa-new"].item_ids[0].startswith(v1.prefix)
    assert set(warmed) >= {v0.id, v1.id}


def test_overrides_take_effect(tmp_path: Path, registry: Path, versions: list[Version]) -> None:
    v0 = versions[0]
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, """experiments:
  - name: ov
    salt: ov-salt
    status: running
    allocation: 1.0
    variants:
      - {name: control, weight: 1.0}
      - {name: k3, weight: 0.0, overrides: {default_k: 3}}
      - {name: sess1, weight: 0.0, overrides: {max_session: 1}}
      - {name: nofull, weight: 0.0, overrides: {allowed_rungs: [batch, popularity]}}
      - {name: nobatch, weight: 0.0, overrides: {allowed_rungs: [full, popularity], budget_ms: 0.001}}
    force: {"u1": k3, "u2": sess1, "u3": nofull, "u4": nobatch}
""")
    srv = serve(registry, flags_path)
    expected = Expected(registry)
    b = expected.bundle(v0.id)
    a, bb, c = b.item_ids[100], b.item_ids[200], b.item_ids[300]
    try:
        with RecommenderClient(srv.target) as cl:
            r = cl.recommend("u1")  # no k: the variant's default_k
            assert r.variant == "ov=k3" and len(r.item_ids) == 3
            assert list(r.item_ids) == expected(v0.id, "u1", k=3)
            assert len(cl.recommend("u1", k=5).item_ids) == 5  # an explicit k wins
            assert len(cl.recommend("u7").item_ids) == 10  # the control keeps the server default

            # max_session 1: the query reads the newest session item; all three stay excluded.
            r = cl.recommend("u2", k=10, recent=[a, bb, c])
            assert r.rung == pb.RUNG_FULL and r.variant == "ov=sess1"
            assert list(r.item_ids) == expected(v0.id, "u2", session=(a,), exclude=(bb, c))
            assert list(r.item_ids) != expected(v0.id, "u2", session=(a, bb, c))

            # full and no_session not allowed: the next allowed rung, batch, saying why.
            r = cl.recommend("u3", k=10, recent=[a])
            assert r.rung == pb.RUNG_BATCH and r.source == "batch"
            assert "rung full not allowed by the experiment" in r.reasons
            assert "rung no_session not allowed by the experiment" in r.reasons

            # A budget too small to search, and batch not allowed: popularity (never a failure).
            r = cl.recommend("u4", k=10)
            assert r.rung == pb.RUNG_POPULARITY and r.source == "popularity"
            assert "rung batch not allowed by the experiment" in r.reasons
            r = cl.recommend("u4", k=10, mode="batch")
            assert r.rung == pb.RUNG_POPULARITY
    finally:
        srv.stop()


def test_search_parameters_are_per_call_and_leave_the_index_alone() -> None:
    import faiss

    from towers.index import IndexSpec, search_params
    from towers.ranking import search

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2000, 16)).astype(np.float32)
    quant = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quant, 16, 32, faiss.METRIC_INNER_PRODUCT)
    ivf.train(emb)
    ivf.add(emb)
    ivf.nprobe = 1
    flat = faiss.IndexFlatIP(16)
    flat.add(emb)
    model = RankModel(combiner=None, item_emb=emb, user_emb=emb[:1], index=ivf, popularity=np.arange(10))  # type: ignore[arg-type]
    q = emb[:50]
    _, exact = flat.search(q, 10)
    _, one = search(model, q, 10)
    _, all_lists = search(model, q, 10, params=search_params(IndexSpec("ivf", nlist=32), nprobe=32))
    assert (all_lists == exact).all() and not (one == exact).all()
    assert ivf.nprobe == 1  # per call: the shared index is not mutated
    assert search_params(IndexSpec("flat"), nprobe=8) is None
    assert search_params(IndexSpec("hnsw"), nprobe=8) is None  # nprobe means nothing to HNSW
    assert search_params(IndexSpec("hnsw"), ef_search=64) is not None


# Every kind `index tune` can choose, wrappers included: (spec, the override's knob).
OVERRIDE_KINDS = [
    pytest.param(dict(type="ivf"), "nprobe", id="IVF,Flat"),
    pytest.param(dict(type="sq8"), "nprobe", id="IVF,SQ8"),
    pytest.param(dict(type="ivfpq", pq_m=8), "nprobe", id="IVF,PQ"),
    pytest.param(dict(type="ivfpqfs", pq_m=16, refine="sq8", k_factor=4.0), "nprobe", id="IVF,PQfs,Refine(SQ8)"),
    pytest.param(dict(type="ivfpq", pq_m=8, opq=True, refine="flat", k_factor=2.0), "nprobe", id="OPQ,IVF,PQ,RFlat"),
    pytest.param(dict(type="ivfpqfs", pq_m=16, opq=True), "nprobe", id="OPQ,IVF,PQfs"),
    pytest.param(dict(type="hnsw"), "ef_search", id="HNSW,Flat"),
    pytest.param(dict(type="hnswsq8"), "ef_search", id="HNSW,SQ8"),
    pytest.param(dict(type="hnsw", refine="sq8", k_factor=2.0), "ef_search", id="HNSW,Flat,Refine(SQ8)"),
]


@pytest.mark.parametrize(("spec_kw", "knob"), OVERRIDE_KINDS)
def test_a_search_override_reaches_every_index_kind_through_its_wrappers(spec_kw: dict[str, Any], knob: str) -> None:
    """An arm's nprobe / ef_search changes what the index returns, whatever wraps the IVF or
    HNSW part (FAISS silently ignores a bare SearchParametersIVF on a refine or OPQ wrapper)."""
    from towers.index import IndexSpec, build, override_problem, search_params

    rng = np.random.default_rng(3)
    emb = rng.standard_normal((6000, 32)).astype(np.float32)  # no clusters: neighbours span IVF cells
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    spec = IndexSpec(nlist=64, nprobe=16, ef_search=128, **spec_kw)
    index = build(emb, spec)
    q = emb[:64] + 0.1 * rng.standard_normal((64, 32)).astype(np.float32)
    _, default = index.search(q, 20)
    low = {"nprobe": 1} if knob == "nprobe" else {"ef_search": 1}
    _, narrowed = index.search(q, 20, params=search_params(spec, **low))
    same = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(default.tolist(), narrowed.tolist(), strict=True)])
    assert same < 0.9, f"the override changed nothing ({same:.2f} of the top 20 the same)"
    other = {"ef_search": 8} if knob == "nprobe" else {"nprobe": 8}
    assert override_problem(spec, **low) is None and override_problem(spec, **other) is not None


def test_every_invalid_flags_file_keeps_the_old_flags_serving(tmp_path: Path, registry: Path,
                                                               versions: list[Version]) -> None:
    from online.experiments import MB, bundle_bytes

    v0, v1, v2 = versions
    flags_path = tmp_path / "flags.yaml"
    good = ab_flags(v1.id, force='"u5": treatment')
    write_flags(flags_path, good)
    sizes = [bundle_bytes(registry / v.id) for v in versions]
    limit_mb = (sizes[0] + sizes[1]) * 1.01 / MB  # CURRENT + v1 fit; adding v2 does not
    srv = serve(registry, flags_path, max_resident_mb=limit_mb)
    sha = admin(srv).flags_sha256
    bad_cases = [
        ("experiments: [\n  - name: x\n", "not valid YAML"),
        (ab_flags(v1.id).replace("weight: 0.5, version: CURRENT", "weight: 2.0, version: CURRENT"),
         "experiments[ranker].variants[control].weight"),
        (ab_flags("v20990101T000000-abcdef0123"), "v20990101T000000-abcdef0123 is not in the registry"),
        (ab_flags(v1.id, shadow=v2.id), "over the limit"),
        # an override the arm's index cannot take (nprobe on a flat index): refused, not ignored
        (ab_flags(v1.id).replace(f"version: {v1.id}}}", f"version: {v1.id}, overrides: {{nprobe: 4}}}}"),
         "experiments[ranker].variants[treatment].overrides.nprobe: nprobe applies to IVF indexes"),
        (None, "flags file not found"),
    ]
    try:
        with RecommenderClient(srv.target) as c:
            for n, (text, message) in enumerate(bad_cases, 1):
                if text is None:
                    flags_path.unlink()
                else:
                    write_flags(flags_path, text)
                wait_until(lambda n=n: admin(srv).flags_rejected == n)  # type: ignore[misc]
                st = admin(srv)
                assert message in st.flags_error, (message, st.flags_error)
                assert st.flags_sha256 == sha and st.flags_reloads == 1
                assert sorted(st.resident_versions) == sorted([v0.id, v1.id])
                r = c.recommend("u5", k=10)  # the old flags serve on
                assert (r.variant, r.model_version) == ("ranker=treatment", v1.id)
            # The embedded store never kept the refused version's arrays.
            assert srv.running.service.store.versions() == {v0.id, v1.id}  # type: ignore[attr-defined]
            # A good file again: served, error cleared.
            write_flags(flags_path, good.replace("ranker-salt-1", "ranker-salt-2"))
            wait_until(lambda: admin(srv).flags_reloads == 2)
            assert admin(srv).flags_error == ""
    finally:
        srv.stop()


def test_invalid_flags_at_start_are_a_clear_error(tmp_path: Path, registry: Path) -> None:
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, ab_flags("v20990101T000000-abcdef0123"))
    with pytest.raises(TwoTowerError, match="not in the registry"):
        serve(registry, flags_path)


def test_a_reload_loads_and_warms_new_versions_before_switching_and_drops_unpinned_ones(
        tmp_path: Path, registry: Path, versions: list[Version], warmed: list[str]) -> None:
    v0, v1, v2 = versions
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, ab_flags(v1.id))
    srv = serve(registry, flags_path)

    def served_warm(r: pb.RecommendResponse) -> None:
        assert r.model_version in warmed, f"{r.model_version} served before it was warmed"

    load = Load(srv.target, check=served_warm)
    try:
        load.wait(100)
        write_flags(flags_path, ab_flags(v2.id))  # the treatment moves to v2
        wait_until(lambda: admin(srv).flags_reloads == 2)
        load.wait(200)
        store = srv.running.service.store
        wait_until(lambda: store.versions() == {v0.id, v2.id})  # type: ignore[attr-defined]
        assert sorted(admin(srv).resident_versions) == sorted([v0.id, v2.id])
    finally:
        load.finish()
        srv.stop()
    assert load.errors == []
    assert warmed.index(v2.id) > warmed.index(v1.id)
    seen = {v for _, v, _, _, _ in load.answers}
    assert seen == {v0.id, v1.id, v2.id}
    prefix = {v.id: v.prefix for v in versions}
    assert all(all(i.startswith(prefix[v]) for i in items) for _, v, _, _, items in load.answers)


def _canonical(r: pb.RecommendResponse) -> bytes:
    """The response's bytes, timings aside (they differ between any two calls)."""
    c = pb.RecommendResponse()
    c.CopyFrom(r)
    c.ClearField("timings")
    return c.SerializeToString(deterministic=True)


def test_a_shadow_leaves_primary_responses_byte_identical_and_records_its_counters(
        tmp_path: Path, registry: Path, versions: list[Version]) -> None:
    v0, v1, v2 = versions
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, ab_flags(v1.id))
    srv = serve(registry, flags_path)
    b = Expected(registry).bundle(v0.id)
    calls = [dict(user_id=f"u{i}", k=10, request_id=f"req-{i}",
                  recent=[b.item_ids[i * 3]] if i % 2 else []) for i in range(60)]

    def run_all() -> list[bytes]:
        with RecommenderClient(srv.target) as c:
            return [_canonical(c.recommend(**kw)) for kw in calls]  # type: ignore[arg-type]

    try:
        before = run_all()
        write_flags(flags_path, ab_flags(v1.id, shadow=v2.id))  # a 100% shadow on v2
        wait_until(lambda: admin(srv).flags_reloads == 2)
        with_shadow = run_all()
        router = srv.running.router
        assert router is not None
        stats = router.shadow_stats["ranker/shadowed"]
        wait_until(lambda: stats.scored + stats.dropped + stats.errors == stats.sampled)
        st = admin(srv)
    finally:
        srv.stop()
    assert with_shadow == before
    assert stats.sampled == len(calls) and stats.errors == 0 and stats.scored > 0
    (sh,) = st.shadows
    assert (sh.experiment, sh.variant, sh.version) == ("ranker", "shadowed", v2.id)
    assert sh.scored == stats.scored and sh.mean_latency_ms > 0
    assert 0.0 <= sh.mean_overlap < 0.5  # v2 names its items differently: no overlap at all
    assert v2.id in st.resident_versions


def test_a_hot_swap_of_current_leaves_pinned_versions_serving(tmp_path: Path, registry: Path,
                                                              versions: list[Version]) -> None:
    _, v1, v2 = versions
    flags_path = tmp_path / "flags.yaml"
    write_flags(flags_path, ab_flags(v1.id, force='"u5": treatment, "u6": control'))
    srv = serve(registry, flags_path)
    expected = Expected(registry)
    load = Load(srv.target)
    try:
        load.wait(100)
        registry_mod.set_current(registry, v2.id)
        wait_until(lambda: admin(srv).version == v2.id)
        load.wait(200)
        with RecommenderClient(srv.target) as c:
            treated, control = c.recommend("u5", k=10), c.recommend("u6", k=10)
        store = srv.running.service.store
        wait_until(lambda: store.versions() == {v1.id, v2.id})  # type: ignore[attr-defined]
    finally:
        load.finish()
        srv.stop()
    assert load.errors == []
    assert (treated.model_version, list(treated.item_ids)) == (v1.id, expected(v1.id, "u5"))
    assert (control.model_version, list(control.item_ids)) == (v2.id, expected(v2.id, "u6"))
    after = load.answers[-100:]
    assert {v for _, v, variant, _, _ in after if variant == "ranker=treatment"} == {v1.id}
    prefix = {v.id: v.prefix for v in versions}
    assert all(all(i.startswith(prefix[v]) for i in items) for _, v, _, _, items in load.answers)


def test_events_carry_the_request_id_of_the_impression_they_answer() -> None:
    from online.request import parse_events
    from towers.errors import InvalidRequest

    cfg = load_config()
    msg = pb.RecordEventsRequest(events=[
        pb.Event(user_id="u1", item_id="i1", type=pb.EVENT_TYPE_CLICK, timestamp=1_700_000_000, request_id="req-7"),
        pb.Event(user_id="u1", item_id="i2", type=pb.EVENT_TYPE_VIEW, timestamp=1_700_000_000)])
    answered, plain = parse_events(msg, cfg)
    assert answered.request_id == "req-7" and plain.request_id == ""
    # Not part of the event's identity: a retry naming another request is the same event.
    assert answered == replace(answered, request_id="req-8")
    msg.events[0].request_id = "r" * (cfg.max_id_length + 1)
    with pytest.raises(InvalidRequest, match=r"events\[0\].request_id"):
        parse_events(msg, cfg)


def test_a_recommend_request_id_is_bounded() -> None:
    """It is echoed, logged and written to the impression log: 7 MB of it once were."""
    from online.request import parse_recommend
    from towers.errors import InvalidRequest

    cfg = load_config()
    assert parse_recommend(pb.RecommendRequest(user_id="u", request_id="r" * cfg.max_id_length), cfg,
                           time_remaining=None).request_id == "r" * cfg.max_id_length
    with pytest.raises(InvalidRequest, match=r"^request_id: longer than 256 characters"):
        parse_recommend(pb.RecommendRequest(user_id="u", request_id="r" * (cfg.max_id_length + 1)), cfg,
                        time_remaining=None)


def test_the_shadow_time_budget_refills_at_its_share_and_is_spent_by_shadow_batches() -> None:
    from online.experiments import TimeBudget

    now = [100.0]
    b = TimeBudget(share=0.1, burst_s=0.02, clock=lambda: now[0])
    assert b.allow()  # starts with its burst
    b.spend(0.05)  # a 50 ms shadow batch overdraws it: -0.03 s
    now[0] += 0.2  # refills 0.02 s: still in debt
    assert not b.allow()
    now[0] += 0.2  # +0.02 s more: positive again
    assert b.allow()
    now[0] += 100.0  # idle for long: never more than the burst banked
    assert b.allow()
    b.spend(0.021)
    assert not b.allow()
    off = TimeBudget(share=0.0, clock=lambda: now[0])
    now[0] += 10.0
    assert not off.allow()  # share 0: shadows never run
