"""Options shared by estimate/fit/table and the conversion of parsed options into specs."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from vramplan.specs import (ATTENTIONS, LOOPS, METHODS, OPTIMIZER_ALIASES, OPTIMIZERS, PRECISIONS,
                            QUANTS, SHARDS, SpecError, TrainSpec)

UserError = SpecError  # every user-facing input error is a SpecError (exit 2, one line)
DEFAULTS = TrainSpec()


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps epilog examples as written and prints every default."""


def add_train_options(p: argparse.ArgumentParser, sharding: bool = False) -> None:
    """The training-setup flags of the CLI contract (defaults: the seed's QLoRA recipe)."""
    d = DEFAULTS
    g = p.add_argument_group("training setup")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="full fine-tuning, LoRA, or QLoRA (4-bit base + LoRA)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    g.add_argument("--batch", type=int, default=d.batch, help="micro-batch size per GPU")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scaling numerator")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                   help="dropout on the adapter input (> 0 saves a mask per adapted linear)")
    g.add_argument("--lora-targets", default=d.lora_targets,
                   help="all-linear, attn, or a comma list such as q_proj,v_proj")
    g.add_argument("--quant", choices=QUANTS, default=d.quant, help="QLoRA base-weight format")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=d.double_quant,
                   help="quantise the 4-bit absmax constants again (QLoRA §3)")
    g.add_argument("--optimizer", choices=OPTIMIZERS + tuple(OPTIMIZER_ALIASES), default=None,
                   metavar="NAME",
                   help="an HF Trainer optim name: " + ", ".join(OPTIMIZERS) + " (adamw = "
                        "adamw_torch_fused, adamw_8bit = adamw_bnb_8bit); default: "
                        "paged_adamw_32bit for qlora, adamw_torch_fused otherwise")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-steps per optimizer step (gradient_accumulation_steps)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="gradient clipping before the optimizer step (0 = off; HF Trainer: 1.0)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="mixed = bf16 autocast with fp32 trainable weights (HF Trainer bf16=True)")
    g.add_argument("--attn", choices=ATTENTIONS, default=d.attn,
                   help="attention kernel (eager saves the s x s scores)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=d.grad_ckpt,
                   help="gradient checkpointing")
    g.add_argument("--loop", choices=LOOPS, default=d.loop,
                   help="trainer: HF Trainer drops the model output before backward; custom: "
                        "outputs = model(**batch); outputs.loss.backward() keeps the logits")
    g.add_argument("--kbit-prep", action=argparse.BooleanOptionalAction, default=d.kbit_prep,
                   help="QLoRA: run peft prepare_model_for_kbit_training (fp32 embeddings, norms, "
                        "lm_head); --no-kbit-prep as in snippets that skip it")
    g.add_argument("--expandable-segments", action=argparse.BooleanOptionalAction,
                   default=d.expandable_segments,
                   help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (changes reserved memory)")
    if sharding:
        g.add_argument("--shard", choices=SHARDS, default=d.shard,
                       help="ZeRO stage or FSDP full sharding across --num-gpus")
        g.add_argument("--num-gpus", type=int, default=d.num_gpus,
                       help="data-parallel GPUs the --shard scheme spreads over")


def train_from_args(args: argparse.Namespace, **override: Any) -> TrainSpec:
    """TrainSpec from parsed options (raises SpecError on impossible setups)."""
    names = {f.name for f in fields(TrainSpec)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(override)
    if values.get("shard", "none") != "none" and values.get("num_gpus", 1) < 2:
        raise SpecError(f"--shard {values['shard']} shards over several GPUs: give --num-gpus "
                        "(2 or more)")
    return TrainSpec(**values)


def output_path(value: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output file that can be written, checked before any work starts: its folder exists and
    is writable, it is not a folder, and it has one of ``suffixes`` (when given)."""
    import os

    path = Path(value)
    if suffixes and path.suffix.lower() not in suffixes:
        raise SpecError(f"{value}: the output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise SpecError(f"{value}: is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SpecError(f"{value}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SpecError(f"{value}: cannot write there")
    return path


def trace_engine():
    """The trace engine's answer module, or a one-line error naming the extra it needs."""
    from importlib.util import find_spec

    if find_spec("torch") is None or find_spec("transformers") is None:  # found, not imported
        raise UserError("the trace engine needs torch and transformers: pip install "
                        "'vramplan[trace]' (or use --engine analytic for the families it "
                        "knows)")
    from vramplan.trace import answer

    return answer
