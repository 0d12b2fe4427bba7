"""Memory of A/B flags: two versions resident at once in a real ``twotower serve``.
``python -m bench.ab_resident [--out FILE]``.

Two synthetic versions (1M items, 100k users, d=64, IVF-SQ8 by default; built once and
cached under ``--workdir``) go into one registry (the first is CURRENT, the second only
installed). Three server processes, one after another:

- ``none``: no flags file: CURRENT alone;
- ``two``: a flags file whose running 50/50 experiment pins the second version, with
  ``max_resident_mb`` just above what the two need: both are resident. Load goes through
  both arms; every response must name one of the two versions, and both must appear;
- ``limited``: ``max_resident_mb`` between one version and two, started with a flags file
  that pins nothing; under load, the file is rewritten to pin the second version and the
  server told to reload: the file must be refused (the error in ``admin status``), the old
  flags must keep serving (responses from CURRENT only, no failed RPC) and the second
  version must not have been loaded (RSS stays near ``none``'s). A start with that limit
  and the pinning file must fail outright.

Reported per server: VmRSS (and its anonymous / file-backed parts and VmHWM, from
``/proc/PID/status``) after SERVING and after load, and the router's ``resident_bytes``
(the manifests' file bytes, what ``max_resident_mb`` bounds). The bundles' item and user
embeddings are memory-mapped, so RSS counts only the pages that were touched: expect it
below ``resident_bytes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, LoadRun, LoadSpec, run_load
from bench.procs import free_port, server

MB = 1 << 20
FLAGS_5050 = """experiments:
  - name: ab-resident
    salt: ab-resident-salt
    status: running
    allocation: 1.0
    variants:
      - {{name: control, weight: 0.5, version: CURRENT}}
      - {{name: treatment, weight: 0.5, version: {version}}}
"""
NO_EXPERIMENTS = "experiments: []\n"


def synth_versions(workdir: Path, *, items: int, users: int, index_type: str, n: int = 2,
                   recall_target: float = 0.9) -> list[tuple[Path, str]]:
    """``n`` synthetic bundles of the same shape (different seeds, hence versions, and item
    ids ``v<j>-...`` so a mixed response would show), built once under ``workdir``."""
    from offline.synth import make_synthetic_bundle
    from towers import bundle as bundle_mod

    out = []
    for j in range(n):
        path = workdir / f"synth-{items}x{users}-{index_type}-v{j}"
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            shutil.rmtree(path, ignore_errors=True)
            make_synthetic_bundle(path, n_items=items, n_users=users, dim=64, seed=10 + j, index_type=index_type,
                                  recall_target=recall_target, progress=False, item_prefix=f"v{j}-")
            print(f"built {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        out.append((path, str(bundle_mod.read_manifest(path)["version"])))
    return out


def fresh_registry(root: Path, versions: list[tuple[Path, str]]) -> Path:
    """A registry with the first version CURRENT and the others installed (pinnable)."""
    from towers import registry as registry_mod

    shutil.rmtree(root, ignore_errors=True)
    registry_mod.publish(versions[0][0], root)
    for path, _ in versions[1:]:
        registry_mod.install(path, root)
    return root


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of ``pid`` in MB (``/proc/PID/status``)."""
    keys = {"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb", "VmHWM": "hwm_mb"}
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[keys[name]] = round(int(rest.split()[0]) / 1024.0, 1)
    return out


