"""A trace counted as on CUDA: block rounding, bool dropout masks, paged states outside the
allocator, cuBLAS workspaces, and the reserved level from the trace's own events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.model.allocator import round_size  # noqa: E402
from vramplan.specs import TrainSpec  # noqa: E402
from vramplan.trace.engine import trace_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = json.loads((ROOT / "validation/configs/llama-gqa-tiny.json").read_text())


def cuda_trace(train: TrainSpec, **kw):
    return trace_step(TINY, train, count_as="cuda", **kw)


def test_a_cuda_dropout_mask_is_bool():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.trace.cuda import CudaKernels

    with FakeTensorMode(), CudaKernels():
        x = torch.empty(4, 8, dtype=torch.bfloat16)
        out, mask = torch.ops.aten.native_dropout(x, 0.1, True)
    assert out.dtype == torch.bfloat16 and mask.dtype == torch.bool and mask.shape == x.shape


def test_every_cuda_storage_is_counted_in_whole_512_byte_blocks():
    r = cuda_trace(TrainSpec(method="lora", seq_len=64, lora_dropout=0.05))
    assert r.events and all(abs(e.nbytes) % 512 == 0 for e in r.events)
    assert all(v % 512 == 0 for v in r.resident.values())


def test_the_two_cublas_workspaces_are_live_at_the_peak():
    t = TrainSpec(method="lora", seq_len=64, lora_dropout=0.0)
    bare, with_ws = cuda_trace(t), cuda_trace(t, workspace_bytes=64 << 20)
    assert with_ws.peak_allocated_bytes - bare.peak_allocated_bytes == 64 << 20
    assert with_ws.at_peak["cublas_workspace"] == 64 << 20


def test_paged_optimizer_states_of_large_tensors_are_outside_the_allocator():
    """bitsandbytes pages states of >= 1e5 elements on CUDA: only the small ones are counted."""
    from transformers import AutoModelForCausalLM

    from vramplan.measure.build import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(TINY))
    numels = [p.numel() for p in {id(p): p for p in model.parameters()}.values()]
    assert any(n >= 100_000 for n in numels) and any(n < 100_000 for n in numels)
    t = TrainSpec(method="full", seq_len=64, optimizer="paged_adamw_32bit", precision="bf16")
    states = cuda_trace(t).at_peak["optimizer_states"]
    assert states == sum(2 * round_size(4 * n) for n in numels if n < 100_000)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_allocator_replay_of_a_trace_sees_its_peak_allocated_to_the_byte(method):
    """The build and step events through the caching-allocator emulation: the same allocated
    peak as the trace (no host tensor or lost free in the replay), and reserved above it."""
    r = cuda_trace(TrainSpec(method=method, seq_len=128, lora_dropout=0.0),
                   workspace_bytes=64 << 20)
    assert r.levels is not None
    assert r.levels.peak_allocated_bytes == r.peak_allocated_bytes
    assert r.levels.peak_reserved_bytes >= r.peak_allocated_bytes


def test_a_cpu_trace_has_no_reserved_level():
    assert trace_step(TINY, TrainSpec(method="lora", seq_len=64)).levels is None
