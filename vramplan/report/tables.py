"""Planner tables: the `fit` table and the model × method memory table (md, csv, html, json).

Pure Python (no pandas). Bytes stay exact integers in csv/json; GiB (2**30) appears only in text,
markdown and html cells, labelled as such.
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from vramplan.cost import CostEstimate, cost_per_billion_tokens
from vramplan.planner import (GpuFit, Plan, level_verdict, per_gpu, smallest_fitting,
                              verdict)
from vramplan.specs import GpuSpec, ModelSpec, TrainSpec
from vramplan.units import GIB

FORMATS = ("md", "csv", "html", "json")
MISSING = "-"
CSV_COLUMNS = ("model", "params", "method", "device_total_bytes", "smallest_gpu",
               "smallest_gpu_memory_bytes", "smallest_gpu_capacity_bytes", "step_seconds",
               "hours", "usd", "time_basis")


@dataclass(frozen=True, slots=True)
class Cell:
    """One model × method: per-GPU device total and the smallest catalog GPU that holds it."""

    model: str
    params: int
    method: str
    device_total_bytes: int
    gpu: GpuSpec | None
    cost: CostEstimate | None = None  # on that GPU
    tokens: float = 1e9  # the job the hours and USD are for

    @property
    def job(self) -> tuple[float | None, float | None]:
        return self.cost.job(self.tokens) if self.cost else (None, None)

    def as_dict(self) -> dict[str, Any]:
        c = self.cost
        hours, usd = self.job
        return {"model": self.model, "params": self.params, "method": self.method,
                "device_total_bytes": self.device_total_bytes,
                "smallest_gpu": self.gpu.key if self.gpu else None,
                "smallest_gpu_memory_bytes": self.gpu.memory_bytes if self.gpu else None,
                "smallest_gpu_capacity_bytes": self.gpu.capacity_bytes if self.gpu else None,
                "step_seconds": round(c.step.seconds, 4) if c and c.step else None,
                "hours": round(hours, 3) if hours is not None else None,
                "usd": round(usd, 2) if usd is not None else None,
                "time_basis": c.label if c and c.step else None}


@dataclass(frozen=True, slots=True)
class MemoryTable:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    cells: tuple[Cell, ...]
    caption: str
    settings: Mapping[str, Any]

    def cell(self, model: str, method: str) -> Cell:
        return next(c for c in self.cells if c.model == model and c.method == method)

    def to_pandas(self):
        """One row per model × method, exact bytes (nullable integers where no GPU fits); the
        caption and settings ride along in ``DataFrame.attrs``. Needs the ``report`` extra."""
        from vramplan.report.evidence import pandas

        pd = pandas()
        df = pd.DataFrame([c.as_dict() for c in self.cells], columns=CSV_COLUMNS)
        for col in ("smallest_gpu_memory_bytes", "smallest_gpu_capacity_bytes"):
            df[col] = df[col].astype("Int64")
        df.attrs.update(caption=self.caption, settings=dict(self.settings))
        return df


@dataclass(frozen=True, slots=True)
class TracedModel:
    """A table row the trace engine answered: per method, the parameter count and the levels of
    a full-depth trace (:func:`vramplan.planner.level_verdict`'s keywords: allocated, outside,
    device_total, largest). It has no step-time model, so no time or cost."""

    name: str
    params: Mapping[str, int]
    levels: Mapping[str, Mapping[str, int]]


def memory_table(models: Sequence[ModelSpec | TracedModel], methods: Sequence[str], train: TrainSpec,
                 gpus: Sequence[GpuSpec], calib: Mapping[str, Any],
                 tokens: float = 1e9) -> MemoryTable:
    """Device total per model × method at one setup (the method varies, all else fixed), the
    smallest GPU that holds it, and the time and cost of ``tokens`` training tokens there."""
    cells = []
    for m in models:
        for method in methods:
            t = replace(train, method=method)
            if isinstance(m, TracedModel):
                lv = m.levels[method]
                gpu = smallest_fitting((g, level_verdict(t, g, calib, **lv)) for g in gpus)
                cells.append(Cell(m.name, m.params[method], method, lv["device_total"], gpu,
                                  None, tokens))
                continue
            s = per_gpu(m, t, calib)
            gpu = smallest_fitting((g, verdict(s, g, calib)) for g in gpus)
            cost = cost_per_billion_tokens(m, t, gpu, t.num_gpus, calib) if gpu else None
            cells.append(Cell(m.name, s.params_total, method, s.device_total_bytes, gpu,
                              cost, tokens))
    settings = {**train.as_dict(), "optimizer": {k: replace(train, method=k).resolved_optimizer
                                                 for k in methods},
                "calibration": calib.get("name", "default"),
                "calibration_status": calib.get("status", "fitted")}
    del settings["method"]
    settings["job_tokens"] = tokens
    text = caption(train, methods, calib, tokens)
    traced = [m.name for m in models if isinstance(m, TracedModel)]
    if traced:
        settings["traced_models"] = traced
        text = text[:-1] + (f"; {', '.join(traced)}: the trace engine (the model's own code on "
                            "fake tensors, every layer traced; no step-time model, so no time "
                            "or cost).")
    return MemoryTable(tuple(m.name for m in models), tuple(methods), tuple(cells), text,
                       settings)


def caption(train: TrainSpec, methods: Sequence[str], calib: Mapping[str, Any],
            tokens: float = 1e9) -> str:
    """Every assumption behind the numbers, in one paragraph."""
    t = train
    opts = ", ".join(f"{k} {replace(t, method=k).resolved_optimizer}" for k in methods)
    parts = [
        "Estimated device total per GPU (what nvidia-smi shows: reserved by the caching "
        "allocator + memory outside it; paged optimizer states not included), GiB = 2^30 bytes, "
        "for one training step",
        f"seq_len {t.seq_len}, micro-batch {t.batch}, precision {t.precision}, "
        f"gradient checkpointing {'on' if t.grad_ckpt else 'off'}, attention {t.attn}",
        f"optimizers: {opts}",
        f"gradient accumulation {t.grad_accum} micro-step(s), clipping "
        + (f"at max_grad_norm {t.max_grad_norm:g}" if t.max_grad_norm > 0 else "off"),
    ]
    if any(k != "full" for k in methods):
        parts.append(f"LoRA r={t.lora_r}, alpha={t.lora_alpha}, dropout {t.lora_dropout}, "
                     f"targets {t.lora_targets}")
    if "qlora" in methods:
        parts.append(f"QLoRA {t.quant}, double quant {'on' if t.double_quant else 'off'}")
    parts.append("no sharding" if t.shard == "none" else f"{t.shard} over {t.num_gpus} GPUs")
    status = calib.get("status", "fitted")
    parts.append(f"calibration {calib.get('name', 'default')} ({status})")
    parts.append("GPU = the catalog GPU with the least usable (CUDA) memory on which the setup "
                 "fits as `vramplan fit` judges it (headroom at least the step's largest single "
                 "allocation and the model's error on measured runs"
                 + ("; bf16 tensor cores, not T4/V100)" if t.precision in ("bf16", "mixed")
                    else ")"))
    fit = calib.get("time") or {}
    parts.append(f"h and $ = hours and USD for {tokens:,.0f} training tokens on that GPU from the "
                 "step-time model; MEAS = its constants were fitted on that GPU's own step times "
                 f"({fit.get('gpu', 'none')}), EST = scaled from them by datasheet TFLOPS and "
                 "bandwidth; $ needs a catalog price")
    return "; ".join(parts) + "."


def _cell_text(c: Cell) -> str:
    where = c.gpu.key if c.gpu else "none fits"
    hours, usd = c.job
    if hours is None:
        return f"{c.device_total_bytes / GIB:.1f} GiB ({where})"
    label = "MEAS" if c.cost.measured else "EST"
    money = f", ${usd:,.0f}" if usd is not None else ""
    return f"{c.device_total_bytes / GIB:.1f} GiB ({where}; {hours:,.3g} h{money} {label})"


def _grid(t: MemoryTable) -> tuple[list[str], list[list[str]]]:
    head = ["model", "params (B)"] + list(t.methods)
    rows = []
    for name in t.models:
        first = t.cell(name, t.methods[0])
        rows.append([name, f"{first.params / 1e9:.1f}"] +
                    [_cell_text(t.cell(name, k)) for k in t.methods])
    return head, rows


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (text left, numbers as given)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_table(t: MemoryTable, fmt: str) -> str:
    """The memory table as md, csv, html or json (csv/json: exact bytes, one row per cell; the csv
    has no caption, which callers print elsewhere)."""
    if fmt == "json":
        return json.dumps({"caption": t.caption, "settings": t.settings,
                           "rows": [c.as_dict() for c in t.cells]}, indent=2)
    if fmt == "csv":  # one header line, no comment: pandas.read_csv reads it without options
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for c in t.cells:
            w.writerow(["" if v is None else v for v in (c.as_dict()[k] for k in CSV_COLUMNS)])
        return buf.getvalue().rstrip("\n")
    head, rows = _grid(t)
    if fmt == "md":
        return markdown(head, rows) + f"\n\n{t.caption}"
    if fmt == "html":
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>\n"
                       for r in rows)
        return (f"<table>\n<caption>{html.escape(t.caption)}</caption>\n<tr>{th}</tr>\n"
                f"{body}</table>")
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _num(x: float | None, spec: str) -> str:
    return MISSING if x is None else format(x, spec)


def fit_rows(p: Plan, max_gpus: int = 64,
             tokens: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the `fit` table (GiB for display); time and cost per 10^9 tokens, or
    for the job's ``tokens`` when given."""
    return gpu_rows(p.fits, max_gpus, tokens)


