"""What the searches' exact allocator nodes cost and buy (issue #8's cold-fit figure).

`vramplan fit` finds each GPU's largest sequence length and batch with the allocator cache
replayed at the user's value and at powers of two (:func:`vramplan.planner.search_total`). This
script answers the same fits a second way, with the cache of the user's own setup only (one
replay), and prints how many max-seq / max-batch answers change and the worst ones, then times a
cold `fit` and a cold `estimate` of Llama-2-70B QLoRA side by side, both ways.
Run: python validation/search_nodes.py
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

SETUPS = (["llama-2-70b", "--method", "qlora"],
          ["llama-2-7b", "--method", "lora", "--seq-len", "4096"],
          ["llama-3.1-8b", "--method", "qlora", "--batch", "4"],
          ["mixtral-8x7b", "--method", "qlora", "--lora-dropout", "0"],
          ["gemma-2-9b", "--method", "lora", "--attn", "eager"],
          ["phi-3-mini", "--method", "qlora", "--no-grad-ckpt"],
          ["qwen2.5-7b", "--method", "full"])
FIT = ["fit", "llama-2-70b", "--method", "qlora", "--json"]
ESTIMATE = ["estimate", "llama-2-70b", "--method", "qlora", "--json"]


def users_cache_only() -> None:
    """Make the searches add the allocator cache of the user's own value, at every probe."""
    from vramplan import planner

    def search_total(model, train, calib, field, anchor, cheap=None):  # type: ignore[no-untyped-def]
        if cheap is None:
            cheap = planner.per_gpu(model, train, calib, allocator=False).device_total_bytes
        at_anchor = planner.per_gpu(model, replace(train, **{field: anchor}), calib)
        return cheap + planner._cache_bytes(at_anchor)

    planner.search_total = search_total


def answers() -> dict[str, dict[str, list[int | None]]]:
    from vramplan.cli import main

    out = {}
    for args in SETUPS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(["fit", *args, "--json"])
        out[" ".join(args)] = {g["key"]: [g["max_seq_len"], g["max_batch"]]
                               for g in json.loads(buf.getvalue())["gpus"]}
    return out


def cold_seconds(argv: list[str], runs: int = 9) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    if sys.argv[1:] == ["--answers"]:  # a worker: print the answers as JSON
        print(json.dumps(answers()))
        return
    if sys.argv[1:] == ["--answers-users-cache"]:
        users_cache_only()
        print(json.dumps(answers()))
        return
    if sys.argv[1:] == ["--fit-users-cache"]:
        users_cache_only()
        from vramplan.cli import main as cli
        with contextlib.redirect_stdout(io.StringIO()):
            cli(FIT)
        return
    run = [sys.executable, __file__]
    exact = json.loads(subprocess.run(run + ["--answers"], capture_output=True, text=True,
                                      check=True).stdout)
    cheap = json.loads(subprocess.run(run + ["--answers-users-cache"], capture_output=True,
                                      text=True, check=True).stdout)
    changed = [(setup, gpu, what, a, b) for setup in exact for gpu in exact[setup]
               for what, a, b in zip(("max seq", "max batch"), exact[setup][gpu], cheap[setup][gpu])
               if a != b]
    total = sum(2 * len(v) for v in exact.values())
    print(f"{len(changed)} of {total} answers change with the user's cache only; the largest:")
    for setup, gpu, what, a, b in sorted(changed, key=lambda c: -abs((c[3] or 0) - (c[4] or 0)))[:8]:
        print(f"  {setup} on {gpu}: {what} {a} (exact nodes) -> {b}")
    cmd = [sys.executable, "-m", "vramplan"]
    est, fit = cold_seconds(cmd + ESTIMATE), cold_seconds(cmd + FIT)
    fit_cheap = cold_seconds(run + ["--fit-users-cache"])
    print(f"cold estimate {est:.3f} s; cold fit {fit:.3f} s ({fit / est:.1f}x); with the user's "
          f"cache only {fit_cheap:.3f} s ({fit_cheap / est:.1f}x)")


if __name__ == "__main__":
    main()
