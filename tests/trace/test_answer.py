"""The trace engine behind the CLI: `estimate --engine trace|auto`, its cache, its errors, and
`check --engine trace`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OLMO2 = ROOT / "validation/configs/trace/olmo2-tiny.json"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))


def run_json(capsys, *argv: str) -> dict:
    assert main(["estimate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_auto_uses_the_trace_engine_for_a_family_the_analytic_engine_does_not_know(capsys):
    out = run_json(capsys, str(OLMO2), "--method", "lora", "--seq-len", "256", "--lora-dropout",
                   "0")
    assert out["engine"] == "trace" and out["model_type"] == "olmo2"
    assert out["peak_allocated_bytes"] == sum(out["terms"].values())
    assert out["params"]["trainable"] > 0 and out["params"]["total"] > out["params"]["trainable"]


def test_a_shallow_model_traced_for_cuda_has_all_three_levels(capsys):
    """Traced whole: reserved from the allocator replay of its events, the device total adds the
    calibrated memory outside the allocator."""
    from vramplan.profiles import load_calibration

    out = run_json(capsys, str(OLMO2), "--method", "lora", "--seq-len", "256", "--lora-dropout",
                   "0")
    assert out["device"] == "cuda"
    assert out["peak_reserved_bytes"] >= out["peak_allocated_bytes"]
    outside = int(load_calibration()["non_allocator"]["bytes"])
    assert out["device_total_bytes"] == out["peak_reserved_bytes"] + outside


@pytest.mark.slow  # traces 8 layers whole and 2-6 layers until steady: ~17 s
def test_a_deep_model_gets_reserved_and_device_only_from_a_full_depth_trace(tmp_path, capsys):
    """Extrapolated from shallow traces: peak allocated only, and a note naming the flag."""
    ref = tmp_path / "config.json"
    ref.write_text(json.dumps({**json.loads(OLMO2.read_text()), "num_hidden_layers": 8}))
    argv = (str(ref), "--method", "lora", "--seq-len", "128", "--lora-dropout", "0")
    auto = run_json(capsys, *argv)
    full = run_json(capsys, *argv, "--trace-depth", "full")
    # the backward peak's slope settles from 4 layers on (see depth.trace_steady)
    assert auto["trace"]["traced_layers"] == [5, 6] and full["trace"]["traced_layers"] == [8]
    assert auto["peak_reserved_bytes"] is None and auto["device_total_bytes"] is None
    assert any("--trace-depth full" in n for n in auto["notes"])
    assert full["peak_reserved_bytes"] >= full["peak_allocated_bytes"]
    assert auto["peak_allocated_bytes"] == full["peak_allocated_bytes"]


def test_auto_keeps_the_analytic_engine_where_it_knows_the_family(capsys):
    assert run_json(capsys, "llama-2-7b")["engine"] == "analytic"


def test_the_engines_agree_on_a_family_both_know(capsys):
    """CUDA semantics on both sides (bf16, as the cross-check; its CPU-semantics cases are in
    test_crosscheck.py)."""
    from vramplan.model.estimate import estimate
    from vramplan.profiles import load_calibration, load_model
    from vramplan.specs import TrainSpec

    ref = str(ROOT / "validation/configs/llama-gqa-tiny.json")
    for method in ("qlora",):  # every family x method x checkpointing: test_crosscheck.py (CI)
        t = TrainSpec(method=method, seq_len=512, lora_dropout=0.0, optimizer="adamw",
                      precision="bf16")
        analytic = estimate(load_model(ref), t, load_calibration(), "cuda").peak_allocated_bytes
        argv = [ref, "--engine", "trace", "--method", method, "--seq-len", "512",
                "--lora-dropout", "0", "--optimizer", "adamw", "--precision", "bf16"]
        traced = run_json(capsys, *argv)["peak_allocated_bytes"]
        assert traced == pytest.approx(analytic, rel=0.01), method


def test_a_second_call_is_answered_from_the_cache(capsys):
    argv = (str(OLMO2), "--method", "qlora", "--seq-len", "128", "--lora-dropout", "0")
    first = run_json(capsys, *argv)
    t0 = time.perf_counter()
    second = run_json(capsys, *argv)
    assert time.perf_counter() - t0 < 0.5
    assert second["trace"]["cached"] and not first["trace"]["cached"]
    assert second["peak_allocated_bytes"] == first["peak_allocated_bytes"]


def test_a_model_type_transformers_does_not_know_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "not_a_real_arch", "hidden_size": 8}))
    assert main(["estimate", str(cfg), "--engine", "trace"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not known to transformers" in err[0]


def test_a_setup_the_libraries_refuse_is_one_line_and_exit_2(capsys):
    """peft refuses LoRA dropout on fused MoE experts (ParamWrapper): said, not a traceback."""
    moe = str(ROOT / "validation/configs/trace/qwen3_moe-tiny.json")
    assert main(["estimate", moe, "--method", "lora", "--lora-dropout", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refused this setup" in err[-1] and "lora_dropout" in err[-1]


def test_check_with_the_trace_engine_meets_the_bar_on_new_families(tmp_path, capsys):
    """Committed CPU steps of model types the analytic engine does not know, against the trace
    (3% is the issue's bar; two records here, all 69 in CI)."""
    records = [json.loads(x) for x in
               (ROOT / "validation/results/cpu-trace.jsonl").read_text().splitlines()]
    few = [{**r, "model": str(ROOT / r["model"])} for r in records
           if r["case_id"] in ("olmo2-full-bf16-s128", "qwen3_moe-qlora-mixed-ckpt-s128")]
    assert len(few) == 2
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in few))
    assert main(["check", str(path), "--engine", "trace", "--tolerance", "0.03"]) == 0


