"""Per-GPU memory under ZeRO / FSDP (vramplan.model.sharding)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramplan.model.estimate import estimate
from vramplan.profiles import load_model
from vramplan.model.sharding import WHOLE_MODEL_COPIES, model_state_bytes, shard_estimate
from vramplan.specs import TrainSpec

STATE_GROUPS = ("weights", "gradients", "optimizer")


def _states(breakdown) -> int:
    """Model states: weights, gradients and optimizer states (not the step's temporaries)."""
    from vramplan.model.sharding import STEP_TRANSIENTS

    return sum(breakdown.group_bytes(g) for g in STATE_GROUPS) - \
        sum(t.nbytes for t in breakdown.terms if t.key in STEP_TRANSIENTS)


def test_zero3_divides_16_bytes_per_param_by_n(calib):
    m = load_model("llama-2-7b")
    t = TrainSpec(method="full", precision="mixed", shard="zero3", num_gpus=8)
    est = estimate(m, t, calib)
    # mixed full: fp32 weights 4 + fp32 grads 4 + AdamW m, v 8 = 16 B/param (ZeRO §3.1's 16Ψ),
    # plus AdamW's 4-byte step tensor per parameter tensor.
    assert _states(est.breakdown) == pytest.approx(16 * est.params_total, rel=1e-6)
    s = shard_estimate(est, t, calib)
    assert model_state_bytes(s) == pytest.approx(16 * est.params_total / 8, rel=1e-6)
    assert s.breakdown.term("weights.gathered_units").nbytes > 0


@pytest.mark.parametrize("scheme,divided", [
    ("zero1", ("optimizer",)),
    ("zero2", ("optimizer", "gradients")),
    ("fsdp", ("optimizer", "gradients", "weights")),
], ids=["zero1", "zero2", "fsdp"])
def test_each_stage_divides_its_groups(calib, scheme, divided):
    m = load_model("llama-2-7b")
    t = TrainSpec(method="full", shard=scheme, num_gpus=4)
    est = estimate(m, t, calib)
    s = shard_estimate(est, t, calib)
    for g in STATE_GROUPS:
        base = est.breakdown.group_bytes(g)
        extra = sum(x.nbytes for x in s.breakdown.terms if x.key in
                    ("weights.gathered_units", "gradients.unit_grads") and x.key.startswith(g))
        got = s.breakdown.group_bytes(g) - extra
        expected = base / 4 if g in divided else base
        assert got == pytest.approx(expected, rel=1e-6, abs=8), g
    # Token-sized activations are never divided (whole-model weight copies shard with the weights).
    token_sized = lambda b: sum(x.nbytes for x in b.terms  # noqa: E731
                                if x.key.startswith("activations.") and x.key not in WHOLE_MODEL_COPIES)
    assert token_sized(s.breakdown) == token_sized(est.breakdown)


def test_fsdp_qlora_shards_packed_weights_not_quant_constants(calib):
    m = load_model("llama-2-70b")
    t = TrainSpec(method="qlora", shard="fsdp", num_gpus=2)
    est = estimate(m, t, calib)
    s = shard_estimate(est, t, calib)
    b0, b1 = est.breakdown, s.breakdown
    assert b1.term("weights.base").nbytes == -(-b0.term("weights.base").nbytes // 2)
    assert b1.term("weights.quant_constants").nbytes == b0.term("weights.quant_constants").nbytes


def test_none_is_the_single_gpu_estimate(calib):
    m = load_model("llama-3.1-8b")
    est = estimate(m, TrainSpec(), calib)
    s = shard_estimate(est, TrainSpec(), calib)
    assert (s.peak_allocated_bytes, s.peak_reserved_bytes, s.device_total_bytes) == \
        (est.peak_allocated_bytes, est.peak_reserved_bytes, est.device_total_bytes)


def test_more_gpus_never_need_more_memory_per_gpu(calib):
    m = load_model("llama-2-13b")
    totals = []
    for n in (1, 2, 4, 8):
        t = replace(TrainSpec(method="full"), shard="zero3", num_gpus=n)
        totals.append(shard_estimate(estimate(m, t, calib), t, calib).device_total_bytes)
    assert totals == sorted(totals, reverse=True)
