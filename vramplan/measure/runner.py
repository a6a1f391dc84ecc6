"""Run a matrix: one worker subprocess per case, each record appended as soon as it is known.

A crash, a nonzero exit, an out-of-memory error or a timeout becomes that case's outcome and the
run goes on. With ``resume=True`` cases already recorded in the output file are skipped, so an
interrupted run can be continued with the same command.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from vramplan.measure.matrix import Case, load_matrix, select
from vramplan.measure.records import ROOT, append_record, git_commit, new_record, recorded_case_ids

DEFAULT_TIMEOUT = 600.0
TAIL_CHARS = 2000


def run_matrix(matrix_path: str | Path, device: str, out_path: str | Path, resume: bool = False,
               only: list[str] | str | None = None, timeout: float = DEFAULT_TIMEOUT,
               progress: TextIO | None = sys.stderr,
               workdir: str | Path | None = None,
               snapshot: bool = False, retry_failed: bool = False) -> list[dict[str, Any]]:
    """Measure every (selected) case of a matrix on ``device``; returns the new records.

    ``only``: case ids or fnmatch globs (list or comma string). ``timeout``: seconds per case.
    ``workdir``: where random-weight checkpoints are cached between cases (a temporary folder,
    removed at the end, unless given). ``snapshot``: CUDA only, store a summary of the caching
    allocator's segments (``torch.cuda.memory._snapshot()``) after every measured phase.
    """
    matrix = load_matrix(matrix_path)
    out_path = Path(out_path).resolve()
    cases = select(matrix.cases, only)
    done = recorded_case_ids(out_path, finished_only=retry_failed) if resume else set()
    todo = [c for c in cases if c.id not in done]
    if progress and len(todo) < len(cases):
        print(f"resume: skipping {len(cases) - len(todo)} case(s) already in {out_path}",
              file=progress)
    own_workdir = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vramplan-measure-"))
    context = {"matrix": matrix.name, "command": shlex.join(sys.argv), "git_commit": git_commit(),
               "snapshot": snapshot}
    records: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        for i, case in enumerate(todo, 1):
            if progress:
                print(f"[{i}/{len(todo)}] {case.id} ...", end=" ", file=progress, flush=True)
            record = run_case_subprocess(case, device, work, timeout, context)
            append_record(out_path, record)
            records.append(record)
            if progress:
                print(_progress_tail(record, t_start, i, len(todo)), file=progress, flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
    return records


def _progress_tail(record: dict[str, Any], t_start: float, i: int, n: int) -> str:
    """``ok 12.3 s (elapsed 1m02s, ETA 3m10s)`` for the progress line."""
    elapsed = time.monotonic() - t_start
    eta = elapsed / i * (n - i)
    wall = record["timing"].get("process_wall_s") or record["timing"].get("wall_s") or 0.0
    text = f"{record['outcome']} {wall:.1f} s (elapsed {_mmss(elapsed)}, ETA {_mmss(eta)})"
    if record["outcome"] != "ok" and record.get("error"):
        text += f"\n    {str(record['error']).splitlines()[0][:200]}"
    return text


def _mmss(seconds: float) -> str:
    """Seconds as ``1m02s``."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def alloc_conf(setup: dict[str, Any], current: str | None) -> str | None:
    """PYTORCH_CUDA_ALLOC_CONF for a case: expandable segments on when its setup asks for them
    (other settings the user exported are kept)."""
    if not setup.get("expandable_segments"):
        return current
    parts = [p for p in (current or "").split(",") if p and not p.startswith("expandable_segments")]
    return ",".join(parts + ["expandable_segments:True"])


def worker_env(device: str, setup: dict[str, Any] | None = None) -> dict[str, str]:
    """The child's environment: offline hub, one CPU thread on CPU (see below), repo importable.

    On small virtual machines OpenMP's thread synchronisation can make every op tens of times
    slower with 2 threads than with 1; memory does not depend on it, so CPU cases use
    ``VRAMPLAN_CPU_THREADS`` (default 1) threads.
    """
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if device == "cpu":
        threads = env.get("VRAMPLAN_CPU_THREADS", "1")
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, VRAMPLAN_CPU_THREADS=threads)
    conf = alloc_conf(setup or {}, env.get("PYTORCH_CUDA_ALLOC_CONF"))
    if conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
    return env


def run_case_subprocess(case: Case, device: str, workdir: Path, timeout: float,
                        context: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh worker process; a record comes back whatever happens."""
    job_dir = Path(tempfile.mkdtemp(prefix="case-", dir=workdir))
    case_json, out_json = job_dir / "case.json", job_dir / "record.json"
    payload = {**case.as_dict(), **context}
    case_json.write_text(json.dumps(payload))
    argv = [sys.executable, "-m", "vramplan.measure.worker", "--case-json", str(case_json),
            "--device", device, "--out", str(out_json), "--workdir", str(workdir)]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    code, stdout, stderr, timed_out = _run(argv, timeout, worker_env(device, payload["setup"]))
    wall = round(time.perf_counter() - t0, 3)
    try:
        record = _read_record(out_json, stdout)
        if record is None:
            record = new_record(payload, context["matrix"], device, context["command"])
            record["env"]["git_commit"] = context["git_commit"]
            record["timing"].update(started=started)
            record.update(_failure(code, stderr, timed_out, timeout))
        record["timing"]["process_wall_s"] = wall
        record["timing"]["wall_s"] = record["timing"].get("wall_s") or wall
        record["worker_command"] = shlex.join(argv[:3] + ["--device", device])
        return record
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _run(argv: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, timed out) of a child in its own process group."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return proc.returncode, stdout, stderr, True
    except KeyboardInterrupt:  # Ctrl-C: the worker and its children go too, nothing orphaned
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _read_record(out_json: Path, stdout: str) -> dict[str, Any] | None:
    """The worker's record: its output file, else the last stdout line that parses as JSON."""
    if out_json.is_file():
        try:
            return json.loads(out_json.read_text())
        except ValueError:
            pass
    for line in reversed(stdout.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) and "case_id" in obj else None
    return None


def _failure(code: int, stderr: str, timed_out: bool, timeout: float) -> dict[str, Any]:
    """Outcome and error text of a worker that left no record."""
    tail = stderr[-TAIL_CHARS:]
    if timed_out:
        error = f"timeout: case ran longer than {timeout:g} s and was killed"
    elif code < 0:
        error = f"worker killed by signal {-code} ({_signame(-code)})"
    else:
        error = f"worker exited with status {code} without a record"
    outcome = "oom" if "out of memory" in tail.lower() else "error"
    return {"outcome": outcome, "error": f"{error}; stderr tail: {tail.strip()[-800:]}".strip(),
            "traceback": tail or None}


def _signame(num: int) -> str:
    """A signal's name (SIGKILL) for error messages."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"
