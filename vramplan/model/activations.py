"""Activation memory: saved tensors per layer, checkpointing, logits and loss, transient buffers.

N = b·s tokens per micro-batch. Per-layer bytes come from :mod:`vramplan.model.ledger`.
"""

from __future__ import annotations

from vramplan.model.dtypes import Dtypes
from vramplan.model.ledger import FP32, LayerCtx, layer_ledger
from vramplan.model.params import layer_linears, lora_tensors, param_tensors
from vramplan.model.terms import Term
from vramplan.specs import ModelSpec, TrainSpec

FWD = ("layer_forward", "loss_forward")
FWD_BWD = ("layer_forward", "loss_forward", "loss_backward", "layer_backward")
ALL_ACT = FWD_BWD + ("down_backward", "last_layer_backward")
LOSS = ("loss_forward", "loss_backward")
AFTER_LAYERS = ("loss_forward", "loss_backward", "layer_backward")
LAYER_WORK = ("layer_forward", "layer_backward", "last_layer_backward")
BWD_WORK = ("layer_backward", "last_layer_backward")
DOWN = ("down_backward",)
INT64 = 8


def layer_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Saved activations of the decoder layers.

    Without checkpointing every layer keeps its whole saved set until its backward
    (Korthikanti et al. 2022, arXiv:2205.05198 §4, adapted op by op to HF decoders). With HF
    gradient checkpointing (non-reentrant) each layer keeps only its input, e_res·h per token, and
    the backward recomputes one layer at a time (``GradientCheckpointingLayer``).
    """
    n = t.seq_len * t.batch
    L = m.num_hidden_layers
    led = layer_ledger(LayerCtx(m, t, d))
    per_layer = led.bytes_per_token()
    if not t.grad_ckpt:
        return (
            Term("activations.saved_layers", (L - 1) * per_layer * n,
                 f"(L - 1) * N * {per_layer} (saved bytes/token/layer)",
                 "arXiv:2205.05198 §4; op-by-op replay of HF decoder layer", phases=FWD_BWD),
            Term("activations.saved_layer_0", per_layer * n, f"N * {per_layer}",
                 "the first layer's saved set, released last in backward", phases=ALL_ACT),
        )
    ckpt = m.hidden_size * d.residual * n
    return (
        Term("activations.checkpoints", (L - 1) * ckpt, "(L - 1) * N * h * e_res",
             "transformers GradientCheckpointingLayer; torch.utils.checkpoint (non-reentrant)",
             phases=FWD_BWD),
        Term("activations.checkpoint_0", ckpt, "N * h * e_res", "the first layer's input, "
             "released last in backward", phases=ALL_ACT),
        # An fp32 layer input is saved by input_layernorm as itself: it is the checkpoint already.
        Term("activations.recomputed_layer", (per_layer - led.saved.get("layer_in", 0)) * n,
             f"N * {per_layer - led.saved.get('layer_in', 0)} (one layer, minus its checkpoint)",
             "torch.utils.checkpoint recomputes one layer's saved set in backward",
             phases=BWD_WORK + DOWN),
    )


def _mlp_dtype(t: TrainSpec, d: Dtypes) -> int:
    """Bytes per element of the MLP intermediates (linear outputs)."""
    return d.compute if d.autocast else (d.residual if t.method == "qlora" else d.load)


def workspace_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Unsaved buffers alive while one layer's MLP runs.

    forward: a wide linear's output in flight twice (base output and its LoRA sum or clone),
    2·I per token; under checkpointing nothing is saved, so act(gate) and up are live on top, 2·I
    more. backward: the incoming residual gradient (h·e_res) and the product's gradient (I); at the
    product's backward the act and up gradients (2·I) appear while the saved product is released
    (−I); at down_proj's backward a QLoRA layer holds its dequantised weight instead.
    Ref: PHYSICS-REFERENCE §5.3 (G·N).
    """
    n = t.seq_len * t.batch
    e = _mlp_dtype(t, d)
    width = m.intermediate_size * (m.num_experts_per_tok or 1)
    fwd = (4 if t.grad_ckpt else 2) * width * e
    return (
        Term("activations.forward_workspace", fwd * n,
             f"N * {4 if t.grad_ckpt else 2} * I * e_mlp", "MLP outputs in flight",
             phases=("layer_forward",)),
        Term("activations.backward_buffers", (width * e + m.hidden_size * d.residual) * n,
             "N * (I * e_mlp + h * e_res)", "residual grad and the MLP product's grad",
             phases=BWD_WORK + ("down_backward",)),
        Term("activations.mlp_backward_grads", width * e * n, "N * (2 * I - I) * e_mlp",
             "act and up grads minus the released product", phases=BWD_WORK),
    )


