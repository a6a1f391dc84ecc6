"""Event recorder: every tensor storage an operator creates, when it is born and when it is freed.

The trace engine's counterpart of :class:`vramplan.measure.tracker.StorageTracker`, with the same
definition of "live bytes" (a storage counts from the operator that creates it until Python frees
it, through a weakref finalizer on the storage object), but keeping the whole ordered log instead
of only the running peak. On fake tensors a storage has a size and a dtype but no memory, so the
log costs nothing but time.

An :class:`Event` is one birth (``nbytes > 0``) or one death (``nbytes < 0``) of a storage. Events
carry the operator that made the storage, the phase and step they happened in, and the storage's
dtype and shape at birth. Peaks are derived from the log (:func:`peaks`), never kept beside it, so
they cannot disagree with it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: The phases of one optimizer step, in order (as measure/probes.PHASES).
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True, slots=True)
class Event:
    """One storage born (``nbytes > 0``) or freed (``nbytes < 0``).

    ``sid`` identifies the storage across its birth and death events; ``op`` is the operator that
    created it (also on the death event); ``phase``/``step`` say when the event happened.
    """

    sid: int
    op: str
    phase: str
    step: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class Recorder(TorchDispatchMode):
    """Logs the birth and death of every storage created by an operator while it is active.

    ``resident`` maps ``storage._cdata`` to bytes for the storages that exist before the step
    (parameters, buffers, quantisation state): they are not born in the step, but their death is
    logged (a negative event of op ``"resident"``), and from then on their key may belong to a new
    storage. (The harness's CPU tracker ignores resident keys forever: a step that replaces a
    parameter's data, as bitsandbytes' ``Linear4bit`` does with a bias of another dtype, frees a
    resident storage it keeps counting, and a new storage born at the same address is missed.)

    ``count`` turns a storage's size into the bytes it holds (identity by default; the CUDA
    allocator's block rounding for a CUDA trace, :func:`vramplan.trace.cuda.cuda_bytes`).
    Storages born under :meth:`outside` (managed memory) are never logged, nor, with
    ``fake_only``, real tensors (a model build's host-side buffers).
    """

    def __init__(self, resident: dict[int, int] | None = None,
                 count: Callable[[int], int] | None = None, fake_only: bool = False) -> None:
        super().__init__()
        self._fake_only = fake_only  # real tensors are the host's (a skeleton's buffers)
        self._count = count or (lambda n: n)
        self._outside_depth = 0
        self._outside: set[int] = set()  # keys of live storages born outside the allocator
        self.events: list[Event] = []
        self.phase = "setup"
        self.step = 0
        self._live: dict[int, int] = {}  # storage key -> sid
        self._next_sid = 0
        self._finalizers: list[weakref.finalize] = []
        #: (position in ``events``, phase, step) where each phase started
        self.marks: list[tuple[int, str, int]] = []
        self._resident = {k: self._count(v) for k, v in (resident or {}).items()}
        #: resident storages watched for death: sid -> storage key
        self.resident_keys: dict[int, int] = {}
        #: (position in ``events``, call) of runtime calls that change the allocator's cache
        #: but no tensor (``"empty_cache"``)
        self.calls: list[tuple[int, str]] = []

    def watch_resident(self, storages: list[Any]) -> None:
        """Log the death of these resident storages (``untyped_storage()`` objects)."""
        for storage in storages:
            key = storage._cdata
            if key in self._resident and key not in self._live:
                sid = self._next_sid
                self._next_sid += 1
                self._live[key] = sid
                self.resident_keys[sid] = key
                self._finalizers.append(weakref.finalize(
                    storage, self._free, key, sid, "resident", self._resident[key], "", ()))

    def start_phase(self, name: str) -> None:
        """Name the phase the following events belong to."""
        self.phase = name
        self.marks.append((len(self.events), name, self.step))

    def start_step(self, step: int) -> None:
        """Number the step the following events belong to (0 is the warm-up step)."""
        self.step = step

    def track(self, tensor: torch.Tensor, op: str) -> None:
        """Log a tensor's storage as born if it is new (also for tensors made outside dispatch)."""
        if tensor.device.type == "meta":  # a skeleton's placeholder, never memory
            return
        if self._fake_only and not isinstance(tensor, FakeTensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live or key in self._outside:
            return
        if self._outside_depth:
            self._outside.add(key)
            self._finalizers.append(weakref.finalize(storage, self._outside.discard, key))
            return
        sid = self._next_sid
        self._next_sid += 1
        nbytes = self._count(storage.nbytes())
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(int(s) for s in tensor.shape)
        self._live[key] = sid
        self.events.append(Event(sid, op, self.phase, self.step, nbytes, dtype, shape))
        self._finalizers.append(weakref.finalize(storage, self._free, key, sid, op, nbytes, dtype,
                                                 shape))

    def call(self, name: str) -> None:
        """Log a runtime call at this point of the log (see :attr:`calls`)."""
        self.calls.append((len(self.events), name))

    def live_keys(self) -> dict[int, int]:
        """Storage key -> sid of every storage live now."""
        return dict(self._live)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Storages born in this context are outside the allocator (never logged, nor their
        views or in-place results)."""
        self._outside_depth += 1
        try:
            yield
        finally:
            self._outside_depth -= 1

    def sid_of(self, tensor: torch.Tensor) -> int | None:
        """The id of the live storage behind ``tensor`` (None if the recorder does not know it)."""
        return self._live.get(tensor.untyped_storage()._cdata)

    def _free(self, key: int, sid: int, op: str, nbytes: int, dtype: str,
              shape: tuple[int, ...]) -> None:
        if self._live.get(key) == sid:
            del self._live[key]
            self.events.append(Event(sid, op, self.phase, self.step, -nbytes, dtype, shape))

    def detach(self) -> None:
        """Stop listening for deaths (storages still alive stay alive in the log)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.name() if hasattr(func, "name") else str(func)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.track(item, name)
        return out


@dataclass(frozen=True, slots=True)
class Peaks:
    """Peaks of the live step bytes (resident excluded), from a point of the log on.

    ``index`` is the position in the log just after the event that set ``peak_bytes`` (the live
    set at the peak is the replay of ``events[:index]``); ``phase_peaks`` follow the harness's
    CPU probe: a phase's peak starts from the bytes live when the phase starts.
    """

    peak_bytes: int
    index: int
    phase_peaks: dict[str, int]


def live_bytes(events: list[Event], stop: int | None = None) -> int:
    """Live step bytes after ``events[:stop]``."""
    return sum(e.nbytes for e in events[:stop])


def peaks(events: list[Event], marks: list[tuple[int, str, int]], from_step: int) -> Peaks:
    """The peak and phase peaks of the steps numbered ``from_step`` and later.

    Like ``torch.cuda.reset_peak_memory_stats`` after the warm-up: the peak starts from the bytes
    live when step ``from_step`` begins (optimizer states made in warm-up stay counted). A phase's
    peak starts from the bytes live at its start, as the harness's CPU probe counts it.
    """
    starts = [m for m in marks if m[2] >= from_step]
    start = starts[0][0] if starts else len(events)
    current = live_bytes(events, start)
    best, best_index = current, start
    phase_peaks: dict[str, int] = {}
    bounds = [m[0] for m in starts[1:]] + [len(events)]
    for (first, phase, _), stop in zip(starts, bounds):
        top = current
        for i in range(first, stop):
            current += events[i].nbytes
            if current > top:
                top = current
            if current > best:
                best, best_index = current, i + 1
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), top)
    return Peaks(best, best_index, phase_peaks)


def live_at(events: list[Event], stop: int) -> dict[int, Event]:
    """The birth events of the storages live after ``events[:stop]``, by storage id."""
    live: dict[int, Event] = {}
    for e in events[:stop]:
        if e.nbytes > 0:
            live[e.sid] = e
        else:
            live.pop(e.sid, None)
    return live
