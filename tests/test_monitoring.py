"""deploy/prometheus and deploy/grafana, validated offline: ``promtool`` checks the scrape
config and the rules and runs the alerts' unit tests (alerts.test.yml: each alert fires on
the series it is about and stays quiet on healthy ones); every dashboard query is valid
PromQL; every metric name they use is one the exporter exposes; compose and Kubernetes point
Prometheus at the port ``serve --metrics-port`` listens on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from monitoring import (
    DASHBOARD,
    PROMETHEUS,
    ROOT,
    alert_rules,
    dashboard,
    dashboard_exprs,
    missing_names,
    parse,
    promtool,
    used_metric_names,
)
from prometheus_client import generate_latest

from online.metrics import ServingMetrics
from online.request import RecResult, StageTimings
from towers.labels import Rung, Source

DEPLOY = ROOT / "deploy"


def run(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def test_promtool_accepts_the_compose_config_and_its_rules() -> None:
    proc = run(promtool(), "check", "config", PROMETHEUS / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "11 rules found" in proc.stdout + proc.stderr


def test_the_alerts_fire_on_what_they_are_about() -> None:
    proc = run(promtool(), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a unit test"


def test_the_alert_tests_do_fail_on_a_wrong_threshold(tmp_path: Path) -> None:
    # The control: with the p99 budget raised to 200 ms, the latency test must fail.
    for name in ("alerts.yml", "alerts.test.yml"):
        (tmp_path / name).write_text((PROMETHEUS / name).read_text().replace("> 0.09", "> 0.2"))
    proc = run(promtool(), "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert proc.returncode != 0 and "TwotowerLatencyP99OverBudget" in proc.stdout + proc.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline query parser of its own; recording rules are parsed as PromQL.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(dashboard_exprs())]}]}
    (path := tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    proc = run(promtool(), "check", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[1m])"}]}]}))
    assert run(promtool(), "check", "rules", bad).returncode != 0  # the control


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    d = dashboard()
    assert d["uid"] and d["panels"] and all(p["datasource"]["uid"] == "prometheus" for p in d["panels"])
    exprs = " ".join(dashboard_exprs())
    for needle in ("by (le, stage)", "by (le, rung)", "twotower_batch_size", "by (version)", "by (variant, version)",
                   "twotower_degraded_responses_total"):
        assert needle in exprs, needle
    # Grafana provisioning: the datasource uid the panels use, and the folder the JSON is in.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/twotower.yml").read_text())
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert (DEPLOY / mounts[prov["providers"][0]["options"]["path"]] / DASHBOARD.name).is_file()
    assert (DEPLOY / mounts["/etc/grafana/provisioning"] / "datasources").is_dir()


def test_every_queried_metric_is_exposed_by_the_exporter() -> None:
    # A single-process registry after one batch (the smoke test repeats this against the
    # multiprocess exporter of `serve --workers 2`).
    m = ServingMetrics(enabled=True)
    m.installed("v1", "control")
    m.set_serving(True)
    m.observe_batch([RecResult(item_ids=[], scores=[], version="v1", variant="control", rung=Rung.POPULARITY,
                               reasons=["cold start: x"], source=Source.POPULARITY, batch_size=1,
                               timings=StageTimings(1, 1, 1, 1, 1, 1))])
    m.rpc_failed("INVALID_ARGUMENT")
    samples = parse(generate_latest(m.registry).decode())
    assert len(used_metric_names()) >= 10
    assert missing_names(samples) == {}
    assert missing_names({}) != {}  # the control: an empty page misses them all


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_prometheus_scrapes_the_serve_metrics_port() -> None:
    c = compose()
    serve, prom = c["services"]["serve"], c["services"]["prometheus"]
    port = serve["command"][serve["command"].index("--metrics-port") + 1]
    assert port in [str(p) for p in serve["expose"]]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    mount = next(v for v in prom["volumes"] if v.startswith("./prometheus:"))
    assert config_flag.split("=", 1)[1] == mount.split(":")[1] + "/prometheus.yml"
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "twotower")
    assert job["static_configs"][0]["targets"] == [f"serve:{port}"]
    assert all('job="twotower"' in r["expr"] for r in alert_rules())  # the job name the alerts select


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep, replace), enough for prometheus-k8s.yml: None if dropped."""
    labels = dict(labels)
    for r in rules:
        value = r.get("separator", ";").join(labels.get(s, "") for s in r["source_labels"])
        m = re.fullmatch(r.get("regex", "(.*)"), value)  # Prometheus anchors its regexes
        action = r.get("action", "replace")
        if action == "keep":
            if m is None:
                return None
        elif action == "replace" and m is not None:
            labels[r["target_label"]] = m.expand(r.get("replacement", "$1").replace("$", "\\"))
    return labels


def test_kubernetes_pods_are_discovered_on_their_metrics_port() -> None:
    from test_deploy import docs, one

    cfg = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "twotower")
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    proc = run(promtool(), "check", "config", PROMETHEUS / "prometheus-k8s.yml")
    if "kubernetes_sd_configs not found" not in proc.stdout + proc.stderr:  # Debian's build omits Kubernetes SD
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for overlay in ("overlays/demo", "overlays/production"):
        dep = one(docs(overlay), "Deployment", "twotower")
        pod = dep["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
        assert c["args"][c["args"].index("--metrics-port") + 1] == str(port)
        meta = {"__address__": "10.0.0.7:50051", "__meta_kubernetes_namespace": "ns",
                "__meta_kubernetes_pod_name": "twotower-abc"}
        meta |= {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                 for k, v in pod["metadata"]["labels"].items()}
        meta |= {f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                 for k, v in pod["metadata"].get("annotations", {}).items()}
        target = relabel(meta, job["relabel_configs"])
        assert target is not None, f"{overlay}: the serving pod is not scraped"
        assert target["__address__"] == f"10.0.0.7:{port}" and target.get("__metrics_path__") == "/metrics"
        unannotated = {k: v for k, v in meta.items() if "annotation" not in k}
        assert relabel(unannotated, job["relabel_configs"]) is None  # the control: no annotation, no scrape
