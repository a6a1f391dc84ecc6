"""The evidence: committed CPU results and a live CPU run both agree with the estimate at 5%."""

from __future__ import annotations

import json

from vramplan.cli import main

TOLERANCE = "0.05"  # the acceptance bound; not to be loosened to make a case pass


def test_committed_cpu_ci_results_pass_check(root, capsys):
    path = root / "validation/results/cpu-ci.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) >= 24
    assert all(r["outcome"] == "ok" and r["env"]["torch"] for r in records)
    models = {r["model"] for r in records}
    assert len(models) >= 4
    assert main(["check", str(path), "--tolerance", TOLERANCE]) == 0


def test_live_cpu_smoke_run_matches_the_estimate(root, tmp_path, capsys):
    out = tmp_path / "smoke.jsonl"
    assert main(["measure", str(root / "validation/matrices/cpu-smoke.toml"), "--device", "cpu",
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6
    assert main(["check", str(out), "--tolerance", TOLERANCE]) == 0


def test_h200_matrix_dry_run_lists_cases_with_predictions(root, capsys):
    assert main(["measure", str(root / "validation/matrices/h200.toml"), "--device", "cuda",
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("h200: 20 cases")
    assert any("70b" in line for line in lines)


def test_check_fails_on_a_drifted_record(root, tmp_path, capsys):
    line = (root / "validation/results/cpu-ci.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    rec["measured"]["peak_allocated_bytes"] = int(rec["measured"]["peak_allocated_bytes"] * 1.2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    assert main(["check", str(bad)]) == 1
