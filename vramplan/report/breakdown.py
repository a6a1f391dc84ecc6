"""One estimate as a readable table or as the JSON object of the CLI contract (no pandas)."""

from __future__ import annotations

import json
from typing import Any

from vramplan.model.estimate import Estimate
from vramplan.model.overhead import tensor_name
from vramplan.units import GIB


def estimate_json(e: Estimate, gpu: Any = None, calib: Any = None) -> dict[str, Any]:
    """The `vramplan estimate --json` object (bytes are exact integers)."""
    out: dict[str, Any] = {
        "model": e.model.name,
        "engine": "analytic",
        "setup": {**e.train.as_dict(), "device": e.device},
        "params": {"total": e.params_total, "trainable": e.params_trainable},
        "terms": {t.key: t.nbytes for t in e.breakdown.terms},
        "term_details": e.breakdown.as_records(),
        "phases": dict(e.phase_bytes),
        "peak_phase": e.peak_phase,
        "peak_allocated_bytes": e.peak_allocated_bytes,
        "peak_reserved_bytes": e.peak_reserved_bytes,
        "device_total_bytes": e.device_total_bytes,
        "paged_bytes": e.paged_bytes,
        "largest_temporary_bytes": e.largest_temporary_bytes,
        "allocator": allocator_json(e),
        "notes": list(e.breakdown.notes),
    }
    if gpu is not None:
        from vramplan.planner import verdict

        v = verdict(e, gpu, calib or {})
        out["gpu"] = {"key": gpu.key, "name": gpu.name, "memory_bytes": gpu.memory_bytes,
                      "capacity_bytes": gpu.capacity_bytes, "verdict": v.word,
                      "verdict_reason": v.reason, "fits": v.fits,
                      "headroom_bytes": gpu.capacity_bytes - e.device_total_bytes}
    return out


def allocator_json(e: Estimate) -> dict[str, Any] | None:
    """What the allocator replay saw in the measured step (None off CUDA)."""
    r = e.replay
    if r is None:
        return None
    return {"replay_peak_allocated_bytes": r.peak_allocated_bytes,
            "replay_peak_reserved_bytes": r.peak_reserved_bytes,
            "segments_created": r.segments,
            "new_segments_in_measured_step": [{"bytes": b, "phase": p, "tensor": tensor_name(n)}
                                              for b, (p, n) in r.new_segments],
            "expandable_segments": e.train.expandable_segments}


def render_json(e: Estimate, gpu: Any = None, calib: Any = None) -> str:
    return json.dumps(estimate_json(e, gpu, calib), indent=2)


def render_text(e: Estimate, gpu: Any = None, calib: Any = None) -> str:
    """Breakdown table (GiB, % of the peak phase), the three levels, then assumptions."""
    t = e.train
    peak_terms = e.at_peak()
    lines = [f"{e.model.name}: {t.method} ({t.precision}, seq {t.seq_len}, batch {t.batch}"
             + (f", r={t.lora_r}" if t.method != "full" else "")
             + f", {t.resolved_optimizer}, grad ckpt {'on' if t.grad_ckpt else 'off'})",
             f"params: {e.params_total:,} total, {e.params_trainable:,} trainable", "",
             f"{'term':<40} {'GiB':>9} {'%':>6}  live in"]
    total = max(e.device_total_bytes, 1)
    for x in e.breakdown.terms:
        mark = "" if x in peak_terms else " (not at peak)"
        lines.append(f"{x.key:<40} {x.nbytes / GIB:>9.3f} {100 * x.nbytes / total:>5.1f}%  "
                     f"{_phases(x)}{mark}")
    lines += ["", f"peak phase: {e.peak_phase}",
              f"peak allocated (torch max_memory_allocated): {e.peak_allocated_bytes / GIB:9.2f} GiB",
              f"peak reserved  (torch max_memory_reserved):  {e.peak_reserved_bytes / GIB:9.2f} GiB",
              f"device total   (nvidia-smi used):            {e.device_total_bytes / GIB:9.2f} GiB"]
    if e.paged_bytes:
        lines.append(f"paged optimizer states:                      {e.paged_bytes / GIB:9.2f} GiB"
                     "  (on the GPU while it has room, else in host RAM, which then needs as much "
                     "free: not in the device total)")
    if gpu is not None:
        from vramplan.planner import verdict

        v = verdict(e, gpu, calib or {})
        room = gpu.capacity_bytes - e.device_total_bytes
        lines.append(f"{gpu.name} ({gpu.capacity_bytes / GIB:.2f} GiB usable): {v.word.upper()}, "
                     f"headroom {room / GIB:+.2f} GiB ({v.reason})")
    lines += ["", "notes:"] + [f"  - {n}" for n in e.breakdown.notes]
    return "\n".join(lines)


def _phases(term: Any) -> str:
    if term.level != "allocated":
        return f"[{term.level} level]"
    if len(term.phases) >= 5:
        return "whole step"
    return ",".join(term.phases)


TOP = 6


def render_top_terms(e: Estimate, top: int = TOP) -> str:
    """The few terms that make most of the device total, the three levels, and a pointer to
    ``--breakdown`` (fit's short form)."""
    counted = sorted(e.at_peak(), key=lambda x: -x.nbytes)
    total = max(e.device_total_bytes, 1)
    lines = [f"largest terms at the peak ({e.peak_phase}):"]
    for x in counted[:top]:
        lines.append(f"  {x.key:<38} {x.nbytes / GIB:>8.2f} GiB {100 * x.nbytes / total:>5.1f}%")
    rest = sum(x.nbytes for x in counted[top:])
    lines.append(f"  {'(' + str(len(counted) - top) + ' more terms)':<38} {rest / GIB:>8.2f} GiB")
    lines += [f"peak allocated {e.peak_allocated_bytes / GIB:.2f} GiB, reserved "
              f"{e.peak_reserved_bytes / GIB:.2f} GiB, device total {e.device_total_bytes / GIB:.2f} "
              "GiB" + (f"; paged optimizer states {e.paged_bytes / GIB:.2f} GiB apart"
                       if e.paged_bytes else ""),
              "(--breakdown lists every term; `vramplan estimate` the same with its notes)"]
    return "\n".join(lines)


def render_trace_text(a) -> str:
    """A traced answer (:class:`vramplan.trace.answer.TraceAnswer`): its groups at the peak, the
    levels it has and the notes."""
    lines = [f"{a.model} ({a.model_type}) {a.setup['method']}, seq {a.setup['seq_len']}, batch "
             f"{a.setup['batch']}: engine trace, counted as on {a.device}"
             + (" (cached)" if a.cached else f" ({a.wall_s:.1f} s)"), "",
             f"{'group at the peak (' + a.peak_phase + ')':<44} {'GiB':>9}"]
    for key, nbytes in sorted(a.groups.items(), key=lambda kv: -kv[1]):
        if nbytes:
            lines.append(f"  {key:<42} {nbytes / GIB:>9.3f}")
    lines.append(f"  {'peak allocated':<42} {a.peak_allocated_bytes / GIB:>9.3f}")
    if a.peak_reserved_bytes is not None:
        lines.append(f"  {'peak reserved (allocator replay)':<42} "
                     f"{a.peak_reserved_bytes / GIB:>9.3f}")
    if a.device_total_bytes is not None:
        lines.append(f"  {'device total (nvidia-smi)':<42} {a.device_total_bytes / GIB:>9.3f}")
    lines += ["", f"params: {a.params_total:,} total, {a.params_trainable:,} trainable"]
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)
