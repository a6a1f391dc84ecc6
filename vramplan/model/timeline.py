"""The ordered allocate/free sequence of model build, a warm-up step and a measured step.

What the harness (and a user's run) does on a CUDA device, tensor by tensor, in order:

1. build: every parameter in module order; a 4-bit linear is materialised in the load dtype and
   quantised (packed weight, fp32 absmax, with double quant the absmax re-quantised to uint8 plus
   a second-level fp32 absmax), the temporaries freed (transformers ``Bnb4bitQuantize``,
   bitsandbytes ``quantize_4bit``); ``prepare_model_for_kbit_training`` casts every non-4-bit
   parameter to fp32 (``param.data = param.data.to(float32)``) and then calls
   ``torch.cuda.empty_cache()``; peft adds the adapters (moved to the base layer's device and
   dtype, then cast to fp32 by ``cast_adapter_dtype``).
2. a step: the embedding output and rotary cos/sin; per decoder layer the forward as the
   :mod:`vramplan.model.ledger` replay lists it (tensors saved for backward, linears called,
   short-lived outputs), with at every 4-bit linear a dequantised weight, and under autocast the
   bf16 copies of fp32 trainable weights (kept until the forward ends, or saved for backward).
   With gradient checkpointing a layer's tensors are freed at its end and made again in backward.
   Then the logits chain (transformers ``ForCausalLMLoss``), its backward, and the layers'
   backward in reverse: the ledger's events reversed, releasing saved tensors, giving birth to
   the parameter gradients (AccumulateGrad) and dequantising 4-bit weights again. At the first
   ``optimizer.step()`` the states are born in parameter order (torch AdamW ``_init_group``:
   exp_avg then exp_avg_sq per parameter; bitsandbytes: state1, state2 and their absmax, paged
   ones in managed memory outside the allocator); ``zero_grad(set_to_none=True)`` frees the grads.

Sizes come from the same inventory as the analytic terms (:mod:`vramplan.model.params`, the
ledger, :mod:`vramplan.model.weights`), so the replay's allocated peak tracks the phase model's.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from vramplan.model.allocator import Block, CachingAllocator
from vramplan.model.dtypes import Dtypes
from vramplan.model.activations import final_norm_output_bytes, lm_head_copied, logits_bytes
from vramplan.model.layout import Layout, layout, other_grads, trainable_order
from vramplan.model.ledger import FP32, Ledger, param_bytes
from vramplan.model.optim import state_pieces
from vramplan.model.weights import int8_bytes, quant_pieces, quantized
from vramplan.specs import ModelSpec, TrainSpec


@dataclass(frozen=True, slots=True)
class Replay:
    """What the allocator replay saw in the measured step (the second one)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    new_segments: tuple[tuple[int, tuple[str, str]], ...]  # (bytes, (phase, tensor)) born in it
    segments: int  # segments created over build and both steps
    largest_block_bytes: int  # the largest single allocation of the measured step


class Run:
    """A replay in progress: named live tensors on an emulated allocator."""

    def __init__(self, expandable: bool) -> None:
        self.alloc = CachingAllocator(expandable)
        self.live: dict[str, Block] = {}
        self.groups: dict[str, list] = {}
        self.phase = "build"

    def new(self, name: str, nbytes: int, group: str | None = None) -> None:
        """Allocate a named tensor (optionally in a group freed together by :meth:`drop_group`)."""
        if nbytes > 0:
            self.live[name] = self.alloc.malloc(nbytes, name)
            if group is not None:
                self.groups.setdefault(group, []).append(name)

    def drop(self, *names: str) -> None:
        for name in names:
            b = self.live.pop(name, None)
            if b is not None:
                self.alloc.free(b)

    @property
    def phase(self) -> str:
        return self.alloc.phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.alloc.phase = value

    def grad(self, key: object, nbytes: int) -> None:
        """AccumulateGrad: a new gradient, or, when one exists (gradient accumulation), a
        temporary added into it in place."""
        if key in self.live:
            self.alloc.transient(nbytes, key)
        else:
            self.new(key, nbytes, "grad")

    def drop_group(self, group: str) -> None:
        self.drop(*self.groups.pop(group, ()))


