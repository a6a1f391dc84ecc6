"""trace_step: the harness's step on fake tensors, against the CPU measurements and a real step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.profiles import load_hf_config  # noqa: E402
from vramplan.specs import SpecError, TrainSpec  # noqa: E402
from vramplan.trace.engine import trace_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "validation" / "results" / "cpu-ci.jsonl"
#: Declared tolerance against a CPU measurement (issue #10). What the trace actually reaches is
#: tighter: 4 bytes on every case but two (see test below).
REL_TOL = 0.02


def cpu_records() -> list[dict]:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["outcome"] == "ok"]


def setup_of(record: dict) -> TrainSpec:
    """The record's setup. Records from before gradient clipping existed in the harness carry no
    max_grad_norm: the step they measured did not clip."""
    setup = dict(record["setup"])
    setup.setdefault("max_grad_norm", 0.0)
    return TrainSpec.from_dict(setup)


CASES = cpu_records()


#: Run by `make test`; the other cpu-ci cases run in CI (`make test-slow`).
FAST = {"llama-full-bf16-s128", "llama-lora-bf16-s512", "qwen2-qlora-mixed-s128-drop05",
        "mixtral-qlora-mixed-s128", "gqa-qlora-int8-bf16-ckpt-s128"}


@pytest.mark.parametrize("record", [r if r["case_id"] in FAST else
                                    pytest.param(r, marks=pytest.mark.slow) for r in CASES],
                         ids=[r["case_id"] for r in CASES])
def test_trace_peak_allocated_matches_the_cpu_measurement(record):
    """Within 2% of measured.peak_allocated_bytes; resident bytes exactly equal."""
    _, cfg = load_hf_config(str(ROOT / record["model"]))
    result = trace_step(cfg, setup_of(record))
    measured = record["measured"]
    assert result.resident_bytes == measured["resident_bytes"]
    assert result.peak_allocated_bytes == pytest.approx(measured["peak_allocated_bytes"],
                                                        rel=REL_TOL)


def test_int8_qlora_counted_as_on_cuda_is_refused_with_a_clear_error():
    """On CUDA LLM.int8() splits outlier columns by the data, which fake tensors do not have:
    SpecError, not a crash inside torch (counted as on CPU it is traced: the cpu-ci case)."""
    _, cfg = load_hf_config(str(ROOT / "validation/configs/llama-tiny.json"))
    with pytest.raises(SpecError, match="int8"):
        trace_step(cfg, TrainSpec(method="qlora", quant="int8", seq_len=16, lora_r=4),
                   count_as="cuda")


def test_unknown_model_type_raises_spec_error():
    """A model_type transformers does not ship is refused before anything is built."""
    with pytest.raises(SpecError, match="not known to transformers"):
        trace_step({"model_type": "no-such-arch", "hidden_size": 8}, TrainSpec(method="full"))


def test_terms_sum_to_the_peak_and_name_what_is_live():
    """Resident groups + step groups at the peak = peak_allocated_bytes, for QLoRA; the peak is
    the loss backward (fp32 logits chain), where AdamW's states from warm-up are live and no
    adapter gradient exists yet."""
    _, cfg = load_hf_config(str(ROOT / "validation/configs/llama-tiny.json"))
    r = trace_step(cfg, TrainSpec(method="qlora", precision="bf16", optimizer="adamw",
                                  seq_len=128, lora_r=16, lora_alpha=32, lora_dropout=0.0))
    assert sum(r.terms.values()) == r.peak_allocated_bytes
    assert sum(r.resident.values()) == r.resident_bytes
    assert r.resident["quant_constants"] > 0 and r.resident["adapters"] > 0
    assert r.peak_phase == "backward" and r.at_peak["gradients"] == 0
    # 4 layers x 7 linears x (lora_A, lora_B) = 56 fp32 adapters: exp_avg + exp_avg_sq of each,
    # plus a 4-byte fp32 step counter per tensor (fused AdamW)
    assert r.at_peak["optimizer_states"] == 2 * r.resident["adapters"] + 56 * 4
    # log-softmax output (saved) + nll_loss_backward + log_softmax_backward: b*s*V*4 B each
    assert r.activations_by_kind["forward:aten::_log_softmax"] == 128 * 4096 * 4


def test_terms_sum_to_the_peak_when_the_step_recasts_a_bias():
    """qwen2's q/k/v biases are cast to bf16 by Linear4bit in the first forward: the new storages
    are weights, net of the resident fp32 ones they replace, and the terms still sum to the peak."""
    _, cfg = load_hf_config(str(ROOT / "validation/configs/qwen2-tiny.json"))
    r = trace_step(cfg, TrainSpec(method="qlora", precision="mixed", optimizer="adamw",
                                  seq_len=128, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                  grad_ckpt=False))
    assert sum(r.terms.values()) == r.peak_allocated_bytes
    assert r.at_peak["recast_weights"] != 0


def test_trace_leaves_no_patch_behind():
    """The harness's builder and transformers' tracing check are restored after a trace."""
    from transformers.utils import import_utils

    from vramplan.measure import build

    before = (build._new_param, build.materialize, import_utils.is_fake_tensor)
    _, cfg = load_hf_config(str(ROOT / "validation/configs/llama-tiny.json"))
    trace_step(cfg, TrainSpec(method="qlora", seq_len=16, lora_r=4))
    assert (build._new_param, build.materialize, import_utils.is_fake_tensor) == before


REAL_VS_TRACE = ["llama-lora-bf16-ckpt-s128-sgd", "qwen2-qlora-mixed-s128-drop05",
                 "mixtral-qlora-mixed-s128", "llama-full-mixed-s128"]


@pytest.mark.parametrize("case_id", [c if c == "qwen2-qlora-mixed-s128-drop05" else
                                     pytest.param(c, marks=pytest.mark.slow)
                                     for c in REAL_VS_TRACE])
def test_trace_logs_the_same_events_as_a_real_step(case_id):
    """The same recorder around a real CPU step (real weights, real kernels) logs the same
    sequence of (operator, phase, step, bytes, dtype, shape) as the trace: same code path."""
    import contextlib

    from vramplan.measure.build import finish_model, load_streaming
    from vramplan.measure.probes import resident_storages
    from vramplan.measure.steps import cpu_autocast_shim, make_optimizer, needs_shim
    from vramplan.trace import engine
    from vramplan.trace.recorder import Recorder

    record = next(r for r in cpu_records() if r["case_id"] == case_id)
    _, cfg = load_hf_config(str(ROOT / record["model"]))
    train = setup_of(record)
    torch.manual_seed(0)
    model = finish_model(load_streaming(cfg, train, "cpu"), train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.resolved_optimizer)
    ids = torch.randint(0, cfg["vocab_size"], (train.batch, train.seq_len))
    rec = Recorder(resident=resident_storages(model))
    rec.watch_resident([t.untyped_storage() for t in engine.resident_tensors(model)])
    shim = cpu_autocast_shim() if needs_shim(train, "cpu") else contextlib.nullcontext()
    with shim, rec:
        for step in range(2):
            rec.start_step(step)
            engine.run_step(model, opt, ids, train, "cpu", rec, {})
    rec.detach()

    def key(e):
        return (e.op, e.phase, e.step, e.nbytes, e.dtype, e.shape)

    traced = trace_step(cfg, train)
    assert [key(e) for e in traced.events] == [key(e) for e in rec.events]


RSS_SCRIPT = r"""
import resource, sys, json
import torch, transformers, peft  # imports are not the trace's memory
from vramplan.profiles import load_hf_config
from vramplan.specs import TrainSpec
from vramplan.trace.engine import trace_step
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
_, cfg = load_hf_config("llama-2-70b")
train = TrainSpec(method="full", precision="mixed", optimizer="adamw", grad_ckpt=False,
                  seq_len=4096, batch=16)
trace_step(cfg, TrainSpec(method="full", seq_len=8), layers=1)  # lazy imports and caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r = trace_step(cfg, train, layers=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": r.peak_allocated_bytes, "grew": after - before}))
"""


@pytest.mark.slow
def test_a_70b_trace_allocates_no_real_memory():
    """Llama-2-70B, 2 layers, full fine-tune, seq 4096 x batch 16: a peak over 100 GiB is traced
    while the process's peak RSS grows by less than 2 GiB."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak"] > 100 * 2**30
    assert got["grew"] < 2 * 2**30, got