def head_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Everything outside the decoder layers: cos/sin, final norm, lm_head input, token ids."""
    n, h = t.seq_len * t.batch, m.hidden_size
    final = 4 * h + 4 if d.residual != FP32 else 4  # fp32 copy (or x itself) + rsqrt
    if t.method == "full":
        final += h * d.residual  # trainable weight saves the normalised input
    terms = [
        Term("activations.rope_cos_sin", 2 * m.head_dim * d.nonquant * n, "2 * N * d_h * e_emb",
             "LlamaRotaryEmbedding output, shared by all layers", phases=ALL_ACT),
        Term("activations.final_norm", final * n, "N * (4h + 4)", "LlamaRMSNorm saved tensors",
             phases=AFTER_LAYERS),
        Term("activations.token_ids", 2 * INT64 * n, "2 * N * 8 (input_ids, labels)",
             "int64 token tensors of the step", phases=ALL_ACT),
    ]
    if t.method == "full":
        e_in = d.compute if d.autocast else d.load
        terms.append(Term("activations.lm_head_input", h * e_in * n, "N * h * e",
                          "lm_head (trainable) saves its input", phases=AFTER_LAYERS))
    elif d.autocast and d.nonquant == FP32:
        v = m.vocab_size
        terms.append(Term("activations.lm_head_weight_cast", v * h * 2, "V * h * 2",
                          "autocast casts the frozen fp32 lm_head to bf16; MmBackward saves it",
                          phases=LOSS))
    return tuple(terms)


def logits_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """The logits and loss chain (transformers 5.x ``ForCausalLMLoss``).

    forward: logits (e_l) + ``logits.float()`` (4, when e_l≠4) + log_softmax output (4) per N·V;
    the log_softmax output stays until backward; the loss backward adds the NLL gradient and the
    log_softmax input gradient (2 × 4·N·V). Gemma-2 soft-capping keeps tanh's output (e_l·N·V).
    Ref: PHYSICS-REFERENCE §5.4; torch ``log_softmax_backward_data``.
    """
    nv = t.seq_len * t.batch * m.vocab_size
    e_l = d.compute if d.autocast else (d.trainable if t.method == "full" else d.nonquant)
    upcast = FP32 if e_l != FP32 else 0
    terms = [
        Term("activations.log_softmax", FP32 * nv, "4 * N * V", "F.cross_entropy -> log_softmax",
             phases=LOSS),
        Term("activations.logits_forward", (e_l + upcast) * nv, f"({e_l} + {upcast}) * N * V",
             "lm_head output and its fp32 copy in ForCausalLMLoss", phases=("loss_forward",)),
        Term("activations.loss_backward_grads", 2 * FP32 * nv, "8 * N * V",
             "NllLoss and LogSoftmax backward gradients", phases=("loss_backward",)),
    ]
    if m.final_logit_softcapping:
        terms.append(Term("activations.logit_softcap", e_l * nv, "e_l * N * V",
                          "Gemma2 tanh soft-capping saves its output", phases=LOSS))
    return tuple(terms)


def transient_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Short-lived buffers: the dequantised 4-bit weight and the autocast weight cache."""
    terms = []
    if t.method == "qlora":
        n = max(lin.weight_params for lin in layer_linears(m))
        dq = 4 * -(-n // 64) if t.double_quant else 0
        terms.append(Term("activations.dequant_buffer", n * d.compute + dq,
                          "max_linear(n) * e_compute (+ 4*n/64 fp32 absmax with DQ)",
                          "bitsandbytes dequantize_4bit in MatMul4Bit forward/backward",
                          phases=("layer_forward",) + DOWN))
    if d.autocast:
        cached = sum(x.params for x in (param_tensors(m) if t.method == "full"
                                        else lora_tensors(m, t)) if x.kind in ("linear", "lm_head", "lora"))
        phases = FWD if t.grad_ckpt else ALL_ACT
        terms.append(Term("activations.autocast_weight_cache", 2 * cached,
                          "2 * P_t(linear weights)", "ATen autocast cached_cast of fp32 leaf "
                          "weights requiring grad", phases=phases))
    return tuple(terms)


def activation_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """All activation terms of one training step."""
    return (*layer_terms(m, t, d), *workspace_terms(m, t, d), *head_terms(m, t, d),
            *logits_terms(m, t, d), *transient_terms(m, t, d))
