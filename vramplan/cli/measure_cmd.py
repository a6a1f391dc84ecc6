"""`vramplan measure`, `check`, `calibrate`: the evidence side of the CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vramplan.cli.common import Formatter, UserError

MEASURE_EXAMPLES = """examples:
  vramplan measure validation/matrices/cpu-ci.toml --device cpu --out validation/results/cpu-ci.jsonl
  vramplan measure validation/matrices/h200.toml --device cuda --out results/h200.jsonl --resume
  vramplan measure validation/matrices/h200.toml --device cpu --dry-run
Each case runs in its own subprocess; a crash or OOM is recorded as that case's outcome."""

CHECK_EXAMPLES = """examples:
  vramplan check validation/results/cpu-ci.jsonl
  vramplan check validation/results/h200.jsonl --tolerance 0.05 --calibration h200
Exit 1 when a case is off by more than the tolerance at any measured level, when a case the
model says fits ran out of memory (or the reverse), or when a case failed."""

CALIBRATE_EXAMPLES = """examples:
  vramplan calibrate validation/results/h200.jsonl --out profiles/calibration/h200.toml
Only the memory outside the caching allocator (non_allocator = device total - reserved) is fitted;
reserved memory comes from the allocator replay and analytic terms are refused."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="run a validation matrix and record measured peaks",
                       description="Build random-weight models locally, load them the way users do "
                                   "(bitsandbytes NF4 + peft), run real optimizer steps and "
                                   "record peak memory per case as JSON lines.",
                       epilog=MEASURE_EXAMPLES, formatter_class=Formatter)
    p.add_argument("matrix", metavar="MATRIX.toml")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                   help="cuda: torch + NVML peaks on the GPU; cpu: the tensor-storage tracker")
    p.add_argument("--out", help="results JSONL (appended to; required unless --dry-run)")
    p.add_argument("--resume", action="store_true", help="skip cases already in --out")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run again the cases whose record is a failure or timeout")
    p.add_argument("--only", help="comma list of case ids or globs to run")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per case")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cases with their predicted device totals; run nothing")
    p.add_argument("--calibration", default="default", help="for --dry-run's predictions")
    p.add_argument("--snapshot", action="store_true",
                   help="CUDA: store a summary of the caching allocator's segments after each "
                        "measured phase (to compare with the allocator replay segment by segment)")
    p.set_defaults(func=run_measure)

    c = sub.add_parser("check", help="compare recorded measurements with fresh estimates",
                       epilog=CHECK_EXAMPLES, formatter_class=Formatter)
    c.add_argument("results", metavar="RESULTS.jsonl", nargs="+")
    c.add_argument("--tolerance", type=fraction, default=0.05,
                   help="relative error allowed, a fraction in (0, 1): 0.05 = 5%%")
    c.add_argument("--calibration", default="default")
    c.add_argument("--json", action="store_true")
    c.add_argument("--engine", choices=("analytic", "trace", "auto"), default="auto",
                   help="which engine re-estimates the records: analytic (every level), trace "
                        "(any architecture transformers ships; counted for each record's "
                        "device), auto (analytic where it knows the family, else trace)")
    c.add_argument("--trace-depth", choices=("auto", "full"), default="auto",
                   help="trace engine: auto extrapolates deep models from two shallow traces "
                        "(peak allocated); full traces every layer and also checks reserved "
                        "and the device total of CUDA records (slower: minutes for a 70B file)")
    c.add_argument("--by", default="",
                   help="also print error statistics per group, computed with pandas: a comma "
                        "list of device, family, method, source, outcome (needs vramplan[report])")
    c.set_defaults(func=run_check)

    k = sub.add_parser("calibrate", help="fit the runtime constants from CUDA measurements",
                       epilog=CALIBRATE_EXAMPLES, formatter_class=Formatter)
    k.add_argument("results", metavar="RESULTS.jsonl", nargs="+")
    k.add_argument("--out", help="profiles/calibration/NAME.toml (required unless --leave-one-out)")
    k.add_argument("--fit", default="non_allocator",
                   help="what to fit (comma list): non_allocator (memory outside the allocator) "
                        "and/or time (the step-time model's efficiencies, one GPU's records)")
    k.add_argument("--leave-one-out", action="store_true",
                   help="with --fit time: predict each record's step time from a fit on the "
                        "others and print the errors (writes nothing unless --out is given)")
    k.add_argument("--base", default="default", help="calibration to start from")
    k.set_defaults(func=run_calibrate)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def fraction(text: str) -> float:
    """argparse type: a fraction strictly between 0 and 1 (5% is 0.05, not 5)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1); 5% is 0.05")
    return value


