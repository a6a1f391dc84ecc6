"""Composition only: gather the terms of a setup and evaluate the three peak levels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from vramplan.model import activations, optim, overhead, weights
from vramplan.model.dtypes import dtypes_for
from vramplan.model.params import total_params, trainable_params
from vramplan.model.terms import PHASES, Breakdown, Term
from vramplan.specs import ModelSpec, TrainSpec


@dataclass(frozen=True, slots=True)
class Estimate:
    """A breakdown plus its three levels and the phase that sets the peak."""

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


def estimate(m: ModelSpec, t: TrainSpec, calib: Mapping[str, Any], device: str = "cuda") -> Estimate:
    """Estimate one training step's peak memory.

    Peak semantics (phase model): live bytes are summed per phase (forward end, loss backward,
    first layer backward, optimizer step) over the terms live in it; peak allocated is the largest.
    Reserved adds allocator slack; the device total adds the CUDA context and paged optimizer states.
    """
    t_eff = effective_setup(m, t)
    if t_eff is not t:
        return _with_note(estimate(m, t_eff, calib, device), t,
                          f"{m.model_type} has no SDPA path in transformers 5.x (from_pretrained "
                          "raises): estimated with eager attention; pass --attn eager or "
                          "flash_attention_2")
    d = dtypes_for(t, device)
    terms = (*weights.weight_terms(m, t, d), *weights.adapter_terms(m, t, d),
             *optim.gradient_terms(m, t, d), *optim.optimizer_terms(m, t, d, device),
             *activations.activation_terms(m, t, d), *overhead.workspace_term(calib, device))
    terms = (*terms, *overhead.context_term(calib, device))
    lv = levels(terms, calib, device)
    full = Breakdown((*terms, *lv.slack), inputs={"model": m.name, **t.as_dict(), "device": device},
                     notes=notes_for(m, t, calib, device))
    return Estimate(m, t, device, full, total_params(m), trainable_params(m, t), lv.phase_bytes,
                    lv.peak_phase, lv.peak_allocated_bytes, lv.peak_reserved_bytes,
                    lv.device_total_bytes)


@dataclass(frozen=True, slots=True)
class Levels:
    """The three peak levels of a set of terms, and the allocator-slack term they imply."""

    phase_bytes: Mapping[str, int]
    peak_phase: str
    slack: tuple[Term, ...]
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int


def levels(terms: tuple[Term, ...], calib: Mapping[str, Any], device: str) -> Levels:
    """Phase model over `terms` (which must not hold the slack term yet).

    Allocated-level terms are summed per phase (each term's ``phases``); the peak allocated is the
    largest phase. Reserved adds the calibrated allocator slack on that peak; the device total
    adds the device-level terms (CUDA context, paged optimizer states).
    """
    base = Breakdown(terms)
    phases = {p: base.phase_bytes(p) for p in PHASES}
    peak_phase = max(PHASES, key=lambda p: phases[p])
    peak = phases[peak_phase]
    slack = overhead.allocator_slack_term(calib, peak, device)
    reserved = peak + sum(x.nbytes for x in slack)
    device_total = reserved + sum(x.nbytes for x in terms if x.level == "device")
    return Levels(phases, peak_phase, slack, peak, reserved, device_total)


def effective_setup(m: ModelSpec, t: TrainSpec) -> TrainSpec:
    """The setup transformers actually runs: Gemma-2 refuses SDPA (soft-capping), so eager."""
    if m.model_type == "gemma2" and t.attn == "sdpa":
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
        notes.append("runtime constants (CUDA context, cuBLAS workspace, allocator slack) are "
                     "PROVISIONAL: not yet fitted on GPU measurements")
    if t.method == "qlora":
        notes.append("QLoRA pipeline: from_pretrained(BitsAndBytesConfig) -> "
                     "prepare_model_for_kbit_training (fp32 embeddings/norms/lm_head) -> get_peft_model")
    if t.precision == "mixed":
        notes.append("mixed = bf16 autocast around the forward (HF Trainer bf16=True)")
    if m.is_moe:
        notes.append("MoE experts are fused 3-D parameters in transformers 5.x: not quantised, "
                     "not LoRA targets")
    if t.attn != "eager":
        notes.append(f"{t.attn}: no s x s score matrix is saved (logsumexp only)")
    if t.resolved_optimizer == "adamw":
        notes.append("adamw = torch AdamW fused (HF Trainer default adamw_torch_fused): no step temporaries")
    if t.shard != "none":
        notes.append(f"sharding {t.shard} over {t.num_gpus} GPUs is applied by the planner")
    return tuple(notes)
