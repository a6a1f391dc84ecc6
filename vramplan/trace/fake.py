"""Fake tensors that take the same code paths as real ones.

A traced step must run the code a real step runs, op for op. Two things would send it elsewhere:

- transformers asks ``is_tracing(tensor)`` (true for a FakeTensor) and then skips its data checks
  (``torch.all(attention_mask == 1)``, packed-sequence detection) and materialises a causal mask
  a real run never builds. :func:`untraced_transformers` makes that question answer as for a real
  tensor.
- those data checks then need values. :class:`SmallReal` runs an operator on real tensors when
  none of its inputs is fake and its outputs are small (token ids, positions, flags: bytes, not
  megabytes), so questions about the inputs' values get the real answer. Everything that touches
  a fake tensor, or would be large, stays fake.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Largest output (bytes, all outputs of one operator) computed for real when no input is fake.
#: Token ids, positions and flags of a batch are far below it; s x s masks are above it.
REAL_LIMIT_BYTES = 1 << 20


def fake_mode() -> FakeTensorMode:
    """A fresh FakeTensorMode (real inputs allowed), with bitsandbytes' shared code table real.

    ``bitsandbytes.functional.quantize_blockwise`` caches its 256-entry dynamic map in a module
    global on first use; made under fake mode it would be a fake tensor that outlives the mode.
    It is made (real, 1 KiB) before the mode starts; a real load shares it the same way.
    """
    with contextlib.suppress(ImportError):
        from bitsandbytes import functional as bnbf

        if "dynamic" not in bnbf.name2qmap:
            bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Module.to() swaps a fake parameter for its converted copy (torch.utils.swap_tensors), which
    # refuses a tensor that has a weakref, and peft moves every new LoRA module with .to(). The
    # converter memoises every operator output in a WeakValueDictionary (a fresh meta tensor each
    # time, so the memo never hits): that memo is turned off for this mode.
    mode.fake_tensor_converter.from_meta_and_device = functools.partial(_unmemoized, FakeTensor)
    return mode


@contextlib.contextmanager
def untraced_transformers() -> Iterator[None]:
    """Make transformers' ``is_tracing(tensor)`` ignore fake tensors (restored on exit)."""
    from transformers.utils import import_utils

    original = import_utils.is_fake_tensor
    import_utils.is_fake_tensor = lambda x: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


@contextlib.contextmanager
def foreach_sees_fake() -> Iterator[None]:
    """Let torch's foreach dispatch decisions treat fake tensors as the plain tensors they stand
    for (``torch.utils._foreach_utils._has_foreach_support`` accepts ``type(t) is Tensor`` only):
    ``clip_grad_norm_`` then takes the same ``_foreach_norm`` path as a real step."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _foreach_utils

    types = _foreach_utils._foreach_supported_types
    added = FakeTensor not in types
    if added:
        types.append(FakeTensor)
    try:
        yield
    finally:
        if added:
            types.remove(FakeTensor)


def _grouped_mm_any_dtype(func: Any, args: Any, kwargs: Any) -> Any:
    """``aten._grouped_mm`` for any float dtype: its meta function accepts bf16 only (the CUDA
    rule), while the CPU kernel takes fp32 too (QLoRA's k-bit prep upcasts fused MoE experts to
    fp32). The shape comes from the meta function on bf16 stand-ins; the dtype is the input's."""
    a, b = args[0], args[1]
    if a.dtype == torch.bfloat16:
        return func(*args, **kwargs)
    stand_in = [torch.empty_strided(t.shape, t.stride(), dtype=torch.bfloat16, device=t.device)
                for t in (a, b)]
    out = func(*stand_in, *args[2:], **kwargs)
    dtype = kwargs.get("out_dtype") or a.dtype
    return torch.empty_strided(out.shape, out.stride(), dtype=dtype, device=out.device)


def _unmemoized(cls: type, fake_mode: FakeTensorMode, t: torch.Tensor, device: torch.device,
                pytype: type | None = None, dispatch_keys: Any = None) -> FakeTensor:
    """``FakeTensorConverter.from_meta_and_device`` without the memo (see :func:`fake_mode`)."""
    return cls(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)


def _outputs_bytes(out: Any) -> int:
    return sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
               if isinstance(t, torch.Tensor))


class SmallReal(TorchDispatchMode):
    """Run an operator for real when none of its tensor inputs is fake and its outputs are small.

    The operator is first run under fake mode (free) to learn its output size; a data-dependent
    operator (``.item()``, ``nonzero``) on real inputs goes straight to the real kernel.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if func is torch.ops.aten._grouped_mm.default:
            return _grouped_mm_any_dtype(func, args, kwargs)
        if any(isinstance(a, FakeTensor) for a in flat):
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:  # data-dependent output: the inputs are real, so ask them
            if "DataDependent" not in type(exc).__name__:
                raise
            return self._real(func, args, kwargs)
        if _outputs_bytes(out) <= REAL_LIMIT_BYTES:
            del out
            return self._real(func, args, kwargs)
        return out

    @staticmethod
    def _real(func: Any, args: Any, kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return func(*args, **kwargs)
