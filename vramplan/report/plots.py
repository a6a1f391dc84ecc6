"""Planner plots (matplotlib OO API, Agg canvas; every function returns a Figure, nothing is shown).

Imported only by the `plot` and `docs` commands, so `estimate` never loads matplotlib.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vramplan.model.terms import GROUPS
from vramplan.model.estimate import Estimate
from vramplan.units import GIB

#: Reproducible PNGs: no software/version stamp in the file's metadata.
PNG_METADATA = {"Software": None}
FIGSIZE = (7.0, 4.5)
DPI = 100


def _figure() -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


#: One bar this many times taller than another: the value axis goes logarithmic.
LOG_RATIO = 8


def peak_group_bytes(s: Estimate) -> dict[str, int]:
    """Bytes per term group in the device total: live at the peak phase, or at the reserved or
    device level (paged optimizer states are outside the device total, so not here)."""
    out = dict.fromkeys(GROUPS, 0)
    for t in s.at_peak():
        out[t.key.split(".")[0]] += t.nbytes
    return out


def setup_line(train) -> str:
    """The setup behind a plot, for its subtitle."""
    t = train
    return (f"seq {t.seq_len}, batch {t.batch}, {t.precision}, grad ckpt "
            f"{'on' if t.grad_ckpt else 'off'}, LoRA r={t.lora_r}, grad accum {t.grad_accum}")


def plot_breakdown(model: str, by_method: Mapping[str, Estimate],
                   gpu_lines: Sequence[tuple[str, int]] = ()) -> Figure:
    """Stacked bar per method of weights/gradients/optimizer/activations/overhead at the peak phase
    (device total level), with optional horizontal GPU-capacity lines (label, bytes)."""
    fig = _figure()
    ax = fig.add_subplot()
    methods = list(by_method)
    groups = {m: peak_group_bytes(s) for m, s in by_method.items()}
    totals = [sum(groups[m].values()) / GIB for m in methods]
    log = len(totals) > 1 and max(totals) > LOG_RATIO * max(min(totals), 1e-9)
    bottom = [0.0] * len(methods)
    for g in GROUPS:
        vals = [groups[m][g] / GIB for m in methods]
        ax.bar(methods, vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, total in enumerate(totals):
        ax.annotate(f"{total:.1f} GiB", (x, total), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    for label, nbytes in gpu_lines:
        ax.axhline(nbytes / GIB, linestyle="--", linewidth=0.8, color="0.3")
        ax.annotate(label, (len(methods) - 0.5, nbytes / GIB), fontsize=7, ha="right", va="bottom")
    top = max([*totals, *(n / GIB for _, n in gpu_lines)], default=1.0)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(totals) / 10, top * 3)
    else:
        ax.set_ylim(0, top * 1.15)  # room for the value labels
    ax.set_ylabel("device total at peak phase [GiB]" + (" (log scale)" if log else ""))
    ax.set_title(f"{model}: memory by term group (estimate)\n"
                 + setup_line(next(iter(by_method.values())).train), fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_maxseq(model: str, method: str, rows: Sequence[tuple[str, int | None]],
                subtitle: str = "") -> Figure:
    """Bar chart of the largest sequence length that fits per GPU (0 where nothing fits), with a
    clear message when nothing fits anywhere."""
    fig = _figure()
    ax = fig.add_subplot()
    labels = [k for k, _ in rows]
    vals = [v or 0 for _, v in rows]
    bars = ax.barh(labels, vals)
    for bar, v in zip(bars, (v for _, v in rows)):
        ax.annotate("does not fit" if v is None else f"{v:,}", (bar.get_width(), bar.get_y()
                    + bar.get_height() / 2), fontsize=7, va="center", xytext=(3, 0),
                    textcoords="offset points")
    if not any(vals):
        ax.set_xlim(0, 1)
        ax.text(0.5, 0.5, "nothing fits on these GPUs at this setup", transform=ax.transAxes,
                ha="center", va="center", fontsize=10)
        ax.set_xticks([])
    else:
        ax.set_xlim(0, max(vals) * 1.2)  # room for the value labels
    ax.set_xlabel("max sequence length that fits [tokens]")
    ax.set_title(f"{model} {method}: max seq_len per GPU (estimate)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str) -> None:
    """Write a PNG without timestamps or version stamps."""
    fig.savefig(path, format="png", metadata=PNG_METADATA)
