"""`vramplan fit`, `table`, `plot`, `docs`: the planner and generated docs (heavy imports lazy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vramplan.cli.common import Formatter, add_train_options, train_from_args
from vramplan.cli.estimate_cmd import add_engine_option, pick_engine
from vramplan.specs import SpecError

FIT_EXAMPLES = """examples:
  vramplan fit llama-2-70b                              # the seed's QLoRA recipe on every GPU
  vramplan fit llama-3.1-8b --method lora --seq-len 4096 --gpus rtx-4090,a100-80gb
  vramplan fit llama-3.1-70b --method full --shard zero3 --num-gpus 8 --json
  vramplan fit llama-3.1-8b --tokens 2e9                 # hours and $ for your job
  vramplan fit qwen2.5-7b --lengths lengths.txt --epochs 3 --batch 4   # real, variable lengths"""
TABLE_EXAMPLES = """examples:
  vramplan table --models llama-3.1-8b,qwen2.5-7b --methods full,lora,qlora
  vramplan table --models llama-2-70b --methods qlora --seq-len 4096 --format csv"""
PLOT_EXAMPLES = """examples:
  vramplan plot breakdown llama-2-70b --out breakdown.png
  vramplan plot maxseq llama-2-70b --method qlora --out maxseq.png"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="which GPUs fit a setup: headroom, max seq/batch, GPU count",
                       description="Fit one setup on catalog GPUs: per-GPU device total vs memory, "
                                   "headroom, largest seq_len and batch, fewest GPUs (sharded), "
                                   "and the time and cost of the run from the step-time model "
                                   "(per 10^9 tokens, or for your job with --tokens / "
                                   "--dataset-tokens / --lengths).",
                       epilog=FIT_EXAMPLES, formatter_class=Formatter)
    p.add_argument("model", metavar="MODEL")
    add_train_options(p, sharding=True)
    p.add_argument("--gpus", default="all",
                   help="all, or a comma list of catalog slugs (`vramplan gpus`) and your own "
                        "cards by usable memory, e.g. rtx-4090,24GiB")
    p.add_argument("--margin", default="0",
                   help="headroom you want on top of the estimate before a GPU counts as fitting: "
                        "bytes with a unit (2GiB, 512MiB) or a percentage of the estimate (5%%)")
    p.add_argument("--calibration", default="default", help="profiles/calibration/NAME.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--breakdown", action="store_true",
                   help="print every term of the estimate (default: the largest ones)")
    add_job_options(p)
    add_engine_option(p, depth="full")
    p.set_defaults(func=run_fit)

    t = sub.add_parser("table", help="memory per model x method and the smallest GPU that fits",
                       epilog=TABLE_EXAMPLES, formatter_class=Formatter)
    t.add_argument("--models", required=True, help="comma list of models")
    t.add_argument("--methods", default="full,lora,qlora", help="comma list of methods")
    add_train_options(t, sharding=True)
    t.set_defaults(method=None)  # the table's methods come from --methods
    t.add_argument("--calibration", default="default")
    t.add_argument("--format", choices=("md", "csv", "html", "json"), default="md")
    add_job_options(t, lengths=False)
    add_engine_option(t, depth="full")
    t.set_defaults(func=run_table)

    q = sub.add_parser("plot", help="breakdown or max-seq plots (PNG, needs matplotlib)",
                       epilog=PLOT_EXAMPLES, formatter_class=Formatter)
    q.add_argument("kind", choices=("breakdown", "maxseq"))
    q.add_argument("model", metavar="MODEL")
    add_train_options(q, sharding=True)
    q.add_argument("--methods", default="full,lora,qlora", help="breakdown: bars to draw")
    q.add_argument("--gpus", default="all", help="maxseq: all, or a comma list of slugs")
    q.add_argument("--calibration", default="default")
    q.add_argument("--out", required=True, help="PNG path")
    q.set_defaults(func=run_plot)

    g = sub.add_parser("suggest", help="what can I run on this card: methods, ranks, max seq/batch",
                       description="The other question: given a GPU, which ways of fine-tuning "
                                   "MODEL fit, and how far each goes; ranked quality first (full > "
                                   "LoRA > QLoRA), then the longest sequence.",
                       epilog="examples:\n  vramplan suggest llama-3.1-8b --gpus rtx-4090\n"
                              "  vramplan suggest qwen2.5-7b --gpus 24GiB --seq-len 4096",
                       formatter_class=Formatter)
    g.add_argument("model", metavar="MODEL")
    g.add_argument("--gpus", required=True, help="one catalog slug or your card's usable memory")
    g.add_argument("--seq-len", type=int, default=2048, help="the sequence length for max batch")
    g.add_argument("--margin", default="0", help="extra headroom, as for fit")
    g.add_argument("--calibration", default="default")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=run_suggest)

    d = sub.add_parser("docs", help="regenerate docs/ (tables, plots, the seed's claims)",
                       formatter_class=Formatter)
    d.add_argument("--out", default="docs", help="output folder")
    d.add_argument("--force", action="store_true",
                   help="write into a folder that vramplan did not generate (files are replaced)")
    d.add_argument("--calibration", default="default")
    d.add_argument("--readme", metavar="README.md",
                   help="also regenerate the evidence block of this README from "
                        "validation/results/*.jsonl beside it (needs vramplan[report])")
    d.set_defaults(func=run_docs)


def add_job_options(p: argparse.ArgumentParser, lengths: bool = True) -> None:
    """--tokens / --dataset-tokens + --epochs / --lengths: the size of the user's job."""
    p.add_argument("--tokens", type=float, metavar="N",
                   help="training tokens of the whole job (e.g. 2e9): time and cost for it")
    p.add_argument("--dataset-tokens", type=float, metavar="N",
                   help="tokens in one pass over your dataset (with --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the dataset")
    if not lengths:
        p.set_defaults(lengths=None)
        return
    p.add_argument("--lengths", metavar="FILE",
                   help="your dataset's token counts: one integer per line (one example each), "
                        "or 'LENGTH COUNT' per line (a histogram); '#' starts a comment. Memory "
                        "is sized for the longest example (a padded batch); time and cost are "
                        "given for padding each batch to its longest and for packing")


