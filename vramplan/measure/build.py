"""Build the model of a case the way users load it: random weights, real quantisation, real peft.

Two paths end in the same model:

- :func:`build_model` writes a random-weight checkpoint (bf16 safetensors) to a work folder, frees it,
  and loads it with ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)`` exactly
  as a user would (the default; what the numbers are meant to describe).
- :func:`build_quantized_streaming` is for models too large for host RAM or disk (70B): the
  skeleton is built on the meta device, ``transformers``' own bitsandbytes quantizer swaps the
  linears for ``Linear4bit``/``Linear8bitLt``, and every parameter is then created with random
  values directly on the device, one module at a time, and quantised there. No full-precision copy
  of the model ever exists on the host.

Both then run :func:`finish_model`: ``prepare_model_for_kbit_training`` (QLoRA), gradient
checkpointing, ``use_cache = False``, ``get_peft_model`` (LoRA/QLoRA) and ``model.train()``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vramplan.specs import ATTN_MODULES, TrainSpec

#: Config keys that describe how a checkpoint was stored, not the architecture.
_STORAGE_KEYS = ("torch_dtype", "dtype", "quantization_config", "_name_or_path", "transformers_version")
#: Standard deviation of the random weights (values do not change memory; this keeps them finite).
INIT_STD = 0.02


def load_dtype(train: TrainSpec) -> torch.dtype:
    """The ``dtype=`` passed to ``from_pretrained``: fp32 for full+mixed, else the precision's dtype."""
    if train.precision == "fp32" or (train.precision == "mixed" and train.method == "full"):
        return torch.float32
    return torch.float16 if train.precision == "fp16" else torch.bfloat16


def compute_dtype(train: TrainSpec) -> torch.dtype:
    """``bnb_4bit_compute_dtype``: bf16 for mixed/bf16, fp16 for fp16, fp32 for fp32."""
    return {"fp32": torch.float32, "fp16": torch.float16}.get(train.precision, torch.bfloat16)


def bnb_config(train: TrainSpec) -> Any:
    """The ``BitsAndBytesConfig`` of a QLoRA setup (None for full and LoRA)."""
    if train.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if train.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=train.quant,
                              bnb_4bit_use_double_quant=train.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(train))


def hf_config(cfg: dict[str, Any]) -> Any:
    """A transformers config object from a config.json dict (storage-only keys dropped)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in cfg.items() if k not in _STORAGE_KEYS and k != "model_type"}
    return AutoConfig.for_model(cfg["model_type"], **kwargs)


def checkpoint_key(cfg: dict[str, Any]) -> str:
    """A short stable hash of a config: checkpoints with the same key are interchangeable."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def write_checkpoint(cfg: dict[str, Any], device: str, workdir: Path) -> Path:
    """Write a random-weight bf16 checkpoint of ``cfg`` under ``workdir``, reusing one already there.

    Weights are initialised on ``device`` (fast on a GPU) and freed before returning. Only the most
    recent checkpoint is kept in ``workdir`` (large models do not fit twice on a small disk); it is
    written to a temporary folder and renamed, so a crash never leaves a half checkpoint behind.
    """
    from transformers import AutoModelForCausalLM

    workdir = Path(workdir)
    target = workdir / f"ckpt-{checkpoint_key(cfg)}"
    if (target / "config.json").is_file():
        return target
    workdir.mkdir(parents=True, exist_ok=True)
    for old in [*workdir.glob("ckpt-*"), *workdir.glob("tmp-ckpt-*")]:
        shutil.rmtree(old, ignore_errors=True)
    tmp = workdir / f"tmp-{target.name}"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    free_memory(device)
    tmp.rename(target)
    return target


def free_memory(device: str) -> None:
    """Collect garbage and, on CUDA, return cached blocks so the next build starts clean."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def build_model(cfg: dict[str, Any], train: TrainSpec, device: str, workdir: Path) -> Any:
    """Random-weight checkpoint, then ``from_pretrained`` + :func:`finish_model` (the user's path)."""
    from transformers import AutoModelForCausalLM

    path = write_checkpoint(cfg, device, Path(workdir))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=load_dtype(train), attn_implementation=train.attn,
        quantization_config=bnb_config(train), device_map={"": device})
    return finish_model(model, train)


