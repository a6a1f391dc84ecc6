"""Gradients, optimizer states and optimizer-step temporaries of the trainable parameters."""

from __future__ import annotations

from vramplan.model.dtypes import Dtypes
from vramplan.model.params import trainable_tensors
from vramplan.model.terms import Term
from vramplan.specs import ModelSpec, TrainSpec
from vramplan.units import ceil_div

#: bitsandbytes ``Optimizer8bit``: tensors under this many elements keep 32-bit states.
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes blockwise 8-bit state quantisation: one fp32 absmax per 256 elements.
BNB_8BIT_BLOCKSIZE = 256
#: bitsandbytes ``get_state_buffer`` pages a state only when ``p.numel() >= 1e5``.
BNB_PAGED_MIN_NUMEL = 100_000
#: fp32 ``dynamic`` quantisation maps (qmap1, qmap2) of 256 entries, shared by all params.
BNB_QMAP_BYTES = 2 * 256 * 4
FP32 = 4


def gradient_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Gradients of the trainable parameters, in the parameter dtype (AccumulateGrad), created as
    backward reaches each module and freed by ``zero_grad(set_to_none=True)``. Backward runs from
    lm_head down: head grads exist from the first layer's backward, the processed layers' grads
    when the last layer runs, the embedding's only at the optimizer step. A layer's own grads grow
    while its saved tensors are released, so they are not counted on top of them.
    Ref: torch AccumulateGrad; ZeRO (arXiv:1910.02054) §3.1."""
    e, L = d.trainable, m.num_hidden_layers
    tensors = trainable_tensors(m, t)
    # A tied embedding is the lm_head weight: its grad appears at the lm_head backward.
    head_kinds = ("lm_head", "embed") if m.tie_word_embeddings else ("lm_head",)
    head = sum(x.params for x in tensors if x.kind in head_kinds)
    embed = sum(x.params for x in tensors if x.kind == "embed" and x.kind not in head_kinds)
    per_layer = (sum(x.params for x in tensors) - head - embed - _final_norm(m, t)) // L
    head += _final_norm(m, t)
    step = ("embedding_backward", "optimizer_step")
    tied_full = t.method == "full" and m.tie_word_embeddings
    return (
        Term("gradients.head", head * e, "(V*h [untied] + h) * sizeof(param)",
             "lm_head and final-norm grads, made right after the loss backward",
             phases=("down_backward", "layer_backward", "last_layer_backward") + step),
        Term("gradients.layers_done", (L - 1) * per_layer * e, "(L-1) * P_t/layer * sizeof(param)",
             "grads of the layers already processed when the last one (layer 0) runs backward",
             phases=("last_layer_backward",) + step),
        Term("gradients.layer_current", per_layer * e, "P_t/layer * sizeof(param)",
             "a layer's own grads appear as its saved activations are released", phases=step),
        Term("gradients.embedding", embed * e, "V * h * sizeof(param) (full only)",
             "embedding grad, created last", phases=step),
        Term("gradients.tied_embedding_accumulation",
             2 * m.vocab_size * m.hidden_size * e if tied_full else 0,
             "2 * V * h * sizeof(param) (tied, full only)",
             "embedding_dense_backward output and its sum with the lm_head grad (AccumulateGrad)",
             phases=("embedding_backward",)),
    )


def _final_norm(m: ModelSpec, t: TrainSpec) -> int:
    """The final norm is trainable only in full fine-tuning (h params)."""
    return m.hidden_size if t.method == "full" else 0


def _state_bytes(numel: int, opt: str, e: int) -> tuple[int, int]:
    """(device-allocated, paged) state bytes of one tensor for one optimizer."""
    if opt == "sgd":
        return 0, 0
    if opt == "adamw":
        return 2 * numel * e + FP32, 0  # exp_avg, exp_avg_sq in param dtype + fp32 step tensor
    eight_bit = opt in ("adamw_8bit", "paged_adamw_8bit") and numel >= BNB_MIN_8BIT_SIZE
    if eight_bit:
        states, absmax = 2 * numel, 2 * FP32 * ceil_div(numel, BNB_8BIT_BLOCKSIZE)
    else:
        states, absmax = 2 * numel * FP32, 0
    paged = opt.startswith("paged") and numel >= BNB_PAGED_MIN_NUMEL
    return (absmax, states) if paged else (states + absmax, 0)


def optimizer_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, device: str) -> tuple[Term, ...]:
    """Optimizer states (allocated lazily at the first step, then resident).

    - torch AdamW: 2·P_t·sizeof(param) + a 4-byte step tensor per parameter (fused/capturable);
    - bnb 8-bit AdamW: 2 B/param + 2·4 B per 256 (absmax), 8 B/param for tensors < 4096 elements;
    - paged optimizers: states of tensors ≥ 1e5 elements live in CUDA managed memory, outside the
      torch allocator and outside the device total (level "paged": on the GPU while it has room,
      else in host RAM).
    Ref: Kingma & Ba 2015 (arXiv:1412.6980); torch.optim.AdamW ``_init_group``; Dettmers et al. 2021
    (arXiv:2110.02861); bitsandbytes ``Optimizer2State.init_state``, ``get_state_buffer``.
    """
    opt = t.resolved_optimizer
    dev = paged = 0
    for x in trainable_tensors(m, t):
        a, p = _state_bytes(x.numel, opt, d.trainable)
        dev += a * x.count
        paged += p * x.count
    if opt.endswith("8bit") or opt.startswith("paged"):
        dev += BNB_QMAP_BYTES if opt.endswith("8bit") else 0
    if device != "cuda":  # no managed memory off CUDA: paged states are ordinary tensors
        dev, paged = dev + paged, 0
    terms = [Term("optimizer.states", dev, f"{opt}: per-tensor state bytes summed over P_t",
                  "torch.optim.AdamW _init_group; bitsandbytes Optimizer2State.init_state")]
    if paged:
        terms.append(Term("optimizer.paged_states", paged, "2 states * numel * sizeof(state), "
                          "tensors >= 1e5 elements", "bitsandbytes get_paged (cudaMallocManaged)",
                          level="paged"))
    return tuple(terms)
