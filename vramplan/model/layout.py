"""What the allocator replay needs of a model and setup, resolved once: the layer's parameters,
its LoRA targets, the byte sizes of a decoder layer's forward and backward as operations (from the
:mod:`vramplan.model.ledger` events), and the trainable tensors in the optimizer's order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vramplan.model import weights
from vramplan.model.activations import merged_experts, moe_merged_pieces
from vramplan.model.dtypes import Dtypes
from vramplan.model.inventory import Inventory, inventory
from vramplan.model.ledger import FP32, Ledger, frozen_first_input
from vramplan.model.params import Tensor
from vramplan.specs import ModelSpec, TrainSpec

@dataclass(frozen=True, slots=True)
class Layout:
    """What the replay needs of a model and setup, resolved once."""

    m: ModelSpec
    t: TrainSpec
    d: Dtypes
    led: Ledger
    inv: Inventory  # the step's tensors (linears, adapters, LoRA targets)
    layer_params: tuple  # one layer's parameter tensors in named_parameters order
    device: str
    program: "LayerProgram | None" = None

    @property
    def n_tok(self) -> int:
        return self.t.seq_len * self.t.batch

    @property
    def linears(self) -> dict:
        """name -> Linear of one decoder layer."""
        return self.inv.linear_by_name

    @property
    def adapted(self) -> frozenset:
        """The linear names with LoRA adapters."""
        return self.inv.adapted

    @property
    def held(self) -> frozenset:
        """Saved names an int8 matmul also keeps (a ctx attribute): under checkpointing the
        forward's own tensors stay until the layer's backward."""
        return frozenset(self.led.held) if self.t.grad_ckpt else frozenset()

    @property
    def first_layer_unsaved(self) -> frozenset:
        """Saved names the first layer does not save (its input norm's and its q/k/v dropout
        masks, when its input needs no grad: :func:`vramplan.model.ledger.frozen_first_input`)."""
        return frozenset(self.led.frozen_input_saves) if frozen_first_input(self.t) \
            else frozenset()


def layout(m: ModelSpec, t: TrainSpec, d: Dtypes, led: Ledger, device: str) -> Layout:
    L = m.num_hidden_layers
    inv = inventory(m, t)
    per = []
    for x in inv.params:
        if x.count % L == 0 and x.kind in ("linear", "bias", "norm", "router", "expert"):
            per += [Tensor(x.name, x.numel, 1, x.kind, x.shape)] * (x.count // L)
    lay = Layout(m, t, d, led, inv, tuple(per), device)
    return replace(lay, program=layer_program(lay))


def trainable_order(lay: Layout) -> list[tuple[str, Tensor]]:
    """(name, tensor) of every trainable tensor in parameter order (the optimizer's order)."""
    m, t = lay.m, lay.t
    L = m.num_hidden_layers
    if t.method != "full":
        return [(f"{i}.{x.name}", x) for i in range(L) for x in lay.inv.lora if x.count == L]
    tensors = lay.inv.params
    out = [("embed", next(x for x in tensors if x.kind == "embed"))]
    out += [(f"{i}.{j}", x) for i in range(L) for j, x in enumerate(lay.layer_params)]
    out += [("final_norm", x) for x in tensors if x.name == "final_norm"]
    out += [("lm_head", x) for x in tensors if x.kind == "lm_head"]
    return out


def linear_weights(lay: Layout, name: str) -> list[tuple[str, int]]:
    """(suffix, numel) of the trainable weights used by one linear call: the full weight (and
    bias) in full fine-tuning, lora_A and lora_B when adapted, nothing otherwise."""
    lin = lay.linears[name]
    if lay.t.method == "full":
        out = [("", lin.weight_params)]
        return out + [(".bias", lin.out_features)] if lin.bias else out
    if name in lay.adapted:
        r = lay.t.lora_r
        return [(".lora_A", r * lin.in_features), (".lora_B", r * lin.out_features)]
    return []


def dequant_bytes(lay: Layout, name: str) -> int:
    """The bf16 weight ``dequantize_4bit`` makes for one 4-bit matmul (+ fp32 absmax with DQ)."""
    return weights.dequant_bytes(lay.linears[name].weight_params, lay.d.compute,
                                 lay.t.double_quant)


def merged_pieces(lay: Layout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """peft ParamWrapper's merged W + B·A copies of a layer's expert stacks and the LoRA factor
    casts, ((down stack, casts...), (gate_up stack, casts...)) (see
    :func:`activations.moe_merged_pieces`); empty unless LoRA all-linear on an MoE."""
    return moe_merged_pieces(lay.m, lay.t, lay.d) if merged_experts(lay.m, lay.t) else ((), ())


def other_grads(lay: Layout) -> list[tuple[str, int]]:
    """A layer's trainable tensors that no nn.Linear call covers: norms, router and fused
    experts in full fine-tuning; the router and expert LoRA factors of an MoE under LoRA."""
    if lay.t.method == "full":
        return [(f"p{j}", x.numel) for j, x in enumerate(lay.layer_params)
                if x.kind in ("norm", "router", "expert")]
    return [(x.name, x.numel) for x in lay.inv.lora
            if x.count == lay.m.num_hidden_layers and x.name.rsplit(".", 1)[0] not in lay.linears]


@dataclass(frozen=True, slots=True)
class LayerProgram:
    """A decoder layer's forward and backward as byte-sized operations, resolved once per
    replay from the ledger's events (every layer runs the same program)."""

    forward: tuple  # ("save", name, bytes) | ("dequant", bytes) | ("cast", name, bytes)
    #                 | ("temp" | "copy", (bytes, ...)) | ("merged", part, bytes)
    #                 | ("unsaved", names): freed at once when the forward records no graph
    backward: tuple  # ("drop", name) | ("linear", first, dequant bytes, ((name, grad bytes), ...))
    #                  | ("moe",): the merged experts' backward (timeline.moe_backward)


def layer_program(lay: Layout) -> LayerProgram:
    n, d = lay.n_tok, lay.d
    qlora = lay.t.method == "qlora" and lay.t.quant != "int8"
    casts = d.autocast and d.trainable == FP32  # autocast's bf16 copies of fp32 weights
    fwd: list[tuple] = []
    bwd: list[tuple] = []
    down, gate_up = merged_pieces(lay)
    for kind, what in lay.led.events:
        if kind == "save" and what == "moe_in" and gate_up:
            # ParamWrapper casts each stack's LoRA factors (kept until their gradients) and
            # merges the stack once, unused, before the experts run (the trace's event log: down,
            # then gate_up, each merge freed at once), then again for each matmul
            fwd += [*(("merged", f"down.{k}", b) for k, b in enumerate(down[1:], 1)),
                    ("copy", down[:1]),
                    *(("merged", f"gate_up.{k}", b) for k, b in enumerate(gate_up[1:], 1)),
                    ("copy", gate_up[:1]), ("save", what, lay.led.saved[what] * n),
                    ("merged", "gate_up", gate_up[0])]
        elif kind == "save" and what == "moe_prod" and gate_up:
            # a checkpointed forward records no graph: act and the gate_up output die once the
            # product exists, the product once the down output does (the trace's event log)
            fwd += [("save", what, lay.led.saved[what] * n), ("unsaved", ("moe_act", "moe_gate_up")),
                    ("merged", "down", down[0])]
        elif kind == "save" and what == "moe_down_out" and gate_up:
            fwd += [("save", what, lay.led.saved[what] * n), ("unsaved", ("moe_prod",))]
        elif kind == "moe_end":
            if gate_up:
                fwd.append(("unsaved", ("moe_in", "moe_down_out")))
        elif kind == "save" and what != "layer_in":
            fwd.append(("save", what, lay.led.saved[what] * n))
        elif kind == "linear":
            if qlora:
                fwd.append(("dequant", dequant_bytes(lay, what)))
            if casts:
                fwd += [("cast", what + suffix, numel * d.compute)
                        for suffix, numel in linear_weights(lay, what)]
        elif kind in ("temp", "copy"):
            fwd.append((kind, tuple(x * n for x in what)))
    first = not gate_up  # merged experts: their backward is the ("moe",) op, not a down linear
    for kind, what in reversed(lay.led.events):
        if kind == "save" and gate_up and what.startswith("moe_"):
            if what == "moe_down_out":  # the last the experts save: their backward starts
                bwd.append(("moe",))
        elif kind == "save" and what != "layer_in":
            bwd.append(("drop", what))
        elif kind == "linear":
            grads = tuple((what + suffix, numel * d.trainable)
                          for suffix, numel in linear_weights(lay, what))
            bwd.append(("linear", first, dequant_bytes(lay, what) if qlora else 0, grads))
            first = False
    return LayerProgram(tuple(fwd), tuple(bwd))
