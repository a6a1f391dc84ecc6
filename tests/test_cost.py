"""Training FLOPs and time/cost per billion tokens (vramplan.cost): hand-worked examples."""

from __future__ import annotations

import pytest

from vramplan.cost import cost_per_billion_tokens, matmul_params, peak_tflops, train_flops_per_token
from vramplan.profiles import load_gpu
from vramplan.specs import GpuSpec, ModelSpec, TrainSpec

# h=64, L=2, V=128, 4 heads of 16, I=128, untied.
TINY = ModelSpec(name="tiny", model_type="llama", hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                 vocab_size=128, tie_word_embeddings=False)
# per layer: q,k,v,o 4·64·64 = 16384; gate, up, down 3·64·128 = 24576 -> 40960; ×2 = 81920;
# lm_head 128·64 = 8192 -> P_mm = 90112 (the embedding lookup is not a matmul).
P_MM = 90112
# attention forward per token: 2 · L · s · d_q = 2 · 2 · 16 · 64 = 4096 at s = 16.
F_A = 4096


def test_matmul_params_hand_count():
    assert matmul_params(TINY) == P_MM


@pytest.mark.parametrize("method,ckpt,expected", [
    ("full", False, 3 * (2 * P_MM + F_A)),            # 6P + 3 F_a = 540672 + 12288
    ("full", True, 4 * (2 * P_MM + F_A)),             # + one recompute forward
    ("lora", False, 2 * 2 * P_MM + 3 * F_A),          # 4P: no frozen weight gradients
    ("qlora", True, 3 * 2 * P_MM + 4 * F_A),          # 4P + 2P recompute
], ids=["full", "full-ckpt", "lora", "qlora-ckpt"])
def test_flops_per_token(method, ckpt, expected):
    t = TrainSpec(method=method, grad_ckpt=ckpt, seq_len=16)
    assert train_flops_per_token(TINY, t) == expected


def test_hours_and_usd_per_billion_tokens():
    gpu = GpuSpec(key="x", name="X", memory_bytes=2**30, gpu_class="datacenter", vendor="nvidia",
                  bf16_tflops=100.0, price_usd_per_hour=2.0)
    t = TrainSpec(method="full", grad_ckpt=False, seq_len=16)
    flops = 3 * (2 * P_MM + F_A)  # 552960 FLOP/token
    c = cost_per_billion_tokens(TINY, t, gpu, n_gpus=2, mfu=0.5)
    # 552960e9 FLOP / (100e12 · 0.5 · 2 FLOP/s) = 5.5296 s -> / 3600 h
    assert c.hours_per_billion_tokens == pytest.approx(flops * 1e9 / (100e12 * 0.5 * 2) / 3600)
    assert c.usd_per_billion_tokens == pytest.approx(c.hours_per_billion_tokens * 2.0 * 2)


def test_fp16_fallback_and_missing_price():
    t4 = load_gpu("t4")
    assert t4.bf16_tflops is None
    assert peak_tflops(t4) == (65.0, "fp16")
    h200 = load_gpu("h200")
    c = cost_per_billion_tokens(TINY, TrainSpec(seq_len=16), h200, 1)
    assert c.hours_per_billion_tokens is not None and c.usd_per_billion_tokens is None
