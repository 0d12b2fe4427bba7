"""Argument helpers every package's subcommands share: the one-line error parser,
argument types that name the bad value, and the default data directory (read from
the environment here, at the edge, and passed down as a parameter)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Argument errors are one line (``twotower train: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_data_dir() -> str:
    return os.environ.get("TWOTOWER_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "twotower"))


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from e
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def existing_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {value}")
    return p