def job_tokens(args: argparse.Namespace) -> float | None:
    """Training tokens of the job from --tokens or --dataset-tokens × --epochs (None: neither)."""
    if args.epochs <= 0:
        raise SpecError(f"--epochs {args.epochs:g}: must be positive")
    given = [x for x in (args.tokens, args.dataset_tokens) if x is not None]
    if len(given) > 1 or (given and args.lengths):
        raise SpecError("give the job's size once: --tokens, --dataset-tokens or --lengths")
    if given and given[0] <= 0:
        raise SpecError("--tokens / --dataset-tokens must be positive")
    if args.tokens is not None:
        return args.tokens
    return args.dataset_tokens * args.epochs if args.dataset_tokens is not None else None


def read_lengths(path: str) -> dict[int, int]:
    """A lengths file: one token count per line, or 'LENGTH COUNT' (a histogram)."""
    from collections import Counter

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--lengths {path}: no such file")
    counts: Counter = Counter()
    for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            nums = [int(x) for x in fields]
        except ValueError:
            raise SpecError(f"--lengths {path}:{i}: expected 'LENGTH' or 'LENGTH COUNT' as "
                            f"integers, got {line.strip()[:40]!r}") from None
        if len(nums) > 2 or nums[0] <= 0 or (len(nums) == 2 and nums[1] < 0):
            raise SpecError(f"--lengths {path}:{i}: expected a positive LENGTH and an optional "
                            f"COUNT >= 0, got {line.strip()[:40]!r}")
        counts[nums[0]] += nums[1] if len(nums) == 2 else 1
    counts = Counter({k: v for k, v in counts.items() if v})
    if not counts:
        raise SpecError(f"--lengths {path}: no lengths in the file")
    return dict(counts)


def _split(value: str, what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise SpecError(f"--{what} is empty")
    return items


def select_gpus(value: str) -> list:
    """GPUs for --gpus: all of the catalog, or slugs and your own cards given by usable memory
    ("24GiB": what torch.cuda.mem_get_info() reports as total); an unknown slug is a SpecError."""
    from vramplan.profiles import load_gpu, load_gpus

    if value == "all":
        return list(load_gpus().values())
    return [custom_gpu(k) if k[:1].isdigit() else load_gpu(k) for k in _split(value, "gpus")]


def custom_gpu(text: str):
    """A GPU of the user's own, from its usable memory ("24GiB", "80GB")."""
    from vramplan.specs import GpuSpec

    size = parse_margin(text)
    if not size.nbytes or size.fraction:
        raise SpecError(f"--gpus {text!r}: give your card's usable memory with a unit, e.g. 24GiB")
    label = text.strip()
    return GpuSpec(key=label, name=f"your {label} GPU", memory_bytes=size.nbytes,
                   gpu_class="custom", vendor="custom", cuda_capacity_bytes=size.nbytes,
                   cuda_capacity_source="given on the command line")


UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6,
         "gb": 10**9}


