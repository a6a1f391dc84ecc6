"""Activation memory: saved tensors per layer, checkpointing, logits and loss, transient buffers.

N = b·s tokens per micro-batch. Per-layer bytes come from :mod:`vramplan.model.ledger`.
"""

from __future__ import annotations

from vramplan.model.dtypes import Dtypes
from vramplan.model.inventory import inventory
from vramplan.model.ledger import (FP32, LayerCtx, Ledger, frozen_first_input, layer_ledger,
                                   norm_out_bytes, param_bytes)
from vramplan.model.terms import PHASES, Term
from vramplan.model.weights import dequant_bytes
from vramplan.specs import ModelSpec, TrainSpec

FWD = ("layer_forward", "loss_forward")
LOSS = ("loss_forward", "loss_backward")
RECOMPUTE = ("recompute_forward",)
DOWN = ("down_backward",)
BWD_WORK = ("down_backward", "layer_backward", "last_layer_backward")
#: Everything from the forward to the first processed layer's backward.
UNTIL_FIRST_BWD = ("layer_forward", "loss_forward", "loss_backward", "recompute_forward",
                   "down_backward", "layer_backward")
ALL_ACT = UNTIL_FIRST_BWD + ("last_layer_backward",)
AFTER_LAYERS = ("loss_forward", "loss_backward", "recompute_forward", "down_backward",
                "layer_backward")
INT64 = 8
#: Activation-group terms sized by weights, not tokens (copies or buffers of weight tensors).
WEIGHT_SIZED = frozenset({"activations.dequant_buffer", "activations.lm_head_weight_cast",
                          "activations.autocast_weight_cache", "activations.layer_weight_casts",
                          "activations.moe_merged_experts", "activations.moe_merged_experts_rest"})


def layer_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, led: Ledger) -> tuple[Term, ...]:
    """Saved activations of the decoder layers and what is live while one layer runs.

    Without checkpointing every layer keeps its whole saved set until its backward
    (Korthikanti et al. 2022, arXiv:2205.05198 §4, adapted op by op to HF decoders); the last
    layer's forward peaks at its worst linear (saved-so-far + that linear's in-flight outputs).
    With HF gradient checkpointing (non-reentrant) each layer keeps only its input, e_res·h per
    token; the backward re-runs one layer's forward (peaking like the forward above, plus the
    incoming residual gradient) and then holds that layer's full saved set
    (``GradientCheckpointingLayer``, ``torch.utils.checkpoint``).
    """
    n = t.seq_len * t.batch
    L = m.num_hidden_layers
    per_layer = led.bytes_per_token()
    partial = Term("activations.layer_in_flight", led.peak_partial * n,
                   f"N * {led.peak_partial} (saved so far + the worst linear's outputs)",
                   "op-by-op replay; peft LoRA forward keeps result, scaled output and sum",
                   phases=("layer_forward",) if not t.grad_ckpt else RECOMPUTE)
    if not t.grad_ckpt:
        # the first layer's input norm and its projections' dropout save nothing when that
        # input needs no grad
        first = per_layer - (led.frozen_input_bytes if frozen_first_input(t) else 0)
        return (
            Term("activations.saved_layer_0", first * n, f"N * {first}",
                 "the first layer's saved set, released last in backward"
                 + (" (its input norm and the dropout on its q/k/v inputs save nothing: a "
                    "frozen embedding's output needs no grad)" if first != per_layer else ""),
                 phases=ALL_ACT if L > 1 else AFTER_LAYERS + ("last_layer_backward",)),
            Term("activations.saved_layers", max(0, L - 2) * per_layer * n,
                 f"(L - 2) * N * {per_layer} (saved bytes/token/layer)",
                 "arXiv:2205.05198 §4; op-by-op replay of HF decoder layer: layers 1 to L-2",
                 phases=ALL_ACT[:-1]),
            Term("activations.saved_layer_last", per_layer * n if L > 1 else 0,
                 f"N * {per_layer}", "the last layer's saved set, complete once its forward "
                 "ends (while it runs: layer_in_flight)", phases=AFTER_LAYERS),
            partial,
        )
    ckpt = m.hidden_size * d.residual * n
    # An fp32 layer input is saved by input_layernorm as itself: it is the checkpoint already.
    # What only int8 matmuls keep is not recomputed: the forward's own copies stay (int8_inputs).
    recomputed = per_layer - led.saved.get("layer_in", 0) - led.held_only_bytes
    held = sum(led.held.values())
    return (*int8_held_terms(held, n, L), *(
        Term("activations.checkpoints", (L - 1) * ckpt, "(L - 1) * N * h * e_res",
             "transformers GradientCheckpointingLayer; torch.utils.checkpoint (non-reentrant)",
             phases=UNTIL_FIRST_BWD),
        Term("activations.checkpoint_0", ckpt, "N * h * e_res", "the first layer's input, "
             "released last in backward", phases=ALL_ACT),
        Term("activations.forward_in_flight", (led.mlp_e * m.intermediate_size
                                               + led.max_transient) * n,
             "N * (I * e_mlp + worst linear's in-flight outputs)",
             "checkpointed forward saves nothing: act(gate) and one linear's outputs are live",
             phases=("layer_forward",)),
        partial,
        Term("activations.recomputed_layer", recomputed * n,
             f"N * {recomputed} (one layer, minus its checkpoint)",
             "torch.utils.checkpoint recomputes one layer's saved set in backward",
             phases=BWD_WORK),
    ))


