"""Which GPU fits: headroom, the largest sequence length and batch, and the GPU count with sharding.

A setup fits a GPU when its per-GPU device total (reserved + CUDA context + paged states, after
sharding; see :mod:`vramplan.sharding`) is at most the GPU's ``memory_bytes``. Searches run over
the analytic model, which is cheap (well under a millisecond per estimate), at a resolution of one
token and one sequence: the result ``x`` fits and ``x + 1`` does not. They assume memory is
non-decreasing in seq_len and batch, which ``tests/test_properties.py`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from vramplan.cost import CostEstimate, cost_per_billion_tokens, load_planner_settings
from vramplan.model.estimate import estimate
from vramplan.sharding import ShardedEstimate, shard_estimate
from vramplan.specs import GpuSpec, ModelSpec, TrainSpec
from vramplan.units import GIB

PERCENT = 100


@dataclass(frozen=True, slots=True)
class GpuFit:
    """One GPU against one setup. Sizes in bytes; None where nothing fits."""

    gpu: GpuSpec
    device_total_bytes: int  # per GPU, with the setup's own sharding
    fits: bool
    headroom_bytes: int  # memory_bytes − device_total_bytes (negative: short by that much)
    headroom_pct: float  # headroom as % of memory_bytes
    max_seq_len: int | None  # largest seq_len that fits, other settings fixed
    max_batch: int | None
    min_gpus: int | None  # smallest N in 1..max_gpus that fits
    min_gpus_shard: str  # the scheme min_gpus assumes
    cost: CostEstimate | None  # on the GPUs the run needs (num_gpus if it fits, else min_gpus)

    def as_dict(self) -> dict[str, Any]:
        """The `fit --json` row."""
        c = self.cost
        return {"key": self.gpu.key, "name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                "fits": self.fits, "device_total_bytes": self.device_total_bytes,
                "headroom_bytes": self.headroom_bytes, "headroom_pct": round(self.headroom_pct, 2),
                "max_seq_len": self.max_seq_len, "max_batch": self.max_batch,
                "min_gpus": self.min_gpus, "min_gpus_shard": self.min_gpus_shard,
                "hours_per_billion_tokens": c.hours_per_billion_tokens if c else None,
                "usd_per_billion_tokens": c.usd_per_billion_tokens if c else None}


@dataclass(frozen=True, slots=True)
class Plan:
    """Every GPU's fit, the chosen answer and its one-sentence statement."""

    model: ModelSpec
    train: TrainSpec
    sharded: ShardedEstimate
    fits: tuple[GpuFit, ...]
    choice: GpuFit | None
    answer: str


def per_gpu(model: ModelSpec, train: TrainSpec, calib: Mapping[str, Any]) -> ShardedEstimate:
    """Per-GPU estimate of a setup with its own sharding (identity for shard none)."""
    return shard_estimate(estimate(model, train, calib), train, calib)


def fits_on(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any]) -> bool:
    """Device total per GPU ≤ the GPU's memory."""
    return per_gpu(model, train, calib).device_total_bytes <= gpu.memory_bytes


def largest_fitting(ok: Callable[[int], bool], start: int, cap: int) -> int | None:
    """Largest x in [1, cap] with ok(x), for ok true up to some point and false after it.

    Doubles from `start` until ok fails (or cap), then bisects exactly: ok(x) and not ok(x + 1),
    unless x == cap. Returns None when ok(1) is false.
    """
    if not ok(1):
        return None
    lo, hi = 1, max(2, min(start, cap))
    while ok(hi):
        lo = hi
        if hi == cap:
            return cap
        hi = min(2 * hi, cap)
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_seq_len(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any]) -> int | None:
    """Largest seq_len (1-token resolution) that fits, batch and the rest fixed."""
    cap = int(load_planner_settings()["search"]["max_seq_len"])
    return largest_fitting(lambda s: fits_on(model, replace(train, seq_len=s), gpu, calib),
                           train.seq_len, cap)


