"""The step inventory: every term reads one list of tensors, built once per model and setup."""

from __future__ import annotations

from dataclasses import replace

from vramplan.model import inventory as inv_mod
from vramplan.model.estimate import estimate
from vramplan.model.params import lora_tensors, param_tensors, trainable_params
from vramplan.model.weights import stored_bytes
from vramplan.model.dtypes import dtypes_for
from vramplan.profiles import load_model
from vramplan.specs import TrainSpec


def test_a_sweep_over_seq_batch_and_optimizer_builds_one_inventory(calib, monkeypatch):
    """(Ranks 7 and 9: setups no other test memoises.)"""
    built = []
    real = inv_mod._build
    monkeypatch.setattr(inv_mod, "_build", lambda m, t: built.append(t) or real(m, t))
    m = load_model("llama-2-7b")
    for seq in (128, 4096):
        for batch in (1, 8):
            for opt in ("paged_adamw_32bit", "adamw_8bit"):
                estimate(m, TrainSpec(seq_len=seq, batch=batch, optimizer=opt, lora_r=7), calib)
    assert len(built) == 1
    estimate(m, TrainSpec(lora_r=9), calib)  # another rank: another inventory
    assert len(built) == 2


def test_the_inventory_lists_what_the_counting_functions_list():
    for name in ("llama-3.1-8b", "phi-3-mini", "mixtral-8x7b", "gemma-2-2b"):
        m = load_model(name)
        for t in (TrainSpec(), TrainSpec(method="full"),
                  TrainSpec(method="lora", lora_targets="o_proj")):
            inv = inv_mod.inventory(m, t)
            assert inv.params == param_tensors(m) and inv.lora == lora_tensors(m, t)
            assert inv.trainable_params == trainable_params(m, t)
            assert inv.adapted == ({"o_proj"} if t.lora_targets == "o_proj" else
                                   (set() if t.method == "full" else
                                    {lin.name for lin in inv.linears}))


def test_stored_bytes_of_a_4bit_linear_is_half_a_byte_per_weight():
    m = load_model("llama-2-7b")
    t = TrainSpec()
    inv = inv_mod.inventory(m, t)
    q = next(x for x in inv.params if x.name == "q_proj")
    assert stored_bytes(q, t, dtypes_for(t), inv) == q.params // 2
    full = replace(t, method="full", precision="bf16")
    assert stored_bytes(q, full, dtypes_for(full), inv_mod.inventory(m, full)) == 2 * q.params
