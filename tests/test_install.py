"""The serving install: the base package (no extras) in a fresh virtual environment,
with its dependencies really resolved, has no torch/tqdm/matplotlib, and serves a
bundle over gRPC with ``twotower serve --workers 2``.

The venv is made with ``uv`` (a [dev] dependency): with its cache warm the install
takes a few seconds; it tries the cache alone first (``--offline``) and goes to the
package index only when something is missing. Without uv it falls back to
``python -m venv`` + pip (slower, tens of seconds). Never ``--system-site-packages``:
the point is what the base dependencies alone provide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest
from cli_entry import package_dirs

from bench.procs import free_port
from online.client import RecommenderClient
from towers import registry as registry_mod

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", *package_dirs())
TRAINING_ONLY = ("torch", "tqdm", "matplotlib")


def clean_env() -> dict[str, str]:
    """The environment without anything that would let the fresh venv see this checkout or venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def run(*cmd: str | Path, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,  # type: ignore[call-overload]
                          env=clean_env(), **kw)


def du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def make_serving_venv(src: Path, venv: Path) -> str:
    """Install ``src`` (no extras) into a new venv at ``venv``; returns how it was done."""
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if Path(uv).is_file():
        made = run(uv, "venv", "--quiet", "--python", sys.executable, venv)
        assert made.returncode == 0, made.stderr
        for mode in (["--offline"], []):  # the cache alone first; the index only when something is missing
            inst = run(uv, "pip", "install", "--quiet", *mode, "--python", venv / "bin" / "python", src)
            if inst.returncode == 0:
                return f"uv {'offline (cache)' if mode else 'online'}"
        raise AssertionError(f"uv pip install failed: {inst.stderr[-2000:]}")
    made = run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    inst = run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", src)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return "pip"


def test_base_install_serves_a_bundle_without_torch(synth_bundle_factory: Callable[..., Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "serving-venv"
    how = make_serving_venv(src, venv)
    install_s = time.monotonic() - t0
    py = venv / "bin" / "python"

    # Installed (not this checkout), and nothing of the training stack is there.
    probe = run(py, "-c", "import importlib.util as u, json, towers, online.server, online.supervisor; "
                          f"print(json.dumps({{'towers': towers.__file__, 'missing': [m for m in {TRAINING_ONLY!r} "
                          "if u.find_spec(m) is None]}))", cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout)
    assert Path(info["towers"]).is_relative_to(venv), info
    assert info["missing"] == list(TRAINING_ONLY)

    # A bundle made by this (full) interpreter, served by the fresh one.
    reg = tmp_path / "registry"
    version = registry_mod.publish(synth_bundle_factory(seed=11, n_items=500, n_users=50), reg)
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "twotower"), "serve", "--registry", str(reg), "--port", str(port),
                             "--workers", "2"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=5.0) as c:
            deadline = time.monotonic() + 120  # two workers importing + loading + warming on 2 busy cores
            status = ""
            while status != "SERVING":
                assert proc.poll() is None, f"serve exited early: {proc.communicate()[0][-3000:]}"
                assert time.monotonic() < deadline, "not SERVING after 120 s"
                try:
                    status = c.health(timeout=1.0)
                except Exception:  # not bound yet (workers bind once warm)
                    time.sleep(0.2)
            resp = c.recommend("u1", k=5, recent=["i3"])
        assert resp.model_version == version and len(resp.item_ids) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]

    serving_mb, full_mb = du_mb(venv), du_mb(Path(sys.prefix))
    with capsys.disabled():
        print(f"\n[install] {how}: install {install_s:.1f} s, whole test {time.monotonic() - t0:.1f} s; "
              f"serving venv {serving_mb:.0f} MB vs full venv {full_mb:.0f} MB ({full_mb / serving_mb:.1f}x)")
    if find_spec("torch") is not None:  # the full environment (make test): the target, >= 5x smaller
        assert full_mb / serving_mb >= 5, (serving_mb, full_mb)
