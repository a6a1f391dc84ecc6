"""Which dtype each tensor has under a training setup: the facts the byte terms are built on.

Everything here is read from library code (transformers 5.x, peft 0.21, bitsandbytes 0.50, torch
2.13 autocast); see PHYSICS-REFERENCE.md §2–§3 for the sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.specs import TrainSpec

_PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "mixed": 2}


@dataclass(frozen=True, slots=True)
class Dtypes:
    """Bytes per element of the tensors whose dtype depends on the setup."""

    autocast: bool  # HF Trainer bf16=True: torch.autocast around the forward
    compute: int  # matmul outputs under autocast, or the load dtype without it
    load: int  # dtype the checkpoint is loaded in (from_pretrained dtype=...)
    nonquant: int  # embeddings / norms / lm_head / biases: fp32 after prepare_model_for_kbit_training
    trainable: int  # trainable parameters, their gradients and torch AdamW states
    residual: int  # the hidden-state stream between blocks
    bool_dropout_mask: bool  # CUDA native_dropout keeps a bool mask; the CPU kernel one in x's dtype
    #: the CPU flash-attention kernel writes its output in the query's memory layout; the CUDA
    #: kernels write (b, s, nh, hd) (see ledger.attention)
    sdpa_follows_query: bool = False


def dtypes_for(train: TrainSpec, device: str = "cuda") -> Dtypes:
    """Resolve the dtypes of a setup.

    - full + mixed loads fp32 (HF Trainer autocasts, it does not cast the model);
      full + bf16/fp16/fp32 loads in that dtype.
    - LoRA/QLoRA load the base in bf16 for mixed/bf16, else the named dtype; peft upcasts adapters
      to fp32 (``PeftModel(autocast_adapter_dtype=True)`` → ``cast_adapter_dtype``).
    - QLoRA: ``prepare_model_for_kbit_training`` casts every non-Params4bit fp16/bf16 parameter to
      fp32, so the norms output fp32 and the residual stream is fp32 (PHYSICS-REFERENCE §2);
      without it (``kbit_prep=False``) they stay in the load dtype.
    """
    p = _PRECISION_BYTES[train.precision]
    autocast = train.precision == "mixed"
    if train.method == "full":
        load = 4 if autocast else p
        trainable = load
    else:
        load = p
        trainable = 4
    nonquant = 4 if train.method == "qlora" and train.kbit_prep else load
    residual = nonquant
    compute = 2 if autocast else load
    return Dtypes(autocast=autocast, compute=compute, load=load, nonquant=nonquant,
                  trainable=trainable, residual=residual, bool_dropout_mask=device == "cuda",
                  sdpa_follows_query=device == "cpu")
