"""Model building: the streaming (meta-device) path equals from_pretrained; peft/prep; a real step."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from vramplan.measure.build import (bnb_config, compute_dtype, finish_model, load_dtype,  # noqa: E402
                                    load_streaming, lora_targets, write_checkpoint)
from vramplan.measure.probes import CpuProbe, quant_state_tensors, resident_storages  # noqa: E402
from vramplan.measure.steps import run_steps  # noqa: E402
from vramplan.profiles import load_hf_config  # noqa: E402
from vramplan.specs import TrainSpec  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: much faster on small VMs, and memory does not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(before)


def config(root, name):
    """The HF config dict of a tiny validation config."""
    return load_hf_config(str(root / "validation" / "configs" / f"{name}.json"))[1]


def inventory(model):
    """name -> (class, shape, dtype, device, quant-state shapes/dtypes) for params and buffers."""
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        qs = [(tuple(t.shape), t.dtype) for t in quant_state_tensors(p)]
        out[n] = (type(p).__name__, tuple(p.shape), p.dtype, p.device.type, p.requires_grad, qs)
    for n, b in model.named_buffers(remove_duplicate=False):
        out["buffer:" + n] = (tuple(b.shape), b.dtype, b.device.type)
    return out


def pretrained(cfg, train, tmp_path):
    """The user's path: random checkpoint + from_pretrained on CPU."""
    from transformers import AutoModelForCausalLM

    path = write_checkpoint(cfg, "cpu", tmp_path)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=load_dtype(train), attn_implementation=train.attn,
        quantization_config=bnb_config(train), device_map={"": "cpu"})


@pytest.mark.parametrize("name, setup", [
    ("llama-tiny", dict(method="qlora", quant="nf4", double_quant=True, precision="mixed")),
    ("qwen2-tiny", dict(method="qlora", quant="fp4", double_quant=False, precision="bf16")),
    ("llama-gqa-tiny", dict(method="qlora", quant="int8", precision="bf16")),
    ("mixtral-tiny", dict(method="lora", precision="bf16")),
])
def test_streaming_storage_equals_from_pretrained(root, tmp_path, name, setup):
    """Meta-device build gives the same params, buffers, quant state and bytes as from_pretrained."""
    cfg, train = config(root, name), TrainSpec(**setup)
    a = pretrained(cfg, train, tmp_path)
    b = load_streaming(cfg, train, "cpu")
    assert inventory(a) == inventory(b)
    ra, rb = resident_storages(a), resident_storages(b)
    assert sum(ra.values()) == sum(rb.values()) and len(ra) == len(rb)
    assert not any(p.device.type == "meta" for p in b.parameters())
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        assert getattr(a, attr, None) == getattr(b, attr, None)
    if cfg.get("tie_word_embeddings"):
        assert b.get_output_embeddings().weight is b.get_input_embeddings().weight


def test_streaming_and_pretrained_prepare_alike(root, tmp_path):
    """After k-bit prep + peft both builds agree; non-quantised params are fp32, only LoRA trains."""
    cfg = config(root, "qwen2-tiny")
    train = TrainSpec(method="qlora", precision="mixed", lora_r=8, lora_dropout=0.0)
    a = finish_model(pretrained(cfg, train, tmp_path), train)
    b = finish_model(load_streaming(cfg, train, "cpu"), train)
    assert inventory(a) == inventory(b)
    assert a.training and not a.config.use_cache
    # prepare_model_for_kbit_training upcasts the non-quantised parameters; LoRA is fp32 and trainable
    dtypes = {n: p.dtype for n, p in b.named_parameters()}
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert all(p.dtype == torch.float32 for n, p in b.named_parameters() if p.requires_grad)
    assert {n.split(".")[-3] for n, p in b.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_dtypes_and_targets(root):
    """Load/compute dtypes, BitsAndBytesConfig and LoRA target names per family."""
    assert load_dtype(TrainSpec(method="full", precision="mixed")) == torch.float32
    assert load_dtype(TrainSpec(method="full", precision="bf16")) == torch.bfloat16
    assert load_dtype(TrainSpec(method="lora", precision="mixed")) == torch.bfloat16
    assert load_dtype(TrainSpec(method="qlora", precision="fp16")) == torch.float16
    assert load_dtype(TrainSpec(method="qlora", precision="fp32")) == torch.float32
    assert compute_dtype(TrainSpec(precision="mixed")) == torch.bfloat16
    assert bnb_config(TrainSpec(method="lora")) is None
    q = bnb_config(TrainSpec(method="qlora", quant="nf4", double_quant=True, precision="fp16"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert bnb_config(TrainSpec(method="qlora", quant="int8")).load_in_8bit
    train = TrainSpec(method="lora", lora_targets="attn")
    phi3 = load_streaming(config(root, "phi3-tiny"), train, "cpu")
    assert lora_targets(phi3, train) == ["o_proj", "qkv_proj"]
    llama = load_streaming(config(root, "llama-tiny"), train, "cpu")
    assert lora_targets(llama, train) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(llama, TrainSpec(method="lora", lora_targets="q_proj,v_proj")) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("setup, shim", [
    (dict(method="qlora", precision="mixed", grad_ckpt=True), True),
    (dict(method="full", precision="bf16", grad_ckpt=False, optimizer="adamw_8bit"), False),
])
def test_run_steps_measures_phases(root, setup, shim):
    """A real CPU step: resident + tracked peaks per phase, shim only for mixed."""
    train = TrainSpec(lora_r=8, lora_dropout=0.0, seq_len=64, **setup)
    model = finish_model(load_streaming(config(root, "llama-gqa-tiny"), train, "cpu"), train)
    resident = sum(resident_storages(model).values())
    out = run_steps(model, train, "cpu", warmup=1, measured=1, probe=CpuProbe())
    m = out["measured"]
    assert out["cpu_autocast_shim"] is shim and torch.is_autocast_enabled.__name__ == "is_autocast_enabled"
    assert m["resident_bytes"] == resident and m["peak_reserved_bytes"] is None
    assert set(m["phases"]) == {"forward", "backward", "optimizer"}
    assert m["peak_allocated_bytes"] == max(m["phases"].values()) > resident
    assert len(out["losses"]) == 2 and all(loss == loss for loss in out["losses"])
    if train.method == "full":  # 8-bit states of every trainable tensor stay live after warm-up
        assert m["phases"]["forward"] - resident >= 2 * out["trainable_params"] * 0.9


def test_timed_steps_run_after_the_memory_result_and_without_the_probe(root):
    """Step time: the median of unprobed steps with a phase split; the memory peaks are those of
    the probed steps, unchanged by the timed ones."""
    train = TrainSpec(method="lora", lora_r=8, lora_dropout=0.0, seq_len=64, precision="bf16",
                      optimizer="adamw", grad_accum=2)
    model = finish_model(load_streaming(config(root, "llama-tiny"), train, "cpu"), train)
    probe = CpuProbe()
    out = run_steps(model, train, "cpu", warmup=1, measured=1, probe=probe, timed=3)
    timed = out["timed"]
    assert timed["timed_steps"] == 3 and len(timed["steps_s"]) == 3
    assert timed["step_s"] == sorted(timed["steps_s"])[1]
    assert set(timed["phases_s"]) == {"forward", "backward", "optimizer"}
    assert sum(timed["phases_s"].values()) <= timed["step_s"] * 1.5
    assert timed["tokens_per_s"] == pytest.approx(64 * 2 / timed["step_s"], rel=1e-3)
    assert len(out["losses"]) == 2  # timed steps are not measured steps
    assert out["measured"] == probe.result()
