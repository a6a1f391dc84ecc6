"""Fit the runtime constants (and only those) from measured CUDA records by least squares.

Fitted: ``cuda_context`` (bytes outside the allocator) and ``allocator_slack`` (reserved −
allocated as a fraction of allocated). Everything else is derived by the analytic model and is
refused: calibration must not absorb a wrong formula.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from vramplan.compare import estimate_for
from vramplan.specs import SpecError

FITTABLE = ("cuda_context", "allocator_slack")


def check_fittable(names: Sequence[str]) -> None:
    """Refuse any constant the analytic model derives."""
    bad = [n for n in names if n not in FITTABLE]
    if bad:
        raise SpecError(f"refusing to fit {', '.join(bad)}: derived by the analytic model; only "
                        f"{', '.join(FITTABLE)} are calibrated")


def fit(records: Sequence[Mapping[str, Any]], calib: Mapping[str, Any],
        names: Sequence[str] = FITTABLE) -> dict[str, Any]:
    """Least-squares fit over records that measured reserved and device-total memory.

    allocator_slack f minimises Σ (reserved − a·(1 + f))² over the predicted allocated a:
    f = Σ a·(reserved − a) / Σ a². cuda_context c minimises Σ (device − reserved − paged − c)²:
    c = mean(device − reserved − paged), with measured reserved so the context cannot absorb
    allocator or activation errors.
    """
    check_fittable(names)
    rows = []
    for r in records:
        m = r.get("measured") or {}
        if r.get("outcome") == "ok" and m.get("peak_reserved_bytes") and m.get("device_total_bytes"):
            est = estimate_for(r, calib)
            paged = sum(t.nbytes for t in est.breakdown.terms if t.key == "optimizer.paged_states")
            rows.append((r["case_id"], est.peak_allocated_bytes, m["peak_reserved_bytes"],
                         m["device_total_bytes"], paged))
    if len(rows) < 2:
        raise SpecError(f"need at least 2 CUDA records with reserved and device-total levels, "
                        f"found {len(rows)}")
    out: dict[str, Any] = {"status": "fitted", "fitted_on": [r[0] for r in rows]}
    if "allocator_slack" in names:
        f = sum(a * (res - a) for _, a, res, _, _ in rows) / sum(a * a for _, a, _, _, _ in rows)
        out["allocator_slack"] = {"fraction": round(f, 6),
                                  "source": f"least squares over {len(rows)} records"}
    if "cuda_context" in names:
        c = sum(dev - res - pg for _, _, res, dev, pg in rows) / len(rows)
        out["cuda_context"] = {"bytes": int(round(c)),
                               "source": f"mean over {len(rows)} records of device - reserved - paged"}
    return out


def to_toml(data: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    """The calibration file: fitted sections replace the base's, the rest is carried over."""
    merged = {**{k: v for k, v in base.items() if k not in ("status", "fitted_on", "name")},
              **data}
    lines = ["# Fitted by `vramplan calibrate`; see fitted_on for the records used.",
             f'status = "{merged.get("status", "fitted")}"',
             "fitted_on = [" + ", ".join(f'"{x}"' for x in merged.get("fitted_on", [])) + "]"]
    for section in ("cuda_context", "cublas_workspace", "allocator_slack"):
        if section in merged:
            lines.append(f"\n[{section}]")
            for k, v in merged[section].items():
                lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else repr(v)))
    return "\n".join(lines) + "\n"
