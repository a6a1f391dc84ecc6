"""Full-depth figures from two shallow traces.

A decoder stack repeats one block, so every byte figure of a step is, to first order, affine in the
number of layers L: resident weights, adapters, gradients and optimizer states grow by one layer's
worth per layer, and so do the activations a step keeps for backward. Two traces at depths
``a < b`` give the per-layer slope; the figure at depth L is ``f(a) + (L - a) * (f(b) - f(a)) /
(b - a)``. With ``b = a + 1`` the slope is an exact integer.

The extrapolation is exact when the peak's moment does not change with depth (same phase, same
place in the last or first layer); it is not for architectures whose layers differ (alternating
sliding-window layers, dense-then-MoE stacks), where ``a`` and ``b`` should span one period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramplan.specs import SpecError, TrainSpec
from vramplan.trace.engine import TraceResult, trace_step


@dataclass(frozen=True, slots=True)
class DepthExtrapolation:
    """Figures at ``target_layers`` extrapolated from traces at ``layers`` (bytes)."""

    target_layers: int
    layers: tuple[int, int]
    traces: tuple[TraceResult, TraceResult]
    peak_allocated_bytes: int
    resident_bytes: int
    phase_peaks: dict[str, int]
    per_layer_peak_bytes: int
    wall_s: float


def linear_at(a: int, fa: int, b: int, fb: int, x: int) -> int:
    """``f(x)`` on the line through ``(a, fa)`` and ``(b, fb)``, rounded to whole bytes."""
    return fa + round((x - a) * (fb - fa) / (b - a))


def trace_depth(cfg: dict[str, Any], train: TrainSpec, *, layers: tuple[int, int] = (2, 3),
                target: int | None = None, **kwargs: Any) -> DepthExtrapolation:
    """Trace ``cfg`` at two depths and extrapolate to ``target`` layers (default: the config's
    ``num_hidden_layers``). Other keyword arguments go to :func:`trace_step`."""
    a, b = layers
    if not 0 < a < b:
        raise SpecError(f"layers must be two increasing positive depths, got {layers}")
    full = int(target if target is not None else cfg.get("num_hidden_layers", 0))
    if full < 1:
        raise SpecError("no target depth: the config has no num_hidden_layers; pass target=")
    ta = trace_step(cfg, train, layers=a, **kwargs)
    tb = trace_step(cfg, train, layers=b, **kwargs)
    return extrapolate(ta, tb, full)


def trace_steady(cfg: dict[str, Any], train: TrainSpec, *, layers: tuple[int, int],
                 target: int, **kwargs: Any) -> DepthExtrapolation:
    """:func:`trace_depth` from depths where every phase peak has reached its final slope.

    A phase's peak is the largest of the live bytes at its moments, each affine in the depth; the
    moment that holds it can move deeper as layers are added (a tiny OLMo-2 LoRA step's backward
    peak grows by 5.4 MB per layer from 2 to 3 layers and by 6.6 MB from 4 on), and a line through
    two depths before that under-counts. So a third depth one period further is traced; while its
    slope differs from the previous one, the pair moves one period deeper (at most to ``target``,
    where the trace is the answer)."""
    a, b = layers
    period = b - a
    kwargs.setdefault("light_warmup", True)  # extrapolated: peak allocated only, no reserved
    ta = trace_step(cfg, train, layers=a, **kwargs)
    tb = trace_step(cfg, train, layers=b, **kwargs)
    while b + period <= target:
        tc = trace_step(cfg, train, layers=b + period, **kwargs)
        if same_slopes(ta, tb, tc):
            return extrapolate(tb, tc, target)
        ta, tb, b = tb, tc, b + period
    return extrapolate(ta, tb, target)


def same_slopes(ta: TraceResult, tb: TraceResult, tc: TraceResult) -> bool:
    """Whether every phase peak grows by the same bytes from ``ta`` to ``tb`` as from ``tb`` to
    ``tc`` (three depths one period apart)."""
    return all(tb.phase_peaks[p] - ta.phase_peaks[p] == tc.phase_peaks[p] - tb.phase_peaks[p]
               for p in tc.phase_peaks if p in ta.phase_peaks and p in tb.phase_peaks)


def extrapolate(ta: TraceResult, tb: TraceResult, full: int) -> DepthExtrapolation:
    """Figures at ``full`` layers on the lines through two traces (see the module docstring)."""
    a, b = ta.num_layers, tb.num_layers
    phases = {p: linear_at(a, ta.phase_peaks[p], b, tb.phase_peaks[p], full)
              for p in ta.phase_peaks if p in tb.phase_peaks}
    return DepthExtrapolation(
        target_layers=full, layers=(a, b), traces=(ta, tb),
        # each phase's peak is affine in L, but the phase that holds the overall peak can change
        # with depth (a checkpointed mixed-precision step peaks in backward at 2 layers and in
        # forward from 3): the peak is the largest extrapolated phase peak
        peak_allocated_bytes=max(phases.values()),
        resident_bytes=linear_at(a, ta.resident_bytes, b, tb.resident_bytes, full),
        phase_peaks=phases,
        per_layer_peak_bytes=round((tb.peak_allocated_bytes - ta.peak_allocated_bytes) / (b - a)),
        wall_s=round(ta.wall_s + tb.wall_s, 3))
