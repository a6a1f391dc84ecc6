"""The step's inventory of parameter tensors, built once per (model, setup) and read by every term.

What a model holds under a setup, listed once: one decoder layer's ``nn.Linear`` modules, the LoRA
targets resolved from the setup's target string, every base parameter tensor
(:func:`vramplan.model.params.param_tensors`), the adapters
(:func:`vramplan.model.params.lora_tensors`), which of them train, and the counts. The weight,
gradient, optimizer, activation, sharding and replay models read it instead of listing tensors
again (the step-time model needs only the model's own tensors: the memoised
:func:`~vramplan.model.params.param_tensors`); how many bytes a tensor is stored in is
:func:`vramplan.model.weights.stored_bytes`.

Only the model and the setup's method, rank and targets decide it, so a sweep over sequence
length, batch, precision or optimizer shares one inventory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.model.params import Linear, Tensor, layer_linears, lora_tensors, param_tensors
from vramplan.specs import ModelSpec, TrainSpec

#: Inventories kept (one per model × method × rank × targets); the oldest go first.
CACHE_SIZE = 512


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every parameter tensor of a model under one setup (counts are over the whole model)."""

    method: str
    linears: tuple[Linear, ...]  # one decoder layer's nn.Linear modules, in module order
    targets: tuple[str, ...] | None  # LoRA target names; None = peft "all-linear"
    params: tuple[Tensor, ...]  # the base model's parameters (tied embeddings once)
    lora: tuple[Tensor, ...]  # LoRA A/B factors (none for full fine-tuning)
    linear_by_name: dict[str, Linear] = field(repr=False)
    adapted: frozenset[str] = frozenset()  # the layer linears that carry adapters

    @property
    def trainable(self) -> tuple[Tensor, ...]:
        """The tensors that get gradients and optimizer states: every parameter for full
        fine-tuning, the adapters otherwise."""
        return self.params if self.method == "full" else self.lora

    @property
    def total_params(self) -> int:
        """P: the base model's parameters (adapters not included)."""
        return sum(x.params for x in self.params)

    @property
    def trainable_params(self) -> int:
        """P_t: trainable parameters."""
        return sum(x.params for x in self.trainable)

    @property
    def all_linear(self) -> bool:
        """LoRA on every linear (peft "all-linear"), which on an MoE also adapts the router and
        the fused experts."""
        return self.method != "full" and self.targets is None

    def of_kind(self, *kinds: str) -> tuple[Tensor, ...]:
        """The base parameters of the given kinds ("embed", "lm_head", "linear", ...)."""
        return tuple(x for x in self.params if x.kind in kinds)


_CACHE: dict[tuple, Inventory] = {}


def inventory(m: ModelSpec, t: TrainSpec) -> Inventory:
    """The inventory of ``m`` under ``t`` (memoised on the model and the setup's method, LoRA
    rank and targets)."""
    key = (m, t.method, t.lora_r, t.lora_targets)
    inv = _CACHE.get(key)
    if inv is None:
        if len(_CACHE) >= CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        inv = _CACHE[key] = _build(m, t)
    return inv


def _build(m: ModelSpec, t: TrainSpec) -> Inventory:
    linears = layer_linears(m)
    by_name = {lin.name: lin for lin in linears}
    lora = lora_tensors(m, t)
    adapted = frozenset(x.name.rsplit(".", 1)[0] for x in lora).intersection(by_name)
    return Inventory(t.method, linears, t.target_modules() if t.method != "full" else None,
                     param_tensors(m), lora, by_name, adapted)
