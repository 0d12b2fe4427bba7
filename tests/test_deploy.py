"""deploy/ validated offline (no Docker engine, no cluster on these machines): hadolint on
each Dockerfile, ``kubectl kustomize`` + ``kubernetes-validate`` on each overlay, the
compose file against the compose specification, and every twotower command they run
against the real CLI. ``make deploy-check`` runs this file alone."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_entry import package_dirs, twotower_argv

from online.admin_auth import check_admin_exposure
from online.config import load_config
from online.ports import check_admin_ports

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
DOCKERFILES = ["Dockerfile", "Dockerfile.train", "Dockerfile.gpu"]
SERVING_DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
KUSTOMIZATIONS = ["base", "overlays/demo", "overlays/production"]
K8S_VERSION = "1.32.0"  # the kubectl client here is 1.32; kubernetes-validate ships its schemas
REDIS_URL_EXAMPLE = "redis://redis:6379/0"


def tool(name: str) -> str:
    """A validation tool from the venv ([dev] extra) or the machine; a clear failure if absent."""
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is not installed (pip install -e '.[dev]'; kubectl comes with the machine)")


def run(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


# --- Dockerfiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    proc = run(tool("hadolint"), "--failure-threshold", "style", DEPLOY / name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    # The control: the lint above is live (an untagged base image, an unpinned pip install).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    proc = run(tool("hadolint"), "--failure-threshold", "style", bad)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout


def stages(name: str) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by build stage."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_are_multi_stage_slim_and_non_root(name: str) -> None:
    st = stages(name)
    assert len(st) >= 2, "multi-stage: build tools and caches stay in the build stage"
    final = st[-1]
    assert final[0] == "FROM python:3.11-slim"
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit(), "a numeric USER, so Kubernetes' runAsNonRoot can check it"


@pytest.mark.parametrize("name", SERVING_DOCKERFILES)
def test_serving_images_have_no_torch_and_a_grpc_healthcheck(name: str) -> None:
    runs = " ".join(i for s in stages(name) for i in s if i.startswith("RUN "))
    assert "torch" not in runs.replace("'torch'", "") and "[train]" not in runs
    assert any(i.startswith("HEALTHCHECK ") and "online.health_probe" in i for i in stages(name)[-1])


def test_train_image_installs_cpu_torch_then_the_train_extra() -> None:
    runs = " ".join(i for s in stages("Dockerfile.train") for i in s if i.startswith("RUN "))
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert runs.index("whl/cpu") < runs.index('".[train]"')


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip()
             and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    copied = {i.split()[1] for s in stages("Dockerfile") for i in s if i.startswith("COPY ") and "--from" not in i}
    copied = {c for x in copied for c in ([x] if x != "pyproject.toml" else ["pyproject.toml", "README.md"])}
    assert copied <= allowed, copied - allowed


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_copy_every_package_of_the_wheel(name: str) -> None:
    # pyproject's package list is the truth: a package the wheel needs (the CLI front, ...)
    # but the image does not copy would build an image whose `twotower` cannot start.
    copied = {i.split()[1] for s in stages(name) for i in s if i.startswith("COPY ") and "--from" not in i}
    allowed = {x.strip()[1:].rstrip("/") for x in (ROOT / ".dockerignore").read_text().splitlines()
               if x.strip().startswith("!")}
    for pkg in package_dirs():
        assert pkg in copied, f"{name} does not COPY {pkg}/"
        assert pkg in allowed, f".dockerignore keeps {pkg}/ out of the build context"


# --- Kubernetes ------------------------------------------------------------------------------

@cache
def rendered(kustomization: str) -> str:
    proc = run(tool("kubectl"), "kustomize", DEPLOY / "k8s" / kustomization)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def docs(kustomization: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered(kustomization)) if d]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomize_output_validates_against_the_kubernetes_schemas(kustomization: str, tmp_path: Path) -> None:
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered(kustomization))
    proc = run(tool("kubernetes-validate"), "--kubernetes-version", K8S_VERSION, "--strict", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and "failed" not in proc.stdout.lower()


def test_kubernetes_validate_does_flag_a_bad_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two}\n")
    proc = run(tool("kubernetes-validate"), "--kubernetes-version", K8S_VERSION, "--strict", bad)
    assert proc.returncode != 0


@pytest.mark.parametrize("overlay", ["overlays/demo", "overlays/production"])
def test_serving_deployment_is_wired(overlay: str) -> None:
    objs = docs(overlay)
    dep = one(objs, "Deployment", "twotower")
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe  # native gRPC health probes
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Selectors select the pods.
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for svc in (one(objs, "Service", "twotower"), one(objs, "Service", "twotower-headless")):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] in ("grpc", grpc_port)
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "twotower"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    # Volumes name objects that exist (the ConfigMap's name carries kustomize's hash suffix).
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == one(objs, "ConfigMap")["metadata"]["name"]
    pvc = one(objs, "PersistentVolumeClaim", vols["registry"]["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == (["ReadWriteMany"] if "production" in overlay else ["ReadWriteOnce"])
    # $(VAR) in args is expanded by the kubelet only for variables the container defines.
    env = {e["name"]: e for e in c.get("env", [])}
    for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
        assert var in env, f"args use $({var}), which the container does not define"
    # The nightly refresh: one run at a time, on the shared registry volume (writable), the
    # flags file (pinned versions keep their keys), the same Redis URL as the serving pods.
    cron = one(objs, "CronJob", "twotower-refresh")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (rc,) = job_pod["containers"]
    assert rc["image"].startswith("twotower-train") and rc["args"][0] == "refresh"
    jvols = {v["name"]: v for v in job_pod["volumes"]}
    claim = jvols["registry"]["persistentVolumeClaim"]
    assert claim["claimName"] == vols["registry"]["persistentVolumeClaim"]["claimName"] and not claim.get("readOnly")
    assert jvols["config"]["configMap"]["name"] == vols["config"]["configMap"]["name"]
    assert rc["args"][rc["args"].index("--registry") + 1] == c["args"][c["args"].index("--registry") + 1]
    jenv = {e["name"]: e for e in rc.get("env", [])}
    assert jenv["REDIS_URL"] == env["REDIS_URL"]
    for var in re.findall(r"\$\((\w+)\)", " ".join(rc["args"])):
        assert var in jenv, f"the refresh's args use $({var}), which its container does not define"


def test_demo_runs_redis_and_production_reads_its_url_from_a_secret() -> None:
    demo = docs("overlays/demo")
    sts = one(demo, "StatefulSet", "redis")
    svc = one(demo, "Service", "redis")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    demo_env = {e["name"]: e for e in one(demo, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert demo_env["REDIS_URL"]["value"].startswith("redis://redis:6379/")
    prod = docs("overlays/production")
    assert not [d for d in prod if d["kind"] in ("StatefulSet", "Secret")]
    prod_env = {e["name"]: e for e in one(prod, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert prod_env["REDIS_URL"] == {"name": "REDIS_URL",
                                     "valueFrom": {"secretKeyRef": {"name": "twotower-redis", "key": "url"}}}


@pytest.mark.parametrize("overlay", ["overlays/demo", "overlays/production"])
def test_the_configmap_is_a_valid_serve_config(overlay: str, tmp_path: Path) -> None:
    objs = docs(overlay)
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    (path := tmp_path / "serve.json").write_text(one(objs, "ConfigMap")["data"]["serve.json"])
    assert args[args.index("--config") + 1] == "/etc/twotower/serve.json"
    cfg = load_config(path, workers__workers=int(args[args.index("--workers") + 1]),
                      port=int(args[args.index("--port") + 1]))
    check_admin_ports(cfg)  # the workers' admin ports clear the serving port
    assert check_admin_exposure(cfg, environ={}) is None  # admin on loopback: no token needed
    # The A/B flags file the Deployment serves with is in the same ConfigMap and is valid.
    from towers.flags import load_flags

    assert args[args.index("--flags") + 1] == "/etc/twotower/flags.yaml"
    (flags := tmp_path / "flags.yaml").write_text(one(objs, "ConfigMap")["data"]["flags.yaml"])
    assert load_flags(flags).experiments == []


# --- Compose ---------------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_spec() -> None:
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_spec_check_does_flag_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  serve:\n    image: x\n    ports: 5\n    restart: sometimes\n")
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", bad)
    assert proc.returncode != 0


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_serves_with_redis_and_a_registry_volume() -> None:
    c = compose()
    serve = c["services"]["serve"]
    cmd = serve["command"]
    assert cmd[0] == "serve" and "--workers" in cmd
    host = cmd[cmd.index("--redis-url") + 1].split("//")[1].split(":")[0]
    assert host in c["services"], "--redis-url names the compose Redis service"
    assert serve["depends_on"]["redis"]["condition"] == "service_healthy"
    registry_vol = next(v for v in serve["volumes"] if v.split(":")[1] == cmd[cmd.index("--registry") + 1])
    assert registry_vol.split(":")[0] in c["volumes"], "the registry is a named volume"
    assert "online.health_probe" in serve["healthcheck"]["test"]


# --- The commands they run, against the real CLI ---------------------------------------------

def deploy_commands() -> list[tuple[str, list[str]]]:
    """Every twotower command line in deploy/: (where, argv without the program name)."""
    cmds: list[tuple[str, list[str]]] = []
    for name, svc in compose()["services"].items():
        if "command" in svc and svc.get("image", "").startswith("twotower"):
            cmds.append((f"compose.yaml:{name}", list(svc["command"])))
    for kustomization in KUSTOMIZATIONS:
        for d in docs(kustomization):
            pod = (d["spec"]["template"]["spec"] if d["kind"] == "Deployment" else
                   d["spec"]["jobTemplate"]["spec"]["template"]["spec"] if d["kind"] == "CronJob" else None)
            for c in (pod or {}).get("containers", []):
                if "twotower" in c["image"]:
                    cmds.append((f"k8s/{kustomization}:{c['name']}", list(c["args"])))
    for name in [*SERVING_DOCKERFILES, "Dockerfile.train"]:
        for i in stages(name)[-1]:
            if i.startswith("CMD ["):
                cmds.append((f"{name}:CMD", json.loads(i[4:])))
    # The job commands the compose comments and deploy/README.md tell an operator to run.
    for doc in (DEPLOY / "compose.yaml", DEPLOY / "README.md"):
        for line in doc.read_text().splitlines():
            if " run --rm jobs " in line:
                cmds.append((f"{doc.name}: {line.strip()[:40]}", shlex.split(line.split(" run --rm jobs ", 1)[1])))
    return [(w, [REDIS_URL_EXAMPLE if a == "$(REDIS_URL)" else a for a in argv]) for w, argv in cmds]


@cache
def subcommand_help(sub: str) -> str:
    proc = run(*twotower_argv(), sub, "--help", cwd=ROOT)
    assert proc.returncode == 0, f"`twotower {sub} --help` failed: {proc.stderr}"
    return proc.stdout


def test_every_deploy_command_parses_with_the_real_cli() -> None:
    cmds = deploy_commands()
    subs = {argv[0] for _, argv in cmds}
    assert {"serve", "synth-bundle", "publish", "refresh"} <= subs, subs  # the list is not empty or stale
    problems = []
    for where, argv in cmds:
        if argv == ["--help"]:
            continue
        helptext = subcommand_help(argv[0])
        for flag in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
            if not re.search(rf"(^|[\s\[,]){re.escape(flag)}([\s=\],]|$)", helptext, re.M):
                problems.append(f"{where}: `twotower {argv[0]}` has no flag {flag}")
        if argv[0] == "serve":  # no positionals: argparse checks every value (types, choices, exclusions)
            proc = run(*twotower_argv(), *argv, "--help", cwd=ROOT)
            if proc.returncode != 0:
                problems.append(f"{where}: {proc.stderr.strip()}")
    assert problems == []


def test_the_flag_check_catches_an_unknown_flag() -> None:
    assert "--no-such-flag" not in subcommand_help("serve")
    proc = run(*twotower_argv(), "serve", "--registry", "/r", "--workers", "two", "--help", cwd=ROOT)
    assert proc.returncode == 2 and "--workers" in proc.stderr
