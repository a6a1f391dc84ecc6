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
