"""How tests run the ``twotower`` console script of this checkout: the entry point named in
pyproject.toml (``[project.scripts]``), run by the current interpreter from the repository
root. Not ``python -m towers.cli`` (the front moves) and not the venv's installed script (an
editable install may point at another checkout)."""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def twotower_argv() -> list[str]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["twotower"]
    module, func = spec.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def package_dirs() -> list[str]:
    """The top-level packages the wheel is built from (pyproject's setuptools ``include``
    patterns), as directories of this checkout: what an install or an image must copy."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    names = sorted({p.rstrip("*").rstrip(".") for p in patterns})
    return [n for n in names if (ROOT / n / "__init__.py").is_file()]
