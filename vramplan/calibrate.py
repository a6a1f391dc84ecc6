"""Fit the one runtime constant (and only that) from measured CUDA records.

Fitted: ``non_allocator``, the memory a CUDA process holds outside PyTorch's caching allocator
(CUDA context, module images, library handles): device total − peak reserved, both measured, so
the constant cannot absorb an error of the tensor model or of the allocator replay. Everything
else is derived and refused: calibration must not absorb a wrong formula. The reserved level has
no fitted constant: it comes from the allocator replay.
"""

from __future__ import annotations

from statistics import median
from typing import Any, Mapping, Sequence

from vramplan.specs import SpecError

FITTABLE = ("non_allocator",)
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


def fit(records: Sequence[Mapping[str, Any]], names: Sequence[str] = FITTABLE,
        base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """non_allocator = median over CUDA records of (device total − peak reserved), measured.

    The median, not the mean, so that one record with a stray process or a late NVML sample does
    not move it; the spread (max − min) is stored beside it and must stay under 256 MiB.
    """
    check_fittable(names)
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


def to_toml(data: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    """The calibration file: fitted sections replace the base's, the rest is carried over."""
    merged = {**{k: v for k, v in base.items() if k not in ("status", "fitted_on", "name")},
              **data}
    lines = ["# Fitted by `vramplan calibrate`; fitted_on lists the records used.",
             f'status = "{merged.get("status", "fitted")}"']
    for key in ("gpu", "stack", "records"):
        if key in merged:
            lines.append(f'{key} = "{merged[key]}"')
    lines.append("fitted_on = [\n" + "".join(f'  "{x}",\n' for x in merged.get("fitted_on", []))
                 + "]")
    for section in ("non_allocator", "cublas_workspace", "verdict"):
        if section in merged:
            lines.append(f"\n[{section}]")
            for k, v in merged[section].items():
                lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else repr(v)))
    return "\n".join(lines) + "\n"
