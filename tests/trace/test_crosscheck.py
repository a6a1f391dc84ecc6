"""The two engines held to each other (issue #10, item 9): for every family both know, full /
LoRA / QLoRA x checkpointing on and off x seq 128 and 512, peak allocated within 1%, or a named
gap of the analytic engine below (the trace equals the CPU measurements to the byte; these are
the analytic engine's errors, to be fixed there). A new gap, or a named one that grows, fails."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from vramplan.trace.crosscheck import TOLERANCE, run  # noqa: E402

#: (config, method, grad_ckpt, seq_len) -> the analytic engine's error against the trace, as
#: found (python -m vramplan.trace.crosscheck). Found, not yet explained; where they cluster:
#: - Mixtral (the MoE block): -3% to +4%;
#: - Gemma-2 LoRA / QLoRA without checkpointing: +1.4% to +3.3% (an over-count, left after the
#:   attention soft-capping's saved tanh output was added: before it, -1% to -7%);
#: - Qwen2 / Phi-3 without checkpointing at seq 512: +1.1%.
KNOWN_GAPS = {
    ('qwen2-tiny', 'lora', False, 512): 0.0107,
    ('qwen2-tiny', 'qlora', False, 512): 0.0104,
    ('phi3-tiny', 'lora', False, 512): 0.0106,
    ('mixtral-tiny', 'lora', True, 128): -0.0297,
    ('mixtral-tiny', 'lora', False, 128): -0.0208,
    ('mixtral-tiny', 'qlora', True, 128): -0.0227,
    ('mixtral-tiny', 'qlora', True, 512): 0.0419,
    ('gemma2-tiny', 'lora', False, 128): 0.0143,
    ('gemma2-tiny', 'lora', False, 512): 0.0288,
    ('gemma2-tiny', 'qlora', False, 512): 0.0328,
}


@pytest.mark.slow
def test_the_engines_agree_within_1_percent_or_the_gap_is_named():
    rows = run(progress=False)
    assert len(rows) == 72
    for r in rows:
        key = (r.config, r.method, r.grad_ckpt, r.seq_len)
        if key in KNOWN_GAPS:
            assert abs(r.error) <= abs(KNOWN_GAPS[key]) + 0.001, (key, r.error)
        else:
            assert abs(r.error) <= TOLERANCE, (key, r.error)
