"""The admin surface: loopback by default, a bearer token (constant-time compare) when
configured, and a refusal to start off loopback without one. Real gRPC on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cli_entry import ROOT, twotower_argv
from pki import make_pki

from online.admin_auth import TOKEN_ENV, admin_token, bearer, check_admin_exposure, is_loopback
from online.config import ServeConfig, TLSConfig, load_config
from online.proto import recommender_pb2 as pb
from online.proto import recommender_pb2_grpc as pb_grpc
from online.server import ServerThread
from towers import registry as registry_mod
from towers.errors import ConfigError

TOKEN = "s3cr3t-admin-token-0123456789"


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def registry(synth_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    reg = tmp_path_factory.mktemp("admin-registry")
    registry_mod.publish(synth_bundle_factory(seed=8, n_items=500, n_users=50), reg)
    return reg


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "admin-token"
    p.write_text(TOKEN + "\n")  # a trailing newline, as `echo` or a Secret writes it
    return p


def admin_cfg(**kw: object) -> ServeConfig:
    return replace(load_config(port=0), admin_port=0, registry_poll_s=0.0, **kw)  # type: ignore[arg-type]


def status(target: str, metadata: tuple[tuple[str, str], ...] | None) -> pb.StatusResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.AdminStub(ch).Status(pb.StatusRequest(), timeout=5, metadata=metadata)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("admin.example", False), ("", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_admin_without_token_refuses_to_start(registry: Path) -> None:
    with pytest.raises(ConfigError, match=r"^admin_token_file: admin_host '0\.0\.0\.0' is not a loopback"):
        ServerThread(admin_cfg(admin_host="0.0.0.0"), registry=registry)


def test_token_sources(token_file: Path, tmp_path: Path) -> None:
    assert check_admin_exposure(admin_cfg(admin_host="0.0.0.0", admin_token_file=str(token_file))) == TOKEN
    assert check_admin_exposure(admin_cfg(admin_host="0.0.0.0"), environ={TOKEN_ENV: TOKEN}) == TOKEN
    assert check_admin_exposure(admin_cfg(), environ={}) is None  # loopback: no token needed
    assert check_admin_exposure(replace(admin_cfg(admin_host="0.0.0.0"), admin_port=-1), environ={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"admin_token_file: .*empty is empty"):
        admin_token(admin_cfg(admin_token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"admin_token_file: .*absent: no such file"):
        admin_token(admin_cfg(admin_token_file=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match=rf"{TOKEN_ENV}: the admin token is 5 characters"):
        admin_token(admin_cfg(), environ={TOKEN_ENV: "short"})


@pytest.fixture
def guarded(registry: Path, token_file: Path) -> Iterator[ServerThread]:
    srv = ServerThread(admin_cfg(admin_token_file=str(token_file)), registry=registry)
    yield srv
    srv.stop()


def test_a_configured_token_is_required(guarded: ServerThread) -> None:
    target = f"127.0.0.1:{guarded.running.admin_port}"
    for md in [None, bearer(TOKEN[:-1]), bearer(TOKEN + "x"), (("authorization", TOKEN),), bearer("")]:
        with pytest.raises(grpc.RpcError) as e:
            status(target, md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (e.value.details() or "")
    st = status(target, bearer(TOKEN))
    assert st.state == "serving" and st.version


def admin_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | (env or {})
    return subprocess.run([*twotower_argv(), "admin", *args], capture_output=True, text=True,
                          timeout=120, env=full_env, cwd=ROOT)


def test_admin_cli_sends_the_token(guarded: ServerThread) -> None:
    target = f"127.0.0.1:{guarded.running.admin_port}"
    ok = admin_cli("status", "--target", target, "--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["state"] == "serving"
    from_env = admin_cli("status", "--target", target, env={TOKEN_ENV: TOKEN})
    assert from_env.returncode == 0, from_env.stderr
    denied = admin_cli("status", "--target", target)
    assert denied.returncode == 2 and "UNAUTHENTICATED" in denied.stderr


def test_admin_over_tls_with_token(registry: Path, token_file: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    cfg = admin_cfg(admin_token_file=str(token_file), tls=TLSConfig(cert=str(pki.server_cert),
                                                                      key=str(pki.server_key)))
    srv = ServerThread(cfg, registry=registry)
    try:
        target = f"127.0.0.1:{srv.running.admin_port}"
        ok = admin_cli("status", "--target", target, "--token", TOKEN, "--tls-ca", str(pki.ca))
        assert ok.returncode == 0, ok.stderr
        plain = admin_cli("status", "--target", target, "--token", TOKEN)
        assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr
    finally:
        srv.stop()


def test_serve_cli_refuses_an_exposed_admin_port_in_one_line(registry: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"admin_host": "0.0.0.0", "admin_port": 0}))
    proc = subprocess.run([*twotower_argv(), "serve", "--registry", str(registry), "--port", "0",
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "admin_token_file" in lines[0] and "0.0.0.0" in lines[0], proc.stderr
