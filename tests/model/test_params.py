"""Exact parameter counts: the analytic count equals transformers' (meta device) and peft's."""

from __future__ import annotations

import warnings

import pytest

from vramplan.model.params import total_params, trainable_params
from vramplan.profiles import list_models, load_hf_config, spec_from_hf_config
from vramplan.specs import TrainSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def meta_model(config: dict):
    cfg = dict(config)
    hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(hf)


@pytest.mark.parametrize("name", list_models("analytic"))
def test_analytic_count_equals_transformers_for_every_profile(name):
    _, config = load_hf_config(name)
    model = meta_model(config)
    expected = sum(p.numel() for p in model.parameters())
    assert total_params(spec_from_hf_config(config, name)) == expected


TINY = ["llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3-mini", "mixtral-8x7b"]


def shrink(config: dict) -> dict:
    """Same family and structure, few layers: peft on meta stays fast."""
    return {**config, "num_hidden_layers": 2}


@pytest.mark.parametrize("name", TINY)
def test_lora_trainable_count_equals_peft_r16_all_linear(name):
    peft = pytest.importorskip("peft")
    _, config = load_hf_config(name)
    config = shrink(config)
    model = meta_model(config)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    expected = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    train = TrainSpec(method="lora", lora_r=16)
    assert trainable_params(spec_from_hf_config(config, name), train) == expected


def profiles_with_stored_counts() -> list[str]:
    from vramplan.profiles import profile_source

    return [n for n in list_models() if profile_source(n).get("meta_param_count") is not None]


@pytest.mark.parametrize("name", profiles_with_stored_counts())
def test_a_profiles_stored_parameter_count_is_transformers_meta_count(name):
    from vramplan.profiles import profile_source

    _, config = load_hf_config(name)
    model = meta_model({k: v for k, v in config.items() if k != "architectures"})
    assert sum(p.numel() for p in model.parameters()) == profile_source(name)["meta_param_count"]
