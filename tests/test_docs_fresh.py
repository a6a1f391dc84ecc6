"""The committed docs are what `vramplan docs` generates now (markdown byte for byte, PNGs exist)."""

from __future__ import annotations

import pytest

from vramplan.profiles import load_calibration, load_gpus
from vramplan.report.docs import markdown_docs

STALE = "docs/{name} is stale: run `make docs` and commit the result"


def test_markdown_docs_are_fresh(root, tmp_path):
    from vramplan.report.docs import write_docs

    write_docs(tmp_path, list(load_gpus().values()), load_calibration("default"), plots=False)
    for path in sorted(tmp_path.glob("*.md")):
        committed = root / "docs" / path.name
        assert committed.is_file(), STALE.format(name=path.name)
        assert committed.read_bytes() == path.read_bytes(), STALE.format(name=path.name)


def test_generation_is_deterministic():
    gpus, calib = list(load_gpus().values()), load_calibration("default")
    assert markdown_docs(gpus, calib) == markdown_docs(gpus, calib)


@pytest.mark.parametrize("name", ["breakdown-llama-2-70b.png", "maxseq-llama-2-70b-qlora.png"])
def test_pngs_exist_and_open(root, name):
    Image = pytest.importorskip("PIL.Image")
    path = root / "docs" / name
    assert path.is_file(), STALE.format(name=name)
    with Image.open(path) as img:
        assert img.format == "PNG"
