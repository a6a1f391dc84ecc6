"""Runtime overheads of a CUDA process, from calibration data only (profiles/calibration/)."""

from __future__ import annotations

from typing import Any, Mapping

from vramplan.model.terms import ALWAYS, Term


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


def allocator_slack_term(calib: Mapping[str, Any], peak_allocated: int, device: str) -> tuple[Term, ...]:
    """Caching-allocator rounding and fragmentation: reserved − allocated = f · peak_allocated."""
    if device != "cuda":
        return ()
    f = float(calib["allocator_slack"]["fraction"])
    return (Term("overhead.allocator_slack", int(round(f * peak_allocated)),
                 f"{f} * peak_allocated", calib_ref(calib, "allocator_slack"), level="reserved"),)


def context_term(calib: Mapping[str, Any], device: str) -> tuple[Term, ...]:
    """CUDA context and module images: outside the allocator, inside nvidia-smi's figure."""
    if device != "cuda":
        return ()
    return (Term("overhead.cuda_context", int(calib["cuda_context"]["bytes"]), "calibrated constant",
                 calib_ref(calib, "cuda_context"), level="device"),)
