"""Step time from physical parts, named like the memory terms: FLOPs, bytes moved and host ops.

One optimizer step is ``grad_accum`` × (forward + backward), then the optimizer phase. In each
phase the GPU runs kernels while the host (Python, the dispatcher, kernel launches) queues them;
the phase takes the longer of the two:

    gpu   = FLOPs / (peak FLOP/s · e_mm) + bytes / (peak bandwidth · e_bw)
    host  = ops · t_op
    phase = max(gpu, host)

``e_mm``, ``e_bw`` (fractions of the datasheet peaks) and ``t_op`` (host seconds per operation)
are the only constants, fitted per GPU by ``vramplan calibrate --time`` and stored in
``profiles/calibration/`` with the records they came from (:mod:`vramplan.calibrate`).

The work of a step is read from the same inventory the memory model uses: the layer program of
:mod:`vramplan.model.layout` (every tensor a decoder layer's forward makes, its dequantisations
and weight casts), the logits chain of :mod:`vramplan.model.activations` and the optimizer state
pieces of :mod:`vramplan.model.optim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from vramplan.model.activations import logits_bytes
from vramplan.model.dtypes import dtypes_for
from vramplan.model.layout import Layout, layout, trainable_order
from vramplan.model.ledger import FP32, ledger_for
from vramplan.model.optim import state_pieces
from vramplan.model.params import param_tensors
from vramplan.specs import GpuSpec, ModelSpec, SpecError, TrainSpec

#: FLOPs per multiply-accumulate.
FLOPS_PER_MAC = 2
#: Backward / forward matmul FLOPs with weight gradients (activation + weight grads) and without.
BACKWARD_FULL = 2
BACKWARD_FROZEN = 1
#: Host operations per 4-bit dequantisation in ``MatMul4Bit`` (bitsandbytes 0.50
#: ``functional.dequantize_4bit``): with double quant ``dequantize_blockwise`` of the absmax,
#: ``absmax += offset``, the ``dequantize_4bit`` kernel and ``.t()``; without, the last two.
DEQUANT_OPS = {True: 4, False: 2}
#: Backward host operations per forward operation: each autograd node launches its gradient
#: kernels (about two per forward op: e.g. a matmul's grad_input and grad_weight, a mul's two
#: operands' grads).
BACKWARD_OPS_PER_FORWARD = 2
#: Host operations outside the layers, per pass: embedding lookup, rotary tables, final norm,
#: lm_head and ``ForCausalLMLoss`` (counted with a dispatch counter on a 2- vs 4-layer qwen2: 48
#: forward, 37 backward aten ops outside the layers; about 16 of them launch kernels).
HEAD_OPS = 16
#: Optimizer host operations (aten ops of clipping + ``step`` + ``zero_grad``, counted with a
#: dispatch counter on CPU: qwen2-tiny LoRA with 2 and 4 layers, torch 2.13, bitsandbytes 0.50):
#: 14 per step, plus per trainable tensor: fused AdamW 0 (one multi-tensor call), foreach AdamW 2,
#: for-loop AdamW 9, HF Adafactor 26, SGD 1, bitsandbytes 8-bit/paged/Lion 2.
OPTIMIZER_OPS_PER_STEP = 14
OPTIMIZER_OPS_PER_TENSOR = {"adamw_torch_fused": 0, "adamw_torch": 2, "adamw_loop": 9,
                            "adafactor": 26, "sgd": 1}
#: bitsandbytes optimizers (one update kernel and its state bookkeeping per tensor).
BNB_OPS_PER_TENSOR = 2


@dataclass(frozen=True, slots=True)
class PhaseWork:
    """What one phase asks of the GPU and of the host."""

    flops: int  # matmul FLOPs
    nbytes: int  # DRAM bytes moved by memory-bound kernels (read + write)
    ops: int  # host operations (kernel launches with their Python and dispatcher cost)


@dataclass(frozen=True, slots=True)
class StepWork:
    """The work of one optimizer step on one GPU (a micro-step's phases and the optimizer)."""

    forward: PhaseWork
    backward: PhaseWork
    optimizer: PhaseWork
    grad_accum: int
    tokens: int  # tokens per optimizer step on this GPU (seq · batch · grad_accum)

    @property
    def flops(self) -> int:
        return self.grad_accum * (self.forward.flops + self.backward.flops)


def matmul_params(m: ModelSpec) -> int:
    """P_mm: parameters multiplied per token: decoder linears, router, lm_head (or the tied
    embedding acting as it), experts scaled by k/E (only routed experts run). The embedding lookup,
    norms and biases are not matmuls. Ref: Kaplan et al. 2020 (arXiv:2001.08361) §2.1."""
    total = 0
    for x in param_tensors(m):
        if x.kind in ("linear", "router", "lm_head"):
            total += x.params
        elif x.kind == "embed" and m.tie_word_embeddings:
            total += x.params
        elif x.kind == "expert":
            total += x.params * m.num_experts_per_tok // m.num_local_experts
    return total


def forward_flops(m: ModelSpec, t: TrainSpec) -> tuple[int, int]:
    """(weights, attention) forward FLOPs of one micro-batch: F_w = 2 · P_mm · N and
    F_a = 2 · L · s · d_q · N (scores and weighted sum; causal masking not halved, Kaplan's
    convention). Ref: Kaplan et al. 2020 eq. 2.2; Hoffmann et al. 2022 (arXiv:2203.15556) App. F."""
    n = t.seq_len * t.batch
    return (FLOPS_PER_MAC * matmul_params(m) * n,
            FLOPS_PER_MAC * m.num_hidden_layers * t.seq_len * m.q_dim * n)


def backward_flops(m: ModelSpec, t: TrainSpec) -> int:
    """Backward FLOPs of one micro-batch: 2·F_w with weight gradients (full), F_w with frozen
    weights (LoRA/QLoRA: activation gradients only; adapters neglected, < 1% at r = 64),
    2·F_a for attention (no weights), + F_w + F_a for the checkpointed recompute."""
    f_w, f_a = forward_flops(m, t)
    flops = (BACKWARD_FULL if t.method == "full" else BACKWARD_FROZEN) * f_w + BACKWARD_FULL * f_a
    return flops + (f_w + f_a if t.grad_ckpt else 0)


def layer_traffic(lay: Layout) -> tuple[int, int, int]:
    """(activation bytes, dequantisation bytes, weight-cast bytes) of one layer's forward.

    - activations: every tensor the layer program makes is written once and read once: 2 · bytes;
    - dequantisation: ``dequantize_4bit`` reads the packed weight (n/2) and absmax and writes the
      compute-dtype weight: packed + the dequantised size;
    - autocast casts of fp32 weights to bf16: read 4 B, write 2 B per element (3 × the copy).
    Not counted: the program's dtype copies (peft's fp32 copy of a LoRA input under autocast)
    and peft ParamWrapper's merged expert stacks (``copy`` and ``merged`` ops), which the
    calibration data predate: counting the copies raised the H200 leave-one-out median error
    from 6.6% to 14.4%, and no MoE step time is measured.
    Ref: bitsandbytes ``MatMul4Bit.forward``; torch autocast ``cached_cast``.
    """
    act = deq = cast = 0
    for op in lay.program.forward:
        if op[0] == "save":
            act += 2 * op[2]
        elif op[0] == "temp":
            act += 2 * sum(op[1])
        elif op[0] == "dequant":
            deq += op[1] + op[1] // (2 * lay.d.compute)  # written copy + packed n/2 read
        elif op[0] == "cast":
            cast += 3 * op[2]
    return act, deq, cast


def layer_ops(lay: Layout) -> int:
    """Host operations of one layer's forward: one per tensor the layer program makes, plus
    :data:`DEQUANT_OPS` per 4-bit matmul (not the ``copy`` and ``merged`` ops: see
    :func:`layer_traffic`)."""
    ops = 0
    for op in lay.program.forward:
        if op[0] == "temp":
            ops += len(op[1])
        elif op[0] == "dequant":
            ops += DEQUANT_OPS[lay.t.double_quant]
        elif op[0] in ("save", "cast"):
            ops += 1
    return ops


def logits_traffic(m: ModelSpec, t: TrainSpec, lay: Layout) -> tuple[int, int]:
    """(forward, backward) bytes of the logits chain: logits (e_l), ``.float()`` and log_softmax
    (4 B each) written and read in forward; NLL and log_softmax gradients (4 B each) and the cast
    back (e_l) in backward. Ref: transformers ``ForCausalLMLoss``; PHYSICS-REFERENCE §5.4."""
    nv = t.seq_len * t.batch * m.vocab_size
    e_l = logits_bytes(t, lay.d)
    upcast = FP32 if e_l != FP32 else 0
    return 2 * (e_l + upcast + FP32) * nv, 2 * (2 * FP32 + (e_l if upcast else 0)) * nv


def optimizer_work(lay: Layout) -> PhaseWork:
    """Clipping and the update. Bytes: ``clip_grad_norm_`` reads every gradient for the norm and
    reads and writes it to scale (3 × grad bytes, when max_grad_norm > 0); the update reads param,
    grad and states and writes param and states (2 · (param + states) + grad). Ops: see
    :data:`OPTIMIZER_OPS_PER_STEP`. Ref: torch ``_fused_adamw``; bitsandbytes
    ``Optimizer2State.update_step``; torch ``nn/utils/clip_grad.py``."""
    t, e = lay.t, lay.d.trainable
    opt = t.resolved_optimizer
    nbytes = 0
    tensors = trainable_order(lay)
    for _, x in tensors:
        pieces, paged = state_pieces(x, opt, e)
        grad = x.numel * e
        nbytes += 2 * (grad + sum(pieces) + paged) + grad + (3 * grad if t.max_grad_norm > 0 else 0)
    per_tensor = OPTIMIZER_OPS_PER_TENSOR.get(opt, BNB_OPS_PER_TENSOR)
    return PhaseWork(0, nbytes, OPTIMIZER_OPS_PER_STEP + per_tensor * len(tensors))


def gradient_bytes(lay: Layout) -> int:
    """Bytes the backward writes into ``.grad``: every trainable tensor's gradient once (the first
    micro-step assigns it; later ones read and add: 3 × in all). Ref: torch ``AccumulateGrad``."""
    grads = sum(x.numel for _, x in trainable_order(lay)) * lay.d.trainable
    return grads * (1 if lay.t.grad_accum == 1 else (1 + 3 * (lay.t.grad_accum - 1))) \
        // lay.t.grad_accum


@lru_cache(maxsize=1024)
def step_work(m: ModelSpec, t: TrainSpec) -> StepWork:
    """The FLOPs, bytes and host ops of one optimizer step (CUDA dtypes); memoised: a plan asks
    it for every GPU."""
    d = dtypes_for(t, "cuda")
    lay = layout(m, t, d, ledger_for(m, t, "cuda"), "cuda")
    L = m.num_hidden_layers
    act, deq, cast = layer_traffic(lay)
    ops = layer_ops(lay)
    head_f, head_b = logits_traffic(m, t, lay)
    f_w, f_a = forward_flops(m, t)
    ck = 1 if t.grad_ckpt else 0
    forward = PhaseWork(f_w + f_a, L * (act + deq + cast) + head_f, L * ops + HEAD_OPS)
    backward = PhaseWork(
        backward_flops(m, t),
        L * ((ck + BACKWARD_OPS_PER_FORWARD) * act + (ck + 1) * deq + ck * cast) + head_b
        + gradient_bytes(lay),
        L * ops * (ck + BACKWARD_OPS_PER_FORWARD) + BACKWARD_OPS_PER_FORWARD * HEAD_OPS)
    return StepWork(forward, backward, optimizer_work(lay), t.grad_accum,
                    t.seq_len * t.batch * t.grad_accum)


# --- rates and time -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Rates:
    """What one GPU achieves: FLOP/s, bytes/s and host seconds per op, and where they come from."""

    flops_per_s: float
    bytes_per_s: float
    seconds_per_op: float
    measured: bool  # fitted on this GPU's own records (else scaled from another GPU's fit)
    basis: str


def peak_tflops(gpu: GpuSpec) -> float | None:
    """Dense peak bf16 TFLOPS, or fp16 where the GPU has no bf16 (T4, V100)."""
    return gpu.bf16_tflops or gpu.fp16_tflops


def rates_for(gpu: GpuSpec, calib: Mapping[str, Any]) -> Rates | None:
    """The calibrated efficiencies applied to this GPU's datasheet peaks; None without a time
    calibration or without the GPU's TFLOPS and bandwidth."""
    fit = calib.get("time")
    tflops, bw = peak_tflops(gpu), gpu.memory_bandwidth_gbs
    if not fit or not tflops or not bw:
        return None
    e_mm, e_bw, t_op = time_constants(fit)
    measured = gpu.name == fit.get("gpu")
    basis = (f"measured on this GPU ({fit.get('records', '?')})" if measured else
             f"scaled from {fit.get('gpu')} measurements by datasheet TFLOPS and bandwidth")
    return Rates(tflops * 1e12 * e_mm, bw * 1e9 * e_bw, t_op, measured, basis)


@dataclass(frozen=True, slots=True)
class StepTime:
    """Seconds of one optimizer step, per phase (gpu, host), and the step total."""

    phases: Mapping[str, tuple[float, float]]  # phase -> (gpu seconds, host seconds)
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def bound(self, phase: str) -> str:
        gpu, host = self.phases[phase]
        return "host" if host > gpu else "gpu"


def phase_seconds(w: PhaseWork, r: Rates) -> tuple[float, float]:
    """(gpu, host) seconds of one phase: FLOPs at the achieved FLOP/s plus bytes at the achieved
    bandwidth; host ops at the host cost per op."""
    return w.flops / r.flops_per_s + w.nbytes / r.bytes_per_s, w.ops * r.seconds_per_op


def step_time(work: StepWork, r: Rates) -> StepTime:
    """grad_accum · (max(forward) + max(backward)) + max(optimizer), each max(gpu, host)."""
    phases = {name: phase_seconds(getattr(work, name), r)
              for name in ("forward", "backward", "optimizer")}
    micro = max(phases["forward"]) + max(phases["backward"])
    return StepTime(phases, work.grad_accum * micro + max(phases["optimizer"]), work.tokens)


def time_constants(fit: Mapping[str, Any]) -> tuple[float, float, float]:
    """(e_mm, e_bw, t_op) of a ``[time]`` calibration section, validated."""
    try:
        out = (float(fit["matmul_efficiency"]), float(fit["bandwidth_efficiency"]),
               float(fit["seconds_per_op"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"malformed [time] calibration: {exc}") from None
    if not (0 < out[0] <= 1 and 0 < out[1] <= 1 and out[2] > 0):
        raise SpecError(f"malformed [time] calibration: efficiencies must be in (0, 1] and "
                        f"seconds_per_op positive, got {out}")
    return out
