"""Gradients, optimizer states and optimizer-step temporaries of the trainable parameters."""

from __future__ import annotations

from vramplan.model.dtypes import Dtypes
from vramplan.model.inventory import inventory
from vramplan.model.params import Tensor
from vramplan.model.terms import PHASES, Term
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
    tensors = inventory(m, t).trainable
    # A tied embedding is the lm_head weight: its grad appears at the lm_head backward.
    head_kinds = ("lm_head", "embed") if m.tie_word_embeddings else ("lm_head",)
    head = sum(x.params for x in tensors if x.kind in head_kinds)
    embed = sum(x.params for x in tensors if x.kind == "embed" and x.kind not in head_kinds)
    per_layer = (sum(x.params for x in tensors) - head - embed - _final_norm(m, t)) // L
    head += _final_norm(m, t)
    step = ("embedding_backward", "optimizer_step")
    tied_full = t.method == "full" and m.tie_word_embeddings
    # With accumulation the grads already exist in every earlier phase (accumulation_terms).
    early = () if t.grad_accum > 1 else ("down_backward", "layer_backward", "last_layer_backward")
    return (
        Term("gradients.head", head * e, "(V*h [untied] + h) * sizeof(param)",
             "lm_head and final-norm grads, made right after the loss backward",
             phases=early + step),
        Term("gradients.layers_done", (L - 1) * per_layer * e, "(L-1) * P_t/layer * sizeof(param)",
             "grads of the layers already processed when the last one (layer 0) runs backward",
             phases=early[-1:] + step),
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


#: Phases in which AccumulateGrad runs (parameter gradients are produced).
ACCUMULATING = ("down_backward", "layer_backward", "last_layer_backward", "embedding_backward")


def accumulation_terms(m: ModelSpec, t: TrainSpec, d: Dtypes) -> tuple[Term, ...]:
    """Gradient accumulation (``grad_accum`` > 1): from the second micro-step on, every gradient
    of the previous micro-steps stays alive through the forward and backward, and AccumulateGrad
    adds each new gradient into it (``variable.grad += new_grad``): one more gradient-sized
    temporary, at most the largest trainable tensor's.
    Ref: torch ``AccumulateGrad::accumulateGrad``; HF Trainer ``gradient_accumulation_steps``."""
    if t.grad_accum <= 1:
        return ()
    tensors = inventory(m, t).trainable
    total = sum(x.params for x in tensors) * d.trainable
    largest = max((x.numel for x in tensors), default=0) * d.trainable
    return (
        Term("gradients.accumulated", total, "P_t * sizeof(param), every phase",
             "grads of earlier micro-steps, kept until the optimizer step (grad_accum > 1)",
             phases=tuple(p for p in PHASES if p not in ("embedding_backward", "optimizer_step"))),
        Term("gradients.accumulate_buffer", largest, "max tensor numel * sizeof(param)",
             "AccumulateGrad: the new gradient before it is added in place", phases=ACCUMULATING),
    )


# --- optimizer states ---------------------------------------------------------------------------

def state_pieces(x: Tensor, opt: str, e: int) -> tuple[list[int], int]:
    """(device-allocated blocks in allocation order, paged bytes) of one tensor's state.

    - ``adamw_torch_fused``: exp_avg, exp_avg_sq in the parameter dtype and a 4-byte step tensor
      on the device (``_init_group`` with fused=True); ``adamw_torch`` / ``adamw_loop`` keep the
      step on the host.
    - bitsandbytes 8-bit (AdamW 2 states, Lion 1): uint8 state(s) + fp32 absmax per 256, fp32
      states below 4096 elements; paged variants put states of tensors >= 1e5 elements in managed
      memory (``get_state_buffer``), the absmax stays on the device. 32-bit paged AdamW: fp32.
    - ``adafactor`` (HF, beta1=None): for 2+-dim tensors the factored second moment, fp32 rows
      (``shape[:-1]``) and columns (``shape[:-2] + shape[-1:]``); for vectors a full fp32 one.
    - ``sgd`` (HF Trainer: momentum 0): none.
    Ref: torch ``optim/adamw.py``; bitsandbytes ``Optimizer2State/Optimizer1State.init_state``;
    transformers ``optimization.py::Adafactor.step``.
    """
    n = x.numel
    if opt == "sgd":
        return [], 0
    if opt == "adamw_torch_fused":
        return [n * e, n * e, FP32], 0
    if opt in ("adamw_torch", "adamw_loop"):
        return [n * e, n * e], 0
    if opt == "adafactor":
        f = x.factored
        return ([FP32 * f[0], FP32 * f[1]] if f else [FP32 * n]), 0
    states = 1 if "lion" in opt else 2
    paged = opt.startswith("paged") and n >= BNB_PAGED_MIN_NUMEL
    if opt.endswith("8bit") and n >= BNB_MIN_8BIT_SIZE:
        absmax = [FP32 * ceil_div(n, BNB_8BIT_BLOCKSIZE)] * states
        return (absmax, states * n) if paged else ([n] * states + absmax, 0)
    return ([], states * n * FP32) if paged else ([n * FP32] * states, 0)


def optimizer_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, device: str) -> tuple[Term, ...]:
    """Optimizer states (allocated lazily at the first step, then resident), per
    :func:`state_pieces`; paged states (CUDA managed memory) are their own level.
    Ref: Kingma & Ba 2015 (arXiv:1412.6980); Dettmers et al. 2021 (arXiv:2110.02861);
    Shazeer & Stern 2018 (Adafactor, arXiv:1804.04235); Chen et al. 2023 (Lion, arXiv:2302.06675).
    """
    opt = t.resolved_optimizer
    dev = paged = 0
    for x in inventory(m, t).trainable:
        pieces, p = state_pieces(x, opt, d.trainable)
        dev += sum(pieces) * x.count
        paged += p * x.count
    if opt.endswith("8bit"):
        dev += BNB_QMAP_BYTES
    if device != "cuda":  # no managed memory off CUDA: paged states are ordinary tensors
        dev, paged = dev + paged, 0
    terms = [Term("optimizer.states", dev, f"{opt}: per-tensor state bytes summed over P_t",
                  "torch.optim.AdamW _init_group; bitsandbytes init_state; HF Adafactor")]
    if paged:
        terms.append(Term("optimizer.paged_states", paged, "states * numel * sizeof(state), "
                          "tensors >= 1e5 elements", "bitsandbytes get_paged (cudaMallocManaged)",
                          level="paged"))
    return (*terms, *step_terms(m, t, d, device))


