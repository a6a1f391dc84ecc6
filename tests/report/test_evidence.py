"""The pandas evidence layer: check --by, the notebook API, and the README's generated block."""

from __future__ import annotations

import sys

import pytest

from vramplan.cli import main

pd = pytest.importorskip("pandas")


def test_readme_evidence_block_is_fresh(root, calib):
    """The README's numbers are what `check --by source,method` computes now (run `make docs`)."""
    from vramplan.report.evidence import README_END, README_START, readme_block

    text = (root / "README.md").read_text()
    assert README_START in text and README_END in text, "README has no evidence block"
    block = text[text.index(README_START):text.index(README_END) + len(README_END)]
    assert block == readme_block(root, calib), "README evidence block is stale: run `make docs`"


def test_check_by_prints_the_same_statistics_as_the_summary(root, capsys, calib):
    from vramplan.report.evidence import compare_files, frame, summary, summary_text

    path = root / "validation/results/cpu-ci.jsonl"
    assert main(["check", str(path), "--by", "family,method"]) == 0
    out = capsys.readouterr().out
    expected = summary_text(summary(frame(compare_files([path], calib)), ("family", "method")))
    assert expected in out
    assert "llama" in expected and "qlora" in expected


def test_check_by_an_unknown_key_is_a_usage_error(root, capsys):
    assert main(["check", str(root / "validation/results/cpu-ci.jsonl"), "--by", "famly"]) == 2
    assert "choose from device, family" in capsys.readouterr().err


def test_summary_statistics_are_median_and_max_of_abs_errors(calib, root):
    import vramplan

    ev = vramplan.evidence(root / "validation/results/cpu-ci.jsonl")
    df = ev.to_pandas()
    s = ev.summary(["method"])
    for method in ("full", "lora", "qlora"):
        errs = df[(df["method"] == method) & (df["level"] == "allocated")]["error"].abs()
        row = s[(s["method"] == method) & (s["level"] == "allocated")].iloc[0]
        assert row["n"] == len(errs)
        assert row["median_abs_error"] == pytest.approx(errs.median())
        assert row["max_abs_error"] == pytest.approx(errs.max())


def test_notebook_style_table_to_pandas():
    import vramplan

    df = vramplan.table("llama-2-7b,qwen2.5-7b", methods="lora,qlora", seq_len=1024).to_pandas()
    assert len(df) == 4 and df["device_total_bytes"].dtype.kind == "i"
    cheapest = df.sort_values("device_total_bytes").iloc[0]
    assert cheapest["method"] == "qlora"
    assert "seq_len 1024" in df.attrs["caption"]


def test_import_vramplan_loads_no_pandas_until_asked():
    import subprocess

    code = ("import sys, vramplan; vramplan.table; "
            "print(sorted(m for m in ('pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_harness_extra_brings_nvml_and_report_extra_brings_pandas(root):
    """The installed metadata (what `pip install '.[harness]'` resolves) names nvidia-ml-py, and
    constraints.txt pins it, so a user's GPU box records the device level."""
    from importlib.metadata import requires

    reqs = requires("vramplan") or []
    assert any(r.startswith("nvidia-ml-py") and 'extra == "harness"' in r for r in reqs)
    assert any(r.startswith("pandas") and 'extra == "report"' in r for r in reqs)
    pins = (root / "constraints.txt").read_text().splitlines()
    assert any(p.startswith("nvidia-ml-py==") for p in pins)
    assert any(p.startswith("pandas==") for p in pins)
