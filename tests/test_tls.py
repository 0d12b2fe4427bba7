"""TLS and mutual TLS on the serving port: real certificates made in the test, real
gRPC over loopback, the Python client and ``twotower recommend``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cli_entry import ROOT, twotower_argv
from pki import Pki, make_pki

from online.client import RecommenderClient
from online.config import TLSConfig, load_config
from online.server import ServerThread
from online.tls import channel_credentials, load_server_tls
from towers import registry as registry_mod
from towers.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def registry(synth_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    reg = tmp_path_factory.mktemp("tls-registry")
    registry_mod.publish(synth_bundle_factory(seed=7, n_items=500, n_users=50), reg)
    return reg


def serve(registry: Path, tls: TLSConfig) -> ServerThread:
    return ServerThread(replace(load_config(port=0), tls=tls), registry=registry)


@pytest.fixture(scope="module")
def tls_server(pki: Pki, registry: Path) -> Iterator[ServerThread]:
    srv = serve(registry, TLSConfig(cert=str(pki.server_cert), key=str(pki.server_key)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, registry: Path) -> Iterator[ServerThread]:
    srv = serve(registry, TLSConfig(cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.ca)))
    yield srv
    srv.stop()


def call_fails(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with RecommenderClient(target, timeout=3.0, credentials=credentials) as c, pytest.raises(grpc.RpcError) as e:
        c.recommend("u1", k=5)
    return e.value.code()  # type: ignore[no-any-return]


def test_tls_client_is_served(tls_server: ServerThread, pki: Pki) -> None:
    with RecommenderClient(tls_server.target, timeout=5.0, credentials=channel_credentials(ca=pki.ca)) as c:
        assert c.health() == "SERVING"
        resp = c.recommend("u1", k=5)
    assert len(resp.item_ids) == 5 and resp.model_version


def test_plaintext_client_to_tls_server_fails(tls_server: ServerThread) -> None:
    assert call_fails(tls_server.target, None) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_ca_fails(tls_server: ServerThread, pki: Pki) -> None:
    assert call_fails(tls_server.target, channel_credentials(ca=pki.rogue_ca)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    target = mtls_server.target
    assert call_fails(target, channel_credentials(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE  # no client cert
    rogue = channel_credentials(ca=pki.ca, cert=pki.rogue_client_cert, key=pki.rogue_client_key)
    assert call_fails(target, rogue) == grpc.StatusCode.UNAVAILABLE  # a cert the server's CA did not sign
    good = channel_credentials(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with RecommenderClient(target, timeout=5.0, credentials=good) as c:
        assert c.health() == "SERVING"
        assert len(c.recommend("u1", k=3).item_ids) == 3


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*twotower_argv(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_recommend_cli_speaks_tls_and_mutual_tls(tls_server: ServerThread, mtls_server: ServerThread,
                                                  pki: Pki) -> None:
    ok = cli("recommend", "--user", "u1", "--k", "3", "--target", tls_server.target, "--tls-ca", str(pki.ca))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("version ") and len(ok.stdout.strip().splitlines()) >= 4
    plain = cli("recommend", "--user", "u1", "--target", tls_server.target)
    assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr
    mutual = cli("recommend", "--user", "u1", "--k", "3", "--target", mtls_server.target, "--tls-ca", str(pki.ca),
                 "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert mutual.returncode == 0, mutual.stderr
    no_cert = cli("recommend", "--user", "u1", "--target", mtls_server.target, "--tls-ca", str(pki.ca))
    assert no_cert.returncode == 2 and "UNAVAILABLE" in no_cert.stderr


def _not_pem(tmp: Path, pki: Pki) -> TLSConfig:
    (tmp / "junk.pem").write_text("hello\n")
    return TLSConfig(cert=str(tmp / "junk.pem"), key=str(pki.server_key))


@pytest.mark.parametrize(
    ("make", "flag", "needle"),
    [
        (lambda tmp, pki: TLSConfig(cert=str(tmp / "nope.pem"), key=str(pki.server_key)), "--tls-cert",
         "nope.pem: no such file"),
        (lambda tmp, pki: TLSConfig(cert=str(tmp), key=str(pki.server_key)), "--tls-cert", "is a directory"),
        (_not_pem, "--tls-cert", "junk.pem: not a PEM file"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_key), key=str(pki.server_key)), "--tls-cert",
         "server.key: holds no PEM CERTIFICATE block"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_cert), key=str(pki.server_cert)), "--tls-key",
         "server.pem: holds no PEM PRIVATE KEY block"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_cert), key=str(pki.client_key)), "--tls-key",
         "client.key is not the private key of"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_cert), key=str(pki.encrypted_key)), "--tls-key",
         "is encrypted"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_cert)), "--tls-key", "needs both --tls-cert and --tls-key"),
        (lambda tmp, pki: TLSConfig(client_ca=str(pki.ca)), "--tls-client-ca", "needs a server certificate"),
        (lambda tmp, pki: TLSConfig(cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.client_key)),
         "--tls-client-ca", "holds no PEM CERTIFICATE block"),
    ],
)
def test_bad_tls_files_are_named(make: Callable[[Path, Pki], TLSConfig], flag: str, needle: str, tmp_path: Path,
                                 pki: Pki) -> None:
    with pytest.raises(ConfigError) as e:
        load_server_tls(make(tmp_path, pki))
    assert flag in str(e.value) and needle in str(e.value)


def test_unreadable_file_is_named(tmp_path: Path, pki: Pki) -> None:
    # A path through a regular file: the OS refuses it (ENOTDIR) even for root, unlike a chmod.
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match=r"--tls-cert.*plain/cert\.pem: cannot read \(Not a directory\)"):
        load_server_tls(TLSConfig(cert=str(tmp_path / "plain" / "cert.pem"), key=str(pki.server_key)))


def test_client_flags_are_checked(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--tls-key: a client certificate needs both"):
        channel_credentials(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ConfigError, match=r"--tls-ca: .*missing\.pem: no such file"):
        channel_credentials(ca=tmp_path / "missing.pem")


def test_serve_cli_refuses_bad_tls_in_one_line(registry: Path, tmp_path: Path, pki: Pki) -> None:
    proc = cli("serve", "--registry", str(registry), "--port", "0", "--tls-cert", str(tmp_path / "absent.pem"),
               "--tls-key", str(pki.server_key))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert" in lines[0] and "absent.pem: no such file" in lines[0], proc.stderr


def test_serve_with_workers_speaks_mutual_tls(registry: Path, pki: Pki) -> None:
    """The deployment's shape: `twotower serve --workers 2` (spawned workers) with mutual TLS."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*twotower_argv(), "serve", "--registry", str(registry), "--port", str(port), "--workers",
                             "2", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                             "--tls-client-ca", str(pki.ca)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    good = channel_credentials(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    try:
        with RecommenderClient(target, timeout=5.0, credentials=good) as c:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "not SERVING after 120 s"
                try:
                    if c.health(timeout=1.0) == "SERVING":
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
            assert len(c.recommend("u2", k=4).item_ids) == 4
        assert call_fails(target, channel_credentials(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