def int8_held_terms(held: int, n: int, L: int) -> tuple[Term, ...]:
    """Under checkpointing, the inputs every layer's int8 matmuls keep as ``ctx`` attributes
    (``held`` bytes per token per layer, see :func:`vramplan.model.ledger.linear`): the
    forward's own tensors, alive like the checkpoints until each layer's backward."""
    if not held:
        return ()
    return (
        Term("activations.int8_inputs", (L - 1) * held * n, f"(L - 1) * N * {held}",
             "bitsandbytes MatMul8bitLt / MatMul8bitFp keep their input as a ctx attribute, "
             "out of checkpointing's reach", phases=UNTIL_FIRST_BWD),
        Term("activations.int8_inputs_0", held * n, f"N * {held}",
             "the first layer's int8 matmul inputs, released last in backward", phases=ALL_ACT),
    )


def workspace_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, led: Ledger) -> tuple[Term, ...]:
    """Gradient buffers alive inside one layer's backward (e = the MLP intermediates' dtype).

    The incoming residual gradient (h·e_res) from the layer's (re)computation on; the product's
    gradient (I·e) from down_proj's backward on; at the MLP's backward two more I-wide gradients
    (the two paths of a LoRA-wrapped down, or act and up) while down_proj's saved input is
    released. Ref: PHYSICS-REFERENCE §5.3 (G·N), checked with the CPU storage tracker.
    """
    n = t.seq_len * t.batch
    e = led.mlp_e
    width = m.intermediate_size * (m.num_experts_per_tok or 1)
    grads = max(0, 2 * width * e - led.down_input_bytes)
    res_grad = 2 * d.residual + (FP32 if d.residual != FP32 else 0)
    residual = Term("activations.residual_grad", m.hidden_size * res_grad * n,
                    "N * h * (2 * e_res + 4 [e_res < 4])",
                    "gradient of the layer output: the RMSNorm path's fp32 grad, its cast back, "
                    "and the sum with the residual path", phases=RECOMPUTE + BWD_WORK)
    if merged_experts(m, t):
        return residual, moe_backward_term(m, t, d, n)
    return (
        residual,
        Term("activations.backward_buffers", width * e * n, "N * I * e_mlp",
             "the MLP product's gradient", phases=BWD_WORK),
        Term("activations.mlp_backward_grads", grads * n, "N * (2 * I * e_mlp - down input saved)",
             "two more I-wide grads while down_proj's saved input is released",
             phases=("layer_backward", "last_layer_backward")),
    )


def merged_experts(m: ModelSpec, t: TrainSpec) -> bool:
    """peft all-linear LoRA on a transformers-5 MoE: every forward merges W + B·A into a copy of
    each fused expert stack (see :func:`moe_merged_expert_terms`)."""
    return m.is_moe and inventory(m, t).all_linear