def admin(target: str, action: str = "status") -> dict[str, Any]:
    """``twotower admin status|reload`` against a server's admin port, as a dict."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from online.proto import recommender_pb2 as pb
    from online.proto import recommender_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.AdminStub(ch)
        resp = (stub.Status(pb.StatusRequest(), timeout=10) if action == "status"
                else stub.Reload(pb.ReloadRequest(), timeout=300))
    d: dict[str, Any] = MessageToDict(resp, always_print_fields_with_no_presence=True,
                                      preserving_proto_field_name=True)
    return d


def start_refused(registry: Path, flags: Path, max_resident_mb: float, timeout: float = 600) -> dict[str, Any]:
    """``twotower serve --flags FLAGS --max-resident-mb N``, expected to refuse to start: its
    exit status and the last line of its stderr (the reason). Refused means it exited with
    an error naming ``max_resident_mb``; one that starts is stopped and reported as not refused."""
    cmd = [sys.executable, "-m", "twotower", "serve", "--registry", str(registry), "--port", str(free_port()),
           "--flags", str(flags), "--max-resident-mb", str(max_resident_mb)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"refused": False, "error": f"still running after {timeout} s"}
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    return {"refused": p.returncode != 0 and "max_resident_mb" in last, "exit_status": p.returncode, "error": last}


def _load_summary(res: LoadResult) -> dict[str, Any]:
    return {"requests": res.requests, "qps": round(res.qps, 1), "errors": res.errors, "versions": res.versions,
            "rungs": res.rungs, "latency_ms": {k: round(v, 2) for k, v in res.latency_ms.items()}}


def _status_fields(st: dict[str, Any]) -> dict[str, Any]:
    out = {k: st.get(k) for k in ("version", "flags_sha256", "flags_error", "flags_reloads", "flags_rejected",
                                  "resident_versions")}
    out["resident_bytes"] = int(st.get("resident_bytes") or 0)  # uint64: a string in proto JSON
    return out


def measure(workdir: Path, *, items: int, users: int, index_type: str = "sq8", load_s: float = 5.0,
            concurrency: int = 16, headroom: float = 1.05) -> dict[str, Any]:
    """The whole scenario (module docstring); returns the JSON-ready result."""
    from online.experiments import bundle_bytes

    versions = synth_versions(workdir, items=items, users=users, index_type=index_type)
    (_, v0), (_, v1) = versions
    reg = fresh_registry(workdir / "ab-resident-registry", versions)
    one = [bundle_bytes(reg / v) for v in (v0, v1)]
    need_mb = sum(one) / MB
    limit_mb = round(need_mb * headroom + 0.01, 2)
    low_mb = round(max(one) / MB * 1.5, 2)  # one version fits, two do not
    assert max(one) / MB <= low_mb < need_mb, (one, low_mb)
    pin = workdir / "ab-resident-pin.yaml"
    pin.write_text(FLAGS_5050.format(version=v1))
    user_ids = tuple(f"u{j}" for j in range(0, users, max(1, users // 5000)))
    spec_kw: dict[str, Any] = {"mode": "closed", "duration_s": load_s, "concurrency": concurrency, "processes": 1,
                               "users": user_ids, "timeout_s": 2.0, "warmup_s": 0.5}
    out: dict[str, Any] = {
        "items": items, "users": users, "index_type": index_type, "versions": [v0, v1],
        "bundle_mb": {v: round(b / MB, 1) for v, b in zip((v0, v1), one, strict=True)},
        "need_mb": round(need_mb, 1), "max_resident_mb": limit_mb, "limited_max_resident_mb": low_mb,
        "load": {"mode": "closed", "concurrency": concurrency, "seconds": load_s}}

    def serve(config: dict[str, Any]) -> Any:
        return server(reg, batch_size=64, config=config, timeout=600)

    # 1. no flags: CURRENT alone
    port = free_port()
    with serve({"admin_port": port}) as srv:
        ready = proc_memory(srv.pid)
        res = run_load(LoadSpec(target=srv.target, **spec_kw))
        out["none"] = {"time_to_serving_s": round(srv.ready_s, 1), "memory_at_serving": ready,
                       "memory_after_load": proc_memory(srv.pid), "status": _status_fields(admin(f"127.0.0.1:{port}")),
                       "load": _load_summary(res)}
    # 2. two versions resident, a running 50/50 experiment, limit just above the need
    port = free_port()
    with serve({"admin_port": port, "flags_file": str(pin), "max_resident_mb": limit_mb}) as srv:
        ready = proc_memory(srv.pid)
        st = admin(f"127.0.0.1:{port}")
        res = run_load(LoadSpec(target=srv.target, **spec_kw))
        out["two"] = {"time_to_serving_s": round(srv.ready_s, 1), "memory_at_serving": ready,
                      "memory_after_load": proc_memory(srv.pid), "status": _status_fields(st),
                      "load": _load_summary(res)}
    # 3. a limit below the need: refused at start; refused on reload while the old flags serve
    start = start_refused(reg, pin, low_mb)
    flags = workdir / "ab-resident-limited.yaml"
    flags.write_text(NO_EXPERIMENTS)
    port = free_port()
    with serve({"admin_port": port, "flags_file": str(flags), "max_resident_mb": low_mb,
                "registry_poll_s": 3600.0}) as srv:
        before = admin(f"127.0.0.1:{port}")
        mem_before = proc_memory(srv.pid)
        run = LoadRun(LoadSpec(target=srv.target, **{**spec_kw, "duration_s": max(load_s, 3.0)}))
        time.sleep(1.0)
        flags.write_text(FLAGS_5050.format(version=v1))
        t0 = time.perf_counter()
        after = admin(f"127.0.0.1:{port}", "reload")
        reload_s = time.perf_counter() - t0
        res = run.result()
        mem_after = proc_memory(srv.pid)
    refused = bool(after.get("flags_error")) and after.get("flags_sha256") == before.get("flags_sha256") \
        and int(after.get("flags_rejected", 0)) > int(before.get("flags_rejected", 0)) \
        and v1 not in after.get("resident_versions", [])
    out["limited"] = {
        "start_with_pinning_flags": start, "status_before": _status_fields(before),
        "status_after": _status_fields(after),
        "reload_s": round(reload_s, 2), "memory_before": mem_before, "memory_after": mem_after,
        "load_during_reload": _load_summary(res),
        "refused": refused,
        "old_flags_kept_serving": refused and sum(res.errors.values()) == 0 and set(res.versions) == {v0}}
    two, none = out["two"], out["none"]
    out["summary"] = {
        "rss_mb_none": none["memory_after_load"]["rss_mb"], "rss_mb_two": two["memory_after_load"]["rss_mb"],
        "rss_mb_added_by_second_version": round(two["memory_after_load"]["rss_mb"]
                                                - none["memory_after_load"]["rss_mb"], 1),
        "rss_anon_mb_none": none["memory_after_load"].get("rss_anon_mb"),
        "rss_anon_mb_two": two["memory_after_load"].get("rss_anon_mb"),
        "resident_bytes": two["status"]["resident_bytes"],
        "resident_mb": round(two["status"]["resident_bytes"] / MB, 1),
        "max_resident_mb": limit_mb,
        "both_versions_answered": set(two["load"]["versions"]) == {v0, v1},
        "errors_two": sum(two["load"]["errors"].values()),
        "limit_below_need_refused_at_start": start.get("refused"),
        "limit_below_need_refused_on_reload": refused,
        "old_flags_kept_serving": out["limited"]["old_flags_kept_serving"],
        "rss_mb_limited_after_refusal": mem_after.get("rss_mb"),
    }
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """RSS of each server (anonymous and file-backed parts) beside the router's
    ``resident_bytes`` and the configured limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("no flags", res["none"]["memory_after_load"]), ("two resident", res["two"]["memory_after_load"]),
            ("limit refused\n(after reload)", res["limited"]["memory_after"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(runs))
    anon = [m.get("rss_anon_mb", 0.0) for _, m in runs]
    ax.bar(xs, anon, label="RssAnon")
    ax.bar(xs, [m.get("rss_file_mb", 0.0) for _, m in runs], bottom=anon, label="RssFile")
    ax.axhline(res["summary"]["resident_mb"], color="k", ls="--", label="resident_bytes (two versions' manifests)")
    ax.axhline(res["max_resident_mb"], color="C3", ls=":", label="max_resident_mb (two)")
    ax.axhline(res["limited_max_resident_mb"], color="C4", ls=":", label="max_resident_mb (limited)")
    ax.set_xticks(list(xs), [n for n, _ in runs])
    ax.set(ylabel="MB", title=f"server RSS after load, {res['items']:,}-item versions ({res['index_type']})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--index", default="sq8", help="index type of both versions (towers.index.INDEX_TYPES)")
    p.add_argument("--workdir", type=Path, default=Path("runs/ab_resident"), help="bundles are built and cached here")
    p.add_argument("--load-seconds", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None, help="JSON; the PNG goes beside it")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    res = measure(a.workdir, items=a.items, users=a.users, index_type=a.index, load_s=a.load_seconds)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
        plot(res, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