def parse_margin(value: str):
    """--margin: "0", "2GiB", "512MiB", "1.5GB" or "5%" (of the estimate)."""
    from vramplan.planner import Margin

    text = value.strip().lower().replace(" ", "")
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100
            if not 0 <= frac < 1:
                raise ValueError
            return Margin(fraction=frac)
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if text.endswith(u)), "")
        if not unit and text not in ("0", "0.0"):
            raise ValueError
        n = float(text[: len(text) - len(unit)]) * UNITS.get(unit, 1)
        if n < 0:
            raise ValueError
        return Margin(nbytes=int(n))
    except ValueError:
        raise SpecError(f"--margin {value!r}: give bytes with a unit (2GiB, 512MiB) or a "
                        "percentage (5%)") from None


def _methods(value: str) -> list[str]:
    from vramplan.specs import METHODS

    methods = _split(value, "methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SpecError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return methods


def run_fit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vramplan.planner import plan
    from vramplan.profiles import (load_calibration, load_hf_config, load_search,
                                   spec_from_hf_config)
    from vramplan.report.breakdown import estimate_json, render_text, render_top_terms
    from vramplan.report.tables import render_fit_text

    margin = parse_margin(args.margin)
    name, cfg = load_hf_config(args.model)
    if pick_engine(args.engine, str(cfg.get("model_type"))) == "trace":
        return run_traced_fit(args, name, cfg, margin)
    model, train = spec_from_hf_config(cfg, name), train_from_args(args)
    tokens = job_tokens(args)
    lengths = read_lengths(args.lengths) if args.lengths else None
    if lengths:  # memory for the longest example: every padded batch is at most that long
        train = replace(train, seq_len=max(lengths))
        print(f"--lengths: {sum(lengths.values()):,} examples, {max(lengths):,} tokens at most: "
              f"sizing memory for seq_len {max(lengths):,}", file=sys.stderr)
    gpus = select_gpus(args.gpus)
    calib = load_calibration(args.calibration)
    search = load_search()
    p = plan(model, train, gpus, calib, margin, catalog=args.gpus == "all", search=search)
    view = p.sharded
    datasets = dataset_rows(p, model, train, calib, lengths, args.epochs) if lengths else None
    if args.json:
        print(json.dumps({"answer": p.answer, "setup": train.as_dict(),
                          "margin": {"bytes": margin.nbytes, "fraction": margin.fraction},
                          "job_tokens": tokens, "gpus": [f.as_dict() for f in p.fits],
                          "dataset": datasets,
                          "time_model": calib.get("time", {}).get("source"),
                          "estimate": estimate_json(view, calib=calib)}, indent=2))
        return 0
    print(render_fit_text(p, search.max_gpus, tokens))
    if datasets:
        print()
        print(render_dataset(datasets, args.epochs))
    print()
    print(render_text(view) if args.breakdown else render_top_terms(view))
    return 0


def traced_setup(args: argparse.Namespace, what: str):
    """The setup of `fit`/`table --engine trace`, refusing what a trace cannot answer."""
    if getattr(args, "shard", "none") != "none":
        raise SpecError(f"{what} --engine trace: a trace is one GPU's step; sharding (--shard) "
                        "needs the analytic engine")
    if args.tokens is not None or args.dataset_tokens is not None or \
            getattr(args, "lengths", None):
        raise SpecError(f"{what} --engine trace: time and cost (--tokens, --dataset-tokens, "
                        "--lengths) need the analytic engine's step-time model")
    return train_from_args(args)


def traced(args: argparse.Namespace, name: str, cfg: dict, train, calib):
    """The trace engine's answer for one setup at --trace-depth, counted as on CUDA."""
    from vramplan.cli.common import trace_engine

    return trace_engine().trace_answer(name, cfg, train, depth=args.trace_depth, calib=calib)


def run_traced_fit(args: argparse.Namespace, name: str, cfg: dict, margin) -> int:
    """`fit --engine trace`: every GPU's verdict and headroom at the traced setup."""
    from vramplan.planner import traced_plan
    from vramplan.profiles import load_calibration
    from vramplan.report.breakdown import render_trace_text
    from vramplan.report.tables import render_traced_fit_text

    train = traced_setup(args, "fit")
    gpus, calib = select_gpus(args.gpus), load_calibration(args.calibration)
    a = traced(args, name, cfg, train, calib)
    fits, answer = traced_plan(name, train, gpus, calib, margin, catalog=args.gpus == "all",
                               **a.verdict_levels(calib))
    if args.json:
        print(json.dumps({"answer": answer, "engine": "trace", "setup": train.as_dict(),
                          "margin": {"bytes": margin.nbytes, "fraction": margin.fraction},
                          "job_tokens": None, "gpus": [f.as_dict() for f in fits],
                          "dataset": None, "time_model": None, "estimate": a.as_json()},
                         indent=2))
        return 0
    print(render_traced_fit_text(answer, fits))
    print()
    print(render_trace_text(a))
    return 0


def dataset_rows(p, model, train, calib, lengths: dict[int, int], epochs: float) -> list[dict]:
    """Padding and packing time and cost on every GPU the plan found a way to run on."""
    from vramplan.cost import dataset_costs

    rows = []
    for f in p.fits:
        if f.cost is None:
            continue
        pad, pack = dataset_costs(model, train, f.gpu, f.cost.n_gpus, calib, lengths, epochs)
        for d in (pad, pack):
            rows.append({"gpu": f.gpu.key, "n_gpus": f.cost.n_gpus, "mode": d.mode,
                         "tokens": d.tokens, "computed_tokens": d.computed_tokens,
                         "steps": d.steps, "hours": d.hours, "usd": d.usd,
                         "time_basis": f.cost.label if f.cost.step else None})
    return rows


def render_dataset(rows: list[dict], epochs: float) -> str:
    """The --lengths table: per GPU, padding vs packing."""
    head = ["gpu", "GPUs", "mode", "tokens", "computed", "steps", "hours", "USD", "time"]
    body = [[r["gpu"], str(r["n_gpus"]), r["mode"], f"{r['tokens']:,}",
             f"{r['computed_tokens']:,}", f"{r['steps']:,}",
             "-" if r["hours"] is None else f"{r['hours']:,.3g}",
             "-" if r["usd"] is None else f"{r['usd']:,.0f}", r["time_basis"] or "-"]
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"Your dataset, {epochs:g} epoch(s): padding = each batch padded to its longest "
             "example (random batches); packing = tokens concatenated into rows of the longest "
             "example's length. computed = tokens the GPUs process, padding included."]
    lines += ["  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in
                        enumerate(zip(r, widths))) for r in [head, *body]]
    return "\n".join(lines)


