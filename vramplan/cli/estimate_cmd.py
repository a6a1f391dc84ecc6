"""`vramplan estimate` and `vramplan profiles`: never imports torch, pandas or matplotlib."""

from __future__ import annotations

import argparse
import json

from vramplan.cli.common import Formatter, add_train_options, train_from_args

EXAMPLES = """examples:
  vramplan estimate llama-2-70b                       # the seed's QLoRA recipe, seq 2048
  vramplan estimate llama-3.1-8b --method lora --seq-len 4096 --gpu rtx-4090
  vramplan estimate ./my-model/config.json --method full --optimizer adamw_8bit --json
MODEL is a shipped profile name (see `vramplan profiles`), a config.json path or folder, or a hub
id (only its config.json is fetched)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="peak memory of one training setup, term by term",
                       description="Peak memory of one fine-tuning step at three levels "
                                   "(allocated, reserved, device total), with every term named.",
                       epilog=EXAMPLES, formatter_class=Formatter)
    p.add_argument("model", metavar="MODEL")
    add_train_options(p, sharding=False)
    p.add_argument("--gpu", help="catalog GPU to compare with (see `vramplan fit`)")
    p.add_argument("--calibration", default="default", help="profiles/calibration/NAME.toml")
    p.add_argument("--json", action="store_true", help="print the JSON contract object")
    p.add_argument("--max-gib", type=float, help="exit 1 when the device total exceeds this")
    add_engine_option(p)
    p.set_defaults(func=run_estimate)

    q = sub.add_parser("profiles", help="list the shipped model profiles",
                       formatter_class=Formatter)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_profiles)

    g = sub.add_parser("gpus", help="list the GPU catalog: slugs for --gpu/--gpus, usable memory",
                       description="The GPU catalog (profiles/gpus.toml). 'usable' is what CUDA "
                                   "lets one process allocate, which verdicts are held against; "
                                   "'total' is nvidia-smi's.", formatter_class=Formatter)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=run_gpus)


def add_engine_option(p: argparse.ArgumentParser, depth: str = "auto") -> None:
    p.add_argument("--engine", choices=("auto", "analytic", "trace"), default="auto",
                   help="analytic: the term-by-term model (milliseconds, the families it knows); "
                        "trace: the model's real transformers/peft/bitsandbytes code on fake "
                        "tensors (any architecture transformers ships; needs vramplan[trace]; "
                        "seconds, then cached); auto: analytic where it knows the family, else "
                        "trace")
    p.add_argument("--trace-depth", choices=("auto", "full"), default=depth,
                   help="trace engine: auto traces a deep model at two shallow depths and "
                        "extrapolates peak allocated (seconds); full traces every layer, which "
                        "also gives the reserved and device levels (about 0.5 s per layer of a "
                        "70B model)")


def pick_engine(engine: str, model_type: str) -> str:
    """The engine that answers: the asked one, or for auto the analytic engine when it knows the
    family and the trace engine otherwise."""
    from vramplan.profiles import SUPPORTED_MODEL_TYPES

    if engine != "auto":
        return engine
    return "analytic" if model_type in SUPPORTED_MODEL_TYPES else "trace"


def run_trace_estimate(args: argparse.Namespace, name: str, cfg: dict) -> int:
    """`estimate --engine trace`: the traced answer, as text or the JSON contract."""
    from vramplan.cli.common import trace_engine

    from vramplan.profiles import load_calibration

    train = train_from_args(args)
    answer = trace_engine().trace_answer(name, cfg, train, depth=args.trace_depth,
                                         calib=load_calibration(args.calibration))
    if args.json:
        print(json.dumps(answer.as_json(), indent=2))
    else:
        from vramplan.report.breakdown import render_trace_text

        print(render_trace_text(answer))
    held = answer.device_total_bytes or answer.peak_allocated_bytes
    if args.max_gib is not None and held > args.max_gib * 2**30:
        return 1
    return 0


def run_estimate(args: argparse.Namespace) -> int:
    from vramplan.model.estimate import estimate
    from vramplan.profiles import load_calibration, load_gpu, load_hf_config, spec_from_hf_config
    from vramplan.report.breakdown import render_json, render_text

    name, cfg = load_hf_config(args.model)
    if pick_engine(args.engine, str(cfg.get("model_type"))) == "trace":
        return run_trace_estimate(args, name, cfg)
    model = spec_from_hf_config(cfg, name)
    train = train_from_args(args)
    gpu = load_gpu(args.gpu) if args.gpu else None
    calib = load_calibration(args.calibration)
    est = estimate(model, train, calib)
    print(render_json(est, gpu, calib) if args.json else render_text(est, gpu, calib))
    if args.max_gib is not None and est.device_total_bytes > args.max_gib * 2**30:
        return 1
    return 0


def run_profiles(args: argparse.Namespace) -> int:
    from vramplan.model.params import total_params
    from vramplan.profiles import SUPPORTED_MODEL_TYPES, list_models, load_hf_config, load_model

    rows = []
    for name in list_models():
        _, cfg = load_hf_config(name)
        if cfg.get("model_type") in SUPPORTED_MODEL_TYPES:
            m = load_model(name)
            params, engine = total_params(m), "analytic"
        else:  # counted by transformers on the meta device when the profile was added
            params, engine = profile_meta_params(name), "trace"
        text = cfg.get("text_config") or cfg
        rows.append({"name": name, "model_type": cfg.get("model_type"), "engine": engine,
                     "params": params, "layers": text.get("num_hidden_layers"),
                     "hidden_size": text.get("hidden_size"), "vocab_size": text.get("vocab_size")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18} {'type':<12} {'engine':<8} {'params':>17} {'layers':>6} {'hidden':>6} "
          f"{'vocab':>7}")
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params']:,}"
        print(f"{r['name']:<18} {r['model_type']:<12} {r['engine']:<8} {params:>17} "
              f"{r['layers']!s:>6} {r['hidden_size']!s:>6} {r['vocab_size']!s:>7}")
    return 0


def profile_meta_params(name: str) -> int | None:
    """The parameter count stored with a trace-engine profile (transformers, meta device)."""
    from vramplan.profiles import profile_source

    return profile_source(name).get("meta_param_count")


def run_gpus(args: argparse.Namespace) -> int:
    from vramplan.profiles import load_gpus

    rows = [{"key": g.key, "name": g.name, "memory_bytes": g.memory_bytes,
             "capacity_bytes": g.capacity_bytes, "bf16_tflops": g.bf16_tflops,
             "price_usd_per_hour": g.price_usd_per_hour,
             "capacity_source": g.cuda_capacity_source} for g in load_gpus().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'slug':<18} {'name':<32} {'total GiB':>9} {'usable GiB':>10} {'bf16 TFLOPS':>11} "
          f"{'$/h':>6}")
    for r in rows:
        tflops = "-" if r["bf16_tflops"] is None else f"{r['bf16_tflops']:.0f}"
        price = "-" if r["price_usd_per_hour"] is None else f"{r['price_usd_per_hour']:.2f}"
        print(f"{r['key']:<18} {r['name'][:32]:<32} {r['memory_bytes'] / 2**30:>9.2f} "
              f"{r['capacity_bytes'] / 2**30:>10.2f} {tflops:>11} {price:>6}")
    return 0