def build(r: Run, lay: Layout) -> None:
    """from_pretrained (+ 4-bit quantisation), prepare_model_for_kbit_training, get_peft_model."""
    m, t, d = lay.m, lay.t, lay.d
    L, load = m.num_hidden_layers, d.load
    tensors = lay.inv.params
    embed = next(x for x in tensors if x.kind == "embed")
    nonq = [("embed", embed.numel)]
    r.new("w.embed", embed.numel * load)
    for i in range(L):
        for j, x in enumerate(lay.layer_params):
            key = f"w.{i}.{j}"
            if t.method == "qlora" and quantized(x):
                r.new("value", x.numel * load)
                if t.quant == "int8":
                    w, c = int8_bytes(x.numel, lay.linears[x.name].out_features)
                    r.new(key, w)
                    r.new(key + ".scb", c)
                else:
                    packed, absmax, qabsmax, absmax2 = quant_pieces(x.numel, t.double_quant)
                    r.new(key, packed)
                    r.new("absmax", absmax)
                    if t.double_quant:
                        r.new("centered", absmax)
                        r.new(key + ".qabsmax", qabsmax)
                        r.new(key + ".absmax2", absmax2)
                        r.drop("centered", "absmax")
                    else:
                        r.live[key + ".absmax"] = r.live.pop("absmax")
                r.drop("value")
            else:
                r.new(key, x.numel * load)
                nonq.append((f"{i}.{j}", x.numel))
    r.new("w.final_norm", m.hidden_size * load)
    nonq.append(("final_norm", m.hidden_size))
    for x in tensors:
        if x.kind == "lm_head":
            r.new("w.lm_head", x.numel * load)
            nonq.append(("lm_head", x.numel))
    if t.method == "qlora" and t.kbit_prep:
        if d.nonquant != load:
            for key, n in nonq:
                r.new("w32." + key, n * d.nonquant)
                r.drop("w." + key)
        r.alloc.empty_cache()  # prepare_model_for_kbit_training(auto_clear_cache=True)
    if t.method != "full":
        adapters = [(f"{i}.{x.name}", x.numel) for i in range(L) for x in lay.inv.lora
                    if x.count == L]
        moved = load if t.method == "lora" else d.trainable  # a 4-bit base has no float dtype
        for key, n in adapters:
            r.new("lora." + key, n * moved)
        if moved != d.trainable:
            for key, n in adapters:  # PeftModel(autocast_adapter_dtype=True)
                r.live["lora." + key + ".tmp"] = r.live.pop("lora." + key)
                r.new("lora." + key, n * d.trainable)
                r.drop("lora." + key + ".tmp")


def forward_layer(r: Run, lay: Layout, i: int, recompute: bool) -> None:
    """One decoder layer's forward (or its recomputation): its saved tensors (freed at the
    layer's end under checkpointing), dequantised weights, autocast copies, outputs in flight."""
    keep_casts = recompute or not lay.t.grad_ckpt
    group = f"a.{i}"
    live, malloc, transient = r.live, r.alloc.malloc, r.alloc.transient
    members = r.groups.setdefault(group, [])
    cache = r.groups.setdefault("cache", [])
    unsaved = lay.first_layer_unsaved if i == 0 else ()
    held = lay.held
    for op in lay.program.forward:
        kind = op[0]
        if kind == "save":
            if op[1] in unsaved:
                continue
            if op[1] in held:
                if recompute:  # only the recomputed graph would keep it: gone at once
                    if op[1] in lay.led.held_only:
                        r.alloc.transient(op[2], op[1])
                        continue
                else:  # kept by the int8 matmul's ctx, out of checkpointing's reach
                    r.new(("held", i, op[1]), op[2])
                    continue
            key = ("a", i, op[1])
            live[key] = malloc(op[2], key)
            members.append(key)
        elif kind in ("temp", "copy"):
            r.alloc.transient_group(op[1], "in_flight")
        elif kind == "dequant":
            transient(op[1], "dequant")
        elif kind == "merged":  # ParamWrapper's W + B·A copy, saved by the experts' matmul
            r.new(("merged", i, op[1]), op[2], None if keep_casts else group)
        elif kind == "unsaved":  # no graph recorded: freed after their last use
            if not keep_casts:
                r.drop(*(("a", i, name) for name in op[1]))
        else:  # cast
            key = ("cast" if keep_casts else "cache", i, op[1])
            live[key] = malloc(op[2], key)
            if not keep_casts:
                cache.append(key)
    if not recompute:
        r.new(("x", i + 1), lay.m.hidden_size * lay.d.residual * lay.n_tok)
        if lay.t.grad_ckpt:
            r.drop_group(group)


