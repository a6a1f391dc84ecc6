"""Planner plots return Figures; the CLI writes PNGs that Pillow opens."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from vramplan.cli import main  # noqa: E402
from vramplan.planner import per_gpu  # noqa: E402
from vramplan.profiles import load_model  # noqa: E402
from vramplan.report.plots import plot_breakdown, plot_maxseq  # noqa: E402
from vramplan.specs import TrainSpec  # noqa: E402


def test_breakdown_figure_has_a_bar_per_method_and_group(calib):
    m = load_model("llama-2-7b")
    by = {k: per_gpu(m, TrainSpec(method=k), calib) for k in ("full", "lora", "qlora")}
    fig = plot_breakdown(m.name, by)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * 5  # 3 methods x 5 groups
    assert "GiB" in ax.get_ylabel()


def test_maxseq_figure(calib):
    fig = plot_maxseq("llama-2-7b", "qlora", [("a", 4096), ("b", None)])
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 2


@pytest.mark.parametrize("argv", [
    ["plot", "breakdown", "llama-2-7b"],
    ["plot", "maxseq", "llama-2-7b", "--method", "qlora", "--gpus", "rtx-4090,a100-80gb"],
], ids=["breakdown", "maxseq"])
def test_cli_writes_a_png(tmp_path, capsys, argv):
    out = tmp_path / "x.png"
    assert main([*argv, "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_breakdown_has_a_setup_subtitle_value_labels_and_a_log_axis_when_one_bar_dwarfs(calib):
    m = load_model("llama-2-70b")
    by = {k: per_gpu(m, TrainSpec(method=k), calib) for k in ("full", "lora", "qlora")}
    ax = plot_breakdown(m.name, by).axes[0]
    assert "seq 2048" in ax.get_title() and "grad ckpt on" in ax.get_title()
    labels = [t.get_text() for t in ax.texts]
    assert sum(x.endswith(" GiB") for x in labels) == 3
    assert ax.get_yscale() == "log"  # full fine-tuning is >20x QLoRA here
    top = max(float(x.split()[0]) for x in labels if x.endswith(" GiB"))
    assert ax.get_ylim()[1] > top  # the labels fit inside the axes


def test_maxseq_says_so_when_nothing_fits():
    ax = plot_maxseq("llama-2-70b", "qlora", [("rtx-4090", None), ("t4", None)]).axes[0]
    assert any("nothing fits" in t.get_text() for t in ax.texts)


def test_maxseq_value_labels_fit_inside_the_axes():
    ax = plot_maxseq("m", "qlora", [("a", 4096), ("b", 100_000)]).axes[0]
    assert ax.get_xlim()[1] > 100_000
