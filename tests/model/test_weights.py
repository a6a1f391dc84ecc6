"""Hand-worked checks of the weight terms, including the seed's own arithmetic."""

from __future__ import annotations

import pytest

from vramplan.model.weights import nf4_bytes


def test_nf4_without_double_quant_is_4_5_bits_per_param():
    # 4096*4096 weights: packed n/2 = 8388608 B; absmax fp32 per 64: 4*262144 = 1048576 B; code 64 B
    packed, consts = nf4_bytes(4096 * 4096, double_quant=False)
    assert packed == 8_388_608
    assert consts == 1_048_576 + 64


def test_double_quant_saves_about_0_373_bits_per_param():
    n = 4096 * 11008
    _, plain = nf4_bytes(n, double_quant=False)
    _, dq = nf4_bytes(n, double_quant=True)
    saving_bits = 8 * (plain - dq) / n
    assert saving_bits == pytest.approx(0.373, abs=0.002)  # QLoRA §3: 0.5 -> 0.127 bit/param


def test_seed_13b_fp16_is_26_gb_and_nf4_about_6_5_gb_plus_constants():
    n = 13_000_000_000
    assert 2 * n == 26_000_000_000  # fp16: 2 bytes/param = 26 GB
    packed, consts = nf4_bytes(n, double_quant=True)
    assert packed == 6_500_000_000  # 13e9 * 0.5 B = 6.5 GB
    assert (packed + consts) / 1e9 == pytest.approx(6.7, abs=0.02)  # PHYSICS.md: ≈ 6.7 GB