def step_temporaries(tensors: tuple[Tensor, ...], opt: str, e: int) -> tuple[int, str, str]:
    """(bytes, formula, source) of what one optimizer step allocates on top of states and grads.

    - ``adamw_torch`` (foreach): ``torch._foreach_sqrt(exp_avg_sqs)`` makes one state-sized copy
      of every tensor of the group at once, then works in place: P_t * e.
    - ``adamw_loop``: ``exp_avg_sq.sqrt() / bias_correction2_sqrt``: two tensor-sized
      temporaries, one tensor at a time: 2 * max numel * e.
    - ``adafactor``: fp32 copies of a 16-bit grad and param, ``grad**2`` and ``+ eps`` (or the
      factored ``update`` and ``-update``): per tensor (4 [e<4] + 4 [e<4] + 8) * numel.
    - fused AdamW, bitsandbytes (in-place kernels) and SGD: none.
    Ref: torch ``optim/adamw.py::_multi_tensor_adamw`` / ``_single_tensor_adamw``; transformers
    ``Adafactor.step``.
    """
    if not tensors:
        return 0, "no trainable tensors", ""
    big = max(x.numel for x in tensors)
    if opt == "adamw_torch":
        return sum(x.params for x in tensors) * e, "P_t * e (foreach sqrt of exp_avg_sq)", \
            "torch optim/adamw.py _multi_tensor_adamw: _foreach_sqrt"
    if opt == "adamw_loop":
        return 2 * big * e, "2 * max numel * e", \
            "torch optim/adamw.py _single_tensor_adamw: exp_avg_sq.sqrt() / bias_correction2"
    if opt == "adafactor":
        copies = (FP32 if e != FP32 else 0) * 2
        return (copies + 2 * FP32) * big, f"({copies} + 8) * max numel", \
            "transformers optimization.py Adafactor.step: grad.float(), p.float(), update"
    return 0, "in-place update kernel", "torch fused AdamW / bitsandbytes / SGD"


def step_terms(m: ModelSpec, t: TrainSpec, d: Dtypes, device: str) -> tuple[Term, ...]:
    """The optimizer step's temporaries and gradient clipping's norms.

    Clipping (``clip_grad_norm_``, HF Trainer max_grad_norm=1.0): ``torch._foreach_norm`` gives
    one scalar per gradient, stacked, then ``_foreach_mul_`` scales in place; on CUDA each scalar
    is a 512-byte block. Ref: torch ``nn/utils/clip_grad.py``.
    """
    tensors = inventory(m, t).trainable
    nbytes, formula, ref = step_temporaries(tensors, t.resolved_optimizer, d.trainable)
    terms = []
    if nbytes:
        terms.append(Term("optimizer.step_temporaries", nbytes, formula, ref,
                          phases=("optimizer_step",)))
    if t.max_grad_norm > 0:
        count = sum(x.count for x in tensors)
        scalar = 512 if device == "cuda" else d.trainable
        terms.append(Term("optimizer.clip_norms", 2 * count * scalar,
                          "2 * number of grads * scalar block", "torch clip_grad_norm_ "
                          "(_foreach_norm, stack)", phases=("optimizer_step",)))
    return tuple(terms)
