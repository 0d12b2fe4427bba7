"""Load generation against a Recommender server, from separate processes.

- closed loop: ``concurrency`` requests always in flight (peak throughput);
- open loop: requests sent on a fixed schedule at ``rate`` per second whatever
  the server does, latency measured from the *scheduled* send time, so a
  stalled server cannot hide its stall (no coordinated omission).

Each client process runs ``grpc.aio`` on its own event loop and returns raw
latencies, status codes and rungs; ``run_load`` merges them into a ``LoadResult``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoadSpec:
    target: str
    mode: str  # closed | open
    duration_s: float
    concurrency: int = 1  # closed loop
    rate: float = 0.0  # open loop, requests per second in total
    processes: int = 1
    k: int = 10
    users: tuple[str, ...] = ("1",)
    items: tuple[str, ...] = ()  # session items are drawn from these
    session_len: int = 3
    timeout_s: float = 1.0
    warmup_s: float = 0.5  # requests in the first warmup_s are sent but not recorded
    seed: int = 0


@dataclass
class LoadResult:
    requests: int = 0
    qps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rungs: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    completed: int = 0  # every call that finished, warmup included (for the server's CPU per call)
    samples_ms: list[float] = field(default_factory=list)  # a sorted subsample, for CDF plots
    # Per request: send time (unix s, comparable across processes), latency (ms), and whether it
    # failed, so a scenario can compare the window around an event with the time before it.
    timeline: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples_ms")
        d.pop("timeline")
        return d

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Requests sent in [t0, t1): count, failures, latency percentiles."""
        sel = self.timeline[(self.timeline[:, 0] >= t0) & (self.timeline[:, 0] < t1)]
        return {"requests": len(sel), "failed": int(sel[:, 2].sum()), "latency_ms": percentiles(sel[:, 1])}


def percentiles(lat_ms: np.ndarray) -> dict[str, float]:
    if len(lat_ms) == 0:
        return {}
    p = np.percentile(lat_ms, [50, 90, 99, 99.9])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "p99.9": float(p[3]),
            "mean": float(lat_ms.mean()), "max": float(lat_ms.max())}


async def _client(spec: LoadSpec, share: float, seed: int) -> dict[str, Any]:
    import grpc

    from online.client import CHANNEL_OPTIONS, request
    from online.proto import recommender_pb2_grpc as pb_grpc
    from towers.labels import Rung

    rng = random.Random(seed)
    lat: list[float] = []
    sent: list[float] = []
    failed: list[bool] = []
    codes: Counter[str] = Counter()
    rungs: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    completed = 0
    # Pre-build the messages: request construction is client cost, not server cost.
    msgs = []
    for _ in range(512):
        sess = rng.sample(spec.items, min(spec.session_len, len(spec.items))) if spec.items else []
        msgs.append(request(rng.choice(spec.users), k=spec.k, recent=sess))
    # The client's shipped service config: UNAVAILABLE (a worker draining, a refused
    # connection during a recycle) is retried, as a real client would.
    async with grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        start = time.perf_counter()
        wall = time.time() - start  # perf_counter → unix time, for event windows across processes
        record_from = start + spec.warmup_s
        end = record_from + spec.duration_s

        async def one(msg: Any, t_sched: float) -> None:
            nonlocal completed
            try:
                resp = await stub.Recommend(msg, timeout=spec.timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                resp, code = None, e.code().name
            completed += 1
            if t_sched >= record_from:
                lat.append((time.perf_counter() - t_sched) * 1000.0)
                sent.append(t_sched + wall)
                failed.append(code != "OK")
                codes[code] += 1
                if resp is not None:
                    rungs[Rung(resp.rung).label] += 1
                    versions[resp.model_version] += 1

        if spec.mode == "closed":
            n = max(1, round(spec.concurrency * share))

            async def loop(j: int) -> None:
                i = j
                while time.perf_counter() < end:
                    await one(msgs[i % len(msgs)], time.perf_counter())
                    i += n

            await asyncio.gather(*(loop(j) for j in range(n)))
        else:
            rate = spec.rate * share
            tasks: set[asyncio.Task[None]] = set()
            i = 0
            t_next = start
            while t_next < end:
                now = time.perf_counter()
                if t_next > now:
                    await asyncio.sleep(t_next - now)
                task = asyncio.ensure_future(one(msgs[i % len(msgs)], t_next))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                t_next += rng.expovariate(rate)  # Poisson arrivals
            if tasks:
                await asyncio.wait(tasks, timeout=spec.timeout_s + 1)
    return {"lat": lat, "sent": sent, "failed": failed, "codes": dict(codes), "rungs": dict(rungs),
            "versions": dict(versions), "completed": completed}


def _proc_main(spec: LoadSpec, share: float, seed: int, conn: Any) -> None:
    conn.send(asyncio.run(_client(spec, share, seed)))
    conn.close()


class LoadRun:
    """Load running in ``spec.processes`` spawned processes; ``result()`` waits and merges.
    Scenarios inject their events (a publish, a SIGKILL) while it runs."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")  # fresh interpreters: no gRPC state inherited from this one
        self.procs, self.conns = [], []
        for j in range(spec.processes):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_proc_main, args=(spec, 1.0 / spec.processes, spec.seed * 1000 + j, child),
                            daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)

    def result(self) -> LoadResult:
        spec = self.spec
        parts = []
        for p, c in zip(self.procs, self.conns, strict=True):
            if c.poll(spec.warmup_s + spec.duration_s + spec.timeout_s + 60):
                parts.append(c.recv())
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        return merge(spec, parts)


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load from ``spec.processes`` spawned processes and merge their results."""
    return LoadRun(spec).result()


def merge(spec: LoadSpec, parts: list[dict[str, Any]]) -> LoadResult:
    lat = np.array([x for part in parts for x in part["lat"]], dtype=np.float64)
    res = LoadResult(requests=len(lat), qps=len(lat) / spec.duration_s, latency_ms=percentiles(lat),
                     completed=sum(int(part.get("completed", 0)) for part in parts))
    for part in parts:
        for key, target in (("codes", res.errors), ("rungs", res.rungs), ("versions", res.versions)):
            for name, n in part[key].items():
                if key == "codes" and name == "OK":
                    continue
                target[name] = target.get(name, 0) + n
    res.timeline = np.array([(t, x, f) for part in parts
                             for t, x, f in zip(part["sent"], part["lat"], part["failed"], strict=True)],
                            dtype=np.float64).reshape(-1, 3)
    if len(lat):
        s = np.sort(lat)
        res.samples_ms = s[np.linspace(0, len(s) - 1, min(len(s), 2000)).astype(int)].tolist()
    return res
