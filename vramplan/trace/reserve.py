"""The reserved level of a traced CUDA step: its recorded events through the caching allocator.

A CUDA trace logs two event sequences (:mod:`vramplan.trace.engine`): the model build (loading,
4-bit quantisation and its temporaries, k-bit preparation's casts and its
``torch.cuda.empty_cache()``, the adapters) and the steps (a warm-up step, then the measured one).
:func:`replay_levels` plays both, in order, through :class:`vramplan.model.allocator.CachingAllocator`
(the rules of ``c10/cuda/CUDACachingAllocator.cpp``, the same emulation the analytic engine's
replay uses): every birth a ``malloc``, every death a ``free``, ``empty_cache`` where the build
called it, and the peaks reset when the measured step begins, as the harness resets
``torch.cuda`` peak stats after warm-up. A resident storage that dies in the step (a bias
bitsandbytes recasts) frees the block its build birth took.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vramplan.model.allocator import Block, CachingAllocator
from vramplan.trace.recorder import Event


@dataclass(frozen=True, slots=True)
class BuildLog:
    """What the build recorder saw: its events, its runtime calls and, at the end of the build,
    the storage key -> sid of every storage still live (the resident ones)."""

    events: tuple[Event, ...]
    calls: tuple[tuple[int, str], ...]
    live: dict[int, int]


@dataclass(frozen=True, slots=True)
class Levels:
    """Peaks of the measured step in the replay (bytes), and the segments it created."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    segments: int


def replay_levels(build: BuildLog, events: Sequence[Event], marks: Sequence[tuple[int, str, int]],
                  calls: Sequence[tuple[int, str]], resident_keys: dict[int, int],
                  from_step: int, expandable: bool = False) -> Levels:
    """Replay build then steps; peaks from the start of step ``from_step`` (see the module)."""
    alloc = CachingAllocator(expandable)
    blocks: dict[tuple[str, int], Block] = {}

    def play(log: Sequence[Event], log_calls: Sequence[tuple[int, str]], ns: str,
             start: int | None = None) -> None:
        at = {}
        for pos, name in log_calls:
            at.setdefault(pos, []).append(name)
        for i, e in enumerate(log):
            if i == start:
                alloc.reset_peaks()
            for name in at.get(i, ()):
                if name == "empty_cache":
                    alloc.empty_cache()
            if e.nbytes > 0:
                blocks[(ns, e.sid)] = alloc.malloc(e.nbytes, e.op)
                continue
            key = (ns, e.sid)
            if ns == "step" and e.op == "resident":  # a storage the build made
                key = ("build", build.live.get(resident_keys.get(e.sid, -1), -1))
            b = blocks.pop(key, None)
            if b is not None:
                alloc.free(b)
        for name in at.get(len(log), ()):
            if name == "empty_cache":
                alloc.empty_cache()

    play(build.events, build.calls, "build")
    starts = [m[0] for m in marks if m[2] >= from_step]
    start = starts[0] if starts else len(events)
    if start >= len(events):
        alloc.reset_peaks()
    play(events, calls, "step", start)
    return Levels(alloc.peak_allocated, alloc.peak_reserved, len(alloc.segments))
