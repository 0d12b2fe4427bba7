"""Routing overhead of A/B flags, in process: ``python -m bench.ab_overhead [--out FILE]``.

A closed loop of 64 concurrent callers on the service itself (no gRPC: its fixed
per-call cost would dilute the ratio, so this is the stricter measurement), over
the same two synthetic versions, in alternating rounds (noise on a shared machine
hits every mode alike):

- ``none``: no flags (today's path);
- ``same``: a 50/50 experiment whose arms both serve CURRENT: the router's own cost
  (assignment memo, grouping, labels) with one group per batch;
- ``two``: a 50/50 experiment, control CURRENT vs a pinned version: the router's cost
  plus two half-size groups per batch (what serving two versions costs by nature);
- ``two-cold``: ``two`` with the assignment memo off (every request hashes);
- ``interleave``: ``two`` as an interleave experiment: every request is answered by both
  versions and the lists merged (team draft), so about twice ``none``'s work per call.

Prints and writes JSON: QPS per mode (median of rounds) and each mode's ratio to ``none``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from offline.synth import make_synthetic_bundle
from online.config import load_config
from online.experiments import Router
from online.feature_store import InMemoryFeatureStore
from online.lifecycle import LoadedModel
from online.request import RecRequest
from online.service import RecommendService
from towers import registry as registry_mod
from towers.labels import Mode

FLAGS = """experiments:
  - name: bench
    salt: bench-salt
    status: running
    allocation: 1.0
    variants:
      - {{name: control, weight: 0.5, version: CURRENT}}
      - {{name: treatment, weight: 0.5, version: {treatment}}}