def max_batch(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any]) -> int | None:
    """Largest micro-batch that fits, seq_len and the rest fixed."""
    cap = int(load_planner_settings()["search"]["max_batch"])
    return largest_fitting(lambda b: fits_on(model, replace(train, batch=b), gpu, calib),
                           train.batch, cap)


def min_gpus(model: ModelSpec, train: TrainSpec, gpu: GpuSpec,
             calib: Mapping[str, Any]) -> tuple[int | None, str]:
    """(smallest N in 1..max_gpus that fits, the scheme used).

    With ``train.shard`` set, that scheme; with none, one GPU unsharded, then the fallback scheme
    (profiles/planner.toml, zero3) from two GPUs on. A linear scan: no monotonicity in N assumed.
    """
    settings = load_planner_settings()["search"]
    scheme = train.shard if train.shard != "none" else str(settings["fallback_shard"])
    if train.shard == "none" and fits_on(model, replace(train, num_gpus=1), gpu, calib):
        return 1, "none"
    first = 1 if train.shard != "none" else 2
    for n in range(first, int(settings["max_gpus"]) + 1):
        if fits_on(model, replace(train, shard=scheme, num_gpus=n), gpu, calib):
            return n, scheme
    return None, scheme


def fit_gpu(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any]) -> GpuFit:
    """How `train` sits on `gpu`: fit, headroom, max seq/batch, GPU count, time and cost."""
    total = per_gpu(model, train, calib).device_total_bytes
    room = gpu.memory_bytes - total
    n, scheme = min_gpus(model, train, gpu, calib)
    fits = room >= 0
    run_gpus = train.num_gpus if fits else n
    cost = cost_per_billion_tokens(model, train, gpu, run_gpus) if run_gpus else None
    return GpuFit(gpu, total, fits, room, PERCENT * room / gpu.memory_bytes,
                  max_seq_len(model, train, gpu, calib), max_batch(model, train, gpu, calib),
                  n, scheme, cost)


def plan(model: ModelSpec, train: TrainSpec, gpus: Sequence[GpuSpec],
         calib: Mapping[str, Any]) -> Plan:
    """Fit every GPU and choose: the smallest-memory GPU that fits as set up, else the
    multi-GPU option with the least total memory (ties: fewer GPUs, then catalog order)."""
    sharded = per_gpu(model, train, calib)
    fits = tuple(fit_gpu(model, train, g, calib) for g in gpus)
    single = [f for f in fits if f.fits]
    if single:
        choice = min(single, key=lambda f: f.gpu.memory_bytes)
    else:
        multi = [f for f in fits if f.min_gpus is not None]
        choice = min(multi, key=lambda f: (f.min_gpus * f.gpu.memory_bytes, f.min_gpus),
                     default=None)
    return Plan(model, train, sharded, fits, choice, answer_sentence(model, train, sharded, choice))


def answer_sentence(model: ModelSpec, train: TrainSpec, sharded: ShardedEstimate,
                    choice: GpuFit | None) -> str:
    """One sentence: what the setup needs and the GPU(s) to run it on."""
    need = sharded.device_total_bytes / GIB
    setup = f"{model.name} {train.method} (seq {train.seq_len}, batch {train.batch})"
    per = f"{need:.1f} GiB per GPU with {train.shard} over {train.num_gpus}" \
        if train.shard != "none" else f"{need:.1f} GiB"
    if choice is None:
        return f"{setup} needs {per} and fits no catalog GPU, even sharded over the GPU-count limit."
    g = choice.gpu
    mem = g.memory_bytes / GIB
    if choice.fits:
        count = f"{train.num_gpus} × " if train.num_gpus > 1 else "one "
        return (f"{setup} needs {per}: the smallest GPU that fits is {count}{g.name} "
                f"({mem:.1f} GiB, {choice.headroom_bytes / GIB:.1f} GiB headroom).")
    return (f"{setup} needs {per}, more than any single catalog GPU: needs {choice.min_gpus} × "
            f"{g.name} ({mem:.1f} GiB each) with {choice.min_gpus_shard}.")
