"""Fit the runtime constants from measured CUDA records: the memory outside the allocator, and the
three step-time efficiencies.

Fitted: ``non_allocator``, the memory a CUDA process holds outside PyTorch's caching allocator
(CUDA context, module images, library handles): device total − peak reserved, both measured, so
the constant cannot absorb an error of the tensor model or of the allocator replay. Everything
else is derived and refused: calibration must not absorb a wrong formula. The reserved level has
no fitted constant: it comes from the allocator replay.
"""

from __future__ import annotations

from math import log
from statistics import median
from typing import Any, Mapping, Sequence

from vramplan.model.steptime import Rates, peak_tflops, step_time
from vramplan.specs import SpecError

FITTABLE = ("non_allocator", "time")
#: Replaced by the allocator replay; asking for them is an error that says so.
RETIRED = {"allocator_slack": "reserved memory now comes from the allocator replay",
           "cuda_context": "now fitted as non_allocator (device total - reserved)"}
#: A process cannot hold less than nothing outside the allocator, and a CUDA context with the
#: libraries of a training step is well under 4 GiB on every GPU (PHYSICS-REFERENCE §6.1).
PLAUSIBLE_NON_ALLOCATOR = (0, 4 << 30)
#: Records must agree on the constant: a spread wider than this says something else varied.
MAX_SPREAD = 256 << 20


def check_fittable(names: Sequence[str]) -> None:
    """Refuse any constant the analytic model derives."""
    for n in names:
        if n in RETIRED:
            raise SpecError(f"refusing to fit {n}: {RETIRED[n]}")
    bad = [n for n in names if n not in FITTABLE]
    if bad:
        raise SpecError(f"refusing to fit {', '.join(bad)}: derived by the analytic model; only "
                        f"{', '.join(FITTABLE)} is calibrated")


