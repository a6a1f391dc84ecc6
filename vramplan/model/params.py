"""Exact parameter counts per tensor, including LoRA adapters (parity-tested against transformers/peft).

Each decoder family's layer is described as a list of linear layers (name, in, out, bias) read from
transformers 5.x ``models/<family>/modeling_<family>.py``; everything else (embeddings, norms, MoE
router and fused experts) is listed as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vramplan.specs import ModelSpec, TrainSpec


@dataclass(frozen=True, slots=True)
class Linear:
    """One ``nn.Linear`` inside every decoder layer."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True, slots=True)
class Tensor:
    """A parameter tensor: elements each, how many copies in the model, and what it is."""

    name: str
    numel: int
    count: int
    kind: str  # "linear" | "bias" | "embed" | "lm_head" | "norm" | "router" | "expert" | "lora"
    shape: tuple[int, ...] = ()  # one copy's shape (torch order: out, in); () = (numel,)

    @property
    def params(self) -> int:
        return self.numel * self.count

    @property
    def factored(self) -> tuple[int, int] | None:
        """(row, column) sizes of Adafactor's factored second moment for a tensor of 2+ dims
        (``shape[:-1]`` and ``shape[:-2] + shape[-1:]`` elements), None for a vector."""
        if len(self.shape) < 2:
            return None
        rows = self.numel // self.shape[-1]
        return rows, self.numel // self.shape[-2]


@lru_cache(maxsize=256)
def layer_linears(m: ModelSpec) -> tuple[Linear, ...]:
    """The nn.Linear modules of one decoder layer (MoE experts are fused 3-D parameters, not here)."""
    h, q, kv, i = m.hidden_size, m.q_dim, m.kv_dim, m.intermediate_size
    if m.fused_qkv:  # Phi3Attention.qkv_proj
        attn = (Linear("qkv_proj", h, q + 2 * kv, m.qkv_bias),)
    else:
        attn = (Linear("q_proj", h, q, m.qkv_bias), Linear("k_proj", h, kv, m.qkv_bias),
                Linear("v_proj", h, kv, m.qkv_bias))
    attn += (Linear("o_proj", q, h, m.o_bias),)
    if m.is_moe:
        return attn
    if m.fused_gate_up:  # Phi3MLP.gate_up_proj
        mlp = (Linear("gate_up_proj", h, 2 * i, m.mlp_bias),)
    else:
        mlp = (Linear("gate_proj", h, i, m.mlp_bias), Linear("up_proj", h, i, m.mlp_bias))
    return attn + mlp + (Linear("down_proj", i, h, m.mlp_bias),)


@lru_cache(maxsize=256)
def param_tensors(m: ModelSpec) -> tuple[Tensor, ...]:
    """Every parameter tensor of the model, tied embeddings counted once.

    Ref: transformers 5.x modeling files; MixtralExperts keeps gate_up_proj [E, 2I, h] and
    down_proj [E, h, I] as nn.Parameter, and the router is a [E, h] weight.
    """
    L, h, V = m.num_hidden_layers, m.hidden_size, m.vocab_size
    out = [Tensor("embed_tokens", V * h, 1, "embed", (V, h))]
    if not m.tie_word_embeddings:
        out.append(Tensor("lm_head", V * h, 1, "lm_head", (V, h)))
    for lin in layer_linears(m):
        out.append(Tensor(lin.name, lin.weight_params, L, "linear",
                          (lin.out_features, lin.in_features)))
        if lin.bias:
            out.append(Tensor(lin.name + ".bias", lin.out_features, L, "bias", (lin.out_features,)))
    out.append(Tensor("layer_norms", h, m.norms_per_layer * L, "norm", (h,)))
    out.append(Tensor("final_norm", h, 1, "norm", (h,)))
    if m.qk_norm:
        out.append(Tensor("qk_norms", m.head_dim, 2 * L, "norm", (m.head_dim,)))
    if m.is_moe:
        e, i = m.num_local_experts, m.intermediate_size
        out.append(Tensor("router", e * h, L, "router", (e, h)))
        out.append(Tensor("experts.gate_up_proj", e * 2 * i * h, L, "expert", (e, 2 * i, h)))
        out.append(Tensor("experts.down_proj", e * h * i, L, "expert", (e, h, i)))
    return tuple(out)


def total_params(m: ModelSpec) -> int:
    """P: all parameters (tied embeddings once)."""
    return sum(t.params for t in param_tensors(m))


def lora_linears(m: ModelSpec, train: TrainSpec) -> tuple[Linear, ...]:
    """The decoder-layer linears a LoRA config adapts (peft "all-linear" skips lm_head)."""
    targets = train.target_modules()
    lins = layer_linears(m)
    if targets is None:
        return lins
    return tuple(lin for lin in lins if lin.name in targets)


def lora_tensors(m: ModelSpec, train: TrainSpec) -> tuple[Tensor, ...]:
    """lora_A (r × in) and lora_B (out × r) for every adapted linear in every layer.

    Ref: peft ``tuners/lora/layer.py::LoraLayer.update_layer`` (nn.Linear(in, r), nn.Linear(r, out),
    no bias); Hu et al. 2021 (arXiv:2106.09685).
    """
    if train.method == "full":
        return ()
    r, L = train.lora_r, m.num_hidden_layers
    out: list[Tensor] = []
    for lin in lora_linears(m, train):
        out.append(Tensor(lin.name + ".lora_A", r * lin.in_features, L, "lora",
                          (r, lin.in_features)))
        out.append(Tensor(lin.name + ".lora_B", r * lin.out_features, L, "lora",
                          (lin.out_features, r)))
    if m.is_moe and train.target_modules() is None:
        out.extend(moe_lora_tensors(m, r))
    return tuple(out)


def moe_lora_tensors(m: ModelSpec, r: int) -> tuple[Tensor, ...]:
    """peft 0.21 "all-linear" on a transformers-5 MoE block: the router gets a plain LoRA
    (r·(h + E)); the fused 3-D experts get ``target_parameters`` LoRA (ParamWrapper) with rank
    r·E per parameter, doubled for the fused gate_up_proj (peft's rank_pattern for it).
    Shapes read from peft ``tuners/lora/layer.py::ParamWrapper`` on a meta Mixtral."""
    h, i, e, L = m.hidden_size, m.intermediate_size, m.num_local_experts, m.num_hidden_layers
    return (
        Tensor("router.lora_A", r * h, L, "lora", (r, h)),
        Tensor("router.lora_B", r * e, L, "lora", (e, r)),
        Tensor("experts.gate_up_proj.lora_A", 2 * r * e * h, L, "lora", (2 * r * e, h)),
        Tensor("experts.gate_up_proj.lora_B", 2 * r * e * 2 * i, L, "lora", (2 * i, 2 * r * e)),
        Tensor("experts.down_proj.lora_A", r * e * i, L, "lora", (r * e, i)),
        Tensor("experts.down_proj.lora_B", r * e * h, L, "lora", (h, r * e)),
    )


def trainable_tensors(m: ModelSpec, train: TrainSpec) -> tuple[Tensor, ...]:
    """Tensors that get gradients and optimizer state: all of them for full, the adapters otherwise."""
    return param_tensors(m) if train.method == "full" else lora_tensors(m, train)


def trainable_params(m: ModelSpec, train: TrainSpec) -> int:
    """P_t: trainable parameters."""
    return sum(t.params for t in trainable_tensors(m, train))
