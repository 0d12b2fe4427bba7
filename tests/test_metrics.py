"""Prometheus metrics and JSON logs: the bulk histogram path against prometheus_client's own
``observe``, a batch's accounting, an in-process server scraped over real HTTP, and
``twotower serve --metrics-port --log-format json`` as a process."""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cli_entry import ROOT, twotower_argv
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from online.client import RecommenderClient
from online.config import load_config
from online.exporter import start_exporter
from online.logs import JsonFormatter
from online.metrics import LATENCY_BUCKETS, ServingMetrics, _Bulk
from online.request import RecResult, StageTimings
from online.server import ServerThread
from towers import registry as registry_mod
from towers.errors import FeatureStoreError, FeatureStoreTimeout
from towers.labels import Rung, Source


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)] of a /metrics page, parsed by prometheus_client's parser."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def scrape_until(url: str, ok: Callable[[dict[str, list[tuple[dict[str, str], float]]]], bool],
                 timeout: float = 10.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Scrape until ``ok`` holds (histograms reach the exported values within ~0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def result(rung: str = "full", *, total_us: int = 1500, queue_us: int = 100, reasons: tuple[str, ...] = (),
           version: str = "v1", request_id: str = "r") -> RecResult:
    return RecResult(item_ids=["a"], scores=[1.0], version=version, variant="control", rung=Rung.from_label(rung),
                     reasons=list(reasons), source=Source.ONLINE, batch_size=1, request_id=request_id,
                     timings=StageTimings(queue=queue_us, fetch=300, combine=20, search=700, filter=40,
                                          total=total_us))


def samples_of(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples if not s.name.endswith("_created")}


def test_bulk_observation_exposes_exactly_what_observe_does() -> None:
    # _Bulk uses prometheus_client's private bucket values; an upgrade that changes them fails here.
    rng = random.Random(0)
    values = [rng.choice([0.0, 0.0005, 0.1, 5.0]) if rng.random() < 0.2 else rng.expovariate(300)
              for _ in range(500)]
    a, b = CollectorRegistry(), CollectorRegistry()
    ha = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=a)
    hb = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=b)
    for v in values:
        ha.observe(v)
    for _ in range(7):
        ha.observe(0.004)
    bulk = _Bulk(hb)
    for v in values[:250]:
        bulk.add(v)
    bulk.flush()
    assert samples_of(b)[("h_seconds_count", "")] == 250  # flushed: in the exported values
    for v in values[250:]:
        bulk.add(v)
    bulk.add(0.004, 7)
    assert samples_of(b)[("h_seconds_count", "")] == 250  # not yet
    bulk.flush()
    got, want = samples_of(b), samples_of(a)
    assert got.keys() == want.keys() and len(got) == len(LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    assert got == {k: pytest.approx(v, rel=1e-12) if k[0].endswith("_sum") else v for k, v in want.items()}


def test_a_batch_is_accounted_per_request() -> None:
    m = ServingMetrics(enabled=True)
    batch: list[RecResult | BaseException] = [
        result(total_us=1_000), result(total_us=2_500),
        result("no_session", total_us=40_000, reasons=("feature store: redis fetch timed out after 30.0 ms",)),
        result("popularity", reasons=("cold start: unknown user and no session",), version="v2"),
        result("batch"),  # mode=BATCH asked for the batch rung: no reason, not degraded
        FeatureStoreError("a failed request is counted where its RPC fails"),
    ]
    m.observe_batch(batch)
    m.observe_batch([result()])
    get = m.registry.get_sample_value
    assert m.served == 6
    assert get("twotower_request_latency_seconds_count", {"rung": "full", "variant": "control", "version": "v1"}) == 3
    assert get("twotower_request_latency_seconds_count", {"rung": "batch", "variant": "control", "version": "v1"}) == 1
    assert get("twotower_request_latency_seconds_count",
               {"rung": "popularity", "variant": "control", "version": "v2"}) == 1
    assert get("twotower_request_latency_seconds_bucket",
               {"rung": "no_session", "variant": "control", "version": "v1", "le": "0.03"}) == 0
    assert get("twotower_request_latency_seconds_bucket",
               {"rung": "no_session", "variant": "control", "version": "v1", "le": "0.05"}) == 1
    for stage in ("queue", "fetch", "combine", "search", "filter", "total"):
        assert get("twotower_stage_latency_seconds_count", {"stage": stage, "variant": "control"}) == 6, stage
    # The batch's fetch (300 µs) counts once for each of its five requests, then once more.
    fetch_sum = get("twotower_stage_latency_seconds_sum", {"stage": "fetch", "variant": "control"})
    assert fetch_sum == pytest.approx(6 * 3e-4)
    assert get("twotower_batch_size_count") == 2 and get("twotower_batch_size_sum") == 6
    assert get("twotower_degraded_responses_total", {"rung": "no_session", "reason": "feature store"}) == 1
    assert get("twotower_degraded_responses_total", {"rung": "popularity", "reason": "cold start"}) == 1
    assert get("twotower_degraded_responses_total", {"rung": "batch", "reason": ""}) is None

    m.store_failed("fetch", FeatureStoreTimeout("redis fetch timed out"))
    m.store_failed("record", FeatureStoreError("redis record failed"))
    assert get("twotower_feature_store_errors_total", {"op": "fetch", "kind": "timeout"}) == 1
    assert get("twotower_feature_store_errors_total", {"op": "record", "kind": "error"}) == 1
    m.installed("v1", "control")
    m.installed("v2", "control")
    assert get("twotower_model_info", {"version": "v1", "variant": "control"}) == 0
    assert get("twotower_model_info", {"version": "v2", "variant": "control"}) == 1


def test_a_routed_batch_keeps_each_groups_stage_times() -> None:
    # An A/B router runs a batch as groups (one version and settings each): each group's
    # fetch time counts for its own requests, under its variant.
    m = ServingMetrics(enabled=True)
    a = result()
    b = replace(result(), variant="treatment", timings=replace(result().timings, fetch=5_000))
    m.observe_batch([a, b, b])
    get = m.registry.get_sample_value
    assert get("twotower_stage_latency_seconds_sum", {"stage": "fetch", "variant": "control"}) == pytest.approx(3e-4)
    assert get("twotower_stage_latency_seconds_sum", {"stage": "fetch", "variant": "treatment"}) == pytest.approx(1e-2)
    assert get("twotower_stage_latency_seconds_count", {"stage": "search", "variant": "treatment"}) == 2
    assert get("twotower_batch_size_sum") == 3


def test_loop_health_sees_a_blocked_loop_and_each_collection() -> None:
    import asyncio
    import gc

    from online.loop_health import LoopHealth

    reg = CollectorRegistry()

    def value(name: str, **labels: str) -> float:
        return reg.get_sample_value(name, labels) or 0.0

    async def main() -> None:
        health = LoopHealth(reg, interval_s=0.001)
        health.start()
        try:
            await asyncio.sleep(0)  # the probe's first timer is armed
            before = value("twotower_gc_pause_seconds_count", generation="2")
            gc.collect(2)
            assert value("twotower_gc_pause_seconds_count", generation="2") == before + 1
            block_until = time.perf_counter() + 0.03
            while time.perf_counter() < block_until:  # the loop is busy: the probe's timer fires late
                pass
            for _ in range(1000):  # until the late timer has run (a few loop iterations)
                if value("twotower_event_loop_lag_seconds_count") >= 1:
                    break
                await asyncio.sleep(0)
            late = value("twotower_event_loop_lag_seconds_count") - value("twotower_event_loop_lag_seconds_bucket",
                                                                          le="0.02")
            assert late >= 1  # at least one sample over 20 ms: the 30 ms block
        finally:
            await health.stop()
        assert health._on_gc not in gc.callbacks

    asyncio.run(main())


def test_disabled_metrics_still_count_what_the_process_needs() -> None:
    m = ServingMetrics(enabled=False)
    m.observe_batch([result(), result("popularity", reasons=("cold start: x",))])
    assert m.served == 2
    assert m.registry.get_sample_value("twotower_request_latency_seconds_count",
                                       {"rung": "full", "variant": "control", "version": "v1"}) is None


def test_json_log_lines_carry_the_request_fields(caplog: pytest.LogCaptureFixture) -> None:
    m = ServingMetrics(enabled=True)
    with caplog.at_level(logging.WARNING, logger="twotower.serve"):
        m.observe_batch([result("no_session", reasons=("feature store: down",), request_id="req-7")] * 3)
    (record,) = caplog.records  # once per second per rung: the other two are folded into the next line
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["logger"] == "twotower.serve" and "degraded" in line["message"]
    assert (line["request_id"], line["version"], line["variant"], line["rung"]) == ("req-7", "v1", "control",
                                                                                      "no_session")
    assert line["reasons"] == ["feature store: down"] and line["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "internal error", (),
                                                sys.exc_info(), extra={"request_id": "q"})
    err = json.loads(JsonFormatter().format(rec))
    assert err["request_id"] == "q" and "ValueError: boom" in err["exc"]


@pytest.fixture(scope="module")
def registry(synth_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    reg = tmp_path_factory.mktemp("metrics-registry")
    registry_mod.publish(synth_bundle_factory(seed=11, n_items=500, n_users=50), reg)
    return reg


@pytest.fixture
def metered(registry: Path) -> Iterator[tuple[ServerThread, str]]:
    srv = ServerThread(replace(load_config(port=0), metrics_port=0), registry=registry)
    exporter = start_exporter(srv.running.service.metrics.registry, host="127.0.0.1", port=0)
    yield srv, f"http://127.0.0.1:{exporter.port}/metrics"
    exporter.close()
    srv.stop()


def test_a_server_exports_its_traffic(metered: tuple[ServerThread, str], registry: Path) -> None:
    srv, url = metered
    version = registry_mod.current_version(registry)
    before = scrape(url)
    assert total(before, "twotower_serving") == 1
    assert total(before, "twotower_model_info", version=version) == 1
    assert total(before, "twotower_model_swaps_total") == 1
    assert total(before, "twotower_request_latency_seconds_count") == 0  # warmup is not traffic
    assert total(before, "process_resident_memory_bytes") > 0
    assert total(before, "twotower_worker_resident_memory_bytes") > 0
    with RecommenderClient(srv.target, timeout=5.0) as c:
        for i in range(10):
            c.recommend(f"u{i}", k=5)
        c.recommend("nobody-knows-me", k=5)  # cold start: the popularity rung
        with pytest.raises(grpc.RpcError):
            c.recommend("u1", k=0)
    after = scrape_until(url, lambda m: total(m, "twotower_request_latency_seconds_count") >= 11)
    assert total(after, "twotower_request_latency_seconds_count", version=version) == 11
    assert total(after, "twotower_request_latency_seconds_count", rung="popularity") == 1
    assert total(after, "twotower_stage_latency_seconds_count", stage="search") == 11
    assert total(after, "twotower_batch_size_sum") == 11
    assert total(after, "twotower_degraded_responses_total", rung="popularity", reason="cold start") == 1
    assert total(after, "twotower_rpc_errors_total", code="INVALID_ARGUMENT") == 1
    assert total(after, "twotower_batcher_queue_depth") == 0 and total(after, "twotower_batches_inflight") == 0
    assert srv.running.service.requests_served == 11
    # Where slow requests wait: the loop's lag probe runs (its first sample within ~50 ms).
    lagged = scrape_until(url, lambda m: total(m, "twotower_event_loop_lag_seconds_count") >= 1)
    assert total(lagged, "twotower_event_loop_lag_seconds_count") >= 1 and "twotower_gc_pause_seconds_count" in lagged

    # A CURRENT naming a version that is not there: rejected, the old version serves on.
    (registry / "CURRENT").write_text("v20200101T000000-0000\n")
    try:
        assert srv.call(srv.running.watcher.check(force=True)) is False  # type: ignore[union-attr]
    finally:
        (registry / "CURRENT").write_text(f"{version}\n")
    swapped = scrape(url)
    assert total(swapped, "twotower_model_rejected_total") == 1
    assert total(swapped, "twotower_model_info", version=version) == 1


def test_serve_cli_exports_metrics_and_logs_json(registry: Path) -> None:
    """One process: ``--metrics-port 0`` (its port is printed) and ``--log-format json`` (every
    stderr line a JSON object; the degraded response's line names its request)."""
    proc = subprocess.Popen([*twotower_argv(), "serve", "--bundle", str(registry_mod.current_path(registry)),
                             "--port", "0", "--metrics-port", "0", "--log-format", "json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "serving V on HOST:PORT (...); metrics on http://HOST:P/metrics"
        assert "metrics on http://" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        target = line.split(" on ")[1].split(" ")[0]
        url = line.rsplit(" ", 1)[1].strip()
        with RecommenderClient(target, timeout=5.0) as c:
            r = c.recommend("nobody-knows-me", k=3, request_id="json-req-1")
        assert r.source == "popularity"
        assert total(scrape_until(url, lambda m: total(m, "twotower_request_latency_seconds_count") >= 1),
                     "twotower_request_latency_seconds_count") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in err.splitlines() if x.strip()]  # every line parses
    assert lines and all({"time", "level", "logger", "message"} <= x.keys() for x in lines)
    degraded = [x for x in lines if "degraded" in x["message"]]
    assert degraded and degraded[0]["request_id"] == "json-req-1" and degraded[0]["rung"] == "popularity"
