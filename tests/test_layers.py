"""The house's floors (DESIGN §1): towers/ at the bottom, offline/ and online/ side by side
on it, bench/ and the twotower/ front above; no import cycles; serving never imports torch."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("towers", "offline", "online", "bench", "twotower")
# What each package may import from the others (itself always).
ALLOWED = {
    "towers": set(),
    "offline": {"towers"},
    "online": {"towers"},
    "bench": {"towers", "offline", "online"},
    "twotower": {"towers", "offline", "online", "bench"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if "proto" not in p.parts}
    g: dict[str, set[str]] = {}
    for name, path in modules.items():
        # "from towers import bundle" names the module towers.bundle; "from towers.x import f" names towers.x
        g[name] = {m for m in imports_of(path) if m in modules and m != name}
    return g


def test_every_package_imports_only_the_floors_below_it() -> None:
    bad = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
           if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert bad == []


def test_there_are_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of behaviour: drop the
    # edges from a module to its own package's __init__ (they exist only to name the package).
    g = {a: {b for b in deps if not a.startswith(b + ".")} for a, deps in g.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_the_graph_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check is not vacuous: a towers module importing online is reported."""
    bad = tmp_path / "towers" / "x.py"
    bad.parent.mkdir()
    bad.write_text("from online.service import RecommendService\nimport offline.train\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of(bad) == {"online.service", "online.service.RecommendService", "offline.train"}
    finally:
        ROOT = saved


def test_twotower_serve_never_imports_torch(served_registry: Path, tmp_path: Path) -> None:
    """A real ``twotower serve`` process: after SERVING and a request, torch is not in its
    sys.modules (reported at exit) and no libtorch is mapped into it."""
    from bench.procs import free_port, wait_serving
    from online.client import RecommenderClient

    port = free_port()
    report = tmp_path / "modules.txt"
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(report)!r}, 'w').write('\\n'.join(sorted(sys.modules))))\n"
            "from twotower.cli import main\n"
            f"sys.exit(main(['serve', '--registry', {str(served_registry)!r}, '--port', '{port}']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_serving(f"127.0.0.1:{port}", 120, proc)
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as c:
            assert len(c.recommend("1", recent=["50"]).item_ids) == 10
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    wait_until(report.exists, 10, "the server's module report")
    modules = set(report.read_text().split())
    assert "online.service" in modules and "faiss" in modules  # it really served
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
    assert "offline.train" not in modules and "towers.model" not in modules


@pytest.mark.parametrize("flag", ["--bundle"])
def test_serve_one_bundle_without_a_registry(served_registry: Path, flag: str) -> None:
    from bench.procs import free_port, wait_serving
    from online.client import RecommenderClient
    from towers import registry as registry_mod

    port = free_port()
    bundle = registry_mod.current_path(served_registry)
    proc = subprocess.Popen([sys.executable, "-m", "twotower", "serve", flag, str(bundle), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", 120, proc)
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as c:
            r = c.recommend("1", k=5)
            assert len(r.item_ids) == 5 and r.model_version == registry_mod.current_version(served_registry)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "twotower", "serve", "--bundle", str(served_registry)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--bundle" in bad.stderr and "manifest.json" in bad.stderr


@pytest.mark.parametrize("package", ["towers", "offline", "online", "bench"])
def test_each_package_names_its_public_surface(package: str) -> None:
    """Every name in ``__all__`` resolves, and a name that is not exported is an error."""
    import importlib

    mod = importlib.import_module(package)
    assert mod.__all__ and all(getattr(mod, name) is not None for name in mod.__all__)
    with pytest.raises(AttributeError):
        _ = mod._not_a_public_name
