"""Hot swap under load: new versions are picked up with no failed RPC and no response
mixing versions; a corrupt version is rejected while the old one serves on."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from waiting import wait_until

from offline.synth import make_synthetic_bundle
from online.client import RecommenderClient
from online.config import load_config
from online.proto import recommender_pb2 as pb
from online.proto import recommender_pb2_grpc as pb_grpc
from online.server import ServerThread
from towers import registry as registry_mod


def make_version(root: Path, seed: int) -> tuple[Path, str, str]:
    prefix = f"s{seed}-"
    out = root / f"b{seed}"
    man = make_synthetic_bundle(out, n_items=1500, n_users=200, dim=16, seed=seed, index_type="flat",
                                progress=False, item_prefix=prefix)
    return out, str(man["version"]), prefix



class Load:
    """Closed-loop load from client threads until stopped; records every outcome."""

    def __init__(self, target: str, threads: int = 3) -> None:
        self.stop = threading.Event()
        self.responses: list[tuple[str, list[str]]] = []
        self.answers: list[tuple[str, str, int, list[str]]] = []  # (version, user, rung, items), one append each
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(target, j)) for j in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, target: str, j: int) -> None:
        with RecommenderClient(target, timeout=5.0) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    user = f"u{(i * 7 + j) % 200}"
                    r = c.recommend(user, k=10)
                    self.responses.append((r.model_version, list(r.item_ids)))
                    self.answers.append((r.model_version, user, r.rung, list(r.item_ids)))
                except grpc.RpcError as e:
                    self.errors.append(e.code().name)
                i += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def admin_status(target: str) -> pb.StatusResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.AdminStub(ch).Status(pb.StatusRequest(), timeout=5)


def test_three_versions_published_under_load_and_a_corrupt_one_rejected(tmp_path: Path) -> None:
    versions = [make_version(tmp_path, seed) for seed in range(4)]
    prefix_of = {v: p for _, v, p in versions}
    reg = tmp_path / "registry"
    registry_mod.publish(versions[0][0], reg)
    cfg = replace(load_config(port=0), registry_poll_s=0.05, admin_port=0)
    srv = ServerThread(cfg, registry=reg)
    admin = f"127.0.0.1:{srv.running.admin_port}"
    load = Load(srv.target)
    try:
        wait_until(lambda: len(load.responses) > 20)
        for path, version, _ in versions[1:]:
            registry_mod.publish(path, reg)
            wait_until(lambda v=version: admin_status(admin).version == v)  # type: ignore[misc]
            n = len(load.responses)
            wait_until(lambda n=n: len(load.responses) > n + 20)  # type: ignore[misc]
        st = admin_status(admin)
        assert st.swaps == 4 and st.state == "serving" and st.rejected == 0
        # The embedded store let go of the old versions' arrays.
        assert srv.running.service.store.versions() == {versions[-1][1]}  # type: ignore[attr-defined]

        # A corrupt version lands in the registry (a bad disk, a hand edit): rejected, v3 serves on.
        last_path, last_version, _ = versions[-1]
        bad = reg / "v20000101T000000-badbad"
        import shutil

        shutil.copytree(last_path, bad)
        data = bytearray((bad / "item_embeddings.npy").read_bytes())
        data[-3] ^= 0xFF
        (bad / "item_embeddings.npy").write_bytes(bytes(data))
        registry_mod.set_current(reg, "v20000101T000000-badbad")
        wait_until(lambda: admin_status(admin).rejected == 1)
        st = admin_status(admin)
        assert st.version == last_version and st.state == "serving"
        assert "sha256 mismatch" in st.last_error and st.candidate == "v20000101T000000-badbad"
        n = len(load.responses)
        wait_until(lambda: len(load.responses) > n + 20)
        with grpc.insecure_channel(admin) as ch:
            again = pb_grpc.AdminStub(ch).Reload(pb.ReloadRequest(), timeout=30)
        assert again.rejected == 2 and again.version == last_version
    finally:
        load.finish()
        srv.stop()
    assert load.errors == []
    seen = {v for v, _ in load.responses}
    assert seen <= set(prefix_of) and len(seen) == 4
    for version, items in load.responses:  # no response mixes versions' items
        assert len(items) == 10 and all(i.startswith(prefix_of[version]) for i in items), version
    # Nor one version's user embeddings with another's items: every list is exactly what its
    # version's own bundle computes for that user.
    from towers import bundle as bundle_mod
    from towers.ranking import QueryBatch, RankModel, rank

    bundles = {v: bundle_mod.load(reg / v) for v in seen}
    models = {v: RankModel.from_bundle(b) for v, b in bundles.items()}
    expected: dict[tuple[str, str], list[str]] = {}
    full = [(v, u, items) for v, u, rung, items in load.answers if rung == pb.RUNG_FULL]
    assert len(full) > 0.9 * len(load.answers)  # degraded answers differ by design; there should be few
    for version, user, items in full:
        if (version, user) not in expected:
            b = bundles[version]
            qb = QueryBatch.from_lists(models[version], user_rows=[b.features.user_vocab.known(user)], sessions=[[]],
                                       excludes=[[]], k=10)
            top, _ = rank(models[version], qb).items(0)
            expected[(version, user)] = [b.item_ids[r] for r in top.tolist()]
        assert items == expected[(version, user)], (version, user)
    assert load.responses[-1][0] == last_version


def test_a_bundle_missing_from_the_registry_is_a_clear_startup_error(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "CURRENT").write_text("v-nowhere\n")
    from towers.errors import RegistryError

    with pytest.raises(RegistryError, match="v-nowhere"):
        ServerThread(load_config(port=0), registry=reg)