def run_table(args: argparse.Namespace) -> int:
    from vramplan.profiles import load_calibration, load_gpus, load_hf_config, spec_from_hf_config
    from vramplan.report.tables import memory_table, render_table

    if args.method is not None:
        raise SpecError("table compares methods: give them as --methods (a comma list), not "
                        "--method")
    methods = _methods(args.methods)
    train = train_from_args(args, method=methods[0])
    tokens = job_tokens(args)
    calib = load_calibration(args.calibration)
    models = []
    for m in _split(args.models, "models"):
        name, cfg = load_hf_config(m)
        if pick_engine(args.engine, str(cfg.get("model_type"))) == "trace":
            models.append(traced_row(args, name, cfg, train, methods, calib))
        else:
            models.append(spec_from_hf_config(cfg, name))
    t = memory_table(models, methods, train, list(load_gpus().values()), calib,
                     1e9 if tokens is None else tokens)
    print(render_table(t, args.format))
    if args.format == "csv":  # the csv itself stays one header line + rows
        print(t.caption, file=sys.stderr)
    return 0


def traced_row(args: argparse.Namespace, name: str, cfg: dict, train, methods, calib):
    """One `table` row from the trace engine: every method traced at full depth."""
    from dataclasses import replace

    from vramplan.report.tables import TracedModel

    if args.trace_depth != "full":
        raise SpecError("table --engine trace needs device totals, which only a full-depth trace "
                        "gives: leave --trace-depth at full")
    traced_setup(args, "table")
    params, levels = {}, {}
    for method in methods:
        a = traced(args, name, cfg, replace(train, method=method), calib)
        params[method] = a.params_total
        levels[method] = a.verdict_levels(calib)
    return TracedModel(name, params, levels)


