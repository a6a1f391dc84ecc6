"""Memory probes: how a training step's peaks are read on each device.

A probe has one protocol, driven by :func:`vramplan.measure.steps.run_steps`:
``begin(model)`` before the first warm-up step, ``end_warmup()`` after the warm-up steps,
``start_phase(name)`` / ``end_phase()`` around forward, backward and optimizer step, ``stop()``
when done, and ``result()`` for the ``measured`` object of a record.

- :class:`CpuProbe`: resident bytes (every unique storage of parameters, buffers and bitsandbytes
  quantisation state) plus a :class:`~vramplan.measure.tracker.StorageTracker` for everything created
  during the steps. Optimizer states and gradients made in warm-up stay counted.
- :class:`CudaProbe`: ``torch.cuda`` peak statistics per phase plus an NVML sampling thread for
  the process's device-level usage (context, workspaces and paged optimizer states included).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch

PHASES = ("forward", "backward", "optimizer")
#: Quantisation-state attributes holding tensors (bnb ``QuantState`` and ``Int8Params``).
_QS_ATTRS = ("absmax", "code", "offset")


def quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a bnb parameter keeps beside its data (Params4bit quant_state, Int8Params SCB/CB)."""
    out: list[torch.Tensor] = []
    qs = getattr(param, "quant_state", None)
    if qs is not None:
        out += [getattr(qs, a, None) for a in _QS_ATTRS]
        state2 = getattr(qs, "state2", None)
        if state2 is not None:
            out += [getattr(state2, "absmax", None), getattr(state2, "code", None)]
    out += [getattr(param, "SCB", None), getattr(param, "CB", None)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def resident_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, their bitsandbytes quantisation state and buffers: what is resident."""
    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors.append(p)
        tensors += quant_state_tensors(p)
    return tensors + list(model.buffers())


def resident_storages(model: torch.nn.Module) -> dict[int, int]:
    """``{storage._cdata: nbytes}`` of every unique storage the model holds (params, buffers, quant state)."""
    out: dict[int, int] = {}
    for t in resident_tensors(model):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        out[storage._cdata] = storage.nbytes()
    return out


class CpuProbe:
    """CPU measurement: resident storages + a dispatch-level tracker of everything created after."""

    device = "cpu"

    def __init__(self) -> None:
        """Set up empty counters (nothing is measured before ``begin``)."""
        self.resident_bytes = 0
        self.tracker: Any = None
        self.measuring = False
        self._entered = False

    def begin(self, model: torch.nn.Module) -> None:
        """Count resident storages and start the tracker (entered as a dispatch mode)."""
        from vramplan.measure.tracker import StorageTracker

        resident = resident_storages(model)
        self.resident_bytes = sum(resident.values())
        self.tracker = StorageTracker(ignore=set(resident))
        self.tracker.watch_resident([t.untyped_storage() for t in resident_tensors(model)
                                     if t.device.type != "meta"])
        self.tracker.__enter__()
        self._entered = True

    def end_warmup(self) -> None:
        """Forget warm-up peaks; live bytes (optimizer states) stay counted."""
        self.tracker.reset_peak()
        self.measuring = True

    def start_phase(self, name: str) -> None:
        """Begin a named phase of a step."""
        self.tracker.start_phase(name)

    def end_phase(self) -> None:
        """Nothing to read on CPU: the tracker keeps phase peaks as it goes."""

    def stop(self) -> None:
        """Leave the dispatch mode (safe to call twice)."""
        if self.tracker is not None and self._entered:
            self.tracker.__exit__(None, None, None)
            self._entered = False

    def result(self) -> dict[str, Any]:
        """The ``measured`` object: resident + tracked peaks; reserved and device levels are null."""
        r = self.resident_bytes
        phases = {p: r + self.tracker.phase_peaks[p] for p in PHASES if p in self.tracker.phase_peaks}
        return {"peak_allocated_bytes": r + self.tracker.peak_bytes, "peak_reserved_bytes": None,
                "device_total_bytes": None, "resident_bytes": r, "baseline_bytes": 0,
                "phases": phases}


class NvmlSampler(threading.Thread):
    """Samples this process's device memory (NVML) every ``interval`` seconds; keeps the maximum."""

    def __init__(self, index: int, baseline: int, interval: float = 0.005) -> None:
        """Open the NVML handle of device ``index``; sampling starts with ``start()``."""
        super().__init__(daemon=True)
        import pynvml

        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.baseline = baseline
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def used(self) -> int:
        """Bytes used by this process (by pid), else device used minus the pre-load baseline."""
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory]
            if mine:
                return int(sum(mine))
        except self.nvml.NVMLError:
            pass
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline

    def run(self) -> None:
        """Sampling loop (daemon thread)."""
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, self.used())
            except self.nvml.NVMLError:  # a failed sample is skipped, not fatal
                pass
            time.sleep(self.interval)

    def reset_peak(self) -> None:
        """Start a new maximum from the current usage."""
        self.peak = self.used()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join(timeout=1.0)


def nvml_index() -> int:
    """NVML index of the visible device 0 (first entry of CUDA_VISIBLE_DEVICES when numeric)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def nvml_baseline() -> tuple[int, dict[str, Any]]:
    """(device bytes used before this process touches CUDA, NVML facts) — call before CUDA init."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index())
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return int(info.used), {"driver": driver if isinstance(driver, str) else driver.decode(),
                                "device_memory_bytes": int(info.total)}
    except Exception as exc:  # pynvml missing or no NVML: device level stays null
        return 0, {"nvml_error": f"{type(exc).__name__}: {exc}"}


