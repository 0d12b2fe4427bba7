"""The ``twotower`` console script: a thin argparse front over the packages'
subcommands. Each package's ``cli`` module only declares its parsers; the heavy
imports (torch, faiss, grpc) happen inside the handler that needs them, so
``twotower serve`` never loads the training stack.

This package sits above ``offline`` and ``online`` (DESIGN §1): the subcommand
registry below is plain imports, so the dependency is visible to readers and tools.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import fuzz as bench_fuzz
from bench import replay as bench_replay
from bench import run as bench_run
from offline import ab_cli as offline_ab_cli
from offline import cli as offline_cli
from online import ab_cli
from online import admin as online_admin
from online import cli as online_cli
from towers.cliargs import OneLineParser
from towers.errors import TwoTowerError
from twotower import demo


def _register_ab(sub: argparse._SubParsersAction) -> None:
    offline_ab_cli.register(ab_cli.register(sub))  # online's ab group, offline's report and export


REGISTRARS = (offline_cli.register, online_cli.register, online_admin.register, _register_ab, bench_run.register,
              bench_fuzz.register, bench_replay.register, demo.register)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="twotower", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for register in REGISTRARS:
        register(sub)
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
