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
