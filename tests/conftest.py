"""Shared fixtures: tiny specs, the default calibration, the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.profiles import load_calibration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def calib():
    return load_calibration("default")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def search():
    """The shipped planner search bounds (profiles/planner.toml)."""
    from vramplan.profiles import load_search

    return load_search()