"""


async def _closed_loop(service: RecommendService, *, users: int, concurrency: int,
                       seconds: float) -> tuple[float, float]:
    """(requests per wall second, requests per CPU second of this process)."""
    done = 0
    end = time.monotonic() + seconds

    async def caller(j: int) -> None:
        nonlocal done
        i = j
        while time.monotonic() < end:
            now = time.monotonic()
            req = RecRequest(f"u{(i * 7919) % users}", 10, (), (), (), Mode.AUTO, "", False, now + 1.0, now)
            await service.recommend(req)
            done += 1
            i += concurrency

    t0, c0 = time.monotonic(), time.process_time()
    await asyncio.gather(*(caller(j) for j in range(concurrency)))
    return done / (time.monotonic() - t0), done / max(time.process_time() - c0, 1e-9)


async def _main(root: Path, *, items: int, users: int, rounds: int, seconds: float,
                concurrency: int) -> dict[str, object]:
    reg = root / "registry"
    ids = []
    for seed in (0, 1):
        man = make_synthetic_bundle(root / f"b{seed}", n_items=items, n_users=users, dim=32, seed=seed,
                                    index_type="flat", progress=False, item_prefix=f"s{seed}-")
        ids.append(str(man["version"]))
    registry_mod.publish(root / "b0", reg)
    registry_mod.install(root / "b1", reg)
    (root / "two.yaml").write_text(FLAGS.format(treatment=ids[1]))
    (root / "same.yaml").write_text(FLAGS.format(treatment="CURRENT"))
    (root / "il.yaml").write_text(FLAGS.format(treatment=ids[1]).replace("allocation: 1.0",
                                                                         "allocation: 1.0\n    kind: interleave"))

    cfg = replace(load_config(), warmup=False)
    service = RecommendService(cfg, InMemoryFeatureStore())
    model = LoadedModel.load(reg / ids[0])
    await service.lifecycle.prepare(model)
    service.lifecycle.install(model)
    routers = {}
    for mode, flags, cache in (("same", "same.yaml", 100_000), ("two", "two.yaml", 100_000),
                               ("two-cold", "two.yaml", 0), ("interleave", "il.yaml", 100_000)):
        r = Router(service, registry=reg, flags_file=root / flags, poll_s=0, cache_size=cache)
        assert await r.reload(force=True), r.state.error
        routers[mode] = r
    qps: dict[str, list[float]] = {m: [] for m in ("none", *routers, "none-again")}
    per_cpu: dict[str, list[float]] = {m: [] for m in qps}
    for _ in range(rounds):
        for mode in qps:
            service.router = routers.get(mode)
            if service.router is not None:
                service.lifecycle.pin(frozenset(service.router.table.models) if service.router.table else frozenset())
            await _closed_loop(service, users=users, concurrency=concurrency, seconds=0.3)  # settle
            wall, per_s = await _closed_loop(service, users=users, concurrency=concurrency, seconds=seconds)
            qps[mode].append(wall)
            per_cpu[mode].append(per_s)
    await service.close()
    med = {m: statistics.median(v) for m, v in qps.items()}
    cpu = {m: statistics.median(v) for m, v in per_cpu.items()}
    # Requests per CPU second is the steadier figure on a shared machine (other processes'
    # load moves wall-clock QPS by 2x between rounds; it moves this one far less).
    return {"concurrency": concurrency, "items": items, "users": users, "rounds": rounds, "seconds": seconds,
            "qps": {m: round(v, 1) for m, v in med.items()},
            "ratio_to_none": {m: round(v / med["none"], 3) for m, v in med.items()},
            "requests_per_cpu_s": {m: round(v, 1) for m, v in cpu.items()},
            "cpu_ratio_to_none": {m: round(v / cpu["none"], 3) for m, v in cpu.items()},
            "rounds_qps": {m: [round(x, 1) for x in v] for m, v in qps.items()},
            "rounds_per_cpu_s": {m: [round(x, 1) for x in v] for m, v in per_cpu.items()}}


def _grpc(root: Path, *, users: int, rounds: int, seconds: float, concurrency: int) -> dict[str, object]:
    """End to end: ``twotower serve`` in a subprocess per mode (the registry and flags files
    ``_main`` left in ``root``), a closed loop over gRPC from load-generator processes; QPS
    and the server's own CPU per call (the clients share the cores)."""
    from bench.loadgen import LoadSpec, run_load
    from bench.procs import cpu_seconds, server

    modes = {"none": None, "same": root / "same.yaml", "two": root / "two.yaml"}
    qps: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ms: dict[str, list[float]] = {m: [] for m in modes}
    errors: dict[str, int] = dict.fromkeys(modes, 0)
    for _ in range(rounds):
        for mode, flags in modes.items():
            config = {"flags_file": str(flags)} if flags is not None else {}
            with server(root / "registry", batch_size=64, config=config) as srv:
                spec = LoadSpec(target=srv.target, mode="closed", duration_s=seconds, concurrency=concurrency,
                                processes=2, users=tuple(f"u{i}" for i in range(users)))
                c0 = cpu_seconds(srv.pid)
                res = run_load(spec)
                cpu = cpu_seconds(srv.pid) - c0
            qps[mode].append(res.qps)
            cpu_ms[mode].append(1000.0 * cpu / max(res.completed, 1))
            errors[mode] += sum(res.errors.values())
    med = {m: statistics.median(v) for m, v in qps.items()}
    cms = {m: statistics.median(v) for m, v in cpu_ms.items()}
    return {"qps": {m: round(v, 1) for m, v in med.items()},
            "ratio_to_none": {m: round(v / med["none"], 3) for m, v in med.items()},
            "server_cpu_ms_per_call": {m: round(v, 4) for m, v in cms.items()},
            "cpu_per_call_ratio_to_none": {m: round(v / cms["none"], 3) for m, v in cms.items()},
            "errors": errors, "rounds_qps": {m: [round(x, 1) for x in v] for m, v in qps.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--grpc-rounds", type=int, default=0, help="also measure end to end over gRPC (subprocesses)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = asyncio.run(_main(Path(d), items=a.items, users=a.users, rounds=a.rounds, seconds=a.seconds,
                                concurrency=a.concurrency))
        if a.grpc_rounds:
            res["grpc"] = _grpc(Path(d), users=a.users, rounds=a.grpc_rounds, seconds=max(a.seconds, 3.0),
                                concurrency=a.concurrency)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