def gpu_rows(fits: Sequence[GpuFit], max_gpus: int = 64,
             tokens: float | None = None) -> tuple[list[str], list[list[str]]]:
    """The `fit` table's header and one row per GPU fit."""
    unit = "1B tok" if tokens is None else "job"
    head = ["gpu", "usable GiB", "verdict", "headroom GiB", "headroom %", "max seq",
            "max batch", "min GPUs", "step s", f"h/{unit}", f"$/{unit}", "time"]
    rows = []
    for f in fits:
        c = f.cost
        gpus = f">{max_gpus}" if f.min_gpus is None else \
            (f"{f.min_gpus}" + (f" {f.min_gpus_shard}" if f.min_gpus_shard != "none" else ""))
        if f.verdict and f.verdict.word == "needs bf16":
            gpus = MISSING  # no GPU count makes a bf16 setup run on it
        word = f.verdict.word if f.verdict else ("fits" if f.fits else "does not fit")
        hours, usd = (c.hours_per_billion_tokens, c.usd_per_billion_tokens) if c else (None, None)
        if c and tokens is not None:
            hours, usd = c.job(tokens)
        rows.append([f.gpu.key, f"{f.gpu.capacity_bytes / GIB:.2f}", word,
                     f"{f.headroom_bytes / GIB:+.1f}", f"{f.headroom_pct:+.0f}",
                     _num(f.max_seq_len, "d"), _num(f.max_batch, "d"), gpus,
                     _num(c.step.seconds if c and c.step else None, ".3f"),
                     _num(hours, ",.1f" if tokens is not None else ",.0f"),
                     _num(usd, ",.0f"), c.label if c and c.step else MISSING])
    return head, rows