def backward_layer(r: Run, lay: Layout, i: int) -> None:
    """Layer i's backward: the ledger's events reversed, after the recomputation when
    checkpointing; MLP and residual gradient buffers as :func:`activations.workspace_terms`."""
    m, d, n = lay.m, lay.d, lay.n_tok
    if lay.t.grad_ckpt:
        forward_layer(r, lay, i, recompute=True)
    width = m.intermediate_size * (m.num_experts_per_tok or 1)
    e = lay.led.mlp_e
    r.new(("g.res", i), m.hidden_size * (FP32 + d.residual) * n)
    live, malloc, transient, free = r.live, r.alloc.malloc, r.alloc.transient, r.alloc.free
    grads = r.groups.setdefault("grad", [])
    for op in lay.program.backward:
        if op[0] == "drop":
            b = live.pop(("a", i, op[1]), None)
            if b is not None:
                free(b)
            continue
        if op[0] == "moe":
            moe_backward(r, lay, i)
            continue
        _, first, dq, weights = op
        if first:
            r.new(("g.prod", i), width * e * n)
        if dq:
            transient(dq, "dequant")
        for name, nbytes in weights:
            key = ("grad", i, name)
            if key in live:  # gradient accumulation: added into the existing grad
                transient(nbytes, key)
            else:
                live[key] = malloc(nbytes, key)
                grads.append(key)
            b = live.pop(("cast", i, name), None)
            if b is not None:
                free(b)
        if first:
            r.new(("g.mlp", i), max(0, 2 * width * e - lay.led.down_input_bytes) * n)
    for name, numel in other_grads(lay):
        r.grad(("grad", i, name), numel * d.trainable)
    r.drop(("g.mlp", i), ("g.prod", i), *(("held", i, k) for k in lay.held))
    r.new(("g.x", i), m.hidden_size * d.residual * n)
    r.drop(("g.x", i + 1), ("g.res", i), ("x", i + 1))


def moe_backward(r: Run, lay: Layout, i: int) -> None:
    """The merged experts' backward, birth by birth as the trace engine's event log shows it
    (transformers ``grouped_mm_experts_forward`` under peft ``ParamWrapper``; the phase model's
    three moments are :func:`vramplan.model.activations.moe_backward_term`'s): the sum over k and
    the routing weights' backward, the down ``_grouped_mm``'s (the product's gradient and the
    merged stack's), act's and up's, gate_up's. R = k·N routed rows in the experts' dtype."""
    m, n = lay.m, lay.n_tok
    e = param_bytes(lay.t, lay.d)
    rows, h, inter = m.num_experts_per_tok * n, m.hidden_size, m.intermediate_size
    w_down = m.num_local_experts * h * inter * e
    a = ("a", i)

    def saved(name: str) -> tuple:
        return (*a, name)

    def g(name: str) -> tuple:
        return ("g.moe", i, name)

    casts = [("merged", i, f"{proj}.{k}") for proj in ("down", "gate_up") for k in (1, 2)]
    r.new(g("sum"), rows * h * FP32)  # fp32: the routing weights' dtype
    r.new(g("weighted"), rows * h * FP32)
    r.new(g("weights"), rows * h * FP32)
    r.drop(saved("moe_down_out"))
    if e != FP32:  # the down output's gradient, cast back to its dtype
        r.new(g("down_out"), rows * h * e)
        r.drop(g("weighted"))
    r.drop(g("weights"), g("sum"))
    r.new(g("w_down"), w_down)
    r.new(g("prod"), rows * inter * e)
    r.drop(saved("moe_prod"), ("merged", i, "down"), g("weighted"), g("down_out"), *casts[:2],
           g("w_down"))
    r.new(g("act"), rows * inter * e)
    r.new(g("up"), rows * inter * e)
    r.drop(saved("moe_act"), g("prod"))
    r.new(g("gate"), rows * inter * e)
    r.drop(saved("moe_gate_up"), g("act"))
    r.new(g("gate_up"), 2 * rows * inter * e)
    r.drop(g("gate"), g("up"))
    r.new(g("w_gate_up"), 2 * w_down)
    r.new(g("in"), rows * h * e)
    r.drop(saved("moe_in"), ("merged", i, "gate_up"), g("gate_up"), *casts[2:], g("w_gate_up"),
           g("in"))


