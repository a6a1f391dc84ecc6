"""Resident weights: base weights per dtype or 4-/8-bit, quantisation constants, fp32 upcasts, adapters."""

from __future__ import annotations

from vramplan.model.dtypes import Dtypes
from vramplan.model.inventory import Inventory, inventory
from vramplan.model.params import Tensor
from vramplan.model.terms import Term
from vramplan.specs import ModelSpec, TrainSpec
from vramplan.units import ceil_div

#: bitsandbytes ``functional.quantize_4bit`` default blocksize (weights per absmax).
BNB_4BIT_BLOCKSIZE = 64
#: Second-level blocksize of double quantisation (``quantize_blockwise(..., blocksize=256)``).
BNB_DQ_BLOCKSIZE = 256
#: fp32[16] NF4/FP4 code table, one per quantised layer (``get_4bit_type``).
BNB_4BIT_CODE_BYTES = 16 * 4
#: fp32[256] dynamic code of the nested quantisation, one per layer, plus the fp32 offset.
BNB_DQ_STATE_BYTES = 256 * 4 + 4


def quantized(t: Tensor) -> bool:
    """Only ``nn.Linear`` weights inside the blocks are quantised (transformers
    ``replace_with_bnb_linear``; lm_head, embeddings, norms, biases, router and fused MoE experts
    are skipped)."""
    return t.kind == "linear"


def quant_pieces(n: int, double_quant: bool) -> tuple[int, int, int, int]:
    """(packed, fp32 absmax, uint8 absmax, second-level fp32 absmax) bytes of one n-element
    4-bit weight as ``quantize_4bit`` makes them: packed = ceil(n/2), fp32 absmax per 64 weights;
    with double quant ``quantize_blockwise(absmax - offset)`` re-quantises that absmax to uint8
    with an fp32 absmax per 256 of them (the fp32 absmax is then freed); without, the last two are
    0. Ref: bitsandbytes ``functional.quantize_4bit``."""
    blocks = ceil_div(n, BNB_4BIT_BLOCKSIZE)
    if not double_quant:
        return ceil_div(n, 2), 4 * blocks, 0, 0
    return ceil_div(n, 2), 4 * blocks, blocks, 4 * ceil_div(blocks, BNB_DQ_BLOCKSIZE)


def nf4_bytes(n: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quantisation-constant bytes) of one n-element 4-bit weight.

    packed = ceil(n/2); constants = fp32 absmax per 64 weights (0.5 bit/param) + code table, or with
    double quant uint8 absmax per 64 + fp32 absmax per 256 of those + offset + codes (≈0.127 bit/param).
    Ref: Dettmers et al. 2023 (arXiv:2305.14314) §3; bitsandbytes ``functional.quantize_4bit``.
    """
    packed, absmax, qabsmax, absmax2 = quant_pieces(n, double_quant)
    consts = qabsmax + absmax2 + BNB_DQ_STATE_BYTES if double_quant else absmax
    return packed, consts + BNB_4BIT_CODE_BYTES


def dequant_bytes(n: int, compute: int, double_quant: bool) -> int:
    """What ``dequantize_4bit`` makes for one 4-bit matmul: the n-element weight in the compute
    dtype, plus (double quant) the fp32 absmax restored from its uint8 copy, one per 64 weights.
    Ref: bitsandbytes ``MatMul4Bit`` forward/backward."""
    return n * compute + (4 * ceil_div(n, BNB_4BIT_BLOCKSIZE) if double_quant else 0)


def int8_bytes(n: int, out_features: int) -> tuple[int, int]:
    """(int8 weight bytes, fp32 row-scale bytes) of an LLM.int8 weight: n + 4·out.
    Ref: Dettmers et al. 2022 (arXiv:2208.07339); bitsandbytes ``Int8Params`` (CB, SCB)."""
    return n, 4 * out_features


def quantized_bytes(x: Tensor, t: TrainSpec, inv: Inventory) -> tuple[int, int]:
    """(stored weight bytes, quantisation-constant bytes) of one copy of a quantised linear
    weight under QLoRA: :func:`int8_bytes` or :func:`nf4_bytes` (NF4 and FP4 store alike)."""
    if t.quant == "int8":
        return int8_bytes(x.numel, inv.linear_by_name[x.name].out_features)
    return nf4_bytes(x.numel, t.double_quant)


def stored_bytes(x: Tensor, t: TrainSpec, d: Dtypes, inv: Inventory) -> int:
    """Bytes one tensor (all its copies) is stored in during the step, quantisation constants
    not included: adapters in the trainable dtype; under QLoRA packed 4-bit / int8 linear weights
    and every other parameter in the non-quantised dtype; else the load dtype."""
    if x.kind == "lora":
        return x.params * d.trainable
    if t.method == "qlora":
        if quantized(x):
            return quantized_bytes(x, t, inv)[0] * x.count
        return x.params * d.nonquant
    return x.params * d.load


def weight_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Base weights, quantisation constants and the fp32 upcast of unquantised tensors."""
    inv = inventory(m, t)
    tensors = inv.params
    if t.method != "qlora":
        p = sum(x.params for x in tensors)
        return (Term("weights.base", p * d.load, "P * sizeof(load dtype)",
                     "from_pretrained(dtype=...); full+mixed loads fp32 (HF Trainer autocasts)"),)
    packed = consts = 0
    for x in tensors:
        if quantized(x):
            w, c = quantized_bytes(x, t, inv)
            packed += w * x.count
            consts += c * x.count
    p_nonq = sum(x.params for x in tensors if not quantized(x))
    bits = "8" if t.quant == "int8" else "4"
    return (
        Term("weights.base", packed, f"sum over quantised linears of n * {bits}/8",
             "bitsandbytes Params4bit/Int8Params storage; arXiv:2305.14314 §3"),
        Term("weights.quant_constants", consts,
             "DQ: n/64 + 4*n/(64*256) + 1092 per layer; no DQ: 4*n/64 + 64" if bits == "4"
             else "4 * out_features per layer (SCB)",
             "bitsandbytes functional.quantize_4bit / QuantState"),
        Term("weights.unquantized_fp32", p_nonq * d.nonquant,
             f"P_nonq * {d.nonquant} (embeddings, lm_head, norms, biases, router, experts)",
             "peft prepare_model_for_kbit_training casts non-Params4bit fp16/bf16 params to fp32"
             if t.kbit_prep else "kept in the load dtype: prepare_model_for_kbit_training skipped"),
    )


def adapter_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """LoRA adapter weights: r·(in+out) per adapted linear, fp32 (peft upcasts bf16/fp16 adapters).

    Ref: peft ``LoraLayer.update_layer``; ``PeftModel(autocast_adapter_dtype=True)``.
    """
    if t.method == "full":
        return ()
    p_lora = sum(x.params for x in inventory(m, t).lora)
    return (Term("weights.lora_adapters", p_lora * d.trainable, "r * (d_in + d_out) * L * 4",
                 "peft LoraLayer.update_layer; cast_adapter_dtype (fp32)"),)
