"""Estimates per second in one process over a sweep (issue #8's figure).

Llama-2-7B QLoRA, seq 128..32768 (powers of two) x batch 1..16 x LoRA r 8/16/64 = 432 setups,
tensor level (``allocator=False``: no caching-allocator replay, which costs ~30 ms per distinct
setup and is memoised), swept 4 times; the best pass is reported, and the first (cold caches).
Run: python validation/sweep_rate.py
"""

from __future__ import annotations

import time

from vramplan.model.estimate import estimate
from vramplan.profiles import load_calibration, load_model
from vramplan.specs import TrainSpec


def main() -> None:
    calib, m = load_calibration(), load_model("llama-2-7b")
    setups = [TrainSpec(method="qlora", seq_len=128 * 2**i, batch=b, lora_r=r)
              for i in range(9) for b in range(1, 17) for r in (8, 16, 64)]
    rates = []
    for _ in range(4):
        t0 = time.perf_counter()
        for t in setups:
            estimate(m, t, calib, allocator=False)
        rates.append(len(setups) / (time.perf_counter() - t0))
    print(f"{len(setups)} setups: first pass {rates[0]:,.0f} estimates/s, best {max(rates):,.0f} "
          "estimates/s")


if __name__ == "__main__":
    main()
