"""The two engines held to each other (issue #10, item 9): for the families both know, the
analytic estimate (CPU semantics) against the trace of the same setup, peak allocated.

`python -m vramplan.trace.crosscheck [--out FILE.json]` prints one line per case and the
disagreements above :data:`TOLERANCE`; ``tests/trace/test_crosscheck.py`` runs it in CI.
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


@dataclass(frozen=True, slots=True)
class Row:
    config: str
    method: str
    grad_ckpt: bool
    seq_len: int
    analytic: int
    trace: int

    @property
    def error(self) -> float:
        return (self.analytic - self.trace) / self.trace


def setups() -> list[tuple[str, TrainSpec]]:
    out = []
    for name in CONFIGS:
        attn = "eager" if name.startswith("gemma2") else "sdpa"
        for method in METHODS:
            for ckpt in (True, False):
                for seq in SEQS:
                    out.append((name, TrainSpec(method=method, grad_ckpt=ckpt, seq_len=seq,
                                                precision="bf16", optimizer="adamw", lora_r=16,
                                                lora_alpha=32, lora_dropout=0.0, attn=attn)))
    return out


def run(progress: bool = True) -> list[Row]:
    """Every case, both engines."""
    from vramplan.model.estimate import estimate
    from vramplan.profiles import load_calibration, load_hf_config, spec_from_hf_config
    from vramplan.trace.answer import quiet_libraries
    from vramplan.trace.engine import trace_step

    calib = load_calibration()
    rows = []
    cases = setups()
    for i, (name, t) in enumerate(cases, 1):
        ref, cfg = load_hf_config(str(ROOT / "validation" / "configs" / f"{name}.json"))
        a = estimate(spec_from_hf_config(cfg, ref), t, calib, "cpu").peak_allocated_bytes
        with quiet_libraries():
            b = trace_step(cfg, t).peak_allocated_bytes
        rows.append(Row(name, t.method, t.grad_ckpt, t.seq_len, a, b))
        if progress:
            print(f"[{i}/{len(cases)}] {name} {t.method} ckpt={t.grad_ckpt} s{t.seq_len}: "
                  f"{rows[-1].error:+.2%}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = run()
    worse = [r for r in rows if abs(r.error) > TOLERANCE]
    for r in worse:
        print(f"{r.config} {r.method} ckpt={r.grad_ckpt} s{r.seq_len}: analytic {r.analytic:,} "
              f"vs trace {r.trace:,} ({r.error:+.2%})")
    print(f"{len(rows) - len(worse)}/{len(rows)} cases agree within {TOLERANCE:.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            [{**{k: getattr(r, k) for k in Row.__slots__}, "error": r.error} for r in rows],
            indent=1))
    return 0 if not worse else 1


if __name__ == "__main__":
    sys.exit(main())