@pytest.mark.slow
def test_check_with_the_trace_engine_on_every_committed_cpu_record():
    """cpu-trace (23 model types) at 3% (cpu-ci against the trace: tests/trace/test_engine.py)."""
    assert main(["check", str(ROOT / "validation/results/cpu-trace.jsonl"), "--engine", "trace",
                 "--tolerance", "0.03"]) == 0


@pytest.mark.parametrize("name,plan", [("llama-2-70b", (2, 3)), ("deepseek-v3", (4, 5)),
                                       ("gemma-3-12b", (6, 12)), ("llama-4-scout", (4, 8)),
                                       ("gpt-oss-20b", (2, 4)), ("gemma-3-27b", None)])
def test_deep_models_are_traced_at_depths_a_whole_layer_pattern_apart(name, plan):
    """Dense prefix (DeepSeek-V3: 3 dense layers), sliding/full patterns (Gemma-3: 5+1,
    gpt-oss: 1+1), chunked/full with NoPE (Llama-4: 3+1); 62 Gemma-3 layers are not whole
    periods after the first, so that one is traced whole."""
    from vramplan.profiles import load_hf_config
    from vramplan.trace.answer import layer_plan

    assert layer_plan(load_hf_config(name)[1]) == plan


@pytest.mark.slow
def test_a_patterned_stack_extrapolates_to_its_full_depth_trace():
    """gemma3_text with its 5 sliding + 1 full pattern, 18 layers: traced at 6 and 12 layers and
    extrapolated, equal to the 18-layer trace."""
    from vramplan.specs import TrainSpec
    from vramplan.trace.answer import _trace, layer_plan
    from vramplan.trace.engine import trace_step

    cfg = {**json.loads((ROOT / "validation/configs/trace/gemma3_text-tiny.json").read_text()),
           "num_hidden_layers": 18, "sliding_window": 32}
    assert layer_plan(cfg) == (6, 12)
    t = TrainSpec(method="lora", seq_len=128, lora_r=8, lora_dropout=0.0, optimizer="adamw")
    assert _trace(cfg, t, layer_plan(cfg))["peak"] == trace_step(cfg, t).peak_allocated_bytes


def fit_json(capsys, *argv: str) -> dict:
    assert main(["fit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_and_table_refuse_what_a_trace_cannot_answer(capsys):
    for argv in (["fit", str(OLMO2), "--engine", "trace", "--shard", "zero3", "--num-gpus", "2"],
                 ["fit", str(OLMO2), "--engine", "trace", "--tokens", "1e9"],
                 ["table", "--models", str(OLMO2), "--engine", "trace", "--trace-depth",
                  "auto"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("analytic" in err[0] or "full" in err[0])


def test_fit_and_table_hold_the_traced_device_total_against_the_gpus(capsys):
    """A shallow model traced whole (one trace, then the cache): fit gives every GPU a verdict
    from the trace's device total (a card just below it never fits, one twice as large does),
    with no search, GPU count or cost; a table mixes engines and says which rows were traced."""
    argv = (str(OLMO2), "--method", "lora", "--seq-len", "256", "--lora-dropout", "0")
    traced = run_json(capsys, *argv)
    total = traced["device_total_bytes"]
    small, big = f"{(total - 2**20) / 2**20:.0f}MiB", f"{(2 * total) / 2**20:.0f}MiB"
    out = fit_json(capsys, *argv, "--gpus", f"{small},{big}")
    assert out["engine"] == "trace" and out["estimate"]["device_total_bytes"] == total
    verdicts = {g["key"]: (g["verdict"], g["device_total_bytes"]) for g in out["gpus"]}
    assert verdicts[small][0] in ("does not fit", "tight") and verdicts[small][1] == total
    assert verdicts[big] == ("fits", total)
    assert all(g["max_seq_len"] is None and g["hours_per_billion_tokens"] is None
               for g in out["gpus"])

    assert main(["table", "--models", f"llama-3.2-1b,{OLMO2}", "--methods", "lora",
                 "--seq-len", "256", "--lora-dropout", "0", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    cells = {c["model"]: c for c in table["rows"]}
    olmo = cells[traced["model"]]
    assert olmo["device_total_bytes"] == total and olmo["hours"] is None
    assert cells["llama-3.2-1b"]["hours"] is not None
    assert table["settings"]["traced_models"] == [traced["model"]]
