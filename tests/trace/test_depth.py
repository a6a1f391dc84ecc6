"""Depth extrapolation: two shallow traces give the full-depth figures."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from vramplan.profiles import load_hf_config  # noqa: E402
from vramplan.specs import TrainSpec  # noqa: E402
from vramplan.trace.depth import trace_depth  # noqa: E402
from vramplan.trace.engine import trace_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SETUPS = {
    "full-bf16": TrainSpec(method="full", precision="bf16", optimizer="adamw", grad_ckpt=False,
                           seq_len=128),
    "lora-bf16-ckpt": TrainSpec(method="lora", precision="bf16", optimizer="adamw", seq_len=512,
                                lora_r=16, lora_dropout=0.0),
    "qlora-bf16-ckpt": TrainSpec(method="qlora", precision="bf16", optimizer="adamw", seq_len=512,
                                 lora_r=16, lora_dropout=0.0),
    # the peak moves from backward (2 layers) to forward (3 and 4): phase-by-phase extrapolation
    "full-mixed-ckpt": TrainSpec(method="full", precision="mixed", optimizer="adamw",
                                 seq_len=512),
}


@pytest.mark.parametrize("name", [n if n == "full-bf16" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SETUPS])
def test_extrapolation_from_2_and_3_layers_equals_the_4_layer_trace(name):
    """llama-tiny has 4 layers: the extrapolated peak and phase peaks equal its trace's, to the
    byte."""
    _, cfg = load_hf_config(str(ROOT / "validation/configs/llama-tiny.json"))
    train = SETUPS[name]
    d = trace_depth(cfg, train, layers=(2, 3))
    full = trace_step(cfg, train)
    assert d.target_layers == 4
    assert d.peak_allocated_bytes == full.peak_allocated_bytes
    assert d.phase_peaks == full.phase_peaks
    assert d.resident_bytes == full.resident_bytes
