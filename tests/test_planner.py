"""Planner searches (vramplan.planner): the reported maxima fit and one more does not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramplan.planner import (FITS, NO, TIGHT, Margin, fit_gpu, fits_on, largest_fitting,
                              max_batch, max_seq_len, min_gpus, plan, search_fits, traced_plan,
                              verdict)
from vramplan.profiles import load_gpu, load_gpus, load_model
from vramplan.specs import TrainSpec

CASES = {
    "7b-qlora-4090": ("llama-2-7b", TrainSpec(), "rtx-4090"),
    "8b-lora-a100": ("llama-3.1-8b", TrainSpec(method="lora", grad_ckpt=False), "a100-80gb"),
    "70b-qlora-h100": ("llama-2-70b", TrainSpec(), "h100-80gb"),
    "13b-full-zero3": ("llama-2-13b", TrainSpec(method="full", shard="zero3", num_gpus=4),
                       "a100-80gb"),
}


@pytest.mark.parametrize("field,finder", [("seq_len", max_seq_len), ("batch", max_batch)],
                         ids=["max_seq", "max_batch"])
@pytest.mark.parametrize("name,train,gpu", CASES.values(), ids=CASES.keys())
def test_reported_maximum_fits_and_one_more_does_not(calib, name, train, gpu, field, finder,
                                                     search):
    m, g = load_model(name), load_gpu(gpu)
    best = finder(m, train, g, calib, search=search)
    assert best is not None
    anchor = getattr(train, field)
    assert search_fits(m, replace(train, **{field: best}), g, calib, field, anchor)
    if field == "seq_len" and best == m.max_context:
        return  # stopped at the model's context (test_max_seq_stops_at_the_models_context)
    assert not search_fits(m, replace(train, **{field: best + 1}), g, calib, field, anchor)


@pytest.mark.parametrize("name,train,gpu", CASES.values(), ids=CASES.keys())
def test_search_total_is_exact_at_the_users_value_and_at_powers_of_two(calib, name, train, gpu):
    from vramplan.planner import per_gpu, search_total

    m = load_model(name)
    for seq in (train.seq_len, 1024, 4096):
        t = replace(train, seq_len=seq)
        assert search_total(m, t, calib, "seq_len", train.seq_len) == \
            per_gpu(m, t, calib).device_total_bytes


def test_nothing_fits_gives_none(calib, search):
    m, g = load_model("llama-2-70b"), load_gpu("rtx-3060-12gb")
    assert max_seq_len(m, TrainSpec(), g, calib, search=search) is None
    assert max_batch(m, TrainSpec(), g, calib, search=search) is None


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 17, 1000, 4096])
def test_largest_fitting_is_exact(limit):
    for start in (1, 8, 5000):
        assert largest_fitting(lambda x: x <= limit, start=start, cap=4096) == (limit or None)


def test_largest_fitting_probes_only_what_the_answer_needs():
    """A passing start makes the probe at 1 needless (each probe may be an allocator replay)."""
    probed = []
    assert largest_fitting(lambda x: probed.append(x) or x <= 100, start=64, cap=4096) == 100
    assert 1 not in probed and len(probed) == len(set(probed)) <= 9


def test_min_gpus_is_the_smallest_count(calib, search):
    m, g = load_model("llama-2-70b"), load_gpu("rtx-4090")
    n, scheme = min_gpus(m, TrainSpec(), g, calib, search=search)
    assert scheme == "zero3" and n is not None and n > 1
    assert fits_on(m, TrainSpec(shard="zero3", num_gpus=n), g, calib)
    assert not fits_on(m, TrainSpec(shard="zero3", num_gpus=n - 1), g, calib)


def test_fit_headroom_is_against_cuda_capacity(calib, search):
    f = fit_gpu(load_model("llama-3.1-8b"), TrainSpec(), load_gpu("rtx-4090"), calib, search=search)
    assert f.gpu.capacity_bytes < f.gpu.memory_bytes
    assert f.headroom_bytes == f.gpu.capacity_bytes - f.device_total_bytes
    assert f.fits == (f.verdict.word == FITS)
    assert f.headroom_pct == pytest.approx(100 * f.headroom_bytes / f.gpu.capacity_bytes)
    assert f.min_gpus == 1


def test_plan_picks_the_smallest_gpu_that_fits(calib, search):
    gpus = list(load_gpus().values())
    p = plan(load_model("llama-3.1-8b"), TrainSpec(), gpus, calib, search=search)
    fitting = [f for f in p.fits if f.fits]
    assert p.choice.gpu.capacity_bytes == min(f.gpu.capacity_bytes for f in fitting)
    assert p.choice.gpu.name in p.answer


def test_plan_falls_back_to_several_gpus(calib, search):
    gpus = [load_gpu("rtx-4090"), load_gpu("a100-80gb")]
    p = plan(load_model("llama-65b"), TrainSpec(method="full"), gpus, calib, search=search)
    assert not any(f.fits for f in p.fits)
    assert p.choice is not None and p.choice.min_gpus > 1
    assert f"{p.choice.min_gpus} × {p.choice.gpu.name}" in p.answer


def test_seed_recipe_70b_verdicts_on_48gb_cards(calib):
    """The measured device peak of this recipe on the H200 is about 47.6 GiB: above the RTX A6000's
    47.53 usable GiB while its live tensors are below, so it is tight; the 44.4 GiB cards cannot
    hold the live tensors at all."""
    m, t = load_model("llama-2-70b"), TrainSpec()
    words = {k: verdict(per_gpu_est(m, t, calib), load_gpu(k), calib).word
             for k in ("rtx-a6000", "l40s", "rtx-6000-ada", "a100-80gb")}
    assert words == {"rtx-a6000": TIGHT, "l40s": NO, "rtx-6000-ada": NO, "a100-80gb": FITS}


def test_llama8b_at_the_measured_oom_edge_is_never_fits(calib):
    # h200-llama8b-lora-bf16-nockpt-s11264-near-capacity ran out of memory on the H200.
    m, g = load_model("llama-3.1-8b"), load_gpu("h200")
    for dropout in (0.0, 0.05):  # the record's setup, and the CLI default the issue names
        t = TrainSpec(method="lora", precision="bf16", grad_ckpt=False, seq_len=11264,
                      optimizer="adamw", lora_dropout=dropout)
        assert verdict(per_gpu_est(m, t, calib), g, calib).word in (TIGHT, NO)


def test_margin_turns_fits_into_tight(calib):
    m, t, g = load_model("llama-2-7b"), TrainSpec(), load_gpu("a100-80gb")
    s = per_gpu_est(m, t, calib)
    room = g.capacity_bytes - s.device_total_bytes
    assert verdict(s, g, calib).word == FITS
    assert verdict(s, g, calib, Margin(nbytes=room + 1)).word == TIGHT
    assert verdict(s, g, calib, Margin(nbytes=room)).word == FITS
    assert Margin(nbytes=10, fraction=0.5).of(100) == 50


@pytest.mark.parametrize("text,margin", [("0", Margin()), ("2GiB", Margin(nbytes=2 * 2**30)),
                                         ("512MiB", Margin(nbytes=512 * 2**20)),
                                         ("1.5GB", Margin(nbytes=1_500_000_000)),
                                         ("5%", Margin(fraction=0.05))])
def test_margin_flag_parses_sizes_and_percentages(text, margin):
    from vramplan.cli.plan_cmd import parse_margin

    assert parse_margin(text) == margin


@pytest.mark.parametrize("text", ["-1GiB", "lots", "150%", "5 parsecs", ""])
def test_margin_flag_rejects_nonsense_with_exit_2(text, capsys):
    from vramplan.cli import main

    assert main(["fit", "llama-2-7b", "--gpus", "h200", "--margin", text]) == 2
    assert "--margin" in capsys.readouterr().err


def per_gpu_est(m, t, calib):
    from vramplan.planner import per_gpu

    return per_gpu(m, t, calib)


def test_gpus_without_bf16_say_so_instead_of_fitting(calib, search):
    # T4 and V100 have no bf16 tensor cores: a bf16 / mixed setup gets "needs bf16", never a fit
    m = load_model("llama-2-13b")
    for key in ("t4", "v100-32gb"):
        f = fit_gpu(m, TrainSpec(), load_gpu(key), calib, search=search)
        assert f.verdict.word == "needs bf16" and not f.fits and f.max_seq_len is None
        assert fit_gpu(m, TrainSpec(precision="fp16"), load_gpu(key), calib, search=search).verdict.word != \
            "needs bf16"


def test_max_seq_stops_at_the_models_context(calib, search):
    m = load_model("llama-2-7b")  # max_position_embeddings 4096
    assert m.max_context == 4096
    assert max_seq_len(m, TrainSpec(), load_gpu("h200"), calib, search=search) == 4096


def test_your_own_card_by_usable_memory(capsys):
    from vramplan.cli import main

    assert main(["fit", "llama-2-7b", "--gpus", "rtx-4090,24GiB", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    mine = next(g for g in data["gpus"] if g["key"] == "24GiB")
    assert mine["capacity_bytes"] == 24 * 2**30 and mine["verdict"] == "fits"
    assert "GPU asked about" not in data["answer"] or "catalog" not in data["answer"]


def test_filtered_gpus_answer_about_those_gpus(capsys):
    from vramplan.cli import main

    assert main(["fit", "llama-2-70b", "--method", "full", "--gpus", "rtx-4090"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "GPU asked about" in first and "catalog" not in first


def test_suggest_ranks_quality_first_and_every_suggestion_fits_as_reported(calib, search):
    from vramplan.planner import QUALITY, suggest

    m, g = load_model("llama-3.1-8b"), load_gpu("rtx-4090")
    rows = suggest(m, g, calib, search=search)
    assert rows and all(s.train.method != "full" for s in rows)  # 8B full needs >100 GiB
    keys = [(QUALITY[s.train.method], -s.max_seq_len) for s in rows]
    assert keys == sorted(keys)  # quality first, then the longest sequence
    for s in rows:
        t = replace(s.train, seq_len=s.max_seq_len)
        assert search_fits(m, t, g, calib, "seq_len", s.train.seq_len)


def test_suggest_on_a_card_without_bf16_uses_fp16(calib, search):
    from vramplan.planner import suggest

    rows = suggest(load_model("qwen2.5-0.5b"), load_gpu("t4"), calib, search=search)
    assert rows and {s.train.precision for s in rows} == {"fp16"}
    assert rows[0].train.method == "full"  # 0.5B full fine-tuning fits a T4 in fp16


def test_suggest_cli(capsys):
    from vramplan.cli import main

    assert main(["suggest", "llama-3.1-8b", "--gpus", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("On NVIDIA GeForce RTX 4090") and "qlora" in out
    assert main(["suggest", "llama-3.1-8b", "--gpus", "rtx-4090,h200"]) == 2


def traced_levels(gib: float) -> dict:
    return {"allocated": int(gib * 2**30), "outside": 2**29, "largest": 2**28}


def test_a_traced_step_without_its_reserved_level_is_never_said_to_fit(calib):
    """A depth-extrapolated trace has no allocator cache: "does not fit" or "tight" only, and the
    answer names the flag that gives the device total."""
    gpus = [load_gpu("rtx-4090"), load_gpu("h100-80gb")]
    fits, answer = traced_plan("m", TrainSpec(), gpus, calib, device_total=None,
                               **traced_levels(30))
    assert [f.verdict.word for f in fits] == [NO, TIGHT]
    assert "--trace-depth full" in answer and "H100" in answer


def test_a_traced_device_total_gets_the_analytic_verdict_rules(calib):
    """The same rules as the analytic planner: fits with headroom, tight near the capacity."""
    gpu = load_gpu("h100-80gb")
    levels = traced_levels(60)
    fits, answer = traced_plan("m", TrainSpec(), [gpu], calib,
                               device_total=levels["allocated"] + 2**30, **levels)
    assert fits[0].verdict.word == FITS and fits[0].min_gpus == 1 and "H100" in answer
    snug = gpu.capacity_bytes - 2**20
    fits, _ = traced_plan("m", TrainSpec(), [gpu], calib, device_total=snug,
                          **{**levels, "allocated": snug - 2**30})
    assert fits[0].verdict.word == TIGHT


def test_a_setup_asked_again_is_not_estimated_again_but_another_calibration_is(calib, monkeypatch):
    import vramplan.planner as planner
    calls = []
    real = planner.estimate
    monkeypatch.setattr(planner, "estimate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    m, t = load_model("llama-3.2-1b"), TrainSpec(seq_len=333)
    first = planner.per_gpu(m, t, calib)
    assert planner.per_gpu(m, t, calib) is first and len(calls) == 1
    other = {**calib, "non_allocator": {**calib["non_allocator"],
                                        "bytes": calib["non_allocator"]["bytes"] + 2**20}}
    assert planner.per_gpu(m, t, other).device_total_bytes == first.device_total_bytes + 2**20
    assert len(calls) == 2
