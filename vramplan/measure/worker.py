"""Subprocess entry: measure one case and write its record (``python -m vramplan.measure.worker``).

Usage::

    python -m vramplan.measure.worker --case-json CASE.json --device cpu|cuda --out RECORD.json \\
        [--workdir DIR]

CASE.json is ``Case.as_dict()`` plus ``matrix``, ``command`` and ``git_commit``. The record is
written to ``--out`` (via a temporary file and a rename) and printed as the last line of stdout.
Every failure inside the case (including CUDA out-of-memory) becomes the record's outcome; the exit
status is 0 whenever a record was written.

Test hooks (environment variables holding comma lists of case ids), used by the test-suite to
check that the runner survives failing cases: ``VRAMPLAN_TEST_FAIL`` raises inside the case,
``VRAMPLAN_TEST_CRASH`` kills the process without a record, ``VRAMPLAN_TEST_HANG`` sleeps forever.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vramplan.measure.records import ROOT, new_record

MAX_ERROR_CHARS = 2000


#: Steps timed without the memory probe on CUDA (their median is the record's step time).
DEFAULT_TIMED_STEPS = 3


def resolve_model(ref: str) -> str:
    """A model ref as the worker can open it: repo-relative paths are made absolute."""
    candidate = ROOT / ref
    return str(candidate) if not Path(ref).is_absolute() and candidate.exists() else ref


def test_hooks(case_id: str) -> None:
    """Fail, crash or hang on purpose when the test-suite asks for it (see module docstring)."""
    def listed(var: str) -> bool:
        """Is this case named in the hook variable?"""
        return case_id in os.environ.get(var, "").split(",")

    if listed("VRAMPLAN_TEST_FAIL"):
        raise RuntimeError(f"test hook: case {case_id} fails on purpose")
    if listed("VRAMPLAN_TEST_CRASH"):
        os._exit(3)
    if listed("VRAMPLAN_TEST_HANG"):
        time.sleep(10**6)


def is_oom(exc: BaseException) -> bool:
    """True for a device out-of-memory error (torch.OutOfMemoryError or the message)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def build(case: dict[str, Any], cfg: dict[str, Any], train: Any, device: str, workdir: Path) -> Any:
    """The case's model via the pretrained (default) or the streaming path."""
    from vramplan.measure.build import build_model, build_quantized_streaming

    target = "cuda:0" if device == "cuda" else device
    if case.get("build", "pretrained") == "streaming":
        return build_quantized_streaming(cfg, train, target)
    return build_model(cfg, train, target, workdir)


def measure(case: dict[str, Any], device: str, workdir: Path, record: dict[str, Any],
            baseline: int) -> None:
    """Build and step the model, filling ``record`` (outcome, measured, timing)."""
    test_hooks(case["case_id"])
    from vramplan.profiles import load_hf_config
    from vramplan.specs import TrainSpec

    _, cfg = load_hf_config(resolve_model(case["model"]))
    train = TrainSpec.from_dict({**case["setup"], "optimizer": case["setup"].get("optimizer", "")})
    import torch

    from vramplan.measure.probes import CpuProbe, CudaProbe
    from vramplan.measure.steps import run_steps

    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("VRAMPLAN_CPU_THREADS", "1")))
        record["env"]["cpu_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    model = build(case, cfg, train, device, workdir)
    record["timing"]["build_s"] = round(time.perf_counter() - t0, 3)
    probe = CudaProbe(baseline, snapshot=bool(case.get("snapshot"))) if device == "cuda" \
        else CpuProbe()
    if device == "cuda":
        record["env"]["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    timed = case.get("timed_steps")
    timed = (DEFAULT_TIMED_STEPS if device == "cuda" else 0) if timed is None else int(timed)
    result = run_steps(model, train, "cuda:0" if device == "cuda" else device,
                       case["warmup_steps"], case["measured_steps"], probe, timed)
    record.update(outcome="ok", measured=result["measured"], losses=result["losses"],
                  trainable_params=result["trainable_params"])
    record["env"]["cpu_autocast_shim"] = result["cpu_autocast_shim"]
    record["timing"].update(warmup_s=result["warmup_s"], measured_s=result["measured_s"],
                            **result.get("timed", {}))


def run_case(case: dict[str, Any], device: str, workdir: Path) -> dict[str, Any]:
    """Measure one case; never raises for a failure inside the case (it becomes the outcome)."""
    record = new_record(case, case.get("matrix", ""), device, case.get("command", ""))
    record["env"]["git_commit"] = case.get("git_commit")
    record["timing"]["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    baseline, nvml_facts = 0, {}
    if device == "cuda":
        from vramplan.measure.probes import nvml_baseline

        baseline, nvml_facts = nvml_baseline()  # before this process creates a CUDA context
    try:
        measure(case, device, workdir, record, baseline)
    except Exception as exc:  # the case's outcome, not the worker's
        record.update(outcome="oom" if is_oom(exc) else "error", measured=None,
                      error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS],
                      traceback="".join(traceback.format_exception(exc))[-MAX_ERROR_CHARS:])
    record["env"].update(device_env(device, nvml_facts))
    record["timing"]["wall_s"] = round(time.perf_counter() - t0, 3)
    return record


def device_env(device: str, nvml_facts: dict[str, Any]) -> dict[str, Any]:
    """Device name, driver and CUDA version (CPU: the processor description)."""
    if device != "cuda":
        import platform

        return {"device_name": platform.processor() or platform.machine()}
    try:
        from vramplan.measure.probes import cuda_env

        return cuda_env(nvml_facts)
    except Exception as exc:  # a broken CUDA setup must not lose the record
        return {"device_env_error": f"{type(exc).__name__}: {exc}", **nvml_facts}


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the case, write and print the record."""
    p = argparse.ArgumentParser(prog="python -m vramplan.measure.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case-json", required=True, help="the case (Case.as_dict() + matrix, command)")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--out", required=True, help="where to write the record (JSON)")
    p.add_argument("--workdir", default=None, help="folder for random-weight checkpoints")
    args = p.parse_args(argv)
    case = json.loads(Path(args.case_json).read_text())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vramplan-ckpt-"))
    record = run_case(case, args.device, workdir)
    write_json_atomic(Path(args.out), record)
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
