"""The ``twotower`` console script: a thin argparse front over the packages'
subcommands. Each package's ``cli`` module only declares its parsers; the heavy
imports (torch, faiss, grpc) happen inside the handler that needs them, so
``twotower serve`` never loads the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from towers.errors import TwoTowerError

# Modules that contribute subcommands, imported by name so towers/ does not
# depend on offline/ or online/ (DESIGN §1).
COMMAND_MODULES = ("offline.cli", "online.cli", "online.bench", "online.admin")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors are one line (``twotower train: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_data_dir() -> str:
    return os.environ.get("TWOTOWER_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "twotower"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="twotower", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except TwoTowerError as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
