"""Online subcommands (serve, recommend); registered by ``towers.cli``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    del sub
