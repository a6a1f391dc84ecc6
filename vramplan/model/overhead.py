"""Runtime memory of a CUDA process around the tensors: the caching allocator's cache (from the
replay of the step) and the memory outside the allocator (from calibration data only)."""

from __future__ import annotations

from typing import Any, Mapping

from vramplan.model.terms import ALWAYS, Term
from vramplan.model.timeline import Replay
from vramplan.units import fmt_size


def calib_ref(calib: Mapping[str, Any], section: str) -> str:
    status = calib.get("status", "fitted")
    return f"calibration[{calib.get('name', 'default')}]#{section} ({status}): " \
           f"{calib[section].get('source', '')}"


def workspace_term(calib: Mapping[str, Any], device: str) -> tuple[Term, ...]:
    """cuBLAS workspaces: allocated through the caching allocator, so visible at every level."""
    if device != "cuda":
        return ()
    return (Term("overhead.cublas_workspace", int(calib["cublas_workspace"]["bytes"]),
                 "calibrated constant", calib_ref(calib, "cublas_workspace"), phases=ALWAYS),)


def allocator_cache_term(replay: Replay | None) -> tuple[Term, ...]:
    """Reserved − allocated: blocks the caching allocator holds free at the measured step's peak.

    bytes = replay peak reserved − replay peak allocated, both of the measured (second) step, from
    replaying build, warm-up and measured step through the rules of ``CUDACachingAllocator.cpp``
    (:mod:`vramplan.model.allocator`, :mod:`vramplan.model.timeline`). No fitted fraction.
    """
    if replay is None:
        return ()
    gap = max(0, replay.peak_reserved_bytes - replay.peak_allocated_bytes)
    return (Term("overhead.allocator_cache", gap,
                 "replay: peak reserved - peak allocated of the measured step",
                 "CUDACachingAllocator replay of build + warm-up + measured step "
                 "(model/allocator.py, model/timeline.py)", level="reserved"),)


def non_allocator_term(calib: Mapping[str, Any], device: str) -> tuple[Term, ...]:
    """CUDA context, module images and library memory outside the caching allocator: inside
    nvidia-smi's figure, never in ``memory_reserved``. A calibrated constant per GPU kind."""
    if device != "cuda":
        return ()
    return (Term("overhead.non_allocator", int(calib["non_allocator"]["bytes"]),
                 "calibrated: device total - peak reserved", calib_ref(calib, "non_allocator"),
                 level="device"),)


def segment_notes(replay: Replay | None, limit: int = 3) -> tuple[str, ...]:
    """Which requests forced new allocator segments in the measured step, largest first."""
    if replay is None or not replay.new_segments:
        return ()
    agg: dict[str, list[int]] = {}
    for size, (_, tag) in replay.new_segments:
        parts = [p for p in tensor_name(tag).split(".") if not p.isdigit()]
        key = parts[0] if parts[0] in GROUPED else ".".join(parts[:2])
        a = agg.setdefault(key, [0, 0])
        a[0] += 1
        a[1] += size
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:limit]
    parts = [f"{c} x {fmt_size(b / c)} for {DESCRIBE.get(k, k)}" for k, (c, b) in top]
    total = sum(size for size, _ in replay.new_segments)
    return (f"allocator: {len(replay.new_segments)} new segment(s), {fmt_size(total)}, in the "
            f"measured step (blocks freed in warm-up were partly taken by optimizer states and "
            f"gradients born at its end): " + ", ".join(parts),)


def tensor_name(tag: object) -> str:
    """A replay tensor's name as text: ("a", 3, "q_proj.out") -> "a.3.q_proj.out"."""
    return ".".join(str(p) for p in tag) if isinstance(tag, tuple) else str(tag)


#: Replay names reported by their first part only (per-layer or per-tensor families).
GROUPED = frozenset({"a", "x", "in_flight", "cast", "cache", "state", "lora", "w", "w32",
                     "dequant", "grad"})
#: What the replay's tensor names stand for, in notes.
DESCRIBE = {"g.lsm": "the fp32 log_softmax gradient (4·b·s·V)",
            "g.nll": "the fp32 NLL gradient (4·b·s·V)", "logits32": "the fp32 logits (4·b·s·V)",
            "log_softmax": "the fp32 log_softmax output (4·b·s·V)", "logits": "the logits",
            "g.logits": "the logits gradient", "a": "saved activations", "x": "layer inputs",
            "dequant": "a dequantised 4-bit weight", "grad": "gradients",
            "in_flight": "linear outputs in flight", "cast": "autocast weight copies",
            "cache": "autocast weight copies", "state": "optimizer states"}