def moe_backward_term(m: ModelSpec, t: TrainSpec, d: Dtypes, n: int) -> Term:
    """What an MoE layer's backward adds to its saved set and merged stacks, with merged experts.

    R = k·N routed rows, e = the experts' dtype, W_d = E·h·I·e (one merged down stack). The
    backward of the down ``_grouped_mm`` holds the product's gradient (R·I·e) and the merged
    stack's gradient (W_d, weight-sized: it flows on into the LoRA factors' gradients); then the
    product, the merged down stack and its gradient are freed and act/up get their gradients
    (two R·I·e) while the down output's gradient (R·h·e) is gone. Before them, the backward of
    the sum over k and of the routing weights holds three R·h·e gradients while the down output
    is still saved (fp32: the routing weights are). The gate_up backward after them (gradient R·2I·e, merged stack gradient
    2·W_d, input gradient R·h·e, with the gate_up output, act and product freed) never exceeds
    the down moment. So

        bytes = max(3·R·h·4, R·I·e + W_d, R·(2I − h)·e − W_d)

    Ref: torch ``_grouped_mm`` backward (``derivatives.yaml``), transformers
    ``integrations/moe.py::grouped_mm_experts_forward``, peft ``ParamWrapper``; the order of the
    births and deaths read from the trace engine's event log (mixtral-tiny)."""
    k, i, h = m.num_experts_per_tok, m.intermediate_size, m.hidden_size
    e = param_bytes(t, d)
    rows = k * n
    w_down = m.num_local_experts * h * i * e
    weighting = 3 * rows * h * FP32  # the routing weights are fp32: so are these gradients
    down = rows * i * e + w_down
    up = rows * (2 * i - h) * e - w_down
    return Term("activations.moe_backward", max(weighting, down, up),
                "max(3 * R * h * 4, R * I * e + E * h * I * e, R * (2I - h) * e - E * h * I * e),"
                " R = k * N",
                "the routing weights' backward (three R·h gradients), then the down _grouped_mm "
                "backward (the product's gradient and the merged down stack's), then act's and "
                "up's gradients (grouped_mm / peft ParamWrapper)", phases=BWD_WORK)


def head_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Everything outside the decoder layers: cos/sin, final norm, lm_head input, token ids."""
    n, h = t.seq_len * t.batch, m.hidden_size
    # RMSNorm saves an fp32 view of its input and rsqrt: a new fp32 copy when the residual stream
    # is 16-bit; the last layer's output itself when it is fp32 (QLoRA after k-bit prep), which
    # no other term counts (the checkpoints are layer inputs)
    final = 4 * h + 4
    if t.method == "full":
        final += h * d.residual  # trainable weight saves the normalised input
    terms = [
        Term("activations.rope_cos_sin", 2 * m.head_dim * d.nonquant * n, "2 * N * d_h * e_emb",
             "LlamaRotaryEmbedding output, shared by all layers", phases=ALL_ACT),
        Term("activations.final_norm", final * n, "N * (4h + 4)", "LlamaRMSNorm saved tensors, "
             "released by the norm's backward, before the layers' (found by the trace engine "
             "counted as on CUDA)", phases=LOSS),
        Term("activations.token_ids", 2 * INT64 * n, "2 * N * 8 (input_ids, labels)",
             "int64 token tensors of the step", phases=ALL_ACT),
    ]
    if t.attn == "eager":
        s = t.seq_len
        masks = 2 if m.sliding_window and m.sliding_window < s else 1
        terms.append(Term("activations.attention_masks", masks * t.batch * s * s * d.nonquant,
                          f"{masks} * b * s^2 * e_emb", "transformers masking_utils eager "
                          "masks (additive, in the embedding dtype), one per mask kind, "
                          "shared by all layers; nothing saves them (the score + mask add "
                          "saves no operand), so they die with the model's forward, unless "
                          "gradient checkpointing keeps them as the layers' inputs",
                          phases=ALL_ACT if t.grad_ckpt else ("layer_forward",)))
    if t.method == "full":
        e_in = d.compute if d.autocast else d.load
        terms.append(Term("activations.lm_head_input", h * e_in * n, "N * h * e",
                          "lm_head (trainable) saves its input", phases=AFTER_LAYERS))
    if lm_head_copied(t, d):
        terms.append(Term("activations.lm_head_weight_cast", m.vocab_size * h * 2, "V * h * 2",
                          "autocast casts the fp32 lm_head (trainable or frozen) to bf16 after "
                          "the layers; its matmul saves the copy until its backward (the "
                          "trainable case found by the trace engine counted as on CUDA)",
                          phases=LOSS))
    out = final_norm_output_bytes(m, t, d)
    if out:
        terms.append(Term("activations.final_norm_output", h * out * n, f"N * h * {out}",
                          "the final norm's output: the CausalLM forward's hidden_states, alive "
                          "until the forward (which computes the loss) returns",
                          phases=("loss_forward",)))
    return tuple(terms)


def final_norm_output_bytes(m: ModelSpec, t: TrainSpec, d: Dtypes) -> int:
    """Bytes per element of the final norm's output while the loss is computed, where no other
    term counts it (0): ``LlamaForCausalLM.forward`` keeps ``hidden_states`` until it returns the
    loss. A trainable lm_head without autocast saves that very tensor (``lm_head_input``); under
    autocast it saves a bf16 cast, and the norm's own output lives beside it. Found by the trace
    engine counted as on CUDA (H200 Llama-13B QLoRA mixed: forward peak)."""
    if t.method == "full" and not d.autocast:
        return 0
    return norm_out_bytes(m, t, d, d.residual)


def lm_head_copied(t: TrainSpec, d: Dtypes) -> bool:
    """Whether autocast makes a bf16 copy of the lm_head weight (an fp32 weight, trainable or
    frozen: ``cached_cast``), which lm_head's matmul saves for its backward."""
    return d.autocast and param_bytes(t, d) == FP32


