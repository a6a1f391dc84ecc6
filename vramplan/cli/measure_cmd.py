"""`vramplan measure`, `check`, `calibrate`: the harness side of the CLI."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """No harness subcommands yet."""
