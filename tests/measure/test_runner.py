"""The runner: one subprocess per case, failures recorded as outcomes, resume, progress lines."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("torch")

from vramplan.measure.records import read_records  # noqa: E402
from vramplan.measure.runner import run_matrix  # noqa: E402

MATRIX = """
name = "runner-test"
[defaults]
warmup_steps = 1
measured_steps = 1
precision = "bf16"
optimizer = "adamw"
lora_r = 4
lora_dropout = 0.0
seq_len = 32
[[case]]
id = "fails"
model = "validation/configs/llama-tiny.json"
method = "lora"
[[case]]
id = "ok"
model = "validation/configs/llama-gqa-tiny.json"
method = "qlora"
grad_ckpt = false
[[case]]
id = "crashes"
model = "validation/configs/llama-tiny.json"
method = "lora"
[[case]]
id = "no-such-model"
model = "validation/configs/does-not-exist.json"
method = "lora"
[[case]]
id = "hangs"
model = "validation/configs/llama-tiny.json"
method = "lora"
"""


@pytest.fixture
def matrix(tmp_path, monkeypatch):
    """A matrix whose cases fail, crash and hang through the worker's test hooks."""
    monkeypatch.setenv("VRAMPLAN_TEST_FAIL", "fails")
    monkeypatch.setenv("VRAMPLAN_TEST_CRASH", "crashes")
    monkeypatch.setenv("VRAMPLAN_TEST_HANG", "hangs")
    path = tmp_path / "m.toml"
    path.write_text(MATRIX)
    return path


def test_runner_keeps_going_after_failing_cases(matrix, tmp_path):
    """Failing, crashing and unknown-model cases are recorded as errors; the good case is measured."""
    out, log = tmp_path / "out.jsonl", io.StringIO()
    records = run_matrix(matrix, "cpu", out, only=["fails", "ok", "crashes", "no-such-model"],
                         progress=log)
    assert [r["case_id"] for r in records] == ["fails", "ok", "crashes", "no-such-model"]
    on_disk = {r["case_id"]: r for r in read_records(out)}
    assert on_disk.keys() == {"fails", "ok", "crashes", "no-such-model"}
    assert on_disk["fails"]["outcome"] == "error"
    assert "fails on purpose" in on_disk["fails"]["error"]
    assert on_disk["crashes"]["outcome"] == "error"
    assert "exited with status 3" in on_disk["crashes"]["error"]
    assert on_disk["no-such-model"]["outcome"] == "error"
    assert "does-not-exist.json" in on_disk["no-such-model"]["error"]
    ok = on_disk["ok"]
    assert ok["outcome"] == "ok" and ok["error"] is None and ok["device"] == "cpu"
    assert ok["matrix"] == "runner-test" and ok["model"] == "validation/configs/llama-gqa-tiny.json"
    assert ok["setup"]["method"] == "qlora" and ok["setup"]["seq_len"] == 32
    m = ok["measured"]
    assert m["peak_allocated_bytes"] > m["resident_bytes"] > 0
    assert set(m["phases"]) == {"forward", "backward", "optimizer"}
    assert m["peak_reserved_bytes"] is None and m["device_total_bytes"] is None
    for key in ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate",
                "platform", "device_name", "driver", "cuda", "git_commit", "cpu_autocast_shim"):
        assert key in ok["env"], key
    assert ok["timing"]["wall_s"] > 0 and ok["timing"]["started"]
    assert isinstance(ok["command"], str)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[1/4] fails ... error ")
    assert any(line.startswith("[2/4] ok ... ok ") and "ETA" in line for line in lines)
    # every record line is one complete JSON object
    assert all(json.loads(line) for line in out.read_text().splitlines())


@pytest.mark.slow
def test_timeout_and_resume(matrix, tmp_path):
    """A hanging case is killed at the timeout; resume skips recorded ids."""
    out = tmp_path / "out.jsonl"
    [rec] = run_matrix(matrix, "cpu", out, only="hang*", timeout=3, progress=None)
    assert rec["outcome"] == "error" and rec["error"].startswith("timeout")
    first = out.read_text()
    again = run_matrix(matrix, "cpu", out, only=["hangs", "fails"], resume=True, progress=None)
    assert [r["case_id"] for r in again] == ["fails"]  # "hangs" is already recorded
    assert out.read_text().startswith(first)
    assert run_matrix(matrix, "cpu", out, only="hangs,fails", resume=True, progress=None) == []
    # --retry-failed: the failed and timed-out cases run again; finished ones are still skipped
    retried = run_matrix(matrix, "cpu", out, only="hangs,fails", resume=True, timeout=3,
                         progress=None, retry_failed=True)
    assert sorted(r["case_id"] for r in retried) == ["fails", "hangs"]


def test_expandable_segments_reach_the_worker_through_the_alloc_conf():
    from vramplan.measure.runner import alloc_conf, worker_env

    assert alloc_conf({"expandable_segments": True}, None) == "expandable_segments:True"
    assert alloc_conf({"expandable_segments": True}, "max_split_size_mb:128") == \
        "max_split_size_mb:128,expandable_segments:True"
    assert alloc_conf({}, "garbage_collection_threshold:0.6") == "garbage_collection_threshold:0.6"
    env = worker_env("cuda", {"expandable_segments": True})
    assert env["PYTORCH_CUDA_ALLOC_CONF"].endswith("expandable_segments:True")


def test_ctrl_c_kills_the_worker_group_and_says_one_line(tmp_path, monkeypatch):
    """SIGINT during a case: the worker's process group is killed (nothing orphaned) and the
    CLI prints one line and exits 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from vramplan.measure.records import ROOT

    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    env = {**os.environ, "VRAMPLAN_TEST_HANG": "hangs"}
    proc = subprocess.Popen([sys.executable, "-m", "vramplan", "measure", str(matrix), "--device",
                             "cpu", "--out", str(tmp_path / "o.jsonl"), "--only", "hangs"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not _children(proc.pid):
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "vramplan: interrupted" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> list[int]:
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
