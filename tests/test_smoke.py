"""Smoke test of the deployment's commands (``make smoke``): what deploy/compose.yaml runs,
read from the compose file and started as plain processes on this machine, so the test breaks
when compose changes.

1. Redis: the ``redis`` service's command, on a free loopback port; its healthcheck.
2. The ``jobs`` steps compose.yaml's header tells an operator to run: ``synth-bundle``, then
   ``publish ... --redis`` into the registry and Redis.
3. ``serve``: the service's command (``--workers 2``, Redis, ``--metrics-port``, JSON logs)
   plus TLS flags with certificates made here; its healthcheck command until it passes.
4. ``/metrics``: every metric the alerts and the dashboard query is exposed, and the counts
   move with traffic sent over TLS; a worker killed with SIGKILL is restarted and the sums
   stay right (its live gauges leave, its counters stay).
5. SIGTERM: exit code 0, no worker left, every log line JSON.

Container paths and addresses map to this machine: ``/registry`` and ``/data`` to temporary
directories, ``redis://redis:6379/0`` to the test's Redis, ``0.0.0.0`` to 127.0.0.1, the
fixed ports to free ones.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cli_entry import ROOT, twotower_argv
from monitoring import Samples, missing_names, scrape, total
from pki import Pki, make_pki

from bench.procs import free_port
from online.client import RecommenderClient
from online.tls import channel_credentials

COMPOSE = ROOT / "deploy" / "compose.yaml"


def wait_for(what: str, ok: Callable[[], bool], timeout: float, proc: subprocess.Popen[Any] | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} while waiting for {what}: "
                        f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s" + (f"\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Deployment:
    """compose.yaml's commands with this machine's paths, addresses and free ports."""

    def __init__(self, tmp: Path) -> None:
        self.compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        self.tmp = tmp
        self.redis_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.registry, self.data = tmp / "registry", tmp / "data"
        self.registry.mkdir()
        self.data.mkdir()
        serve = self.service("serve")["command"]
        self.map = {"/registry": str(self.registry), "redis://redis:6379/0": self.redis_url, "0.0.0.0": "127.0.0.1",
                    serve[serve.index("--port") + 1]: str(self.grpc_port),
                    serve[serve.index("--metrics-port") + 1]: str(self.metrics_port)}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def service(self, name: str) -> dict[str, Any]:
        svc: dict[str, Any] = self.compose["services"][name]
        return svc

    def local(self, argv: list[str]) -> list[str]:
        out = []
        for a in argv:
            a = self.map.get(a, a)
            if a.startswith("/data/"):
                a = str(self.data / a[len("/data/"):])
            out.append(a.replace("127.0.0.1:50051", f"127.0.0.1:{self.grpc_port}"))
        return out

    def job_commands(self) -> list[list[str]]:
        """The ``docker compose ... run --rm jobs ...`` lines of compose.yaml's header."""
        return [self.local(shlex.split(line.split(" run --rm jobs ", 1)[1]))
                for line in COMPOSE.read_text().splitlines() if line.startswith("#") and " run --rm jobs " in line]

    def healthcheck(self, name: str) -> list[str]:
        test = self.service(name)["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = self.local(test[1:])
        return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("smoke-pki"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("smoke"))
    cmd = d.service("redis")["command"]
    assert cmd[0] == "redis-server"
    redis = subprocess.Popen([*cmd, "--port", str(d.redis_port), "--bind", "127.0.0.1", "--dir", str(d.tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        check = d.healthcheck("redis")
        ping = [check[0], "-p", str(d.redis_port), *check[1:]]
        wait_for("redis healthcheck", lambda: subprocess.run(ping, capture_output=True, text=True).stdout.strip()
                 == "PONG", 20, redis)
        yield d
    finally:
        redis.kill()
        redis.wait(timeout=10)


def test_the_compose_deployment_runs_as_plain_processes(deployment: Deployment, pki: Pki) -> None:
    d = deployment
    jobs = d.job_commands()
    assert [j[0] for j in jobs] == ["synth-bundle", "publish"], jobs
    assert "--redis" in jobs[1], "publish loads the version into Redis before serve needs it"
    for argv in jobs:
        proc = subprocess.run([*twotower_argv(), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"twotower {shlex.join(argv)}:\n{proc.stderr[-3000:]}"

    serve = d.local(d.service("serve")["command"])
    assert serve[0] == "serve" and int(serve[serve.index("--workers") + 1]) >= 2
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    out, err = d.tmp / "serve.out", d.tmp / "serve.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([*twotower_argv(), *serve, *tls], cwd=ROOT, stdout=o, stderr=e)
    try:
        probe = [*d.healthcheck("serve"), "--tls-ca", str(pki.ca)]
        wait_for("serve healthcheck (SERVING over TLS)",
                 lambda: subprocess.run(probe, capture_output=True, cwd=ROOT).returncode == 0, 180, proc, err)
        url = f"http://127.0.0.1:{d.metrics_port}/metrics"
        # The healthcheck passes once one worker serves (they share the port); the other may
        # still be warming up. Both must report SERVING before the first scrape is judged.
        wait_for("both workers SERVING", lambda: total(scrape(url), "twotower_serving") == 2, 180, proc, err)
        workers = exercise(d, url, scrape(url), pki, err)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]
    logs = err.read_text().splitlines()
    assert logs and all(json.loads(line)["level"] for line in logs), "every log line is a JSON object"
    assert {json.loads(line)["pid"] for line in logs} >= {proc.pid}, "the supervisor logs as JSON too"
    assert "metrics on http://" in out.read_text()
    wait_for("no worker left", lambda: not any(alive(p) for p in workers), 10)


def exercise(d: Deployment, url: str, before: Samples, pki: Pki, log: Path) -> set[int]:
    """Traffic over TLS, /metrics before and after, a worker killed; returns the worker pids."""
    assert total(before, "twotower_serving") == 2  # both workers, in one scrape target
    workers = {int(lab["pid"]) for lab, _ in before["twotower_worker_resident_memory_bytes"]}
    assert len(workers) == 2 and all(v > 0 for _, v in before["twotower_worker_resident_memory_bytes"])
    version = (d.registry / "CURRENT").read_text().strip()
    assert total(before, "twotower_model_info", version=version) == 2
    assert total(before, "twotower_request_latency_seconds_count") == 0

    creds = channel_credentials(ca=pki.ca)
    n = 40
    with RecommenderClient(f"127.0.0.1:{d.grpc_port}", timeout=5.0, credentials=creds) as c:
        for i in range(n):
            r = c.recommend(f"u{i}", k=5)
            assert len(r.item_ids) == 5 and r.model_version == version
        assert c.recommend("nobody-knows-me", k=5).source == "popularity"  # a degraded response
        with pytest.raises(grpc.RpcError):
            c.recommend("u1", k=0)  # INVALID_ARGUMENT
    n += 1

    def settled() -> bool:
        return total(scrape(url), "twotower_request_latency_seconds_count") >= n

    wait_for("the traffic in /metrics", settled, 10)
    after = scrape(url)
    assert total(after, "twotower_request_latency_seconds_count") == n
    assert total(after, "twotower_request_latency_seconds_count", rung="full", version=version) == n - 1
    assert total(after, "twotower_stage_latency_seconds_count", stage="fetch") == n
    assert total(after, "twotower_degraded_responses_total", reason="cold start") == 1
    assert total(after, "twotower_rpc_errors_total", code="INVALID_ARGUMENT") == 1
    assert missing_names(after) == {}, "metrics the alerts or the dashboard query but the exporter lacks"

    # A worker dies: the supervisor restarts it; its live gauges leave the sums, its counts stay.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:  # the supervisor logs the replacement SERVING (loaded, warm, its gauge set)
        for line in log.read_text().splitlines():
            words = json.loads(line)["message"].split() if line.strip() else []
            if words[:1] == ["worker"] and words[2:4] == ["is", "SERVING"] and int(words[1]) not in workers:
                return True
        return False

    wait_for("the restarted worker SERVING", restarted, 120)
    final = scrape(url)
    assert total(final, "twotower_worker_restarts_total") == 1
    assert total(final, "twotower_serving") == 2 and total(final, "twotower_model_info", version=version) == 2
    assert total(final, "twotower_request_latency_seconds_count") == n
    assert not alive(victim)
    return {int(lab["pid"]) for lab, _ in final["twotower_worker_resident_memory_bytes"]}
