"""Invariants of the analytic model over every shipped profile."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramplan.model.activations import WEIGHT_SIZED
from vramplan.model.estimate import estimate
from vramplan.model.params import total_params
from vramplan.profiles import list_models, load_model
from vramplan.specs import TrainSpec

MODELS = list_models("analytic")
BASE = TrainSpec(seq_len=1024)


def est(calib, name, replay=False, **kw):
    """The estimate of a shipped model at BASE + kw. The tensor-level properties do not need the
    allocator replay (peak allocated and the terms come from the phase model); the tests of the
    reserved and device levels ask for it."""
    return estimate(load_model(name), replace(BASE, **kw), calib, allocator=replay)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("field,values", [("seq_len", [256, 512, 2048, 4096]),
                                          ("batch", [1, 2, 4]), ("lora_r", [8, 16, 64, 128])])
def test_memory_never_falls_as_seq_batch_or_rank_grow(calib, name, method, field, values):
    # The tensor level. Reserved memory is not monotone: which blocks the caching allocator can
    # reuse depends on the sizes (see test_levels_are_ordered and the allocator tests).
    totals = [est(calib, name, method=method, **{field: v}).peak_allocated_bytes for v in values]
    assert totals == sorted(totals)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_levels_are_ordered(calib, name, method):
    e = est(calib, name, replay=True, method=method)
    assert e.peak_allocated_bytes <= e.peak_reserved_bytes < e.device_total_bytes
    assert e.replay is not None
    # the replay's own tensor peak tracks the phase model's (same inventory, real order)
    assert abs(e.replay.peak_allocated_bytes - e.peak_allocated_bytes) <= \
        0.05 * e.peak_allocated_bytes


# Models of 3B+ parameters: below that, QLoRA's fp32 upcasts (embeddings, lm_head, residual
# stream) outweigh the 4-bit saving; see test_small_model_qlora_can_exceed_lora.
DENSE = [n for n in MODELS if not load_model(n).is_moe and total_params(load_model(n)) >= 3e9]


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "sgd"])
@pytest.mark.parametrize("ckpt", [True, False])
def test_full_at_least_lora_at_least_qlora(calib, name, optimizer, ckpt):
    # Default precision (mixed, HF Trainer bf16=True). With a plain bf16 loop and no checkpointing
    # a small model can invert full >= LoRA: peft casts every adapter input to fp32 while full bf16
    # fine-tuning saves bf16 inputs (PHYSICS-REFERENCE §5.2, measured in validation/results).
    peaks = [est(calib, name, method=m, optimizer=optimizer, grad_ckpt=ckpt).peak_allocated_bytes
             for m in ("full", "lora", "qlora")]
    assert peaks[0] >= peaks[1] >= peaks[2]


def test_small_model_qlora_can_exceed_lora(calib):
    # Qwen2.5-0.5B: 0.36 B of its 0.49 B params are the 151936-row embedding; QLoRA keeps it in fp32
    # (prepare_model_for_kbit_training) and runs an fp32 residual stream, LoRA keeps both in bf16.
    setup = {"optimizer": "adamw", "grad_ckpt": False}
    assert est(calib, "qwen2.5-0.5b", method="qlora", **setup).peak_allocated_bytes > \
        est(calib, "qwen2.5-0.5b", method="lora", **setup).peak_allocated_bytes


def test_moe_qlora_exceeds_lora_because_unquantised_experts_are_upcast(calib):
    # transformers 5.x keeps Mixtral experts as fused nn.Parameter: bnb does not quantise them and
    # prepare_model_for_kbit_training casts them to fp32 (PHYSICS-REFERENCE §8).
    q = est(calib, "mixtral-8x7b", method="qlora").peak_allocated_bytes
    lo = est(calib, "mixtral-8x7b", method="lora").peak_allocated_bytes
    full = est(calib, "mixtral-8x7b", method="full").peak_allocated_bytes
    assert full >= q > lo


@pytest.mark.parametrize("name", MODELS)
def test_bf16_weights_are_half_of_fp32(calib, name):
    bf16 = est(calib, name, method="full", precision="bf16").breakdown.term("weights.base")
    fp32 = est(calib, name, method="full", precision="fp32").breakdown.term("weights.base")
    assert 2 * bf16.nbytes == fp32.nbytes


@pytest.mark.parametrize("name", MODELS)
def test_qlora_base_weights_smaller_than_lora(calib, name):
    q = est(calib, name, method="qlora").breakdown.term("weights.base").nbytes
    lo = est(calib, name, method="lora").breakdown.term("weights.base").nbytes
    assert q < lo


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_never_increases_activations(calib, name):
    on = est(calib, name, grad_ckpt=True)
    off = est(calib, name, grad_ckpt=False)
    assert on.peak_allocated_bytes <= off.peak_allocated_bytes


@pytest.mark.parametrize("name", MODELS[:6])
def test_optimizer_and_gradients_do_not_depend_on_seq_or_batch(calib, name):
    a = est(calib, name, seq_len=512, batch=1).breakdown
    b = est(calib, name, seq_len=4096, batch=4).breakdown
    for group in ("optimizer", "gradients"):
        assert a.group_bytes(group) == b.group_bytes(group)


@pytest.mark.parametrize("name", MODELS[:6])
def test_activations_are_linear_in_batch(calib, name):
    one = est(calib, name, batch=1, method="lora").breakdown
    three = est(calib, name, batch=3, method="lora").breakdown
    for t in one.terms:
        if t.key.startswith("activations.") and t.key not in WEIGHT_SIZED:
            assert three.term(t.key).nbytes == 3 * t.nbytes, t.key


def test_tying_embeddings_removes_exactly_v_times_h(calib):
    from vramplan.model.params import total_params

    m = load_model("llama-3.2-1b")
    assert m.tie_word_embeddings
    untied = replace(m, tie_word_embeddings=False)
    assert total_params(untied) - total_params(m) == m.vocab_size * m.hidden_size


@pytest.mark.parametrize("name", MODELS[:4])
def test_terms_non_negative_unique_and_levels_ordered(calib, name):
    e = est(calib, name, replay=True)
    keys = [t.key for t in e.breakdown.terms]
    assert len(keys) == len(set(keys))
    assert all(t.nbytes >= 0 for t in e.breakdown.terms)
    assert e.peak_allocated_bytes <= e.peak_reserved_bytes <= e.device_total_bytes
    assert e.peak_allocated_bytes == max(e.phase_bytes.values())


def test_foreach_adamw_adds_a_state_sized_temporary_at_the_step(calib):
    """torch AdamW foreach (adamw_torch) makes one state-sized copy (_foreach_sqrt) of every
    tensor at the step; fused makes none. Full fine-tuning of llama-2-7b peaks at the step."""
    m = load_model("llama-2-7b")
    fused = estimate(m, TrainSpec(method="full"), calib)
    foreach = estimate(m, TrainSpec(method="full", optimizer="adamw_torch"), calib)
    temp = foreach.breakdown.term("optimizer.step_temporaries")
    assert temp is not None and temp.nbytes == total_params(m) * 4  # fp32 states under mixed
    assert foreach.peak_phase == "optimizer_step"
    # fused also keeps a 4-byte step tensor per parameter on the device; foreach keeps it on the host
    from vramplan.model.params import param_tensors

    steps = 4 * sum(x.count for x in param_tensors(m))
    assert foreach.peak_allocated_bytes - fused.peak_allocated_bytes == temp.nbytes - steps
    assert fused.breakdown.term("optimizer.step_temporaries") is None


def test_bf16_foreach_full_finetune_peaks_at_ten_bytes_per_parameter(calib):
    # fms-acceleration's Mistral-7B measurements: 5 x P x 2 bytes at batch 4 and 8 alike
    m = load_model("mistral-7b-v0.3")
    for batch in (4, 8):
        e = estimate(m, TrainSpec(method="full", precision="bf16", optimizer="adamw_torch",
                                  batch=batch, seq_len=512), calib)
        assert e.peak_phase == "optimizer_step"
        assert e.peak_allocated_bytes == pytest.approx(10 * total_params(m), rel=0.01)


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_keeps_every_gradient_through_the_micro_steps(calib, accum):
    m = load_model("llama-2-7b")
    one = estimate(m, TrainSpec(method="full", seq_len=4096, grad_ckpt=False), calib)
    more = estimate(m, TrainSpec(method="full", seq_len=4096, grad_ckpt=False,
                                 grad_accum=accum), calib)
    grads = total_params(m) * 4
    assert more.phase_bytes["layer_forward"] == one.phase_bytes["layer_forward"] + grads
    assert more.breakdown.term("gradients.accumulated").nbytes == grads
