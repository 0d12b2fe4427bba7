"""The load generator and the benchmark's summary: structure and counting, never wall time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen import LoadSpec, run_load
from bench.run import markdown, summarize
from online.config import load_config
from online.server import ServerThread


@pytest.fixture
def target(served_registry: Path) -> Iterator[str]:
    srv = ServerThread(load_config(port=0), registry=served_registry)
    yield srv.target
    srv.stop()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_load_generator_counts_every_response(target: str, mode: str) -> None:
    spec = LoadSpec(target=target, mode=mode, duration_s=0.5, concurrency=4, rate=100.0, users=("1", "2", "3"),
                    items=("50", "181", "1"), warmup_s=0.1)
    res = run_load(spec)
    assert res.requests > 0 and res.errors == {}
    assert sum(res.rungs.values()) == res.requests  # every recorded response has a rung
    assert set(res.latency_ms) >= {"p50", "p90", "p99", "p99.9"}
    # The percentiles are of what was recorded: recompute them from the timeline.
    lat = res.timeline[:, 1]
    assert len(lat) == res.requests and res.latency_ms["max"] == pytest.approx(lat.max())
    assert res.latency_ms["p50"] == pytest.approx(float(np.percentile(lat, 50)))
    assert res.completed >= res.requests  # warmup calls complete but are not recorded
    assert len(res.versions) == 1


def test_load_generator_reports_failures_by_status_code() -> None:
    from bench.procs import free_port

    spec = LoadSpec(target=f"127.0.0.1:{free_port()}", mode="closed", duration_s=0.3, concurrency=2, warmup_s=0.0,
                    timeout_s=0.2)
    res = run_load(spec)
    assert res.requests > 0 and set(res.errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert sum(res.errors.values()) == res.requests


def test_summary_ratios() -> None:
    def row(cat: str, batching: bool, c: int, qps: float, p50: float, p99: float,
            full: float = 1.0) -> dict[str, object]:
        return {"label": f"{cat} {batching} {c}", "mode": "closed", "catalog": cat, "batching": batching,
                "concurrency": c, "qps": qps, "latency_ms": {"p50": p50, "p99": p99},
                "rungs": {"full": int(100 * full), "batch": int(100 * (1 - full))}}

    rows = [row("x", True, 64, 3000, 10, 20), row("x", False, 64, 1000, 30, 40, full=0.25),
            row("x", True, 1, 900, 1.1, 2), row("x", False, 1, 950, 1.0, 2),
            {"label": "ceiling c=64", "mode": "closed", "concurrency": 64, "qps": 4000.0, "latency_ms": {}}]
    s = summarize(rows)
    assert "| x True 64 | 3000 | 10.0 | 20.0 |" in markdown(rows)
    assert s["x: batching speedup at c=64"] == 3.0
    assert s["x: full-quality QPS speedup at c=64"] == 12.0  # a quarter of the unbatched answers were full
    assert s["x: p99 at c=64 batched / unbatched"] == 0.5
    assert s["x: p50 added by batching at c=1 (ms)"] == pytest.approx(0.1)
    assert s["best QPS / trivial-handler QPS"] == 0.75


def test_paths_summary_pairs_each_run_with_the_trivial_run_beside_it() -> None:
    def row(cat: str, mode: str, rep: int, qps: float, p99: float, cpu: float, **kw: object) -> dict[str, object]:
        return {"label": f"{cat} {mode} {rep}", "mode": mode, "scenario": "paths", "catalog_of": cat, "rep": rep,
                "qps": qps, "latency_ms": {"p50": 1.0, "p99": p99}, "server_cpu_s_per_1k": cpu, **kw}

    rows = [row("trivial", "closed", 0, 2000, 40, 0.40, paired_with="x aio"),
            row("x", "closed", 0, 1500, 60, 0.60, transport="aio"),
            row("trivial", "closed", 1, 1000, 40, 0.50, paired_with="x aio"),  # a noisy neighbour hit both
            row("x", "closed", 1, 800, 60, 0.75, transport="aio"),
            row("x", "open", 0, 700, 30, 0.6, transport="aio", open_rate=700),
            row("trivial", "open", 0, 700, 10, 0.4, paired_with="x aio", open_rate=700)]
    s = summarize(rows)
    assert s["paths: x aio QPS / trivial QPS at c=64"] == [0.75, 0.8]
    assert s["paths: x aio server CPU per call / trivial's"] == [1.5, 1.5]
    assert s["paths: x aio open-loop p99 / trivial's at 700/s"] == [3.0]


def test_quant_summary_counts_full_quality_answers_of_the_tuned_index_against_todays() -> None:
    def row(cat: str, rep: int, qps: float, full: int, degraded: int, transport: str = "aio") -> dict[str, object]:
        return {"label": f"{cat} {rep}", "mode": "closed", "scenario": "paths", "catalog_of": cat, "rep": rep,
                "transport": transport, "qps": qps, "latency_ms": {"p99": 1.0},
                "rungs": {"full": full, "no_session": degraded}}

    rows = [row("synth-1m-ivf95", 0, 400, 90, 10), row("synth-1m-ivf95", 1, 500, 50, 50),
            row("synth-1m-tuned", 0, 1440, 100, 0), row("synth-1m-tuned", 1, 1000, 100, 0),
            row("synth-1m-ivf95", 0, 100, 100, 0, "sync"), row("synth-1m-tuned", 0, 900, 100, 0, "sync")]
    s = summarize(rows)
    # Full-quality QPS: today's 360 and 250 (median 305), tuned 1440 and 1000 (median 1220).
    assert s["quant (aio): full-quality QPS at c=64, tuned / today's IVF-Flat (medians over reps)"] == 4.0
    # Each transport on its own: the sync rows never mix into the aio ratio.
    assert s["quant (sync): full-quality QPS at c=64, tuned / today's IVF-Flat (medians over reps)"] == 9.0


def test_ab_resident_reports_both_versions_and_the_refused_limit(tmp_path: Path) -> None:
    """The A/B memory benchmark on tiny bundles: real servers, the 50/50 arms both answer,
    and a limit below two versions is refused at start and on reload while the old flags
    serve on (structure and outcomes only: no sizes or times are asserted)."""
    from bench.ab_resident import measure

    res = measure(tmp_path, items=2000, users=300, index_type="flat", load_s=0.3, concurrency=4)
    s = res["summary"]
    v0, v1 = res["versions"]
    assert s["both_versions_answered"] and s["errors_two"] == 0
    assert res["two"]["status"]["resident_versions"] == sorted([v0, v1])
    assert 0 < s["resident_bytes"] <= s["max_resident_mb"] * (1 << 20)
    assert res["none"]["status"]["resident_bytes"] == 0  # no flags file: the router counts nothing
    assert s["limit_below_need_refused_at_start"] is True
    assert s["limit_below_need_refused_on_reload"] is True and s["old_flags_kept_serving"] is True
    assert "max_resident_mb" in res["limited"]["status_after"]["flags_error"]
    for key in ("rss_mb_none", "rss_mb_two", "rss_mb_limited_after_refusal"):
        assert s[key] > 0


def test_ab_shadow_switches_the_shadow_on_and_off(tmp_path: Path) -> None:
    """The shadow benchmark on tiny bundles, one short round: the flags switch really turns the
    shadow on and off (its counters move only in shadow runs) and every response comes from
    CURRENT; the summary pairs the runs of each round (no latency is asserted)."""
    from bench.ab_shadow import MODES, measure

    res = measure(tmp_path, items=2000, users=300, index_type="flat", rounds=1, seconds=0.5, peak_reps=1,
                  peak_seconds=0.5, concurrency=4, out_png=tmp_path / "s.png")
    s = res["summary"]
    assert s["responses_from_current_only"] and s["failed_rpcs"] == dict.fromkeys(MODES, 0)
    for row in res["runs"]:
        moved = row["shadow"]["sampled"]
        assert (moved > 0) if row["mode"] == "shadow" else (moved == 0), row
        # A shadow batch still running when the status was read is sampled but not yet counted.
        assert row["shadow"]["sampled"] >= row["shadow"]["scored"] + row["shadow"]["dropped"] + row["shadow"]["errors"]
    assert len(s["per_round_p99_ratio"]) == 1 and set(s["median_of_rounds_ms"]) == set(MODES)
    assert (tmp_path / "s.png").is_file()


def test_profile_top_frames_count_own_and_inclusive_samples(tmp_path: Path) -> None:
    from bench.profile_server import top_frames

    collapsed = tmp_path / "stacks.txt"
    collapsed.write_text("main;serve;search 6\nmain;serve;parse 3\nmain;idle 1\n")
    t = top_frames(collapsed)
    assert t["samples"] == 10
    assert t["own"][:3] == [["search", 0.6], ["parse", 0.3], ["idle", 0.1]]
    assert dict(map(tuple, t["inclusive"]))["serve"] == 0.9 and dict(map(tuple, t["inclusive"]))["main"] == 1.0