def _existing(paths: list[str]) -> list[Path]:
    """The results files, each checked to exist (one line and exit 2 otherwise)."""
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such results file")
    return [Path(p) for p in paths]


def _read(paths: list[str]) -> list[dict]:
    from vramplan.measure.records import read_records

    return [r for path in _existing(paths) for r in read_records(path)]


def run_measure(args: argparse.Namespace) -> int:
    from vramplan.measure.matrix import load_matrix

    matrix = load_matrix(args.matrix)
    if args.dry_run:
        return _dry_run(matrix, args)
    if not args.out:
        raise UserError("--out RESULTS.jsonl is required (or use --dry-run)")
    from vramplan.cli.common import output_path

    output_path(args.out, (".jsonl",))
    if args.device == "cuda":
        try:
            import torch
        except ImportError:
            raise UserError("--device cuda needs torch (pip install 'vramplan[harness]')") from None
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    from vramplan.measure.runner import run_matrix

    only = args.only.split(",") if args.only else None
    if only:
        from vramplan.measure.matrix import select

        if not select(matrix.cases, only):
            raise UserError(f"--only {args.only}: no case of {args.matrix} matches")
    records = run_matrix(args.matrix, args.device, args.out, resume=args.resume, only=only,
                         timeout=args.timeout, progress=sys.stderr, snapshot=args.snapshot,
                         retry_failed=args.retry_failed)
    failed = [r for r in records if r.get("outcome") == "error"]
    print(f"{len(records)} case(s) recorded in {args.out}; {len(failed)} failed"
          + (": " + ", ".join(r["case_id"] for r in failed) if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _dry_run(matrix, args: argparse.Namespace) -> int:
    from vramplan.model.estimate import estimate
    from vramplan.profiles import (SUPPORTED_MODEL_TYPES, load_calibration, load_hf_config,
                                   resolve_ref, spec_from_hf_config)
    from vramplan.units import GIB

    calib = load_calibration(args.calibration)
    print(f"{matrix.name}: {len(matrix.cases)} cases (predicted, {args.device})")
    print(f"{'case':<44} {'method':<6} {'seq':>6} {'alloc GiB':>10} {'device GiB':>11}")
    for case in matrix.cases:
        name, cfg = load_hf_config(resolve_ref(case.model, Path(args.matrix).resolve().parent))
        head = f"{case.id:<44} {case.train.method:<6} {case.train.seq_len:>6}"
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:  # the trace engine's families
            print(f"{head} {'-':>10} {'-':>11}  ({cfg.get('model_type')}: check --engine trace)")
            continue
        e = estimate(spec_from_hf_config(cfg, name), case.train, calib, args.device)
        print(f"{head} {e.peak_allocated_bytes / GIB:>10.3f} {e.device_total_bytes / GIB:>11.3f}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Measured vs predicted per record (GiB), then the error statistics per level."""
    import json

    from vramplan.compare import LEVELS
    from vramplan.profiles import load_calibration
    from vramplan.report.evidence import compare_files

    by = [k.strip() for k in args.by.split(",") if k.strip()]
    if by:
        from vramplan.report.evidence import GROUP_KEYS, pandas

        bad = [k for k in by if k not in GROUP_KEYS]
        if bad:
            raise UserError(f"--by {','.join(bad)}: choose from {', '.join(GROUP_KEYS)}")
        pandas()  # a missing extra is reported before any work
    calib = load_calibration(args.calibration)
    if args.engine != "analytic":
        from vramplan.cli.common import trace_engine

        if args.engine == "trace":
            trace_engine()  # a missing extra is reported before any work
    rows = compare_files(_existing(args.results), calib, args.tolerance, args.engine,
                         args.trace_depth)
    if args.json:
        print(json.dumps([{"case_id": c.case_id, "outcome": c.outcome, "method": c.method,
                           "measured": c.measured, "predicted": c.predicted, "errors": c.errors,
                           "step_seconds": ({"measured": c.step_s[0], "predicted": c.step_s[1],
                                             "error": c.time_error} if c.step_s else None),
                           "problems": list(c.problems)} for c in rows], indent=2))
    else:
        # 120 columns: the case, then measured/predicted GiB and the error per level, the step
        # time's error; what went wrong (and notes) on an indented line under the case.
        short = {"peak_allocated_bytes": "alloc", "peak_reserved_bytes": "reserv",
                 "device_total_bytes": "device"}
        print(f"{'case':<30} {'method':<6} " + " ".join(
            f"{short[lv] + ' meas/pred':>16} {'err':>6}" for lv in LEVELS) + f" {'step':>6}")
        for c in rows:
            cells = []
            for lv in LEVELS:
                m, p = c.measured.get(lv), c.predicted.get(lv)
                cells.append(f"{_gib(m):>7}/{_gib(p):<8} {_pct(c.errors.get(lv)):>6}")
            name = c.case_id if len(c.case_id) <= 30 else c.case_id[:29] + "~"
            print(f"{name:<30} {c.method:<6} " + " ".join(cells) + f" {_pct(c.time_error):>6}"
                  + (" ok" if c.ok else " FAIL"))
            for line in (*c.problems, *c.notes):
                print(f"    {line}")
        _summary(rows)
    if by:
        from vramplan.report import evidence

        print()
        print(evidence.summary_text(evidence.summary(evidence.frame(rows), by)))
    bad = [c for c in rows if not c.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases within {args.tolerance:.0%}", file=sys.stderr)
    if not any(c.errors or c.outcome == "oom" for c in rows):
        print("vramplan check: no comparable record (nothing measured to compare)",
              file=sys.stderr)
        return 1
    return 1 if bad else 0


def _summary(rows) -> None:
    from statistics import median

    from vramplan.compare import LEVELS

    for lv in LEVELS:
        errs = [abs(c.errors[lv]) for c in rows if lv in c.errors]
        unmeasured = sum(1 for c in rows if c.outcome == "ok" and c.device != "cpu"
                         and c.measured.get(lv) is None)
        unpredicted = sum(1 for c in rows if c.outcome == "ok" and c.device != "cpu"
                          and c.measured.get(lv) is not None and c.predicted.get(lv) is None)
        tail = f"; not measured in {unmeasured}" if unmeasured else ""
        tail += (f"; not predicted in {unpredicted} (the trace engine gives this level at "
                 f"--trace-depth full)" if unpredicted else "")
        if errs:
            print(f"{lv}: median |error| {median(errs):.1%}, max {max(errs):.1%} over "
                  f"{len(errs)}{tail}")
        elif unmeasured or unpredicted:
            print(f"{lv}: {tail.removeprefix('; ')}")
    times = [abs(c.time_error) for c in rows if c.time_error is not None]
    if times:
        print(f"step time: median |error| {median(times):.1%}, max {max(times):.1%} over "
              f"{len(times)} (in-sample; calibrate --fit time --leave-one-out for held-out)")


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def run_calibrate(args: argparse.Namespace) -> int:
    from vramplan.calibrate import check_fittable, fit, to_toml
    from vramplan.profiles import load_calibration

    from vramplan.cli.common import output_path

    names = [n.strip() for n in args.fit.split(",") if n.strip()]
    check_fittable(names)
    if args.leave_one_out:
        if names != ["time"]:
            raise UserError("--leave-one-out goes with --fit time")
        _leave_one_out(_read(args.results))
        if not args.out:
            return 0
    if not args.out:
        raise UserError("calibrate needs --out FILE.toml (or --leave-one-out to only report)")
    output_path(args.out, (".toml",))
    base = load_calibration(args.base)
    data = fit(_read(args.results), names, base)
    if "non_allocator" in names:
        data["records"] = " ".join(args.results)
    if "time" in data:
        data["time"] = {**data["time"], "records": " ".join(args.results)}
    Path(args.out).write_text(to_toml(data, base))
    n = len(data.get("fitted_on") or data["time"]["fitted_on"])
    print(f"wrote {args.out} (fitted on {n} records)", file=sys.stderr)
    return 0


def _leave_one_out(records: list[dict]) -> None:
    """Each record's step time predicted by a fit on the others: the table and the summary."""
    from statistics import median

    from vramplan.calibrate import leave_one_out, time_rows

    rows = time_rows(records)
    if len(rows) < 6:
        raise UserError(f"leave-one-out needs at least 6 CUDA records with a measured step time, "
                        f"found {len(rows)}")
    print(f"{'case':<56} {'measured s':>10} {'predicted s':>11} {'error':>7}")
    errs = []
    for case, y, p in leave_one_out(rows):
        errs.append(abs(p - y) / y)
        print(f"{case[:56]:<56} {y:>10.3f} {p:>11.3f} {(p - y) / y:>+7.1%}")
    print(f"step time, leave-one-out: median |error| {median(errs):.1%}, max {max(errs):.1%} "
          f"over {len(errs)} records")