def aligned(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in
                      enumerate(zip(r, widths))) for r in [head, *rows]]


#: The `fit` table's columns a traced step fills (verdict and headroom at its own setup).
TRACED_COLUMNS = 5
#: What the `fit` table's "usable GiB" and "verdict" columns mean, whichever engine filled them.
VERDICT_NOTE = ("usable GiB: what CUDA lets a process allocate (below nvidia-smi's total). "
                "verdict: tight = may run, but the headroom is below the step's largest single "
                "allocation, the model's error on measured runs or --margin.")


def render_traced_fit_text(answer: str, fits: Sequence[GpuFit]) -> str:
    """`fit --engine trace`: the answer and each GPU's verdict and headroom at the traced setup."""
    head, rows = gpu_rows(fits)
    lines = [answer, "", *aligned(head[:TRACED_COLUMNS], [r[:TRACED_COLUMNS] for r in rows])]
    lines += ["", VERDICT_NOTE + " The trace answers for its own --seq-len and --batch on one "
              "GPU: max seq/batch, GPU counts with sharding, and time and cost need the analytic "
              "engine (families it knows)."]
    return "\n".join(lines)


def render_fit_text(p: Plan, max_gpus: int = 64, tokens: float | None = None) -> str:
    """The answer, the per-GPU table, and the footnotes on time, cost and the columns."""
    head, rows = fit_rows(p, max_gpus, tokens)
    lines = [p.answer, "", *aligned(head, rows)]
    per = "per 10^9 training tokens" if tokens is None else f"for {tokens:,.0f} training tokens"
    lines += ["", f"step s: one optimizer step on one GPU from the step-time model (FLOPs, bytes "
              f"moved, host ops); hours and USD {per} on the GPUs the run needs (num-gpus if it "
              "fits, else min GPUs; communication between GPUs not counted). time: MEASURED = "
              "the model's constants were fitted on this GPU's own step times; ESTIMATE = scaled "
              "from another GPU's fit by datasheet TFLOPS and bandwidth. price = indicative "
              "on-demand list price per GPU-hour (- = no price in the catalog).",
              VERDICT_NOTE,
              "max seq / max batch: largest value within the usable memory with everything else "
              "fixed (1-token / 1-sequence resolution; allocator cache interpolated between "
              "replays at powers of two)"
              + (f"; max seq stops at the model's context, {p.model.max_context:,} tokens"
                 if p.model.max_context else "") + f". min GPUs >{max_gpus}: none up to the "
              "GPU-count limit (profiles/planner.toml)."]
    return "\n".join(lines)
