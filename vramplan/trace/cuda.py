"""What a CUDA device allocates for a step that the traced CPU step does not, or differently.

The fake tensors of a trace claim the CPU (a CPU build of torch cannot build autograd graphs on a
fake CUDA device: every graph node asks the device's guard for its stream). The harness's CPU
steps already take the CUDA pipeline's code paths (explicit foreach AdamW, the autocast shim of
:func:`vramplan.measure.steps.cpu_autocast_shim`), so the ops and their outputs are those of a
GPU step. Four facts of the CUDA runtime then separate ``torch.cuda.max_memory_allocated`` from
the CPU count, and :func:`cuda_semantics` applies them to a trace:

- **Block rounding** (``c10/cuda/CUDACachingAllocator.cpp`` ``round_size``): every allocation
  is counted in multiples of 512 B (:func:`vramplan.model.allocator.round_size`); an empty
  storage allocates nothing.
- **Dropout masks** (``aten/src/ATen/native/cuda/Dropout.cu`` ``dropout_cuda``): the CUDA kernel
  keeps the mask as ``bool`` (1 B per element); the CPU kernel keeps it in the input's dtype.
- **Paged optimizer states** (bitsandbytes ``Optimizer8bit.get_state_buffer``): on CUDA a paged
  optimizer puts every state of ≥ 1e5 elements in managed memory (``F.get_paged``,
  ``cudaMallocManaged``), outside the caching allocator; on CPU it falls back to ``zeros_like``.
- **cuBLAS workspaces** (``aten/src/ATen/cuda/CublasHandlePool.cpp``): one per handle, made
  through the caching allocator at the first matmul on a stream; the forward and the autograd
  engine's backward thread use two. Their size is the calibrated ``cublas_workspace`` constant
  (the analytic engine's ``overhead.cublas_workspace``), split between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vramplan.model.allocator import round_size

#: bitsandbytes pages a state of at least this many elements (``get_state_buffer``).
PAGED_MIN_NUMEL = 100_000


def cuda_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts for a storage of ``nbytes`` (0 stays 0)."""
    return round_size(nbytes) if nbytes > 0 else 0


class CudaKernels(TorchDispatchMode):
    """Give operators the outputs their CUDA kernels give where they differ from the CPU ones:
    ``native_dropout``'s mask is ``bool``. Entered below the recorder, so the recorder logs the
    CUDA outputs only."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_dropout.default:
            result, mask = out
            del out
            mask = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
            return result, mask
        return out


@contextlib.contextmanager
def paged_states_outside(outside: Callable[[], contextlib.AbstractContextManager]) \
        -> Iterator[None]:
    """Make bitsandbytes' paged optimizers create their large states under ``outside()`` (a
    recorder context that does not log births): managed memory, as on CUDA."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        yield
        return
    original = Optimizer8bit.get_state_buffer

    def get_state_buffer(self: Any, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> Any:
        """bitsandbytes' CPU buffer, born outside the allocator when CUDA would page it."""
        if getattr(self, "is_paged", False) and p.numel() >= PAGED_MIN_NUMEL:
            with outside():
                return original(self, p, dtype)
        return original(self, p, dtype)

    Optimizer8bit.get_state_buffer = get_state_buffer
    try:
        yield
    finally:
        Optimizer8bit.get_state_buffer = original


def workspace(nbytes: int) -> torch.Tensor:
    """One cuBLAS workspace of ``nbytes`` (call under the fake mode and the recorder)."""
    return torch.empty(nbytes, dtype=torch.uint8)