def build_quantized_streaming(cfg: dict[str, Any], train: TrainSpec, device: str) -> Any:
    """Meta-device skeleton, quantised module by module on ``device``, then :func:`finish_model`."""
    return finish_model(load_streaming(cfg, train, device), train)


def load_streaming(cfg: dict[str, Any], train: TrainSpec, device: str) -> Any:
    """The loaded (not yet prepared) model, equal in storage to ``from_pretrained``'s, built in place.

    Mirrors ``PreTrainedModel.from_pretrained``: skeleton without weights (buffers such as the rotary
    ``inv_freq`` are computed on the host, as there), ``hf_quantizer.preprocess_model`` (which calls
    ``replace_with_bnb_linear`` with transformers' own skip list: lm_head, tied weights), weights
    materialised and quantised as ``Bnb4bitQuantize``/``Bnb8bitQuantize`` do, then
    ``postprocess_model`` and ``eval()``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    dtype = load_dtype(train)
    qconfig = bnb_config(train)
    quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False) if qconfig else None
    with init_empty_weights(include_buffers=False), default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype,
                                                 attn_implementation=train.attn)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device},
                                       checkpoint_files=None, use_kernels=False)
    model.tie_weights()  # share tied parameters while still on meta: materialised once
    torch.manual_seed(0)
    materialize(model, device, dtype, model._get_dtype_plan(dtype))
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (from_pretrained builds the skeleton under it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def materialize(model: torch.nn.Module, device: str, dtype: torch.dtype,
                dtype_plan: dict[str, torch.dtype] | None = None) -> None:
    """Give every meta parameter random values on ``device``, quantising bnb weights on the spot.

    Works module by module, so at most one linear layer exists in full precision at any time.
    ``dtype`` is the load dtype (what a bnb weight has before quantisation); other parameters keep
    their skeleton dtype unless ``dtype_plan`` (transformers' keep-in-fp32 globs) says otherwise.
    Shared (tied) parameters stay shared. Buffers are moved to ``device``.
    """
    plan = [(re.compile(glob.replace("*", ".*")), dt) for glob, dt in (dtype_plan or {}).items()]
    done: dict[int, torch.nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                full = f"{mod_name}.{name}" if mod_name else name
                target = next((dt for rx, dt in plan if rx.search(full)), param.dtype)
                done[id(param)] = _new_param(param, device, dtype, target)
            module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)


def _new_param(old: torch.nn.Parameter, device: str, dtype: torch.dtype,
               target: torch.dtype) -> torch.nn.Parameter:
    """One random parameter on ``device`` (``target`` dtype); bnb weights quantised as transformers does."""
    if old.device.type != "meta":
        return old
    cls = type(old).__name__
    if cls == "Params4bit":  # transformers Bnb4bitQuantize.convert
        import bitsandbytes as bnb

        value = _random(old.shape, dtype, device)
        return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)
    if cls == "Int8Params":  # transformers Bnb8bitQuantize.convert
        import bitsandbytes as bnb

        value = _random(old.shape, dtype, device)
        kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
        return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)
    # A loaded checkpoint tensor becomes a fresh Parameter (requires_grad=True), also for the biases
    # that replace_with_bnb_linear had frozen on the skeleton.
    return torch.nn.Parameter(_random(old.shape, target, device), requires_grad=target.is_floating_point)


def _random(shape: torch.Size, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A tensor of N(0, INIT_STD) values created directly on ``device``."""
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD)


def finish_model(model: Any, train: TrainSpec) -> Any:
    """Prepare for training as a user does: k-bit prep (QLoRA, unless kbit_prep is off) or grad
    ckpt, no KV cache, LoRA, train()."""
    if train.method == "qlora" and train.kbit_prep:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif train.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if train.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
            target_modules=lora_targets(model, train), task_type="CAUSAL_LM"))
    model.train()
    return model


def lora_targets(model: torch.nn.Module, train: TrainSpec) -> str | list[str]:
    """peft ``target_modules``: "all-linear", the attention projections present, or the list."""
    if train.lora_targets == "all-linear":
        return "all-linear"
    names = train.target_modules() or ()
    if train.lora_targets == "attn":
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        names = tuple(n for n in ATTN_MODULES if n in present)
    return list(names)
