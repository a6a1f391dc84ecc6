"""Planner tables and the `fit` / `table` commands (vramplan.report.tables)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from vramplan.cli import main
from vramplan.profiles import load_gpus, load_model
from vramplan.report.tables import memory_table, render_table
from vramplan.specs import TrainSpec

CAPTION_BITS = ("seq_len 2048", "micro-batch 1", "precision mixed", "gradient checkpointing on",
                "lora adamw_torch_fused", "qlora paged_adamw_32bit", "LoRA r=64",
                "calibration default", "GiB = 2^30", "gradient accumulation 1 micro-step(s)",
                "clipping at max_grad_norm 1")


@pytest.fixture(scope="module")
def table():
    from vramplan.profiles import load_calibration
    models = [load_model("llama-3.1-8b"), load_model("qwen2.5-7b")]
    return memory_table(models, ("full", "lora", "qlora"), TrainSpec(),
                        list(load_gpus().values()), load_calibration("default"))


def test_a_cells_gpu_is_the_one_fit_names_for_that_setup(table, search):
    """One rule for "the smallest GPU": the table's cell and `fit`'s choice agree, and it can
    run bf16 (the table's setup is bf16 autocast)."""
    from vramplan.planner import plan
    from vramplan.profiles import load_calibration

    gpus = list(load_gpus().values())
    for c in table.cells:
        p = plan(load_model(c.model), TrainSpec(method=c.method), gpus, load_calibration(),
                 search=search)
        chosen = p.choice.gpu if p.choice is not None and p.choice.fits else None
        assert c.gpu == chosen, (c.model, c.method)
        if c.gpu is not None:
            assert c.gpu.capacity_bytes >= c.device_total_bytes and c.gpu.has_bf16


def test_markdown_has_a_row_per_model_and_the_caption(table):
    out = render_table(table, "md")
    assert re.search(r"^\| model \| params \(B\) \| full \| lora \| qlora \|$", out, re.M)
    assert len([x for x in out.splitlines() if x.startswith("| llama-3.1-8b")]) == 1
    for bit in CAPTION_BITS:
        assert bit in out


def test_csv_carries_exact_bytes(table):
    text = render_table(table, "csv")
    assert text.startswith("model,params,method,device_total_bytes,")  # one header, no comment
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6
    cell = table.cell("qwen2.5-7b", "lora")
    row = next(r for r in rows if r["model"] == "qwen2.5-7b" and r["method"] == "lora")
    assert int(row["device_total_bytes"]) == cell.device_total_bytes


def test_json_and_html(table):
    data = json.loads(render_table(table, "json"))
    assert set(data) == {"caption", "settings", "rows"}
    assert data["settings"]["optimizer"]["qlora"] == "paged_adamw_32bit"
    assert all(isinstance(r["device_total_bytes"], int) for r in data["rows"])
    assert "<caption>" in render_table(table, "html")


def test_table_cli(capsys):
    assert main(["table", "--models", "llama-2-7b", "--methods", "lora,qlora", "--format",
                 "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in data["rows"]] == ["lora", "qlora"]


def test_fit_cli_text(capsys):
    assert main(["fit", "llama-2-7b", "--gpus", "rtx-4090,a100-80gb"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "llama-2-7b qlora" in first and "fits" in first
    assert re.search(r"^rtx-4090\s+23\.65\s+(fits|tight|does not fit)", out, re.M)
    assert "ESTIMATE" in out and "peak allocated" in out


def test_fit_cli_json(capsys):
    assert main(["fit", "llama-3.1-8b", "--method", "full", "--shard", "zero3", "--num-gpus", "4",
                 "--gpus", "a100-80gb,h100-80gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"answer", "setup", "gpus", "estimate"} <= set(data)
    assert data["setup"]["shard"] == "zero3" and data["setup"]["num_gpus"] == 4
    keys = {"key", "name", "memory_bytes", "capacity_bytes", "verdict", "fits", "headroom_bytes",
            "headroom_pct", "max_seq_len", "max_batch", "min_gpus", "hours_per_billion_tokens",
            "usd_per_billion_tokens"}
    for g in data["gpus"]:
        assert keys <= set(g)
        assert g["headroom_bytes"] == g["capacity_bytes"] - data["estimate"]["device_total_bytes"]
        assert g["capacity_bytes"] < g["memory_bytes"]  # CUDA's usable memory, not NVML's total


@pytest.mark.parametrize("argv", [
    ["fit", "llama-2-7b", "--gpus", "rtx-9999"],
    ["fit", "llama-2-7b", "--num-gpus", "2"],
    ["table", "--models", "llama-2-7b", "--methods", "dora"],
], ids=["unknown-gpu", "gpus-without-shard", "unknown-method"])
def test_bad_input_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err


def test_csv_round_trips_through_pandas_without_options(table):
    """pandas.read_csv reads the csv as written: one header line, exact integer bytes."""
    pd = pytest.importorskip("pandas")
    back = pd.read_csv(io.StringIO(render_table(table, "csv")))
    df = table.to_pandas()
    assert list(back.columns) == list(df.columns)
    assert back["device_total_bytes"].dtype.kind == "i"
    assert back["device_total_bytes"].tolist() == df["device_total_bytes"].tolist()
    assert back["params"].tolist() == df["params"].tolist()
    assert back["smallest_gpu_memory_bytes"].astype("Int64").tolist() == \
        df["smallest_gpu_memory_bytes"].tolist()


def test_csv_names_both_the_total_and_the_usable_memory_of_the_smallest_gpu(table):
    rows = list(csv.DictReader(io.StringIO(render_table(table, "csv"))))
    for r in rows:
        if r["smallest_gpu"]:
            assert int(r["smallest_gpu_capacity_bytes"]) < int(r["smallest_gpu_memory_bytes"])
            assert int(r["device_total_bytes"]) <= int(r["smallest_gpu_capacity_bytes"])