def run_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from vramplan.planner import max_seq_len, per_gpu
    from vramplan.profiles import load_calibration, load_model, load_search
    from vramplan.report.plots import plot_breakdown, plot_maxseq, save_png, setup_line

    from vramplan.cli.common import output_path

    output_path(args.out, (".png",))
    model, calib = load_model(args.model), load_calibration(args.calibration)
    if args.kind == "breakdown":
        by_method = {m: per_gpu(model, train_from_args(args, method=m), calib)
                     for m in _methods(args.methods)}
        fig = plot_breakdown(model.name, by_method)
    else:
        train = train_from_args(args)
        search = load_search()
        rows = [(g.key, max_seq_len(model, train, g, calib, search=search))
                for g in select_gpus(args.gpus)]
        fig = plot_maxseq(model.name, train.method, rows, setup_line(train))
    save_png(fig, args.out)
    print(f"wrote {args.out}")
    return 0


def run_docs(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from vramplan.profiles import load_calibration, load_gpus
    from vramplan.report.docs import write_docs

    from vramplan.measure.records import read_records
    from vramplan.report.docs import check_docs_folder

    check_docs_folder(Path(args.out), args.force)
    if args.readme:
        from vramplan.cli.common import output_path

        output_path(args.readme, (".md",))
    calib = load_calibration(args.calibration)
    results = sorted((Path(args.readme).resolve().parent if args.readme else Path.cwd())
                     .glob("validation/results/*.jsonl"))
    records = [r for path in results for r in read_records(path)]
    paths = write_docs(Path(args.out), list(load_gpus().values()), calib, records=records)
    if args.readme:
        from vramplan.report.evidence import readme_block, replace_block

        readme = Path(args.readme)
        if not readme.is_file():
            raise SpecError(f"--readme {readme}: no such file")
        readme.write_text(replace_block(readme.read_text(),
                                        readme_block(readme.resolve().parent, calib)))
        paths.append(readme)
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_suggest(args: argparse.Namespace) -> int:
    from vramplan.planner import suggest
    from vramplan.profiles import load_calibration, load_model, load_search
    from vramplan.specs import TrainSpec

    gpus = select_gpus(args.gpus)
    if len(gpus) != 1:
        raise SpecError("suggest answers for one GPU: give one slug or size in --gpus")
    gpu, margin = gpus[0], parse_margin(args.margin)
    model = load_model(args.model)
    rows = suggest(model, gpu, load_calibration(args.calibration), TrainSpec(seq_len=args.seq_len),
                   margin, search=load_search())
    if args.json:
        print(json.dumps([{"setup": s.train.as_dict(), "max_seq_len": s.max_seq_len,
                           "max_batch": s.max_batch, "verdict": s.verdict.word} for s in rows],
                         indent=2))
        return 0
    if not rows:
        print(f"Nothing fits {model.name} on {gpu.name} ({gpu.capacity_bytes / 2**30:.2f} GiB "
              "usable), not even QLoRA at one token: look at `vramplan fit` for GPU counts.")
        return 0
    best = rows[0]
    print(f"On {gpu.name} ({gpu.capacity_bytes / 2**30:.2f} GiB usable), {model.name} fits best "
          f"as {best.train.method}" + (f" r={best.train.lora_r}" if best.train.method != "full"
                                       else "") +
          f", grad ckpt {'on' if best.train.grad_ckpt else 'off'}: up to "
          f"{best.max_seq_len:,} tokens per sequence.")
    print()
    head = f"{'#':>2}  {'method':<6} {'r':>3}  {'ckpt':<4} {'precision':<9} {'max seq':>8} " \
           f"{'max batch @' + str(args.seq_len):>16}  verdict @{args.seq_len}"
    print(head)
    for i, s in enumerate(rows, 1):
        t = s.train
        print(f"{i:>2}  {t.method:<6} {t.lora_r if t.method != 'full' else '-':>3}  "
              f"{'on' if t.grad_ckpt else 'off':<4} {t.precision:<9} {s.max_seq_len or 0:>8,} "
              f"{s.max_batch if s.max_batch is not None else '-':>16}  {s.verdict.word}")
    print()
    print("max seq at batch 1, max batch at the given --seq-len, everything else at the seed's "
          "defaults (optimizer: adamw_torch_fused, paged_adamw_32bit for QLoRA).")
    return 0
