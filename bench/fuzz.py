"""``twotower fuzz``: the long protocol-fuzzing run of the benchmark (issue 10 item 7).

The generators, the target and the property are ``bench/fuzz_cases.py`` (shared with
``tests/test_fuzz.py``, which runs a bounded, derandomized number of examples in CI);
this module runs many more and counts answers by status code. Hypothesis is a dev
dependency, so it is imported only when a run starts: ``twotower serve`` never needs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fuzz_settings(n: int, *, seed: int | None) -> Any:
    """Settings for ``n`` examples: no deadline (a shared 2-core machine), no example
    database, derandomized when ``seed`` is None (the CI run is reproducible)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=n, deadline=None, database=None, derandomize=seed is None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def run_fuzz(n: int = 10_000, *, seed: int | None = 0, workdir: Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Send ``n`` generated messages (half of each type); count answers by status code and
    collect every violated property (the run goes on, so one bug does not hide others)."""
    from hypothesis import given
    from hypothesis import seed as hseed

    from bench.fuzz_cases import Case, fuzz_target, recommend_cases, record_events_cases

    tmp = Path(tempfile.mkdtemp(prefix="twotower-fuzz-")) if workdir is None else workdir
    violations: list[dict[str, str]] = []
    t0 = time.perf_counter()
    try:
        with fuzz_target(workdir=tmp) as t:
            for strategy in (recommend_cases, record_events_cases):
                def one(case: Case) -> None:
                    for p in t.run_case(case):
                        if len(violations) < 50:
                            violations.append({"problem": p, "input": case.short()})
                    if progress and sum(t.counts[case.method].values()) % 1000 == 0:
                        progress(f"{case.method}: {sum(t.counts[case.method].values())} sent")

                test = given(strategy(users=t.users, items=t.items))(one)
                test = fuzz_settings((n + 1) // 2, seed=seed)(test)
                if seed is not None:
                    test = hseed(seed)(test)
                test()
            serving, lost = t.serving(), t.lost_sentinels()
            counts = {m: dict(sorted(c.items())) for m, c in t.counts.items()}
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(sum(c.values()) for c in counts.values())
    return {"messages": total, "counts": counts,
            "internal_or_unknown": sum(c.get("INTERNAL", 0) + c.get("UNKNOWN", 0) for c in counts.values()),
            "violations": violations, "serving_after": serving, "lost_sentinel_events": [str(e) for e in lost],
            "seconds": round(time.perf_counter() - t0, 1), "seed": seed}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="fuzz the gRPC API with generated messages; counts by status code")
    p.add_argument("--examples", type=int, default=10_000, help="messages in all (half of each type)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    res = run_fuzz(args.examples, seed=args.seed, progress=None if args.json else print)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for method, counts in res["counts"].items():
            print(f"{method:13s} " + "  ".join(f"{code} {n}" for code, n in counts.items()))
        print(f"{res['messages']} messages in {res['seconds']} s; INTERNAL/UNKNOWN {res['internal_or_unknown']}; "
              f"SERVING after: {res['serving_after']}; lost events: {len(res['lost_sentinel_events'])}")
        for v in res["violations"]:
            print(f"VIOLATION {v['problem']}\n    input: {v['input']}")
    ok = not res["violations"] and res["serving_after"] and not res["lost_sentinel_events"]
    return 0 if ok else 1
