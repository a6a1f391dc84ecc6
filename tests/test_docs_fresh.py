"""The committed docs are what `vramplan docs` generates now (markdown byte for byte, PNGs exist)."""

from __future__ import annotations

import pytest

from vramplan.profiles import load_calibration, load_gpus
from vramplan.report.docs import markdown_docs

STALE = "docs/{name} is stale: run `make docs` and commit the result"


def committed_records(root):
    from vramplan.measure.records import read_records

    return [r for p in sorted((root / "validation/results").glob("*.jsonl"))
            for r in read_records(p)]


def test_markdown_docs_are_fresh(root, tmp_path):
    from vramplan.report.docs import write_docs

    write_docs(tmp_path, list(load_gpus().values()), load_calibration("default"), plots=False,
               records=committed_records(root))
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


def test_seed_claims_show_the_measured_70b_qlora_beside_the_estimate(root):
    from vramplan.report.docs import seed_claims_markdown

    page = seed_claims_markdown(load_calibration("default"), records=committed_records(root))
    row = next(x for x in page.splitlines() if x.startswith("| 70B QLoRA"))
    # h200-llama2-70b-qlora-mixed-ckpt-s2048-paged8-streaming: 48888 MiB = 51.3 GB
    assert "51.3 on H200 (nearest: lora_dropout 0.0, optimizer paged_adamw_8bit)" in row
