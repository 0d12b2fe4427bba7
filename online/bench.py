"""``twotower bench``: load generation and the benchmark scenarios (registered by ``towers.cli``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    del sub  # the bench subcommand is registered here once the load generator lands
