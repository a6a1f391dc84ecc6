"""The two engines held to each other (issue #10, item 9): for every family both know, full /
LoRA / QLoRA x checkpointing on and off x seq 128 and 512, counted as on CPU (bf16) and as on
CUDA (mixed precision), peak allocated within 1%, or a named gap of the analytic engine below
(the trace equals the CPU measurements to the byte and the H200 ones within 0.8%; these are the
analytic engine's errors, to be fixed there). A new gap, or a named one that grows, fails."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from vramplan.trace.crosscheck import TOLERANCE, run  # noqa: E402

#: (config, method, grad_ckpt, seq_len) -> the analytic engine's error against the trace, as
#: found (python -m vramplan.trace.crosscheck). Fixed so far: Gemma-2's soft-capping tanh output;
#: the first layer's input norm, which saves nothing in LoRA/QLoRA without checkpointing (closed
#: the Qwen2 / Phi-3 LoRA gaps at seq 512); peft ParamWrapper's casts of the expert LoRA factors
#: to the experts' dtype (closed Mixtral LoRA without checkpointing); eager attention's output,
#: which nothing saves, and its masks, which die with the model's forward unless checkpointing
#: keeps them (closed Gemma-2 without checkpointing); on CPU, o_proj's input is a copy when
#: RoPE made q with torch.cat (closed Phi-3 QLoRA without checkpointing); an MoE layer's
#: backward in three moments with the merged expert stacks' weight-sized gradients, and the
#: in-flight outputs at the experts' end (closed Mixtral with checkpointing: -2.3% to +4.2%
#: before). None is left.
#: Counted as on CUDA in mixed precision (found when that count was added): the final norm's
#: output, alive until the loss is computed; the final norm's saved tensors, released before
#: the layers' backward; the trainable lm_head's autocast copy, saved until its backward; the
#: first layer's q/k/v LoRA dropout masks, not saved when its input needs no grad; peft's fp32
#: copy of a LoRA input under autocast, in flight at lora_A. None is left.
KNOWN_GAPS: dict[tuple[str, str, str, bool, int], float] = {}


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_engines_agree_within_1_percent_or_the_gap_is_named(device):
    rows = run(progress=False, device=device)
    assert len(rows) == 72
    for r in rows:
        key = (r.device, r.config, r.method, r.grad_ckpt, r.seq_len)
        if key in KNOWN_GAPS:
            assert abs(r.error) <= abs(KNOWN_GAPS[key]) + 0.001, (key, r.error)
        else:
            assert abs(r.error) <= TOLERANCE, (key, r.error)
