"""Planner searches (vramplan.planner): the reported maxima fit and one more does not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramplan.planner import (fit_gpu, fits_on, largest_fitting, max_batch, max_seq_len, min_gpus,
                              plan)
from vramplan.profiles import load_gpu, load_gpus, load_model
from vramplan.specs import TrainSpec

CASES = {
    "7b-qlora-4090": ("llama-2-7b", TrainSpec(), "rtx-4090"),
    "8b-lora-a100": ("llama-3.1-8b", TrainSpec(method="lora", grad_ckpt=False), "a100-80gb"),
    "70b-qlora-h100": ("llama-2-70b", TrainSpec(), "h100-80gb"),
    "13b-full-zero3": ("llama-2-13b", TrainSpec(method="full", shard="zero3", num_gpus=4),
                       "a100-80gb"),
}


@pytest.mark.parametrize("field,search", [("seq_len", max_seq_len), ("batch", max_batch)],
                         ids=["max_seq", "max_batch"])
@pytest.mark.parametrize("name,train,gpu", CASES.values(), ids=CASES.keys())
def test_reported_maximum_fits_and_one_more_does_not(calib, name, train, gpu, field, search):
    m, g = load_model(name), load_gpu(gpu)
    best = search(m, train, g, calib)
    assert best is not None
    assert fits_on(m, replace(train, **{field: best}), g, calib)
    assert not fits_on(m, replace(train, **{field: best + 1}), g, calib)


def test_nothing_fits_gives_none(calib):
    m, g = load_model("llama-2-70b"), load_gpu("rtx-3060-12gb")
    assert max_seq_len(m, TrainSpec(), g, calib) is None
    assert max_batch(m, TrainSpec(), g, calib) is None


@pytest.mark.parametrize("limit", [1, 2, 3, 17, 1000, 4096])
def test_largest_fitting_is_exact(limit):
    assert largest_fitting(lambda x: x <= limit, start=8, cap=4096) == limit
    assert largest_fitting(lambda x: x <= limit, start=1, cap=4096) == limit


def test_min_gpus_is_the_smallest_count(calib):
    m, g = load_model("llama-2-70b"), load_gpu("rtx-4090")
    n, scheme = min_gpus(m, TrainSpec(), g, calib)
    assert scheme == "zero3" and n is not None and n > 1
    assert fits_on(m, TrainSpec(shard="zero3", num_gpus=n), g, calib)
    assert not fits_on(m, TrainSpec(shard="zero3", num_gpus=n - 1), g, calib)


def test_fit_headroom_matches_the_estimate(calib):
    f = fit_gpu(load_model("llama-3.1-8b"), TrainSpec(), load_gpu("rtx-4090"), calib)
    assert f.headroom_bytes == f.gpu.memory_bytes - f.device_total_bytes
    assert f.fits == (f.headroom_bytes >= 0)
    assert f.headroom_pct == pytest.approx(100 * f.headroom_bytes / f.gpu.memory_bytes)
    assert f.min_gpus == 1


def test_plan_picks_the_smallest_gpu_that_fits(calib):
    gpus = list(load_gpus().values())
    p = plan(load_model("llama-3.1-8b"), TrainSpec(), gpus, calib)
    fitting = [f for f in p.fits if f.fits]
    assert p.choice.gpu.memory_bytes == min(f.gpu.memory_bytes for f in fitting)
    assert p.choice.gpu.name in p.answer


def test_plan_falls_back_to_several_gpus(calib):
    gpus = [load_gpu("rtx-4090"), load_gpu("a100-80gb")]
    p = plan(load_model("llama-65b"), TrainSpec(method="full"), gpus, calib)
    assert not any(f.fits for f in p.fits)
    assert p.choice is not None and p.choice.min_gpus > 1
    assert f"{p.choice.min_gpus} × {p.choice.gpu.name}" in p.answer
