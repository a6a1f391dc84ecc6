"""`vramplan fit`, `table`, `plot` (planner and docs): filled in by the planner work."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """No planner subcommands yet."""
