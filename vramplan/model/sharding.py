"""Per-GPU memory under ZeRO-1/2/3 or FSDP full sharding, from a single-GPU estimate.

Per GPU, with N data-parallel ranks and Ψ trainable parameters (Rajbhandari et al. 2020,
arXiv:1910.02054 §5, Fig. 1; the FSDP paper, Zhao et al. 2023, arXiv:2304.11277 §3):

    none   : W + G + O
    zero1  : W + G + O/N                              (P_os)
    zero2  : W + (G + O)/N                            (P_os+g)
    zero3  : (W + G + O)/N + gathered working set     (P_os+g+p)
    fsdp   : same as zero3 (FULL_SHARD)

The gathered working set is the unsharded parameters of the unit being computed plus the
prefetched next one (forward and backward prefetch), and the unsharded gradients of one unit
before its reduce-scatter. Each decoder layer is one wrap unit (transformer auto-wrap policy);
the embedding and the lm_head are taken as units of their own. Activations are never divided
(ZeRO-R partitions activations only under model parallelism, §6). Quantisation constants of
FSDP + QLoRA are not sharded: the bnb ``QuantState`` is module state, not a flat parameter
(bitsandbytes ``docs/source/fsdp_qlora.md``); the packed 4-bit storage is. Activation-group
terms that are copies of the whole model's weights (autocast weight cache, merged MoE experts of the
other layers) are divided with the weights under ZeRO-3/FSDP, since those copies are made of
gathered units and freed with them.

Not modelled: NCCL buffers, DeepSpeed's bucketed communication buffers, CPU offload.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from vramplan.model.dtypes import dtypes_for
from vramplan.model.estimate import Estimate, levels
from vramplan.model.inventory import inventory
from vramplan.model.params import Tensor
from vramplan.model.terms import PHASES, Breakdown, Term
from vramplan.model.weights import stored_bytes
from vramplan.specs import ModelSpec, TrainSpec
from vramplan.units import ceil_div

CACHE_KEY = "overhead.allocator_cache"
#: Optimizer-group terms that are not model states: the step's temporaries and clipping norms.
STEP_TRANSIENTS = frozenset({"optimizer.step_temporaries", "optimizer.clip_norms",
                             "gradients.accumulate_buffer"})
#: Which term groups each scheme divides by N (ZeRO §5: P_os, P_os+g, P_os+g+p).
SHARDED_GROUPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "zero1": ("optimizer",),
    "zero2": ("optimizer", "gradients"),
    "zero3": ("optimizer", "gradients", "weights"),
    "fsdp": ("optimizer", "gradients", "weights"),
}
#: Terms never sharded even when their group is: bnb QuantState is module state, not a parameter.
UNSHARDED_KEYS = frozenset({"weights.quant_constants"})
#: Activation terms sized by the whole model's weights (copies of every layer's parameters): under
#: ZeRO-3/FSDP the copies are made of gathered units and freed with them, so they scale as the
#: parameters do. One-layer copies (dequant buffer, layer casts) are not divided.
WHOLE_MODEL_COPIES = frozenset({"activations.autocast_weight_cache",
                                "activations.moe_merged_experts_rest"})
#: Schemes that gather parameters on demand (and so hold a working set of full units).
GATHERING = frozenset({"zero3", "fsdp"})
#: Units gathered at once: the current one plus one prefetched (FSDP forward/backward prefetch,
#: DeepSpeed stage3 prefetch); see arXiv:2304.11277 §3.3.
GATHERED_UNITS = 2
#: Parameters are resharded after backward, so gathered units are absent at the optimizer step.
GATHER_PHASES = tuple(p for p in PHASES if p != "optimizer_step")
UNIT_GRAD_PHASES = ("down_backward", "layer_backward", "last_layer_backward")


def model_state_bytes(est: Estimate) -> int:
    """Per-GPU weights + gradients + optimizer states (ZeRO's model states), without the
    gathered working set or the optimizer step's temporaries."""
    return sum(t.nbytes for t in est.breakdown.terms
               if t.key.split(".")[0] in ("weights", "gradients", "optimizer")
               and t.key not in STEP_TRANSIENTS
               and not t.key.endswith("gathered_units") and not t.key.endswith("unit_grads"))


def shard_term(t: Term, n: int) -> Term:
    """The per-rank share of one term: ceil(bytes / N) (uneven shards are padded up)."""
    return replace(t, nbytes=ceil_div(t.nbytes, n), formula=f"({t.formula}) / N_gpus")


def layer_unit_tensors(m: ModelSpec, train: TrainSpec) -> tuple[Tensor, ...]:
    """The parameter tensors of one decoder layer, adapters included (count = copies per layer)."""
    L = m.num_hidden_layers
    inv = inventory(m, train)
    per_layer = [x for x in inv.params if x.kind not in ("embed", "lm_head")
                 and x.name != "final_norm"]
    per_layer += list(inv.lora)
    return tuple(replace(x, count=x.count // L) for x in per_layer)


def unit_bytes(m: ModelSpec, train: TrainSpec, device: str) -> tuple[int, int, int]:
    """(largest unit's bytes, one layer unit's bytes, one layer's trainable params), each tensor
    in its stored bytes (:func:`vramplan.model.weights.stored_bytes`).

    Units: one decoder layer, the embedding, the lm_head (untied). Ref: FSDP
    ``transformer_auto_wrap_policy``; arXiv:2304.11277 §3.2.
    """
    inv, d = inventory(m, train), dtypes_for(train, device)
    layer = layer_unit_tensors(m, train)
    layer_bytes = sum(stored_bytes(x, train, d, inv) for x in layer)
    others = [stored_bytes(x, train, d, inv) for x in inv.of_kind("embed", "lm_head")]
    trainable = sum(x.params for x in layer if train.method == "full" or x.kind == "lora")
    return max([layer_bytes, *others]), layer_bytes, trainable


def gathered_terms(m: ModelSpec, train: TrainSpec, device: str) -> tuple[Term, ...]:
    """The ZeRO-3/FSDP working set: full units gathered on demand, and one unit's full grads.

    bytes = unit_max + (GATHERED_UNITS − 1) · unit_layer, and P_t/layer · e_grad
    Ref: arXiv:1910.02054 §5.3 (P_p: parameters broadcast on demand); arXiv:2304.11277 §3.3
    (prefetching); PHYSICS-REFERENCE §7.2.
    """
    biggest, layer, layer_trainable = unit_bytes(m, train, device)
    e_grad = dtypes_for(train, device).trainable
    return (
        Term("weights.gathered_units", biggest + (GATHERED_UNITS - 1) * layer,
             f"max unit + {GATHERED_UNITS - 1} x layer unit (full, stored dtype)",
             "arXiv:1910.02054 §5.3; arXiv:2304.11277 §3.3 (all-gather + prefetch)",
             phases=GATHER_PHASES),
        Term("gradients.unit_grads", layer_trainable * e_grad, "P_t/layer * sizeof(grad)",
             "unsharded grads of one unit before reduce-scatter (arXiv:2304.11277 §3)",
             phases=UNIT_GRAD_PHASES),
    )


def shard_estimate(est: Estimate, train: TrainSpec, calib: Mapping[str, Any]) -> Estimate:
    """Per-GPU memory of `est` under ``train.shard`` over ``train.num_gpus`` ranks.

    Terms of the sharded groups are divided by N; the peak is recomputed with the same phase
    model (each term's ``phases``). Reserved adds the allocator cache of the unsharded replay,
    scaled by the ratio of the sharded to the unsharded peak allocated (an approximation: the
    replay is of one unsharded rank), and the device total the memory outside the allocator.
    """
    n, scheme = train.num_gpus, train.shard
    groups = SHARDED_GROUPS[scheme]
    kept = []
    cache = None
    for t in est.breakdown.terms:
        if t.key == CACHE_KEY and scheme != "none" and n > 1:
            cache = t  # rescaled below, on the sharded peak
            continue
        shardable = (t.key.split(".")[0] in groups and t.key not in UNSHARDED_KEYS) or \
            (scheme in GATHERING and t.key in WHOLE_MODEL_COPIES)
        kept.append(shard_term(t, n) if shardable and n > 1 else t)
    if scheme in GATHERING:
        kept.extend(gathered_terms(est.model, est.train, est.device))
    if cache is not None:
        ratio = levels(tuple(kept)).peak_allocated_bytes / max(1, est.peak_allocated_bytes)
        kept.append(replace(cache, nbytes=int(cache.nbytes * ratio),
                            formula=f"({cache.formula}) * sharded peak / unsharded peak"))
    lv = levels(tuple(kept))
    terms = tuple(kept)
    notes = est.breakdown.notes + ((f"per GPU under {scheme} over {n} GPUs (ZeRO §5 / FSDP); "
                                    "NCCL and communication buckets not modelled",)
                                   if scheme != "none" else ())
    full = Breakdown(terms, inputs=est.breakdown.inputs, notes=notes)
    return replace(est, breakdown=full, phase_bytes=lv.phase_bytes, peak_phase=lv.peak_phase,
                   peak_allocated_bytes=lv.peak_allocated_bytes,
                   peak_reserved_bytes=lv.peak_reserved_bytes,
                   device_total_bytes=lv.device_total_bytes, paged_bytes=lv.paged_bytes,
                   shard=scheme, num_gpus=n)
