"""Measurement records: one JSON object per line, appended atomically (standard library only).

A record::

    {"case_id", "matrix", "model", "setup", "warmup_steps", "measured_steps", "device",
     "outcome": "ok" | "oom" | "error", "error": str | null,
     "measured": {"peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes",
                  "resident_bytes", "baseline_bytes", "phases": {...}} | null,
     "env": {"python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "platform",
             "device_name", "driver", "cuda", "git_commit", "cpu_autocast_shim", ...},
     "timing": {"started", "wall_s", "build_s", "warmup_s", "measured_s" (the probed steps),
                "step_s", "steps_s", "tokens_per_s", "phases_s" (``timed_steps`` unprobed steps,
                their median and phase split), ...}, "command": str}

Files are only ever appended to: a crash can at worst leave a truncated last line, which
:func:`read_records` reports and skips.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from vramplan.specs import SpecError

OUTCOMES = ("ok", "oom", "error")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
ROOT = Path(__file__).resolve().parent.parent.parent


class TruncatedRecordWarning(UserWarning):
    """A results file holds a line that is not a complete JSON record (an interrupted write)."""


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a single line: one ``os.write`` on an ``O_APPEND`` fd, then fsync.

    The file is never rewritten; an exclusive ``flock`` serialises concurrent writers. If the file ends without a newline (an earlier writer died
    mid-line) the new record starts on a fresh line so that it stays readable.
    """
    if record.get("outcome") not in OUTCOMES:
        raise SpecError(f"record {record.get('case_id')!r}: outcome must be one of {OUTCOMES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, separators=(", ", ": ")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent writers: the mid-line check and write as one
        if _ends_mid_line(fd):
            data = b"\n" + data
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it in one go; never seen otherwise
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_mid_line(fd: int) -> bool:
    """True when the file's last byte is not a newline (an interrupted write)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_records(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """All complete records of a JSONL file, in order.

    A line that is not a JSON object (a write cut short by a crash or a full disk) is skipped with
    a :class:`TruncatedRecordWarning` naming the file and line; ``strict=True`` raises SpecError.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            last = lineno == len(lines) and not text.endswith("\n")
            what = "truncated last line" if last else "malformed line"
            msg = (f"{path}:{lineno}: {what} ({len(line)} chars, not a complete JSON record; "
                   f"an interrupted write?) skipped; rerun with resume to measure that case again")
            if strict:
                raise SpecError(msg) from None
            warnings.warn(msg, TruncatedRecordWarning, stacklevel=2)
            continue
        records.append(obj)
    return records


def recorded_case_ids(path: str | Path, finished_only: bool = False) -> set[str]:
    """Ids of the cases already recorded in ``path`` (empty if the file does not exist);
    ``finished_only``: only those whose last record is a measurement or an out-of-memory, so
    that failed and timed-out cases run again (``measure --resume --retry-failed``)."""
    path = Path(path)
    if not path.is_file():
        return set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedRecordWarning)
        last = {str(r["case_id"]): r.get("outcome") for r in read_records(path) if "case_id" in r}
    return {c for c, outcome in last.items() if not finished_only or outcome in ("ok", "oom")}


def versions() -> dict[str, str | None]:
    """Installed versions of the harness stack (from package metadata; nothing is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["platform"] = platform.platform()
    return out


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's commit of the checkout (with "-dirty" when files differ), or None outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def base_env(commit: str | None = None) -> dict[str, Any]:
    """The ``env`` object with the software fingerprint; device fields are filled by the worker."""
    env: dict[str, Any] = versions()
    env.update({"device_name": None, "driver": None, "cuda": None, "git_commit": commit,
                "cpu_autocast_shim": False})
    return env


def new_record(case: dict[str, Any], matrix: str, device: str, command: str) -> dict[str, Any]:
    """A record skeleton for a case (as from ``Case.as_dict``); outcome "error" until filled in."""
    return {"case_id": case["case_id"], "matrix": matrix, "model": case["model"],
            "setup": case["setup"], "build": case.get("build", "pretrained"),
            "warmup_steps": case["warmup_steps"], "measured_steps": case["measured_steps"],
            "timed_steps": case.get("timed_steps"),
            "device": device, "outcome": "error", "error": None, "measured": None,
            "env": base_env(), "timing": {"started": None, "wall_s": None}, "command": command}