def loss_forward(r: Run, lay: Layout) -> None:
    """Final norm, lm_head and ForCausalLMLoss: logits, ``logits.float()``, log_softmax; the
    model output (and its logits) is dropped when the loop keeps only ``.loss``."""
    m, t, d, n = lay.m, lay.t, lay.d, lay.n_tok
    nv = n * m.vocab_size
    r.new("final_norm", (4 * m.hidden_size + 4) * n)
    out = final_norm_output_bytes(m, t, d)
    r.new("final_out", m.hidden_size * out * n)  # the forward's hidden_states, until it returns
    if lm_head_copied(t, d):
        r.new("lm_head_cast", m.vocab_size * m.hidden_size * 2)  # saved by lm_head's matmul
    e_l = logits_bytes(lay.t, lay.d)
    if d.autocast and out and out != d.compute:  # lm_head's input, cast for its matmul
        r.new("final_out_cast", m.hidden_size * d.compute * n)
    r.new("logits", e_l * nv)
    r.drop("final_out_cast")
    if m.final_logit_softcapping:  # Gemma-2: tanh(logits / c) * c, tanh's output saved
        r.new("softcap", e_l * nv)
    if e_l != FP32:
        r.new("logits32", FP32 * nv)
    r.new("log_softmax", FP32 * nv)
    if t.loop == "custom":  # `outputs = model(...)`: the new output replaces the previous one
        r.drop("logits32", "logits.kept")
        r.live["logits.kept"] = r.live.pop("logits")
    else:
        r.drop("logits32", "logits")
    r.drop("final_out")
    r.drop_group("cache")  # autocast's weight cache is cleared when the forward exits


def loss_backward(r: Run, lay: Layout) -> None:
    """NLL and log_softmax backward (two fp32 N·V grads), the cast back, lm_head backward."""
    m, t, d, n = lay.m, lay.t, lay.d, lay.n_tok
    nv = n * m.vocab_size
    e_l = logits_bytes(lay.t, lay.d)
    r.new("g.nll", FP32 * nv)
    r.new("g.lsm", FP32 * nv)
    r.drop("g.nll", "log_softmax")
    if e_l != FP32:
        r.new("g.logits", e_l * nv)
        r.drop("g.lsm")
    if t.method == "full":
        head = "embed" if m.tie_word_embeddings else "lm_head"
        r.grad(f"grad.{head}", m.vocab_size * m.hidden_size * d.trainable)
        r.grad("grad.final_norm", m.hidden_size * d.trainable)
    r.new(("g.x", m.num_hidden_layers), m.hidden_size * d.residual * n)
    r.drop("g.logits", "g.lsm", "lm_head_cast", "final_norm", "softcap")


