"""Where a serving process spends its time under load: ``python -m bench.profile_server
--registry REG [--out bench/results/paths/profile] [--tag NAME]``.

``twotower serve`` (in-memory store) under a closed loop at c=64, then an open loop at half
the peak that loop reached, each sampled by py-spy (the ``[dev]`` extra installs it; run as a
user allowed to ptrace the server). Writes per phase a flame graph (``TAG-PHASE.svg``), the
collapsed stacks (``TAG-PHASE.txt``) and ``TAG.json``: the load's QPS and latency (with the
profiler attached: slower than a bench run) and the top frames by own and inclusive samples.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

PHASE_S = 12.0
SAMPLE_S = 10


def top_frames(collapsed: Path, n: int = 25) -> dict[str, Any]:
    """Share of samples per frame: where it was the innermost (own) and anywhere (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return {"samples": total, "own": [[f, round(c / total, 4)] for f, c in own.most_common(n)],
            "inclusive": [[f, round(c / total, 4)] for f, c in incl.most_common(n)]}


def _record(pyspy: str, pid: int, base: Path) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(SAMPLE_S), "--rate", "100",
                              "--format", fmt, "-o", f"{base}.{ext}", "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for fmt, ext in (("raw", "txt"), ("flamegraph", "svg"))]


def profile(registry: Path, out: Path, *, tag: str) -> dict[str, Any]:
    from bench.loadgen import LoadSpec, run_load
    from bench.procs import server
    from towers import bundle as bundle_mod
    from towers import registry as registry_mod

    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy is not installed (pip install '.[dev]')")
    b = bundle_mod.load(registry_mod.current_path(registry), verify_checksums=False)
    users, items = tuple(b.features.user_vocab.values[:2000]), tuple(b.item_ids[:2000])
    out.mkdir(parents=True, exist_ok=True)
    load: dict[str, Any] = {}
    with server(registry, batch_size=64) as srv:
        for phase in ("c64", "open"):
            spec = LoadSpec(target=srv.target, mode="closed", duration_s=PHASE_S, concurrency=64, processes=2,
                            users=users, items=items) if phase == "c64" else \
                LoadSpec(target=srv.target, mode="open", duration_s=PHASE_S, rate=load["c64"]["qps"] / 2,
                         processes=2, users=users, items=items)
            procs = _record(pyspy, srv.pid, out / f"{tag}-{phase}")
            r = run_load(spec)
            for p in procs:
                p.wait()
            load[phase] = {"qps": round(r.qps, 1), "p50_ms": r.latency_ms.get("p50"), "p99_ms": r.latency_ms.get("p99")}
    result = {"registry": str(registry), "load": load,
              "top_frames": {phase: top_frames(out / f"{tag}-{phase}.txt") for phase in ("c64", "open")}}
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench/results/paths/profile"))
    p.add_argument("--tag", default="ml100k")
    a = p.parse_args(argv)
    result = profile(a.registry, a.out, tag=a.tag)
    print(json.dumps(result["load"]))
    for phase, t in result["top_frames"].items():
        print(f"== {phase}: {t['samples']} samples; own time")
        for f, share in t["own"][:15]:
            print(f"  {share:6.1%}  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
