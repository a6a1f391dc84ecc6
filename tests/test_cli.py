"""The CLI contract: estimate's JSON keys, errors as one line + exit 2, cold start without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vramplan.cli import main

CONTRACT_KEYS = {"model", "setup", "params", "terms", "peak_allocated_bytes",
                 "peak_reserved_bytes", "device_total_bytes", "notes"}


def test_estimate_json_has_the_contract_keys(capsys):
    assert main(["estimate", "llama-2-70b", "--method", "qlora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS <= set(out)
    assert out["params"]["total"] == 68_976_648_192
    assert out["setup"]["optimizer"] == "paged_adamw_32bit"
    assert out["setup"]["lora_r"] == 64 and out["setup"]["double_quant"] is True
    assert out["peak_allocated_bytes"] <= out["peak_reserved_bytes"] <= out["device_total_bytes"]
    assert all(isinstance(v, int) and v >= 0 for v in out["terms"].values())


def test_estimate_text_shows_three_levels_and_notes(capsys):
    assert main(["estimate", "llama-3.1-8b", "--method", "lora", "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    for label in ("peak allocated", "peak reserved", "device total", "notes:",
                  "calibrated on NVIDIA H200", "RTX 4090 (23.65 GiB usable): "):
        assert label in out


def test_estimate_accepts_a_config_path_and_folder(capsys, tmp_path, root):
    profile = json.loads((root / "profiles/models/qwen2.5-0.5b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(profile["config"]))
    assert main(["estimate", str(tmp_path), "--json"]) == 0
    assert main(["estimate", str(tmp_path / "config.json"), "--json"]) == 0


BAD = {
    "unknown profile": ["estimate", "llama-2-71b"],
    "missing file": ["estimate", "/nonexistent/config.json"],
    "rank 0": ["estimate", "llama-2-7b", "--lora-r", "0"],
    "negative seq": ["estimate", "llama-2-7b", "--seq-len", "-5"],
    "zero batch": ["estimate", "llama-2-7b", "--batch", "0"],
    "unknown optimizer": ["estimate", "llama-2-7b", "--optimizer", "adam9000"],
    "unknown lora target": ["estimate", "llama-2-7b", "--lora-targets", "foo_proj"],
    "unknown gpu": ["estimate", "llama-2-7b", "--gpu", "rtx-9999"],
    "dropout 1": ["estimate", "llama-2-7b", "--lora-dropout", "1.0"],
    "path that is not there": ["estimate", "./nope/"],
    "unknown hub id offline": ["estimate", "someone/not-a-shipped-model"],
    "shard without gpu count": ["fit", "llama-2-7b", "--shard", "zero3", "--gpus", "h200"],
    "lora target the model lacks": ["estimate", "phi-3-mini", "--lora-targets", "gate_proj"],
    "table with --method": ["table", "--models", "llama-2-7b", "--method", "full"],
    "plot to svg": ["plot", "breakdown", "llama-2-7b", "--out", "/tmp/vramplan-test.svg"],
    "plot into a missing folder": ["plot", "breakdown", "llama-2-7b", "--out", "/nope/x.png"],
    "calibration file missing": ["estimate", "llama-2-7b", "--calibration", "/nope/c.toml"],
    "grad accum 0": ["estimate", "llama-2-7b", "--grad-accum", "0"],
    "negative max grad norm": ["estimate", "llama-2-7b", "--max-grad-norm", "-1"],
    "own card without unit": ["fit", "llama-2-7b", "--gpus", "24 parsecs"],
    "unknown gpu in fit": ["fit", "llama-2-7b", "--gpus", "h300"],
    "docs into an unwritable folder": ["docs", "--out", "/proc/vramplan-docs"],
}


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_exit_2(argv, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is looked up locally, never fetched
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err


CONFIGS = {
    "malformed json": "{not json",
    "missing key": json.dumps({"model_type": "llama", "hidden_size": 64}),
    "unsupported architecture": json.dumps({"model_type": "gpt2", "hidden_size": 64}),
    "not an object": "[1, 2]",
    "zero heads": json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 0,
                              "vocab_size": 100}),
    "fractional hidden size": json.dumps({"model_type": "llama", "hidden_size": 4096.7,
                                          "intermediate_size": 128, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "vocab_size": 100}),
    "mixtral without experts": json.dumps({"model_type": "mixtral", "hidden_size": 64,
                                           "intermediate_size": 128, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "vocab_size": 100}),
    "hidden not a multiple of heads": json.dumps({"model_type": "llama", "hidden_size": 65,
                                                  "intermediate_size": 128,
                                                  "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "vocab_size": 100}),
    "negative layers": json.dumps({"model_type": "llama", "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": -2,
                                   "num_attention_heads": 4, "vocab_size": 100}),
    "vocab as text": json.dumps({"model_type": "llama", "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "vocab_size": "32k"}),
    "boolean hidden size": json.dumps({"model_type": "llama", "hidden_size": True,
                                       "intermediate_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "vocab_size": 100}),
}


@pytest.mark.parametrize("text", CONFIGS.values(), ids=CONFIGS.keys())
def test_bad_config_is_one_clear_line(text, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert main(["estimate", str(path), "--engine", "analytic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vramplan: error:")


def test_unsupported_architecture_names_the_supported_ones_and_the_trace_engine(tmp_path,
                                                                                capsys):
    path = tmp_path / "config.json"
    path.write_text(CONFIGS["unsupported architecture"])
    main(["estimate", str(path), "--engine", "analytic"])
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama" in err and "phi3" in err and "--engine trace" in err


def test_help_prints_defaults(capsys):
    with pytest.raises(SystemExit):
        from vramplan.cli import build_parser
        build_parser().parse_args(["estimate", "--help"])
    out = capsys.readouterr().out
    assert "paged_adamw_32bit" in out and "2048" in out and "examples:" in out


def test_each_command_is_built_alone_with_the_same_options_as_in_the_full_parser():
    from vramplan.cli import COMMANDS, build_parser

    def options(parser, command):
        sub = next(a for a in parser._actions if a.dest == "command").choices
        return sorted(opt for a in sub[command]._actions for opt in a.option_strings)

    full = build_parser()
    commands = next(a for a in full._actions if a.dest == "command").choices
    assert set(commands) == set(COMMANDS)
    for command in COMMANDS:
        assert options(build_parser(command), command) == options(full, command)


def test_estimate_loads_neither_the_planner_nor_the_harness():
    code = ("import sys, io, contextlib; from vramplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['estimate', 'llama-2-7b'])\n"
            "print([m for m in ('vramplan.cli.plan_cmd', 'vramplan.cli.measure_cmd', "
            "'vramplan.planner') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_profiles_lists_every_shipped_model(capsys):
    assert main(["profiles", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"llama-2-70b", "mixtral-8x7b", "gemma-2-27b", "phi-3-medium"} <= names


def test_estimate_cold_start_imports_no_heavy_library():
    code = ("import sys, time; t=time.perf_counter(); from vramplan.cli import main; "
            "import io, contextlib; buf=io.StringIO();\n"
            "with contextlib.redirect_stdout(buf): rc = main(['estimate', 'llama-2-70b', '--json'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "print(rc, heavy, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, heavy, seconds = out.stdout.rsplit(" ", 1)[0].split(" ", 1)[0], \
        out.stdout.split("[", 1)[1].split("]", 1)[0], float(out.stdout.rsplit(" ", 1)[1])
    assert rc == "0" and heavy == ""
    assert seconds < 0.3


def test_model_package_imports_with_torch_and_pandas_blocked():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['pandas'] = None; "
            "sys.modules['matplotlib'] = None; import vramplan.model.estimate, vramplan.cli")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("argv", [
    ["check", "validation/results/cpu-ci.jsonl", "--tolerance", "5"],
    ["check", "validation/results/cpu-ci.jsonl", "--tolerance", "-1"],
    ["check", "validation/results/cpu-ci.jsonl", "--by", "colour"],
    ["measure", "validation/matrices/cpu-smoke.toml", "--device", "cpu", "--out", "x.jsonl",
     "--timeout", "-1"],
    ["measure", "validation/matrices/cpu-smoke.toml", "--device", "cpu", "--out", "x.jsonl",
     "--only", "no-such-case"],
    ["calibrate", "validation/results/h200.jsonl", "--out", "x.toml", "--fit", "allocator_slack"],
    ["fit", "llama-2-7b", "--margin", "lots"],
    ["gpus", "--bogus"],
], ids=["tolerance-percent", "tolerance-negative", "by-unknown", "timeout-negative", "only-none",
        "calibrate-retired-slack", "margin-nonsense", "gpus-unknown-flag"])
def test_evidence_commands_refuse_bad_input_with_one_line_and_exit_2(root, argv, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["", "garbage\n", "[table]\nkey = 1\n"],
                         ids=["empty", "garbage", "toml"])
def test_check_fails_when_nothing_is_comparable(tmp_path, content, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text(content)
    assert main(["check", str(path)]) == 1
    assert "no comparable record" in capsys.readouterr().err


def test_version_and_gpu_list(capsys):
    assert main(["--version"]) == 0
    assert "vramplan 0.1.0" in capsys.readouterr().out
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert "h200" in out and "139.80" in out and "usable GiB" in out



def test_the_bad_input_table_covers_at_least_40_kinds():
    kinds = len(BAD) + len(CONFIGS) + 8 + 3 + 5  # + evidence commands, check files, --margin
    assert kinds >= 40


def test_check_reports_a_non_numeric_peak_instead_of_crashing(tmp_path, root, capsys):
    line = (root / "validation/results/cpu-ci.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    rec["measured"]["peak_allocated_bytes"] = "lots"
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert main(["check", str(path)]) == 1
    assert "not a byte count" in capsys.readouterr().out


def test_a_shipped_profile_answers_for_its_hub_id_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["estimate", "meta-llama/Llama-2-7b-hf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "llama-2-7b"


def test_docs_refuses_a_folder_it_did_not_generate_unless_forced(tmp_path, capsys):
    (tmp_path / "index.md").write_text("# my own docs\n")
    assert main(["docs", "--out", str(tmp_path)]) == 2
    assert "did not generate" in capsys.readouterr().err
    assert (tmp_path / "index.md").read_text() == "# my own docs\n"


def test_check_and_dry_run_work_from_another_folder(root, tmp_path, monkeypatch, capsys):
    """Relative model paths in a results file or matrix resolve against that file's checkout."""
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(root / "validation/results/cpu-ci.jsonl")]) == 0
    assert main(["measure", str(root / "validation/matrices/cpu-ci.toml"), "--device", "cpu",
                 "--dry-run"]) == 0
    assert "llama-full-bf16-s128" in capsys.readouterr().out


