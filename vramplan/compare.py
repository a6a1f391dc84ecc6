"""Join measured records with fresh estimates: relative errors per level, fit/no-fit agreement.

Pure Python: reads records as dicts (the JSONL written by :mod:`vramplan.measure.records`) and
recomputes each case's estimate from its recorded model and setup. Never imports the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vramplan.model.estimate import Estimate, estimate
from vramplan.planner import FITS, NO, verdict
from vramplan.profiles import (SUPPORTED_MODEL_TYPES, load_gpus, load_hf_config, load_model,
                               resolve_ref)
from vramplan.model.steptime import StepWork, rates_for, step_time, step_work
from vramplan.specs import GpuSpec, ModelSpec, SpecError, TrainSpec

LEVELS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes")
#: Default tolerance of `vramplan check`: the issue's acceptance bound (5% relative, every level).
DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True, slots=True)
class Comparison:
    """One record against its estimate."""

    case_id: str
    outcome: str
    method: str
    measured: Mapping[str, int | None]
    predicted: Mapping[str, int]
    errors: Mapping[str, float]  # level -> (predicted - measured) / measured
    problems: tuple[str, ...] = field(default=())
    known_gap: str | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. "device level not measured (no NVML)"
    source: str = ""  # the results file's stem ("h200", "cpu-ci")
    device: str = "?"  # "cpu", or the GPU's name for CUDA records
    family: str = "?"  # the model's model_type
    #: measured and predicted seconds per step (CUDA records with a time calibration)
    step_s: tuple[float, float] | None = None

    @property
    def time_error(self) -> float | None:
        return None if self.step_s is None else (self.step_s[1] - self.step_s[0]) / self.step_s[0]

    @property
    def ok(self) -> bool:
        return not self.problems


#: Records timed through the memory probe (``timing.measured_s`` without ``timing.step_s``) carry
#: its sleeps: 2 × 5 ms at the end of each of the 3 phases so the NVML sampler sees the phase's
#: last state (``measure/probes.py``: ``CudaProbe.end_phase``, ``NvmlSampler`` interval 0.005 s).
PROBE_OVERHEAD_S = 3 * 2 * 0.005

#: Setup keys that records made before they existed lack, with what those harness runs did:
#: no gradient accumulation and no clipping.
LEGACY_SETUP = {"grad_accum": 1, "max_grad_norm": 0.0}


def record_train(record: Mapping[str, Any]) -> TrainSpec:
    """The setup of a recorded case (keys it predates filled in from :data:`LEGACY_SETUP`)."""
    setup = {**LEGACY_SETUP, **{k: v for k, v in record["setup"].items() if k != "device"}}
    return TrainSpec.from_dict(setup)


def record_spec(record: Mapping[str, Any], anchor: Path | None = None) -> tuple[ModelSpec,
                                                                                TrainSpec]:
    """The model and setup of a recorded case; a relative model path resolves against ``anchor``
    (the results file's folder) when it is not found here."""
    return load_model(resolve_ref(record["model"], anchor)), record_train(record)


def estimate_for(record: Mapping[str, Any], calib: Mapping[str, Any],
                 anchor: Path | None = None) -> Estimate:
    """The estimate of a recorded case (its model, setup and device)."""
    return estimate(*record_spec(record, anchor), calib, record.get("device", "cuda"))


def record_step_time(record: Mapping[str, Any]) -> tuple[float, float] | None:
    """(seconds per optimizer step, harness overhead in them) of a CUDA record: the median of its
    unprobed timed steps (``timing.step_s``), else its probed measured steps (``measured_s`` /
    steps, with :data:`PROBE_OVERHEAD_S`); None off CUDA (CPU time says nothing of a GPU) or
    when the record has no timing."""
    timing = record.get("timing") or {}
    if record.get("outcome") != "ok" or record.get("device", "cuda") != "cuda":
        return None
    if timing.get("step_s"):
        return float(timing["step_s"]), 0.0
    if timing.get("measured_s"):
        return float(timing["measured_s"]) / int(record.get("measured_steps") or 1), \
            PROBE_OVERHEAD_S
    return None


def record_work(record: Mapping[str, Any], anchor: Path | None = None) -> StepWork:
    """The step-time model's work for a recorded case."""
    return step_work(*record_spec(record, anchor))


def device_of(record: Mapping[str, Any]) -> str:
    """"cpu", or the CUDA device's name as the record's env gives it."""
    if record.get("device", "cuda") != "cuda":
        return "cpu"
    return str((record.get("env") or {}).get("device_name") or "cuda")


def unmeasured_notes(record: Mapping[str, Any]) -> tuple[str, ...]:
    """What a successful CUDA record did not measure, and why (so it is never read as agreement)."""
    measured = record.get("measured") or {}
    if record.get("outcome") != "ok" or record.get("device", "cuda") != "cuda":
        return ()
    if measured.get("device_total_bytes") is None:
        why = measured.get("device_level") or (record.get("env") or {}).get("nvml_error") \
            or "no NVML reading"
        return (f"device level not measured ({why})",)
    return ()


def compare_record(record: Mapping[str, Any], calib: Mapping[str, Any],
                   tolerance: float = DEFAULT_TOLERANCE, source: str = "",
                   anchor: Path | None = None, engine: str = "analytic",
                   trace_depth: str = "auto") -> Comparison:
    """Compare one record at every level it measured; an OOM must be predicted not to fit.
    ``engine``: "analytic", "trace" (the levels the trace gives; see :func:`compare_traced`)
    or "auto" (analytic for the families it knows, else trace)."""
    case_id = str(record.get("case_id", "?"))
    where = {"source": source, "device": device_of(record)}
    if engine != "analytic":
        try:
            name, cfg = load_hf_config(resolve_ref(str(record["model"]), anchor))
        except (SpecError, KeyError) as exc:
            return Comparison(case_id, record.get("outcome", "?"), "?", {}, {}, {},
                              (f"cannot re-estimate: {exc}",), **where)
        if engine == "trace" or cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            return compare_traced(record, name, cfg, tolerance, where, calib, trace_depth)
    try:
        est = estimate_for(record, calib, anchor)
    except (SpecError, KeyError, TypeError, AttributeError) as exc:
        return Comparison(case_id, record.get("outcome", "?"), "?", {}, {}, {},
                          (f"cannot re-estimate: {exc}",), **where)
    predicted = {lvl: getattr(est, lvl) for lvl in LEVELS}
    measured = dict.fromkeys(LEVELS)
    raw = record.get("measured") or {}
    if not isinstance(raw, Mapping):
        return Comparison(case_id, record.get("outcome", "?"), est.train.method, {}, predicted, {},
                          ("malformed record: measured is not an object",), **where)
    bad = [k for k in LEVELS if raw.get(k) is not None and
           (isinstance(raw[k], bool) or not isinstance(raw[k], (int, float)) or raw[k] < 0)]
    if bad:
        return Comparison(case_id, record.get("outcome", "?"), est.train.method, {}, predicted, {},
                          (f"malformed record: {', '.join(bad)} is not a byte count",), **where)
    measured.update({k: v for k, v in raw.items() if k in LEVELS})
    errors, problems = {}, []
    outcome = record.get("outcome", "ok")
    gpu = record_gpu(record)
    word = verdict(est, gpu, calib).word if gpu else None
    if outcome == "ok":
        for lvl in LEVELS:
            if measured.get(lvl):
                errors[lvl] = (predicted[lvl] - measured[lvl]) / measured[lvl]
                if abs(errors[lvl]) > tolerance:
                    problems.append(f"{lvl} off by {errors[lvl]:+.1%}")
        if word == NO:
            problems.append("ran, but the model predicts it does not fit")
    elif outcome == "oom":
        if word == FITS:
            problems.append("ran out of memory, but the model predicts it fits")
    else:
        problems.append(f"case failed: {str(record.get('error'))[:120]}")
    notes = unmeasured_notes(record) + ((f"verdict on this GPU: {word}",) if outcome == "oom"
                                        else ())
    return Comparison(case_id, outcome, est.train.method, measured, predicted, errors,
                      tuple(problems), record.get("known_gap"), notes,
                      family=est.model.model_type, step_s=compare_time(record, est, gpu, calib),
                      **where)


def compare_traced(record: Mapping[str, Any], name: str, cfg: Mapping[str, Any],
                   tolerance: float, where: Mapping[str, str],
                   calib: Mapping[str, Any] | None = None, depth: str = "auto") -> Comparison:
    """A record against the trace engine, counted for the record's device (CUDA or the CPU
    harness), at the levels the traced answer gives (peak allocated; reserved and device total
    for a CUDA record traced at full depth)."""
    from vramplan.trace.answer import trace_answer

    case_id = str(record.get("case_id", "?"))
    outcome = str(record.get("outcome", "?"))
    train = record_train(record)
    device = "cuda" if record.get("device", "cuda") == "cuda" else "cpu"
    try:
        answer = trace_answer(name, dict(cfg), train, device=device, depth=depth,
                              calib=dict(calib) if calib is not None else None)
    except SpecError as exc:
        return Comparison(case_id, outcome, train.method, {}, {}, {},
                          (f"cannot trace: {exc}",), family=str(cfg.get("model_type")), **where)
    predicted = {lvl: getattr(answer, lvl) for lvl in LEVELS
                 if getattr(answer, lvl) is not None}
    raw = record.get("measured") or {}
    measured = {lvl: raw.get(lvl) for lvl in LEVELS}
    errors, problems, notes = {}, [], []
    if outcome == "ok":
        for lvl, value in predicted.items():
            if measured.get(lvl):
                errors[lvl] = (value - measured[lvl]) / measured[lvl]
                if abs(errors[lvl]) > tolerance:
                    problems.append(f"{lvl} off by {errors[lvl]:+.1%} (trace engine)")
    elif outcome == "oom":
        gpu = record_gpu(record)
        held = answer.device_total_bytes or answer.peak_allocated_bytes
        if gpu is None:
            notes.append("ran out of memory on a GPU the record does not name")
        elif held > gpu.capacity_bytes:
            notes.append(f"trace: {held / 2**30:.2f} GiB does not fit {gpu.name}, as measured")
        elif answer.device_total_bytes is not None:
            problems.append("ran out of memory, but the trace predicts it fits")
        else:
            notes.append("ran out of memory; peak allocated alone fits, and the reserved and "
                         "device levels need --trace-depth full to say more")
    else:
        problems.append(f"case failed: {str(record.get('error'))[:120]}")
    return Comparison(case_id, outcome, train.method, measured, predicted, errors,
                      tuple(problems), record.get("known_gap"), tuple(notes),
                      family=str(cfg.get("model_type")), **where)


def compare_time(record: Mapping[str, Any], est: Estimate, gpu: GpuSpec | None,
                 calib: Mapping[str, Any]) -> tuple[float, float] | None:
    """(measured, predicted) seconds per step, or None when either side is missing."""
    timed = record_step_time(record)
    rates = rates_for(gpu, calib) if gpu is not None else None
    if timed is None or rates is None:
        return None
    return timed[0], step_time(step_work(est.model, est.train), rates).seconds + timed[1]


def record_gpu(record: Mapping[str, Any]) -> GpuSpec | None:
    """The GPU a CUDA record ran on: the catalog entry of the same name (its CUDA capacity),
    else one built from the record's own memory figure; None off CUDA or when unknown."""
    env = record.get("env") or {}
    if record.get("device", "cuda") != "cuda":
        return None
    name = env.get("device_name")
    match = next((g for g in load_gpus().values() if g.name == name), None)
    if match is not None:
        return match
    total = env.get("device_memory_bytes")
    # a GPU the record ran on: its features are whatever the run needed ("custom")
    return GpuSpec(key="recorded", name=str(name), memory_bytes=int(total), gpu_class="custom",
                   vendor="custom") if total else None
