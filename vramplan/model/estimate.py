"""Composition only: gather the terms of a setup and evaluate the three peak levels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Mapping

from vramplan.model import activations, optim, overhead, weights
from vramplan.model.dtypes import dtypes_for
from vramplan.model.ledger import ledger_for, per_token_setup
from vramplan.model.inventory import inventory
from vramplan.model.terms import PHASES, Breakdown, Term
from vramplan.model.timeline import Replay, replay
from vramplan.specs import ModelSpec, SpecError, TrainSpec


@dataclass(frozen=True, slots=True)
class Estimate:
    """One training step on one of ``num_gpus`` GPUs (unsharded: 1): its breakdown, its three
    levels, its phase timeline (``phase_bytes``) and the phase that sets the peak. The only result
    type: :func:`vramplan.model.sharding.shard_estimate` returns one for N GPUs."""

    model: ModelSpec
    train: TrainSpec
    device: str
    breakdown: Breakdown
    params_total: int
    params_trainable: int
    phase_bytes: Mapping[str, int]
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    paged_bytes: int = 0  # bnb paged optimizer states: on the GPU while it has room, else host RAM
    replay: Replay | None = None  # the caching-allocator replay behind the reserved level
    shard: str = "none"  # the sharding scheme the terms are divided by (model/sharding.py)
    num_gpus: int = 1

    @property
    def largest_temporary_bytes(self) -> int:
        """The largest single block the measured step allocates (0 without a replay)."""
        return self.replay.largest_block_bytes if self.replay else 0

    def at_peak(self) -> tuple[Term, ...]:
        """The terms counted in the device total: live in the peak phase, or at the reserved or
        device level. Paged states are not among them (see ``paged_bytes``)."""
        return self.breakdown.counted(self.peak_phase)


def estimate(m: ModelSpec, t: TrainSpec, calib: Mapping[str, Any], device: str = "cuda",
             allocator: bool = True) -> Estimate:
    """Estimate one training step's peak memory.

    Peak semantics (phase model): live bytes are summed per phase (forward end, loss backward,
    first layer backward, optimizer step) over the terms live in it; peak allocated is the largest.
    Reserved adds the blocks the caching allocator holds free at the peak, from a replay of the
    step's allocate/free sequence; the device total adds the memory outside the allocator.
    Paged optimizer states are their own figure (``paged_bytes``), outside the device total.
    """
    check_targets(m, t)
    t_eff = effective_setup(m, t)
    if t_eff is not t:
        return _with_note(estimate(m, t_eff, calib, device, allocator), t,
                          f"{m.model_type} has no SDPA path in transformers 5.x (from_pretrained "
                          "raises): estimated with eager attention; pass --attn eager or "
                          "flash_attention_2")
    d = dtypes_for(t, device)
    shape_free = per_token_setup(t)
    led = ledger_for(m, t, device)  # one decoder layer serves every user
    rp = step_replay(m, t, device, int(calib["cublas_workspace"]["bytes"]) // 2) \
        if device == "cuda" and allocator else None
    held = setup_terms(m, shape_free, device)
    terms = (*held.terms, *activations.layer_terms(m, t, d, led),
             *activations.workspace_terms(m, t, d, led), *activations.head_terms(m, t, d),
             *activations.logits_terms(m, t, d), *held.transients,
             *overhead.workspace_term(calib, device), *overhead.allocator_cache_term(rp),
             *overhead.non_allocator_term(calib, device))
    lv = levels(terms)
    full = Breakdown(terms, inputs={"model": m.name, **t.as_dict(), "device": device},
                     notes=notes_for(m, t, calib, device) + overhead.segment_notes(rp))
    return Estimate(m, t, device, full, held.params_total, held.params_trainable,
                    lv.phase_bytes, lv.peak_phase, lv.peak_allocated_bytes,
                    lv.peak_reserved_bytes, lv.device_total_bytes, lv.paged_bytes, rp)


@dataclass(frozen=True, slots=True)
class SetupTerms:
    """The terms that do not depend on the batch shape, and the parameter counts."""

    terms: tuple[Term, ...]  # resident: weights, adapters, gradients, optimizer
    transients: tuple[Term, ...]  # weight-sized buffers (:func:`activations.transient_terms`)
    params_total: int
    params_trainable: int


@lru_cache(maxsize=4096)
def setup_terms(m: ModelSpec, t: TrainSpec, device: str) -> SetupTerms:
    """Weights, adapters, gradients, accumulation and optimizer terms: built once per model and
    setup (a sweep over seq and batch reuses them; none of them reads seq_len or batch)."""
    d = dtypes_for(t, device)
    return SetupTerms((*weights.weight_terms(m, t, d), *weights.adapter_terms(m, t, d),
                       *optim.gradient_terms(m, t, d), *optim.accumulation_terms(m, t, d),
                       *optim.optimizer_terms(m, t, d, device)),
                      activations.transient_terms(m, t, d), inventory(m, t).total_params,
                      inventory(m, t).trainable_params)


def step_replay(m: ModelSpec, t: TrainSpec, device: str, workspace: int) -> Replay:
    """The allocator replay of one setup, memoised: sharding options do not change it (the
    replay is of one unsharded rank; see :func:`vramplan.model.sharding.shard_estimate`)."""
    if t.shard != "none" or t.num_gpus != 1:
        t = replace(t, shard="none", num_gpus=1)
    return cached_replay(m, t, device, workspace)


@lru_cache(maxsize=1024)
def cached_replay(m: ModelSpec, t: TrainSpec, device: str, workspace: int) -> Replay:
    return replay(m, t, dtypes_for(t, device), ledger_for(m, t, device), device,
                  t.expandable_segments, workspace)


@dataclass(frozen=True, slots=True)
class Levels:
    """The peak levels of a set of terms."""

    phase_bytes: Mapping[str, int]
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    paged_bytes: int


def levels(terms: tuple[Term, ...]) -> Levels:
    """Phase model over `terms`.

    Allocated-level terms are summed per phase (each term's ``phases``); the peak allocated is the
    largest phase. Reserved adds the reserved-level terms (the allocator's cache from the replay);
    the device total adds the device-level terms (memory outside the allocator). Paged-level
    terms (bitsandbytes managed memory) are summed apart.
    """
    phases = dict.fromkeys(PHASES, 0)
    by_level = {"allocated": 0, "reserved": 0, "device": 0, "paged": 0}
    for x in terms:
        if x.level == "allocated":
            for p in x.phases:
                phases[p] += x.nbytes
        else:
            by_level[x.level] += x.nbytes
    peak_phase = max(PHASES, key=lambda p: phases[p])
    peak = phases[peak_phase]
    reserved = peak + by_level["reserved"]
    return Levels(phases, peak_phase, peak, reserved, reserved + by_level["device"],
                  by_level["paged"])


def check_targets(m: ModelSpec, t: TrainSpec) -> None:
    """peft raises when none of the named LoRA targets exists in the model; so does this."""
    names = inventory(m, t).targets
    if names:
        have = [lin.name for lin in inventory(m, t).linears]
        if not set(names) & set(have):
            raise SpecError(f"--lora-targets {t.lora_targets}: {m.name} ({m.model_type}) has no "
                            f"such module; its linears are {', '.join(have)}")


def effective_setup(m: ModelSpec, t: TrainSpec) -> TrainSpec:
    """The setup transformers actually runs: a family without an SDPA path (Gemma-2: soft-capping)
    runs eager attention."""
    if not m.sdpa and t.attn == "sdpa":
        return replace(t, attn="eager")
    return t


def _with_note(e: Estimate, asked: TrainSpec, note: str) -> Estimate:
    """The same estimate reported against the setup that was asked for, with a note."""
    bd = e.breakdown
    return replace(e, train=asked, breakdown=replace(bd, notes=(note, *bd.notes)))


def notes_for(m: ModelSpec, t: TrainSpec, calib: Mapping[str, Any], device: str) -> tuple[str, ...]:
    """Assumptions printed under every estimate."""
    notes = []
    if device == "cuda" and calib.get("status") == "provisional":
        notes.append("runtime constants (memory outside the allocator, cuBLAS workspace) are "
                     "PROVISIONAL: not yet fitted on GPU measurements")
    elif device == "cuda" and calib.get("gpu"):
        notes.append(f"memory outside the allocator calibrated on {calib['gpu']} "
                     f"({calib.get('stack', 'see profiles/calibration')}); other GPUs and "
                     "driver/CUDA versions may differ by tens of MiB")
    if device == "cuda" and t.resolved_optimizer.startswith("paged"):
        notes.append("paged optimizer states (bitsandbytes, CUDA managed memory) are not in the "
                     "device total: they use the GPU while it has room and move to host RAM "
                     "when it is full (see paged_bytes)")
    if t.method == "qlora":
        notes.append("QLoRA pipeline: from_pretrained(BitsAndBytesConfig) -> "
                     "prepare_model_for_kbit_training (fp32 embeddings/norms/lm_head) -> get_peft_model")
    if t.precision == "mixed":
        notes.append("mixed = bf16 autocast around the forward (HF Trainer bf16=True)")
    if m.is_moe:
        notes.append("MoE experts are fused 3-D parameters in transformers 5.x: bitsandbytes does "
                     "not quantise them (it replaces nn.Linear only), so QLoRA keeps them in fp32 "
                     "after prepare_model_for_kbit_training, above LoRA's bf16 copy; with "
                     "all-linear, peft adapts them through target_parameters (counted in the "
                     "trainable parameters)")
    if m.is_moe and inventory(m, t).all_linear and t.lora_dropout > 0:
        notes.append("this setup does not run as given: peft 0.21 refuses LoRA dropout on fused "
                     "MoE experts, which all-linear adapts through ParamWrapper (ValueError "
                     "'lora.ParamWrapper does not work with lora_dropout != 0'); use "
                     "--lora-dropout 0 or name the targets (the estimate is for the setup as "
                     "given, dropout masks included)")
    if t.attn != "eager":
        notes.append(f"{t.attn}: no s x s score matrix is saved (logsumexp only)")
    opt = t.resolved_optimizer
    if opt == "adamw_torch_fused":
        notes.append("adamw_torch_fused = torch AdamW(fused=True), HF Trainer 5.x's default: no "
                     "step temporaries (adamw_torch, the foreach one, adds a state-sized copy)")
    if t.grad_accum > 1:
        notes.append(f"gradient accumulation over {t.grad_accum} micro-steps: every gradient stays "
                     "alive through the later micro-steps' forward and backward")
    if t.max_grad_norm > 0:
        notes.append(f"gradient clipping at {t.max_grad_norm:g} (HF Trainer default 1.0): "
                     "per-gradient norm scalars only")
    if t.shard != "none":
        notes.append(f"sharding {t.shard} over {t.num_gpus} GPUs is applied by the planner")
    return tuple(notes)
