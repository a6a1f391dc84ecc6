"""Planner plots (matplotlib OO API, Agg canvas; every function returns a Figure, nothing is shown).

Imported only by the `plot` and `docs` commands, so `estimate` never loads matplotlib.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vramplan.model.terms import GROUPS
from vramplan.sharding import ShardedEstimate
from vramplan.units import GIB

#: Reproducible PNGs: no software/version stamp in the file's metadata.
PNG_METADATA = {"Software": None}
FIGSIZE = (7.0, 4.5)
DPI = 100


def _figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def peak_group_bytes(s: ShardedEstimate) -> dict[str, int]:
    """Bytes per term group at the peak phase; reserved/device-level terms go to their group too."""
    out = dict.fromkeys(GROUPS, 0)
    for t in s.breakdown.terms:
        if s.peak_phase in t.phases or t.level != "allocated":
            out[t.key.split(".")[0]] += t.nbytes
    return out


def plot_breakdown(model: str, by_method: Mapping[str, ShardedEstimate],
                   gpu_lines: Sequence[tuple[str, int]] = ()) -> Figure:
    """Stacked bar per method of weights/gradients/optimizer/activations/overhead at the peak phase
    (device total level), with optional horizontal GPU-capacity lines (label, bytes)."""
    fig = _figure()
    ax = fig.add_subplot()
    methods = list(by_method)
    groups = {m: peak_group_bytes(s) for m, s in by_method.items()}
    bottom = [0.0] * len(methods)
    for g in GROUPS:
        vals = [groups[m][g] / GIB for m in methods]
        ax.bar(methods, vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for label, nbytes in gpu_lines:
        ax.axhline(nbytes / GIB, linestyle="--", linewidth=0.8, color="0.3")
        ax.annotate(label, (len(methods) - 0.5, nbytes / GIB), fontsize=7, ha="right", va="bottom")
    ax.set_ylabel("device total at peak phase [GiB]")
    ax.set_title(f"{model}: memory by term group (estimate)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_maxseq(model: str, method: str, rows: Sequence[tuple[str, int | None]]) -> Figure:
    """Bar chart of the largest sequence length that fits per GPU (0 where nothing fits)."""
    fig = _figure()
    ax = fig.add_subplot()
    labels = [k for k, _ in rows]
    vals = [v or 0 for _, v in rows]
    bars = ax.barh(labels, vals)
    for bar, v in zip(bars, (v for _, v in rows)):
        ax.annotate("does not fit" if v is None else f"{v:,}", (bar.get_width(), bar.get_y()
                    + bar.get_height() / 2), fontsize=7, va="center", xytext=(3, 0),
                    textcoords="offset points")
    ax.set_xlabel("max sequence length that fits [tokens]")
    ax.set_title(f"{model} {method}: max seq_len per GPU (estimate)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str) -> None:
    """Write a PNG without timestamps or version stamps."""
    fig.savefig(path, format="png", metadata=PNG_METADATA)
