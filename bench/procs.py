"""Processes the benchmark runs: ``twotower serve`` subprocesses, a trivial handler
(the Python gRPC ceiling) and throwaway redis-servers; each waits for readiness with a bound."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it (admin ports per slot)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65536:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_serving(target: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until the health service says SERVING (bounded by ``timeout``)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.perf_counter()
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.perf_counter() - t0 < timeout:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before SERVING")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{target} not SERVING after {timeout} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``), in seconds. The
    benchmark's clients share the cores with the server, so QPS alone mixes both costs;
    the server's own CPU per call does not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ServerProc:
    target: str
    ready_s: float  # seconds from start to SERVING
    pid: int

    def __iter__(self) -> Iterator[Any]:  # (target, ready) unpacking, as the scenarios use it
        return iter((self.target, self.ready_s))


@contextmanager
def server(registry: Path, *, batch_size: int, redis_url: str | None = None, config: dict[str, Any] | None = None,
           timeout: float = 600, transport: str | None = None) -> Iterator[ServerProc]:
    """``twotower serve`` in a subprocess; yields its target, seconds to SERVING and pid."""
    port = free_port()
    cmd = [sys.executable, "-m", "twotower", "serve", "--registry", str(registry), "--port", str(port),
           "--max-batch-size", str(batch_size)]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    if transport:
        cmd += ["--transport", transport]
    cfg_file = None
    if config:
        cfg_file = Path(tempfile.mkstemp(suffix=".json")[1])
        cfg_file.write_text(json.dumps(config))
        cmd += ["--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_serving(f"127.0.0.1:{port}", timeout, proc)
        yield ServerProc(f"127.0.0.1:{port}", ready, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if cfg_file:
            cfg_file.unlink(missing_ok=True)


TRIVIAL_KINDS = ("plain", "batched", "batched+thread")


def trivial_main(port: int, kind: str = "plain") -> None:
    """A Recommender whose handler returns a fixed 10-item response: the gRPC ceiling.
    ``batched``: each call waits for its answer from the server's own ``Batcher`` (a future per
    call, a batch task, the same settings), whose handler does nothing; ``batched+thread``:
    each batch also hops to a worker thread and back, as the search does. The steps between
    ``plain`` and the real server, so a gap can be split into what batching costs and what the
    stages cost."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from online.batcher import Batcher
    from online.config import BatchingConfig
    from online.proto import recommender_pb2 as pb
    from online.proto import recommender_pb2_grpc as pb_grpc

    fixed = pb.RecommendResponse(item_ids=[str(i) for i in range(10)], scores=[0.5] * 10, model_version="trivial",
                                 rung=pb.RUNG_FULL, source="trivial")
    pool = ThreadPoolExecutor(max_workers=2)

    async def answer(reqs: Any, _queue_s: Any) -> list[Any]:
        if kind == "batched+thread":
            await asyncio.get_running_loop().run_in_executor(pool, len, reqs)
        return [fixed] * len(reqs)

    b = BatchingConfig()
    batcher: Batcher[Any, Any] = Batcher(answer, max_batch_size=b.max_batch_size, max_wait_ms=b.max_wait_ms,
                                         gap_ms=b.gap_ms, max_inflight=b.max_inflight_batches, max_pending=0)

    class Trivial(pb_grpc.RecommenderServicer):
        async def Recommend(self, request: Any, context: Any) -> Any:
            return fixed if kind == "plain" else await batcher.submit(request)

    async def main() -> None:
        srv = grpc.aio.server()
        pb_grpc.add_RecommenderServicer_to_server(Trivial(), srv)
        h = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(h, srv)
        srv.add_insecure_port(f"127.0.0.1:{port}")
        await srv.start()
        await h.set("", health_pb2.HealthCheckResponse.SERVING)
        await srv.wait_for_termination()

    asyncio.run(main())


@contextmanager
def trivial_server(kind: str = "plain") -> Iterator[ServerProc]:
    port = free_port()
    # -c, not -m bench.procs: the package's __init__ imports this module first, and runpy then
    # warns that it runs a second copy of it.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from bench.procs import trivial_main; "
                             "trivial_main(int(sys.argv[1]), sys.argv[2])", str(port), kind])
    try:
        ready = wait_serving(f"127.0.0.1:{port}", 60, proc)
        yield ServerProc(f"127.0.0.1:{port}", ready, proc.pid)
    finally:
        proc.kill()
        proc.wait()


class RedisProcess:
    """A throwaway redis-server (no persistence) on a free loopback port, which a test or a
    benchmark can stop, signal (SIGSTOP: a hung server) and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        # DEBUG SLEEP (the "Redis slowed" fault) is refused unless debug commands are enabled.
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir), "--dbfilename", "dump.rdb",
                                      "--enable-debug-command", "local"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):  # bounded wait for the server to accept connections
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def shutdown_saving(self) -> None:
        import redis

        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=self.port).shutdown(save=True)
        assert self.proc is not None
        self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
