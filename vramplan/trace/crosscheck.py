"""The two engines held to each other (issue #10, item 9): for the families both know, the
analytic estimate against the trace of the same setup, peak allocated, in two counts: as on CPU
in bf16 (the CPU harness's semantics) and as on CUDA in mixed precision (autocast, the cuBLAS
workspaces, CUDA's block rounding and dropout masks: :mod:`vramplan.trace.cuda`).

`python -m vramplan.trace.crosscheck [--device cpu|cuda] [--out FILE.json]` prints one line per
case and the disagreements above :data:`TOLERANCE`; ``tests/trace/test_crosscheck.py`` runs both
in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from vramplan.specs import TrainSpec

#: The engines must agree on peak allocated within this (relative to the trace).
TOLERANCE = 0.01
ROOT = Path(__file__).resolve().parents[2]
#: Tiny configs of every family the analytic engine knows (validation/configs/).
CONFIGS = ("llama-tiny", "llama-gqa-tiny", "qwen2-tiny", "phi3-tiny", "mixtral-tiny",
           "gemma2-tiny")
METHODS = ("full", "lora", "qlora")
SEQS = (128, 512)


#: How each count runs: the precision of its setups (CPU: the CPU harness's bf16 cases; CUDA:
#: mixed, the HF Trainer bf16=True recipe, where autocast's copies matter).
PRECISION = {"cpu": "bf16", "cuda": "mixed"}


@dataclass(frozen=True, slots=True)
class Row:
    config: str
    method: str
    grad_ckpt: bool
    seq_len: int
    analytic: int
    trace: int
    device: str = "cpu"

    @property
    def error(self) -> float:
        return (self.analytic - self.trace) / self.trace


def setups(device: str = "cpu") -> list[tuple[str, TrainSpec]]:
    out = []
    for name in CONFIGS:
        attn = "eager" if name.startswith("gemma2") else "sdpa"
        for method in METHODS:
            for ckpt in (True, False):
                for seq in SEQS:
                    out.append((name, TrainSpec(method=method, grad_ckpt=ckpt, seq_len=seq,
                                                precision=PRECISION[device], optimizer="adamw",
                                                lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                                attn=attn)))
    return out


def run(progress: bool = True, device: str = "cpu") -> list[Row]:
    """Every case, both engines, counted as on ``device``."""
    from vramplan.model.estimate import estimate
    from vramplan.profiles import load_calibration, load_hf_config, spec_from_hf_config
    from vramplan.trace.answer import quiet_libraries
    from vramplan.trace.engine import trace_step

    calib = load_calibration()
    workspace = int(calib["cublas_workspace"]["bytes"]) if device == "cuda" else 0
    rows = []
    cases = setups(device)
    for i, (name, t) in enumerate(cases, 1):
        ref, cfg = load_hf_config(str(ROOT / "validation" / "configs" / f"{name}.json"))
        a = estimate(spec_from_hf_config(cfg, ref), t, calib, device).peak_allocated_bytes
        with quiet_libraries():
            b = trace_step(cfg, t, count_as=device, workspace_bytes=workspace)
        rows.append(Row(name, t.method, t.grad_ckpt, t.seq_len, a, b.peak_allocated_bytes,
                        device))
        if progress:
            print(f"[{i}/{len(cases)}] {device} {name} {t.method} ckpt={t.grad_ckpt} "
                  f"s{t.seq_len}: {rows[-1].error:+.2%}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda", "both"), default="both",
                   help="count as on CPU (bf16 setups), as on CUDA (mixed precision), or both")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    devices = ("cpu", "cuda") if args.device == "both" else (args.device,)
    rows = [r for device in devices for r in run(device=device)]
    worse = [r for r in rows if abs(r.error) > TOLERANCE]
    for r in worse:
        print(f"{r.device} {r.config} {r.method} ckpt={r.grad_ckpt} s{r.seq_len}: analytic "
              f"{r.analytic:,} vs trace {r.trace:,} ({r.error:+.2%})")
    print(f"{len(rows) - len(worse)}/{len(rows)} cases agree within {TOLERANCE:.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            [{**{k: getattr(r, k) for k in Row.__slots__}, "error": r.error} for r in rows],
            indent=1))
    return 0 if not worse else 1


if __name__ == "__main__":
    sys.exit(main())
