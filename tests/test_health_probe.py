"""The container health check, run exactly as the Dockerfile's HEALTHCHECK and the compose
health check write it (only the target and the interpreter swapped), against real servers:
SERVING → 0; NOT_SERVING, nothing listening, or a TLS mismatch → 1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from cli_entry import ROOT
from pki import make_pki

from online.config import TLSConfig, load_config
from online.server import ServerThread
from towers import registry as registry_mod

DEFAULT_TARGET = "127.0.0.1:50051"


def dockerfile_healthcheck(name: str) -> list[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / name).read_text())
    (line,) = [x for x in text.splitlines() if x.startswith("HEALTHCHECK ")]
    return list(json.loads(line.split(" CMD ", 1)[1]))


def compose_healthcheck() -> list[str]:
    test = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["serve"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return list(test[1:])


HEALTHCHECKS = {"Dockerfile": lambda: dockerfile_healthcheck("Dockerfile"),
                "Dockerfile.gpu": lambda: dockerfile_healthcheck("Dockerfile.gpu"),
                "compose.yaml": compose_healthcheck}


def run_check(cmd: list[str], target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert cmd[0] == "python" and DEFAULT_TARGET in cmd, cmd
    argv = [sys.executable, *[target if a == DEFAULT_TARGET else a for a in cmd[1:]], *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture(scope="module")
def registry(synth_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    reg = tmp_path_factory.mktemp("probe-registry")
    registry_mod.publish(synth_bundle_factory(seed=9, n_items=500, n_users=50), reg)
    return reg


@pytest.fixture(scope="module")
def serving(registry: Path) -> Iterator[ServerThread]:
    srv = ServerThread(load_config(port=0), registry=registry)
    yield srv
    srv.stop()


@pytest.mark.parametrize("where", sorted(HEALTHCHECKS))
def test_serving_server_is_healthy(where: str, serving: ServerThread) -> None:
    proc = run_check(HEALTHCHECKS[where](), serving.target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{serving.target}: SERVING"


def test_not_serving_and_unreachable_are_unhealthy() -> None:
    cmd = HEALTHCHECKS["Dockerfile"]()
    srv = ServerThread(load_config(port=0))  # bound, no bundle: NOT_SERVING
    try:
        proc = run_check(cmd, srv.target)
        assert proc.returncode == 1 and "NOT_SERVING" in proc.stdout
    finally:
        srv.stop()
    proc = run_check(cmd, srv.target)  # stopped: nothing listens there now
    assert proc.returncode == 1 and "UNREACHABLE: UNAVAILABLE" in proc.stdout


def test_probe_speaks_tls(registry: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    srv = ServerThread(replace(load_config(port=0), tls=TLSConfig(cert=str(pki.server_cert), key=str(pki.server_key))),
                       registry=registry)
    try:
        cmd = HEALTHCHECKS["Dockerfile"]()
        assert run_check(cmd, srv.target, "--tls-ca", str(pki.ca)).returncode == 0
        assert run_check(cmd, srv.target).returncode == 1  # plaintext probe against a TLS port
        bad = run_check(cmd, srv.target, "--tls-ca", str(tmp_path / "missing.pem"))
        assert bad.returncode == 2 and "--tls-ca" in bad.stderr and "missing.pem: no such file" in bad.stderr
    finally:
        srv.stop()