def logits_bytes(t: TrainSpec, d: Dtypes) -> int:
    """Bytes per element of the lm_head output: the autocast dtype, else the lm_head weight's
    (trainable in full fine-tuning, frozen otherwise)."""
    return d.compute if d.autocast else (d.trainable if t.method == "full" else d.nonquant)


def logits_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """The logits and loss chain (transformers 5.x ``ForCausalLMLoss``).

    forward: logits (e_l) + ``logits.float()`` (4, when e_l≠4) + log_softmax output (4) per N·V;
    the log_softmax output stays until backward; the loss backward adds the NLL gradient and the
    log_softmax input gradient (2 × 4·N·V). Gemma-2 soft-capping keeps tanh's output (e_l·N·V).
    Ref: PHYSICS-REFERENCE §5.4; torch ``log_softmax_backward_data``.
    """
    nv = t.seq_len * t.batch * m.vocab_size
    e_l = logits_bytes(t, d)
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
    if t.loop == "custom":
        terms.append(Term("activations.kept_output_logits", e_l * nv, "e_l * N * V",
                          "a hand-written loop keeps `outputs` (its logits) through backward and "
                          "the optimizer step, until the next forward returns", phases=PHASES))
    return tuple(terms)


def transient_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Short-lived buffers: the dequantised 4-bit weight and the autocast weight cache."""
    terms = []
    if t.method == "qlora":
        n = max(lin.weight_params for lin in inventory(m, t).linears)
        terms.append(Term("activations.dequant_buffer", dequant_bytes(n, d.compute, t.double_quant),
                          "max_linear(n) * e_compute (+ 4*n/64 fp32 absmax with DQ)",
                          "bitsandbytes dequantize_4bit in MatMul4Bit forward/backward"
                          + (" (an MoE's down projection is its unquantised experts: none in "
                             "its backward)" if m.is_moe else ""),
                          phases=("layer_forward",) + (() if m.is_moe else DOWN)))
    if d.autocast:
        terms.extend(autocast_cache_terms(m, t))
    if merged_experts(m, t):
        terms.extend(moe_merged_expert_terms(m, t, d))
    return tuple(terms)


def moe_merged_expert_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """peft ``ParamWrapper`` (target_parameters LoRA on fused experts) parametrises each expert
    stack as ``baddbmm(W, B, A)`` for the forward: a merged copy of every expert weight of the
    layer, in the parameter dtype, which the expert matmuls save for backward; the LoRA factors
    enter ``baddbmm`` cast to that dtype (``get_delta_factors``: ``lhs.to(param.dtype)``), a copy
    when the adapters' dtype differs, which ``baddbmm`` saves too. Without checkpointing every
    layer's copies live until its backward; with it, one layer's at a time.
    Ref: peft ``tuners/lora/layer.py::_LoraFactorsProxy``, ``ParamWrapper._activate_lora``.
    """
    per_layer = moe_merged_bytes(m, t, d)
    L = m.num_hidden_layers
    one_phases = ("layer_forward",) + RECOMPUTE + BWD_WORK if t.grad_ckpt else \
        UNTIL_FIRST_BWD + ("last_layer_backward",)
    terms = [Term("activations.moe_merged_experts", per_layer,
                  "3 * E * I * h * e_param (+ expert LoRA factors * e_param when cast)",
                  "merged W + B·A expert stack of the running layer", phases=one_phases)]
    if not t.grad_ckpt:
        terms.append(Term("activations.moe_merged_experts_rest", (L - 1) * per_layer,
                          "(L - 1) * (3 * E * I * h + cast LoRA factors) * e_param",
                          "merged expert stacks saved by the other layers", phases=UNTIL_FIRST_BWD))
    return tuple(terms)


def moe_merged_bytes(m: ModelSpec, t: TrainSpec, d: Dtypes) -> int:
    """One layer's ParamWrapper copies: the merged expert stacks (3·E·I·h) and, when the adapters'
    dtype is not the experts', the LoRA factors cast to it (see :func:`moe_merged_expert_terms`)."""
    return sum(sum(part) for part in moe_merged_pieces(m, t, d))