def test_check_output_fits_120_columns(root, capsys):
    main(["check", str(root / "validation/results/h200.jsonl"),
          str(root / "validation/results/cpu-ci.jsonl")])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120


def test_help_shows_every_default(capsys):
    import re

    for cmd, flags in ((["estimate", "--help"], ("--method", "--attn", "--lora-alpha",
                                                 "--lora-dropout")),
                       (["fit", "--help"], ("--method", "--num-gpus", "--margin")),
                       (["measure", "--help"], ("--device", "--timeout"))):
        main(cmd)
        out = capsys.readouterr().out
        for flag in flags:
            block = re.search(rf"^  {flag}[ ,].*?(?=^  -|\Z)", out, re.M | re.S).group(0)
            assert "(default" in block, (cmd, flag)


def test_an_moe_setup_peft_refuses_says_so(capsys):
    """peft 0.21 raises for LoRA dropout on fused MoE experts (all-linear): the estimate says
    the setup does not run as given (found by the trace engine, which runs peft)."""
    assert main(["estimate", "mixtral-8x7b", "--method", "lora", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("does not run as given" in n for n in notes)
    assert main(["estimate", "mixtral-8x7b", "--method", "lora", "--lora-dropout", "0",
                 "--json"]) == 0
    assert not any("does not run" in n for n in json.loads(capsys.readouterr().out)["notes"])