class CudaProbe:
    """CUDA measurement: per-phase ``max_memory_allocated/reserved`` and an NVML peak sampler."""

    device = "cuda"

    def __init__(self, baseline: int, snapshot: bool = False) -> None:
        """Set up empty counters (nothing is measured before ``begin``)."""
        self.baseline = baseline
        self.snapshot = snapshot
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.cuda_used: dict[str, int] = {}  # per phase: mem_get_info's used bytes at its end
        self.cuda_total: int | None = None  # mem_get_info's total: what CUDA lets a process use
        self.resident_bytes = 0
        self.sampler: NvmlSampler | None = None
        self.phase: str | None = None
        self.measuring = False
        self.alloc: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.device_peak: dict[str, int] = {}
        self.device_level = "measured (NVML, this process's used memory)"

    def start_sampler(self) -> None:
        """Start the NVML sampler; without NVML, say so in the record and on stderr."""
        try:
            self.sampler = NvmlSampler(nvml_index(), self.baseline)
            self.sampler.start()
        except Exception as exc:  # no pynvml or no NVML: allocated and reserved are still recorded
            self.sampler = None
            why = "pynvml is not installed (pip install 'vramplan[harness]' brings nvidia-ml-py)" \
                if isinstance(exc, ImportError) else f"NVML failed: {type(exc).__name__}: {exc}"
            self.device_level = f"not measured: {why}"
            print(f"vramplan measure: device level {self.device_level}", file=sys.stderr)

    def begin(self, model: torch.nn.Module) -> None:
        """Record resident bytes (allocated now) and start the NVML sampler if NVML works."""
        torch.cuda.synchronize()
        self.resident_bytes = int(torch.cuda.memory_allocated())
        self.start_sampler()

    def end_warmup(self) -> None:
        """Reset peaks after warm-up (optimizer states and allocator pools are in place)."""
        self.measuring = True

    def start_phase(self, name: str) -> None:
        """Reset the peak counters so that the phase's own peaks can be read at its end."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if self.sampler is not None:
            self.sampler.reset_peak()
        self.phase = name

    def end_phase(self) -> None:
        """Read the phase's peaks (kept as the max over measured steps)."""
        torch.cuda.synchronize()
        if not self.measuring or self.phase is None:
            return
        p = self.phase
        self.alloc[p] = max(self.alloc.get(p, 0), int(torch.cuda.max_memory_allocated()))
        self.reserved[p] = max(self.reserved.get(p, 0), int(torch.cuda.max_memory_reserved()))
        if self.sampler is not None:
            time.sleep(2 * self.sampler.interval)  # let the sampler see the phase's last state
            self.device_peak[p] = max(self.device_peak.get(p, 0), self.sampler.peak)
        free, total = torch.cuda.mem_get_info()  # counts managed (paged) memory resident on it
        self.cuda_used[p] = max(self.cuda_used.get(p, 0), int(total) - int(free))
        self.cuda_total = int(total)
        if self.snapshot:
            self.snapshots[p] = segment_summary(torch.cuda.memory._snapshot())

    def stop(self) -> None:
        """Stop the sampler."""
        if self.sampler is not None:
            self.sampler.stop()

    def result(self) -> dict[str, Any]:
        """The ``measured`` object (all three levels; device level null without NVML)."""
        return {"peak_allocated_bytes": max(self.alloc.values(), default=None),
                "peak_reserved_bytes": max(self.reserved.values(), default=None),
                "device_total_bytes": max(self.device_peak.values(), default=None),
                "device_level": self.device_level,
                "resident_bytes": self.resident_bytes, "baseline_bytes": self.baseline,
                "phases": dict(self.alloc),
                "phases_reserved": dict(self.reserved),
                "phases_device": dict(self.device_peak),
                # torch.cuda.mem_get_info() at each phase's end: the device's used memory as CUDA
                # sees it (managed memory included; other processes too), and its total
                "phases_cuda_used": dict(self.cuda_used),
                "cuda_total_bytes": self.cuda_total,
                "num_alloc_retries": int(torch.cuda.memory_stats().get("num_alloc_retries", 0)),
                **({"snapshots": dict(self.snapshots)} if self.snapshot else {})}


def segment_summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A small, comparable summary of ``torch.cuda.memory._snapshot()``: every segment's size,
    allocated bytes and pool, largest first (the raw snapshot, with stack traces, is not kept)."""
    segs = sorted(([int(s["total_size"]), int(s["allocated_size"]),
                    "small" if s.get("segment_type") == "small" else "large"]
                   for s in snapshot.get("segments", [])), reverse=True)
    return {"segments": len(segs), "reserved_bytes": sum(s[0] for s in segs),
            "allocated_bytes": sum(s[1] for s in segs), "by_segment": segs}


def cuda_env(extra: dict[str, Any]) -> dict[str, Any]:
    """GPU name, CUDA version and NVML facts for the record's ``env``."""
    props = torch.cuda.get_device_properties(0)
    env = {"device_name": props.name, "cuda": torch.version.cuda, "driver": None,
           "device_memory_bytes": int(props.total_memory)}
    env.update({k: v for k, v in extra.items() if v is not None})
    return env