def moe_merged_pieces(m: ModelSpec, t: TrainSpec, d: Dtypes
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One layer's merged copies, down stack first as ParamWrapper makes them: ((down stack, its
    LoRA B cast, A cast), (gate_up stack, B cast, A cast)). The casts (``get_delta_factors``:
    ``.to(param.dtype)``) are made only when the adapters' dtype is not the experts'."""
    e, i, h, n_exp = d.nonquant, m.intermediate_size, m.hidden_size, m.num_local_experts
    factors = {x.name: x.numel for x in inventory(m, t).lora if x.name.startswith("experts.")}
    cast = d.trainable != d.nonquant

    def part(proj: str, stack: int) -> tuple[int, ...]:
        casts = tuple(factors.get(f"experts.{proj}.lora_{ab}", 0) * e for ab in "BA")
        return (stack, *casts) if cast else (stack,)

    return part("down_proj", n_exp * h * i * e), part("gate_up_proj", n_exp * 2 * i * h * e)


def autocast_cache_terms(m: ModelSpec, t: TrainSpec) -> tuple[Term, ...]:
    """bf16 copies of fp32 trainable weights made by autocast.

    ``cached_cast`` keeps one bf16 copy of every fp32 leaf weight that requires grad until the
    outermost autocast exits (end of forward); the matmuls also save them for backward, so without
    checkpointing they live until each layer's backward. With checkpointing the recomputation
    re-casts one layer's weights, saved until that layer's backward ends. An MoE's fused experts
    and their LoRA factors are never cast: ``_grouped_mm`` has no autocast kernel and peft merges
    W + B·A with autocast disabled (see :func:`vramplan.model.ledger.moe_mlp`; found by the
    engines' cross-check).
    Ref: ATen ``autocast_mode.cpp::cached_cast``; PHYSICS-REFERENCE §3.3, §9 item 4.
    """
    tensors = inventory(m, t).trainable
    linear = [x for x in tensors if x.kind in ("linear", "lora")
              and not x.name.startswith("experts.")]
    per_layer = sum(x.params for x in linear) // m.num_hidden_layers
    all_phases = FWD if t.grad_ckpt else UNTIL_FIRST_BWD
    layer_phases = (RECOMPUTE + BWD_WORK) if t.grad_ckpt else ("last_layer_backward",)
    return (
        Term("activations.autocast_weight_cache", 2 * per_layer * m.num_hidden_layers,
             "2 * P_t(the layers' matmul weights)", "ATen autocast cached_cast of fp32 leaf "
             "weights requiring grad (the lm_head's copy: lm_head_weight_cast)",
             phases=all_phases),
        Term("activations.layer_weight_casts", 2 * per_layer, "2 * P_t(one layer's matmuls)",
             "autocast copies of the layer being recomputed / run backward", phases=layer_phases),
    )


def activation_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, led: Ledger | None = None
                     ) -> tuple[Term, ...]:
    """All activation terms of one training step (``led``: the layer ledger, if already made)."""
    led = led or layer_ledger(LayerCtx(m, t, d))
    return (*layer_terms(m, t, d, led), *workspace_terms(m, t, d, led), *head_terms(m, t, d),
            *logits_terms(m, t, d), *transient_terms(m, t, d))
