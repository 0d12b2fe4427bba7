"""Helpers for the monitoring tests: the PromQL expressions deploy/ ships (alerts, dashboard),
the metric names they use, and the sample names a /metrics page exposes."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "twotower.json"
_NAME = re.compile(r"\b(twotower_[a-z0-9_]+)")

Samples = dict[str, list[tuple[dict[str, str], float]]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (make setup installs Debian's prometheus package, which has it)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    """Every panel query, with Grafana's ``$__rate_interval`` made a plain range."""
    return [t["expr"].replace("$__rate_interval", "1m") for p in dashboard()["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def used_metric_names() -> dict[str, set[str]]:
    """Metric name → where deploy/ uses it (an alert or a dashboard panel)."""
    out: dict[str, set[str]] = {}
    for r in alert_rules():
        for name in metric_names(r["expr"]):
            out.setdefault(name, set()).add(f"alert {r['alert']}")
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            for name in metric_names(t["expr"]):
                out.setdefault(name, set()).add(f"panel {p['title']!r}")
    return out


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return parse(resp.read().decode())


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def missing_names(samples: Samples) -> dict[str, set[str]]:
    """Names deploy/ queries that the scraped page does not expose, with where they are used."""
    return {name: where for name, where in used_metric_names().items() if name not in samples}
