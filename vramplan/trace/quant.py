"""bitsandbytes 4-bit and int8 weights as fake tensors.

``bnb.nn.Params4bit`` is a ``Parameter`` subclass made with ``Tensor._make_subclass``, which cannot
wrap a FakeTensor (a tensor has one Python type). A traced QLoRA model therefore holds each 4-bit
weight as a fake ``Parameter`` that carries the attributes a ``Params4bit`` carries
(``quant_state``, ``blocksize``, ``quant_type``, ``bnb_quantized``, ``module``, ...): every reader
in bitsandbytes, peft, transformers and the harness's probe reads those attributes, not the type.

The packed data and the quantisation state come from bitsandbytes' own
``functional.quantize_4bit`` run on a fake full-precision weight, through the fake kernels
bitsandbytes registers for its ``torch.ops.bitsandbytes`` operators: packed weights
``uint8 (numel/2, 1)``, absmax per block, and with double quant the uint8 absmax, the fp32
offset and the nested state (absmax per 256 values, the shared 256-entry dynamic code), exactly
as a real load holds them.

An LLM.int8() weight (``bnb.nn.Int8Params``, the same ``Parameter``-subclass problem) is made as
``Int8Params._quantize`` makes it: a float16 copy of the loaded weight, then
``functional.int8_vectorwise_quant`` (fake kernel: int8 ``CB`` of the weight's shape and fp32
row scales ``SCB``), the parameter's data being ``CB``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: Params4bit attributes copied onto the fake parameter (the rest are set by quantisation).
_PARAMS4BIT_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module")


def fake_params4bit(old: Any, dtype: torch.dtype, device: str) -> torch.nn.Parameter:
    """A quantised 4-bit weight for the meta ``Params4bit`` ``old`` (call under fake mode), as
    ``Params4bit._quantize`` makes it from a ``dtype`` weight of ``old``'s shape."""
    from bitsandbytes import functional as bnbf

    full = torch.empty(old.shape, dtype=dtype, device=device)
    packed, state = bnbf.quantize_4bit(full, blocksize=old.blocksize,
                                       compress_statistics=old.compress_statistics,
                                       quant_type=old.quant_type, quant_storage=old.quant_storage)
    del full
    param = torch.nn.Parameter(packed, requires_grad=False)
    for attr in _PARAMS4BIT_ATTRS:
        setattr(param, attr, getattr(old, attr, None))
    param.quant_state = state
    param.bnb_quantized = True
    if param.module is not None:
        param.module.quant_state = state
    return param


def fake_int8params(old: Any, dtype: torch.dtype, device: str) -> torch.nn.Parameter:
    """A quantised int8 weight for the meta ``Int8Params`` ``old`` (call under fake mode), as
    transformers' ``Bnb8bitQuantize`` and ``Int8Params._quantize`` make it from a ``dtype``
    weight: the weight, its float16 copy, then CB (int8) and SCB (fp32, one per row); the two
    float copies are freed."""
    from bitsandbytes import functional as bnbf

    full = torch.empty(old.shape, dtype=dtype, device=device)
    half = full.contiguous().to(dtype=torch.float16)
    cb, scb, _ = bnbf.int8_vectorwise_quant(half)
    del half, full
    param = torch.nn.Parameter(cb, requires_grad=False)
    param.CB, param.SCB = cb, scb
    param.has_fp16_weights = getattr(old, "has_fp16_weights", False)
    return param


@contextlib.contextmanager
def fake_loading(mode: Any) -> Iterator[None]:
    """Make :func:`vramplan.measure.build.materialize` run under the fake ``mode`` and create
    4-bit weights with :func:`fake_params4bit` (other parameters as the harness does); restored
    on exit. The skeleton before it stays on the real meta device (a ``Params4bit`` cannot wrap
    a fake meta tensor either)."""
    from vramplan.measure import build

    original = build._new_param
    original_materialize = build.materialize

    def materialize(*args: Any, **kwargs: Any) -> None:
        """The harness's materialize, under fake mode."""
        with mode:
            original_materialize(*args, **kwargs)

    def new_param(old: torch.nn.Parameter, device: str, dtype: torch.dtype,
                  target: torch.dtype) -> torch.nn.Parameter:
        """Fake 4-bit / int8 weight for a meta Params4bit / Int8Params; the harness's own
        path otherwise."""
        if old.device.type == "meta" and type(old).__name__ == "Params4bit":
            return fake_params4bit(old, dtype, device)
        if old.device.type == "meta" and type(old).__name__ == "Int8Params":
            return fake_int8params(old, dtype, device)
        return original(old, device, dtype, target)

    build._new_param = new_param
    build.materialize = materialize
    try:
        yield
    finally:
        build._new_param = original
        build.materialize = original_materialize