def micro_step(r: Run, lay: Layout, first: bool, workspace: int) -> None:
    """Forward, loss and backward of one micro-batch (gradients born, or accumulated)."""
    m, t, d, n = lay.m, lay.t, lay.d, lay.n_tok
    L = m.num_hidden_layers
    r.phase = "forward"
    if first:
        r.new("cublas.forward", workspace)
    r.new(("x", 0), m.hidden_size * d.residual * n)
    r.new("rope", 2 * m.head_dim * d.nonquant * n)
    if t.attn == "eager":  # masking_utils: one additive b·s² mask per mask kind
        s = t.seq_len
        kinds = 2 if m.sliding_window and m.sliding_window < s else 1
        for k in range(kinds):
            r.new(f"mask.{k}", t.batch * s * s * d.nonquant)
    for i in range(L):
        forward_layer(r, lay, i, recompute=False)
    if not t.grad_ckpt:  # the masks die with the model's forward (checkpoints keep them)
        r.drop("mask.0", "mask.1")
    r.phase = "loss"
    loss_forward(r, lay)
    r.phase = "backward"
    if first:
        r.new("cublas.backward", workspace)
    loss_backward(r, lay)
    for i in reversed(range(L)):
        backward_layer(r, lay, i)
    r.drop("rope", ("g.x", 0), ("x", 0), "mask.0", "mask.1")
    if t.method == "full":
        v_h = m.vocab_size * m.hidden_size * d.trainable
        if m.tie_word_embeddings:  # embedding_dense_backward, then AccumulateGrad's sum
            r.new("g.embed_dense", v_h)
            r.new("g.embed_sum", v_h)
            r.drop("g.embed_dense", "grad.embed")
            r.live["grad.embed"] = r.live.pop("g.embed_sum")
            r.groups.setdefault("grad", []).append("grad.embed")
        else:
            r.grad("grad.embed", v_h)


def optimizer_step(r: Run, lay: Layout, first: bool) -> None:
    """Clipping, the optimizer step (states born at the first one, step temporaries), zero_grad
    (see :func:`vramplan.model.optim.state_pieces` and ``step_temporaries``)."""
    t, d = lay.t, lay.d
    e = d.trainable
    r.phase = "optimizer"
    tensors = trainable_order(lay)
    if t.max_grad_norm > 0 and tensors:  # clip_grad_norm_: _foreach_norm scalars, then stack
        r.alloc.transient_group((e,) * len(tensors) + (e * len(tensors),), "clip_norms")
    opt = t.resolved_optimizer
    if first and lay.device == "cuda":
        for name, x in tensors:
            for k, nbytes in enumerate(state_pieces(x, opt, e)[0]):
                r.new(f"state.{name}.{k}", nbytes)
    if opt == "adamw_torch":  # _foreach_sqrt(exp_avg_sqs): a copy of every state at once
        for name, x in tensors:
            r.new(("sqrt", name), x.numel * e, "sqrt")
        r.drop_group("sqrt")
    elif opt == "adamw_loop":
        for _, x in tensors:
            r.alloc.transient_group((x.numel * e, x.numel * e), "denom")
    elif opt == "adafactor":
        for _, x in tensors:
            pieces = ((FP32 * x.numel,) * 2 if e != FP32 else ()) + (FP32 * x.numel,) * 2
            r.alloc.transient_group(pieces, "adafactor_update")
    r.drop_group("grad")


def step(r: Run, lay: Layout, first: bool, workspace: int = 0) -> None:
    """One optimizer step: ``grad_accum`` micro-steps, then clipping, the optimizer step and
    zero_grad. The first step also creates the cuBLAS workspaces (``workspace`` bytes per handle;
    the autograd thread has its own: ``CublasHandlePool.cpp``) and the optimizer states."""
    for k in range(lay.t.grad_accum):
        micro_step(r, lay, first and k == 0, workspace)
    optimizer_step(r, lay, first)


def replay(m: ModelSpec, t: TrainSpec, d: Dtypes, led: Ledger, device: str = "cuda",
           expandable: bool = False, workspace: int = 0) -> Replay:
    """Build, a warm-up step and a measured step through the caching-allocator emulation; the
    peaks are those of the measured step (the harness resets them after warm-up)."""
    lay = layout(m, t, d, led, device)
    r = Run(expandable)
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of short-lived blocks: the cycle collector only slows it
    try:
        build(r, lay)
        step(r, lay, first=True, workspace=workspace)
        before = len(r.alloc.segments)
        r.alloc.reset_peaks()
        r.alloc.largest = 0
        step(r, lay, first=False)
    finally:
        if collecting:
            gc.enable()
    return Replay(r.alloc.peak_allocated, r.alloc.peak_reserved,
                  tuple(r.alloc.segments[before:]), len(r.alloc.segments), r.alloc.largest)