def fit(records: Sequence[Mapping[str, Any]], names: Sequence[str] = ("non_allocator",),
        base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The asked sections: ``non_allocator`` (with the verdict margin) and/or ``time``."""
    check_fittable(names)
    out: dict[str, Any] = {}
    if "non_allocator" in names:
        out.update(fit_non_allocator(records, base))
    if "time" in names:
        out["time"] = fit_time(records)
        out.setdefault("status", "fitted")
    return out


def fit_non_allocator(records: Sequence[Mapping[str, Any]],
                      base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """non_allocator = median over CUDA records of (device total − peak reserved), measured.

    The median, not the mean, so that one record with a stray process or a late NVML sample does
    not move it; the spread (max − min) is stored beside it and must stay under 256 MiB.
    """
    base = base or {}
    rows = []
    for r in records:
        m = r.get("measured") or {}
        if r.get("outcome") == "ok" and r.get("device", "cuda") == "cuda" \
                and m.get("peak_reserved_bytes") and m.get("device_total_bytes"):
            rows.append((r["case_id"], m["device_total_bytes"] - m["peak_reserved_bytes"], r))
    if len(rows) < 2:
        raise SpecError(f"need at least 2 CUDA records with reserved and device-total levels, "
                        f"found {len(rows)}")
    gaps = [g for _, g, _ in rows]
    value = int(median(gaps))
    lo, hi = PLAUSIBLE_NON_ALLOCATOR
    spread = max(gaps) - min(gaps)
    if not lo <= value <= hi:
        raise SpecError(f"implausible fit: non_allocator = {value / 2**20:.0f} MiB is outside "
                        f"[{lo >> 20}, {hi >> 20}] MiB; check the records")
    if spread > MAX_SPREAD:
        raise SpecError(f"records disagree: device - reserved spans {spread / 2**20:.0f} MiB "
                        f"(> {MAX_SPREAD >> 20} MiB); fit one GPU/driver/stack at a time")
    env = rows[0][2].get("env") or {}
    gpus = sorted({(r.get("env") or {}).get("device_name", "?") for _, _, r in rows})
    out = {
        "status": "fitted",
        "gpu": ", ".join(gpus),
        "stack": f"torch {env.get('torch')}, CUDA {env.get('cuda')}, driver {env.get('driver')}",
        "fitted_on": [c for c, _, _ in rows],
        "non_allocator": {
            "bytes": value,
            "source": f"median over {len(rows)} records of measured device total - peak reserved "
                      f"(min {min(gaps) / 2**20:.0f} MiB, max {max(gaps) / 2**20:.0f} MiB)"},
    }
    out["verdict"] = device_error(records, {**base, **out})
    if "non_allocator" in base:
        before = device_error(records, base)["device_error"]
        if out["verdict"]["device_error"] > before:
            raise SpecError(f"refusing the fit: on these records its worst device-level error "
                            f"({out['verdict']['device_error']:.1%}) is worse than the base "
                            f"calibration's ({before:.1%})")
    return out


def device_error(records: Sequence[Mapping[str, Any]], calib: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own largest |device-total error| over the records, with the fitted constant:
    a "fits" verdict needs at least this much headroom (rounded up to 0.1%)."""
    from math import ceil

    from vramplan.compare import compare_record

    errs = [abs(c.errors["device_total_bytes"]) for c in
            (compare_record(r, calib, tolerance=1.0) for r in records)
            if "device_total_bytes" in c.errors]
    if not errs:
        raise SpecError("no record measured the device level: cannot size the verdict margin")
    worst = ceil(max(errs) * 1000) / 1000
    return {"device_error": worst,
            "source": f"max |device total error| of `vramplan check` over {len(errs)} records "
                      f"with this calibration ({max(errs):.2%}, rounded up)"}


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[\n" + "".join(f"  {_toml_value(x)},\n" for x in v) + "]"
    return repr(v)


def to_toml(data: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    """The calibration file: fitted sections replace the base's, the rest is carried over."""
    replaced = ("status", "fitted_on", "name") if "fitted_on" in data else ("status", "name")
    merged = {**{k: v for k, v in base.items() if k not in replaced}, **data}
    lines = ["# Fitted by `vramplan calibrate`; fitted_on lists the records used.",
             f'status = "{merged.get("status", "fitted")}"']
    for key in ("gpu", "stack", "records"):
        if key in merged:
            lines.append(f'{key} = "{merged[key]}"')
    lines.append("fitted_on = [\n" + "".join(f'  "{x}",\n' for x in merged.get("fitted_on", []))
                 + "]")
    for section in ("non_allocator", "cublas_workspace", "verdict", "time"):
        if section in merged:
            lines.append(f"\n[{section}]")
            for k, v in merged[section].items():
                lines.append(f"{k} = " + _toml_value(v))
    return "\n".join(lines) + "\n"


# --- step time ----------------------------------------------------------------------------------

#: Plausible ranges of the time constants: a fraction of a datasheet peak is in (0, 1]; one host
#: operation (Python, dispatcher, launch) costs between a microsecond and a millisecond.
PLAUSIBLE_EFFICIENCY = (0.02, 1.0)
PLAUSIBLE_SECONDS_PER_OP = (1e-6, 1e-3)


def time_rows(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any, float, float, str]]:
    """(case id, StepWork, measured step seconds, harness overhead seconds, GPU name) of every
    CUDA record with a measured step time on a catalog GPU with datasheet peaks."""
    from vramplan.compare import record_gpu, record_step_time, record_work

    rows = []
    for r in records:
        timed = record_step_time(r)
        gpu = record_gpu(r)
        if timed is None or gpu is None:
            continue
        rows.append((str(r.get("case_id")), record_work(r), timed[0], timed[1], gpu))
    return rows


def _predict(consts: Sequence[float], work: Any, gpu: Any, overhead: float) -> float:
    e_mm, e_bw, t_op = consts
    rates = Rates(peak_tflops(gpu) * 1e12 * e_mm, gpu.memory_bandwidth_gbs * 1e9 * e_bw, t_op,
                  True, "fit")
    return step_time(work, rates).seconds + overhead


def _loss(consts: Sequence[float], rows: Sequence[tuple]) -> float:
    """Sum of |log(predicted / measured)|: relative errors, robust to one slow step."""
    return sum(abs(log(_predict(consts, w, g, o) / y)) for _, w, y, o, g in rows)


def _search(rows: Sequence[tuple]) -> tuple[float, float, float]:
    """Minimise :func:`_loss` over the plausible box: a coarse grid, then a coordinate search
    with multiplicative steps that halve when no move helps (deterministic, standard library)."""
    lo_e, hi_e = PLAUSIBLE_EFFICIENCY
    lo_t, hi_t = PLAUSIBLE_SECONDS_PER_OP
    grid_e = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
    grid_t = (2e-6, 5e-6, 1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4)
    best = min(((a, b, c) for a in grid_e for b in grid_e for c in grid_t),
               key=lambda p: _loss(p, rows))
    point, value = list(best), _loss(best, rows)
    bounds = ((lo_e, hi_e), (lo_e, hi_e), (lo_t, hi_t))
    step = 1.5
    while step > 1.0005:
        moved = False
        for i in range(3):
            for f in (step, 1 / step):
                trial = point[:]
                trial[i] = min(max(trial[i] * f, bounds[i][0]), bounds[i][1])
                v = _loss(trial, rows)
                if v < value - 1e-12:
                    point, value, moved = trial, v, True
        if not moved:
            step = step ** 0.5
    return point[0], point[1], point[2]


def leave_one_out(rows: Sequence[tuple]) -> list[tuple[str, float, float]]:
    """(case id, measured s, predicted s) with each record predicted by a fit on the others."""
    out = []
    for i, (case, work, y, overhead, gpu) in enumerate(rows):
        consts = _search([r for j, r in enumerate(rows) if j != i])
        out.append((case, y, _predict(consts, work, gpu, overhead)))
    return out


def fit_time(records: Sequence[Mapping[str, Any]], loo: bool = True) -> dict[str, Any]:
    """The ``[time]`` section: e_mm, e_bw and t_op of one GPU (see :mod:`vramplan.model.steptime`),
    fitted on its CUDA records' measured step times, with the leave-one-out errors beside them."""
    rows = time_rows(records)
    names = sorted({g.name for *_, g in rows})
    if len(names) > 1:
        raise SpecError(f"records from several GPUs ({', '.join(names)}): fit one GPU at a time")
    if len(rows) < 5:
        raise SpecError(f"need at least 5 CUDA records with a measured step time on a catalog GPU "
                        f"with datasheet TFLOPS and bandwidth, found {len(rows)}")
    e_mm, e_bw, t_op = _search(rows)
    errs = [abs(p - y) / y for _, y, p in leave_one_out(rows)] if loo else []
    out: dict[str, Any] = {
        "gpu": names[0], "matmul_efficiency": round(e_mm, 4),
        "bandwidth_efficiency": round(e_bw, 4), "seconds_per_op": float(f"{t_op:.4g}"),
        "source": f"fitted on the measured step times of {len(rows)} records: minimum of the sum "
                  f"of |log(predicted / measured)|",
        "fitted_on": [c for c, *_ in rows]}
    if errs:
        out["leave_one_out"] = (f"median |error| {median(errs):.1%}, max {max(errs):.1%} over "
                                f"{len(errs)} records")
    return out
