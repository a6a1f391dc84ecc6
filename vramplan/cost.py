"""Training time and cost per billion tokens: an ESTIMATE from FLOPs, peak throughput and an
assumed utilisation (profiles/planner.toml), never a measurement.

FLOPs per token (Kaplan et al. 2020, arXiv:2001.08361 §2.1, eq. 2.2; Hoffmann et al. 2022,
arXiv:2203.15556 App. F):

    F_w = 2 · P_mm          forward matmul FLOPs of the weights (P_mm: params used in a matmul)
    F_a = 2 · L · s · d_q   forward attention scores and weighted sum (n_ctx = s, d_attn = d_q)
    full        : 3 · (F_w + F_a)     forward + backward (activation and weight gradients: 2×)
    LoRA/QLoRA  : 2 · F_w + 3 · F_a   backward computes activation gradients only (no frozen weight
                                      gradients); attention has no weights, so its backward is 2×
    grad ckpt   : + (F_w + F_a)       one extra forward

i.e. 6·P per token for full fine-tuning and 4·P for LoRA, +2·P with checkpointing. The adapters'
own FLOPs (6 · P_lora per token, < 1% of P at r = 64) are neglected. P_mm excludes the input
embedding lookup (not a matmul) and norms/biases, and counts MoE experts at k/E (only routed experts
run). Causal masking is not halved (Kaplan's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.model.params import param_tensors
from vramplan.profiles import load_planner_settings
from vramplan.specs import GpuSpec, ModelSpec, TrainSpec

TOKENS_PER_BILLION = 10**9
FLOPS_PER_TFLOPS = 10**12
SECONDS_PER_HOUR = 3600
#: FLOPs per multiply-accumulate.
FLOPS_PER_MAC = 2
#: Backward / forward FLOP ratio when both activation and weight gradients are computed.
BACKWARD_FULL = 2
#: Backward / forward FLOP ratio with frozen weights (activation gradients only).
BACKWARD_FROZEN = 1


def peak_tflops(gpu: GpuSpec) -> tuple[float | None, str]:
    """(dense peak TFLOPS, "bf16" | "fp16") of a catalog GPU; fp16 where it has no bf16 (T4, V100)."""
    if gpu.bf16_tflops:
        return gpu.bf16_tflops, "bf16"
    return (gpu.fp16_tflops, "fp16") if gpu.fp16_tflops else (None, "")


def matmul_params(m: ModelSpec) -> int:
    """P_mm: parameters multiplied per token: decoder linears, router, lm_head (or the tied
    embedding acting as it), experts scaled by k/E."""
    total = 0
    for x in param_tensors(m):
        if x.kind in ("linear", "router", "lm_head"):
            total += x.params
        elif x.kind == "embed" and m.tie_word_embeddings:
            total += x.params
        elif x.kind == "expert":
            total += x.params * m.num_experts_per_tok // m.num_local_experts
    return total


def train_flops_per_token(m: ModelSpec, t: TrainSpec) -> int:
    """Training FLOPs per token of one step (formula in the module docstring)."""
    f_w = FLOPS_PER_MAC * matmul_params(m)
    f_a = FLOPS_PER_MAC * m.num_hidden_layers * t.seq_len * m.q_dim
    backward_w = BACKWARD_FULL if t.method == "full" else BACKWARD_FROZEN
    flops = (1 + backward_w) * f_w + (1 + BACKWARD_FULL) * f_a
    if t.grad_ckpt:
        flops += f_w + f_a
    return flops


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Time and money per 10^9 training tokens on n_gpus data-parallel GPUs (an estimate)."""

    flops_per_token: int
    tflops: float | None
    tflops_dtype: str
    mfu: float
    n_gpus: int
    hours_per_billion_tokens: float | None
    usd_per_billion_tokens: float | None


def cost_per_billion_tokens(m: ModelSpec, t: TrainSpec, gpu: GpuSpec, n_gpus: int,
                            mfu: float | None = None) -> CostEstimate:
    """Hours and USD per billion tokens.

    hours = F_token · 10^9 / (TFLOPS · 10^12 · MFU · N) / 3600;  USD = hours · price/h · N
    (None where the catalog has no throughput or no price for the GPU).
    """
    mfu = float(load_planner_settings()["cost"]["mfu"]) if mfu is None else mfu
    flops = train_flops_per_token(m, t)
    tflops, kind = peak_tflops(gpu)
    hours = usd = None
    if tflops:
        rate = tflops * FLOPS_PER_TFLOPS * mfu * n_gpus
        hours = flops * TOKENS_PER_BILLION / rate / SECONDS_PER_HOUR
        if gpu.price_usd_per_hour is not None:
            usd = hours * gpu.price_usd_per_hour * n_gpus
    return CostEstimate(flops, tflops, kind, mfu, n_gpus, hours, usd)
