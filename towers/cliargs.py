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


REDIS_URL_ENV = "TWOTOWER_REDIS_URL"


def secret_file(value: str) -> str:
    """The first line of a file (a mounted Kubernetes Secret, say), without its newline."""
    try:
        text = Path(value).read_text().strip()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value}: unreadable ({e.strerror})") from e
    if not text:
        raise argparse.ArgumentTypeError(f"{value}: empty")
    return text


def add_redis_url(p: argparse.ArgumentParser, *, flag: str = "--redis-url",
                  required: bool, help: str) -> None:
    """``flag URL``, or ``--redis-url-file FILE``, or (for a command that needs Redis) the
    ``TWOTOWER_REDIS_URL`` environment variable: a URL with a password need not sit on a
    command line (``ps``, shell history, a manifest's args). All set ``args.redis_url``.
    Optional uses (publish, serve) read no environment: setting it must not switch them on."""
    env = (os.environ.get(REDIS_URL_ENV) or None) if required else None
    g = p.add_mutually_exclusive_group(required=required and env is None)
    g.add_argument(flag, dest="redis_url", default=env, metavar="URL",
                   help=f"{help} (or --redis-url-file" + (f", or ${REDIS_URL_ENV})" if required else ")"))
    g.add_argument("--redis-url-file", dest="redis_url", type=secret_file, default=env, metavar="FILE",
                   help=f"read {flag}'s URL from the first line of FILE")
