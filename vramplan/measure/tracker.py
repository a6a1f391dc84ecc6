"""Tensor-storage tracker: the CPU stand-in for ``torch.cuda.max_memory_allocated``.

While active, every tensor storage an operator creates is counted from its creation until Python
frees it (a weakref finalizer on the storage object, which PyTorch keeps alive exactly as long as the
C++ storage). Storages that existed before activation (parameters, buffers, quantisation state) are
counted separately as ``resident_bytes`` by the caller. The tracker sees what the dispatcher sees: it
misses kernel-internal workspaces and any allocator rounding, which is what "allocated" means here.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    """Counts live bytes of storages created by operators; records the running peak and phase peaks."""

    def __init__(self, ignore: set[int] | None = None) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self._ignore = set(ignore or ())
        self._watched: set[int] = set()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase: str | None = None

    # -- phases ---------------------------------------------------------------------------------
    def start_phase(self, name: str) -> None:
        """Begin a named phase; its peak starts from the bytes live now."""
        self._phase = name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current_bytes)

    def _bump(self) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        if self._phase is not None and self.current_bytes > self.phase_peaks[self._phase]:
            self.phase_peaks[self._phase] = self.current_bytes

    def reset_peak(self) -> None:
        """Forget the peaks (like ``torch.cuda.reset_peak_memory_stats``); live bytes stay counted."""
        self.peak_bytes = self.current_bytes
        self.phase_peaks = {}
        self._phase = None

    # -- accounting -----------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor's storage if it is new (also used for tensors made outside dispatch)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live or key in self._ignore:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current_bytes += nbytes
        weakref.finalize(storage, self._free, key, nbytes)
        self._bump()

    def watch_resident(self, storages: list[Any]) -> None:
        """Count the death of resident storages (bitsandbytes' ``Linear4bit`` replaces a bias of
        another dtype by a cast copy in the first forward): their bytes leave the count, which
        may then fall below the resident baseline, and their addresses may be reused by new
        storages, which are then counted."""
        for storage in storages:
            key = storage._cdata
            if key in self._ignore and key not in self._watched:
                self._watched.add(key)
                weakref.finalize(storage, self._resident_freed, key, storage.nbytes())

    def _resident_freed(self, key: int, nbytes: int) -> None:
        self._ignore.discard(key)
        self.current_bytes -= nbytes

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self.track(item)
        return out
