"""Which GPU fits: verdicts with a margin, headroom, the largest sequence length and batch, and the
GPU count with sharding.

A setup's per-GPU device total (reserved + memory outside the allocator, after sharding; see
:mod:`vramplan.model.sharding`) is held against the GPU's CUDA capacity (what ``torch.cuda`` lets a
process allocate, ``GpuSpec.capacity_bytes``), not the NVML total. The verdict:

- *does not fit*: even the live tensors (peak allocated) and the memory outside the allocator
  exceed the capacity: the step cannot run;
- *tight*: it may run, but the headroom is below what is needed to be sure: the largest single
  allocation of the step (one failed request is an OOM), the model's own largest device-level
  error on the measured records (``calibration[verdict].device_error``), or the user's
  ``--margin``; or the device total exceeds the capacity while the live tensors do not (the
  allocator would have to give back its cache and retry, ``num_alloc_retries``);
- *fits*: headroom at least all of those.

The max-seq / max-batch / GPU-count searches run on the analytic model (sub-millisecond per
setup) with the allocator's cache taken from replays at the user's own value and at powers of two
of the searched quantity, linearly interpolated in between (the replay costs tens of
milliseconds; its result is not monotone in seq or batch, so it cannot be searched directly).
Searches resolve one token / one sequence: the result ``x`` passes and ``x + 1`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from vramplan.cost import CostEstimate, cost_per_billion_tokens
from vramplan.model.estimate import Estimate, estimate
from vramplan.model.sharding import shard_estimate
from vramplan.specs import GpuSpec, ModelSpec, Search, TrainSpec
from vramplan.units import GIB

PERCENT = 100
FITS, TIGHT, NO, NEEDS_BF16 = "fits", "tight", "does not fit", "needs bf16"
#: Setups that compute in bf16 (HF Trainer bf16=True autocast, or bf16 weights).
BF16_PRECISIONS = ("bf16", "mixed")


def runs_precision(gpu: GpuSpec, precision: str) -> bool:
    """Whether ``gpu`` can compute in ``precision``: bf16 needs bf16 tensor cores (not T4/V100)."""
    return gpu.has_bf16 or precision not in BF16_PRECISIONS
CACHE_KEY = "overhead.allocator_cache"


@dataclass(frozen=True, slots=True)
class Margin:
    """Extra headroom a user asks for: bytes, a fraction of the device total, or both (max)."""

    nbytes: int = 0
    fraction: float = 0.0

    def of(self, device_total: int) -> int:
        return max(self.nbytes, int(self.fraction * device_total))


@dataclass(frozen=True, slots=True)
class Verdict:
    """fits / tight / does not fit, with the headroom it needs and why."""

    word: str
    needed_bytes: int  # headroom a "fits" needs
    reason: str

    @property
    def fits(self) -> bool:
        return self.word == FITS


def verdict(s: Estimate, gpu: GpuSpec, calib: Mapping[str, Any],
            margin: Margin = Margin()) -> Verdict:
    """The verdict for one setup (per-GPU estimate, sharded or not) on one GPU (see the module
    docstring)."""
    return level_verdict(s.train, gpu, calib, margin, allocated=s.peak_allocated_bytes,
                         outside=s.device_total_bytes - s.peak_reserved_bytes,
                         device_total=s.device_total_bytes, largest=s.largest_temporary_bytes)


def level_verdict(train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
                  margin: Margin = Margin(), *, allocated: int, outside: int,
                  device_total: int | None, largest: int) -> Verdict:
    """The verdict from a step's levels, whichever engine gave them (see the module docstring).
    ``device_total`` None: the reserved level is unknown (a depth-extrapolated trace), so a step
    whose live tensors fit is at best *tight*."""
    cap = gpu.capacity_bytes
    if not runs_precision(gpu, train.precision):
        return Verdict(NEEDS_BF16, 0, f"{gpu.name} has no bf16 tensor cores: use --precision "
                                      "fp16 (or fp32) on it")
    held = device_total if device_total is not None else allocated + outside
    error = float((calib.get("verdict") or {}).get("device_error", 0.0))
    needs = {"the largest single allocation": largest,
             f"the model's {error:.1%} error on measured runs": int(error * held),
             "your --margin": margin.of(held)}
    why, need = max(needs.items(), key=lambda kv: kv[1])
    room = cap - held
    if allocated + outside > cap:
        return Verdict(NO, need, "the live tensors alone exceed the capacity")
    if device_total is None:
        return Verdict(TIGHT, need, "the live tensors fit; the allocator's cache was not traced "
                                    "at this depth (--trace-depth full)")
    if room < 0:
        return Verdict(TIGHT, need, "over capacity unless the allocator frees its cache and "
                                    "retries")
    if room < need:
        return Verdict(TIGHT, need, f"headroom below {why} ({need / GIB:.2f} GiB)")
    return Verdict(FITS, need, f"headroom covers {why} ({need / GIB:.2f} GiB)")


def smallest_fitting(verdicts: Iterable[tuple[GpuSpec, Verdict]]) -> GpuSpec | None:
    """The GPU with the least CUDA capacity whose verdict is "fits" (the first listed wins a
    tie): the one GPU `fit` names and a `table` cell shows."""
    return min((g for g, v in verdicts if v.fits), key=lambda g: g.capacity_bytes, default=None)


@dataclass(frozen=True, slots=True)
class GpuFit:
    """One GPU against one setup. Sizes in bytes; None where nothing fits."""

    gpu: GpuSpec
    device_total_bytes: int  # per GPU, with the setup's own sharding
    fits: bool  # verdict is "fits"
    headroom_bytes: int  # capacity_bytes − device_total_bytes (negative: short by that much)
    headroom_pct: float  # headroom as % of capacity_bytes
    max_seq_len: int | None  # largest seq_len that fits, other settings fixed
    max_batch: int | None
    min_gpus: int | None  # smallest N in 1..max_gpus that fits
    min_gpus_shard: str  # the scheme min_gpus assumes
    cost: CostEstimate | None  # on the GPUs the run needs (num_gpus if it fits, else min GPUs)
    verdict: Verdict | None = None

    def as_dict(self) -> dict[str, Any]:
        """The `fit --json` row."""
        c, v = self.cost, self.verdict
        return {"key": self.gpu.key, "name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                "capacity_bytes": self.gpu.capacity_bytes,
                "verdict": v.word if v else None, "verdict_reason": v.reason if v else None,
                "needed_headroom_bytes": v.needed_bytes if v else None,
                "fits": self.fits, "device_total_bytes": self.device_total_bytes,
                "headroom_bytes": self.headroom_bytes, "headroom_pct": round(self.headroom_pct, 2),
                "max_seq_len": self.max_seq_len, "max_batch": self.max_batch,
                "min_gpus": self.min_gpus, "min_gpus_shard": self.min_gpus_shard,
                "hours_per_billion_tokens": c.hours_per_billion_tokens if c else None,
                "usd_per_billion_tokens": c.usd_per_billion_tokens if c else None,
                "step_seconds": c.step.seconds if c and c.step else None,
                "tokens_per_s": c.step.tokens_per_s * c.n_gpus if c and c.step else None,
                "time_basis": (c.label if c.step else None) if c else None,
                "time_source": c.basis if c else None}


@dataclass(frozen=True, slots=True)
class Plan:
    """Every GPU's fit, the chosen answer and its one-sentence statement."""

    model: ModelSpec
    train: TrainSpec
    sharded: Estimate
    fits: tuple[GpuFit, ...]
    choice: GpuFit | None
    answer: str


#: per_gpu's memo: (model, setup, allocator, id(calib)) -> (calib, estimate). A plan asks the same
#: setup many times (every GPU's count scan probes the same N; searches meet again at their
#: nodes). The calibration is compared by identity, as the mapping itself is not hashable.
_PER_GPU: dict[tuple[ModelSpec, TrainSpec, bool, int], tuple[Mapping[str, Any], Estimate]] = {}
PER_GPU_MEMO = 4096


def per_gpu(model: ModelSpec, train: TrainSpec, calib: Mapping[str, Any],
            allocator: bool = True) -> Estimate:
    """Per-GPU estimate of a setup with its own sharding (identity for shard none), memoised
    per model, setup and calibration object."""
    key = (model, train, allocator, id(calib))
    hit = _PER_GPU.get(key)
    if hit is not None and hit[0] is calib:
        return hit[1]
    if len(_PER_GPU) >= PER_GPU_MEMO:
        _PER_GPU.clear()
    s = shard_estimate(estimate(model, train, calib, allocator=allocator), train, calib)
    _PER_GPU[key] = (calib, s)
    return s


def fits_on(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
            margin: Margin = Margin()) -> bool:
    """The exact verdict (allocator replay of this very setup) is "fits"."""
    return verdict(per_gpu(model, train, calib), gpu, calib, margin).fits


def _cache_bytes(s: Estimate) -> int:
    return sum(t.nbytes for t in s.breakdown.terms if t.key == CACHE_KEY)


def search_total(model: ModelSpec, train: TrainSpec, calib: Mapping[str, Any], field: str,
                 anchor: int, cheap: int | None = None) -> int:
    """Per-GPU device total for the searches: analytic levels without a replay (``cheap``, when
    the caller has it), plus the allocator cache replayed at ``anchor`` (the user's value) and at
    powers of two of ``field``, linearly interpolated between the nearest of them (replays are
    memoised)."""
    v = getattr(train, field)
    if cheap is None:
        cheap = per_gpu(model, train, calib, allocator=False).device_total_bytes
    lo, hi = 1 << (v.bit_length() - 1), 1 << v.bit_length()
    if lo == v:
        hi = v
    nodes = sorted({lo, hi} | ({anchor} if lo <= anchor <= hi else set()))
    left = max(x for x in nodes if x <= v)
    right = min(x for x in nodes if x >= v)
    cache = {x: _cache_bytes(per_gpu(model, replace(train, **{field: x}), calib))
             for x in {left, right}}
    if left == right:
        return cheap + cache[left]
    w = (v - left) / (right - left)
    return cheap + int(round(cache[left] + w * (cache[right] - cache[left])))


def largest_fitting(ok: Callable[[int], bool], start: int, cap: int) -> int | None:
    """Largest x in [1, cap] with ok(x), for ok true up to some point and false after it.

    Probes `start` first and doubles from it until ok fails (or cap), or, when `start` fails,
    searches below it; then bisects exactly: ok(x) and not ok(x + 1), unless x == cap. Returns
    None when ok(1) is false. Each probe may cost an allocator replay, so no value is probed
    that the answer does not need (1 only when everything above it fails).
    """
    lo = max(1, min(start, cap))
    if ok(lo):
        while lo < cap:
            hi = min(2 * lo, cap)
            if not ok(hi):
                break
            lo = hi
        else:
            return cap
    else:
        lo, hi = 0, lo  # 0: nothing known to pass yet
    while hi - lo > 1:  # invariant: ok(lo) (or lo == 0), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo or None


def search_fits(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
                field: str, anchor: int, margin: Margin = Margin()) -> bool:
    """The searches' test: device total (interpolated cache) + margin within the capacity. A
    setup whose total without the cache already exceeds the capacity fails without a replay (the
    cache is never negative and the margin never shrinks as the total grows)."""
    cheap = per_gpu(model, train, calib, allocator=False).device_total_bytes
    if cheap + margin.of(cheap) > gpu.capacity_bytes:
        return False
    total = search_total(model, train, calib, field, anchor, cheap)
    return total + margin.of(total) <= gpu.capacity_bytes


def max_seq_len(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
                margin: Margin = Margin(), *, search: Search) -> int | None:
    """Largest seq_len (1-token resolution) within the capacity, batch and the rest fixed, and
    never past the model's context (``max_position_embeddings``) or ``search.max_seq_len``."""
    cap = search.max_seq_len
    if model.max_context:
        cap = min(cap, model.max_context)
    return largest_fitting(lambda s: search_fits(model, replace(train, seq_len=s), gpu, calib,
                                                 "seq_len", train.seq_len, margin),
                           train.seq_len, cap)


def max_batch(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
              margin: Margin = Margin(), *, search: Search) -> int | None:
    """Largest micro-batch within the capacity (at most ``search.max_batch``), seq_len and the
    rest fixed."""
    cap = search.max_batch
    return largest_fitting(lambda b: search_fits(model, replace(train, batch=b), gpu, calib,
                                                 "batch", train.batch, margin),
                           train.batch, cap)


def min_gpus(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
             margin: Margin = Margin(), *, search: Search) -> tuple[int | None, str]:
    """(smallest N in 1..max_gpus whose verdict is "fits", the scheme used).

    With ``train.shard`` set, that scheme; with none, one GPU unsharded, then the fallback scheme
    (profiles/planner.toml, zero3) from two GPUs on. A linear scan: no monotonicity in N assumed.
    Every N shares one allocator replay (that of one unsharded rank).
    """
    scheme = train.shard if train.shard != "none" else search.fallback_shard
    if train.shard == "none" and fits_on(model, replace(train, num_gpus=1), gpu, calib, margin):
        return 1, "none"
    first = 1 if train.shard != "none" else 2
    for n in range(first, search.max_gpus + 1):
        if fits_on(model, replace(train, shard=scheme, num_gpus=n), gpu, calib, margin):
            return n, scheme
    return None, scheme


def fit_gpu(model: ModelSpec, train: TrainSpec, gpu: GpuSpec, calib: Mapping[str, Any],
            margin: Margin = Margin(), *, search: Search) -> GpuFit:
    """How `train` sits on `gpu`: verdict, headroom, max seq/batch, GPU count, time and cost."""
    s = per_gpu(model, train, calib)
    v = verdict(s, gpu, calib, margin)
    total = s.device_total_bytes
    room = gpu.capacity_bytes - total
    if v.word == NEEDS_BF16:  # it cannot run this setup at any size
        return GpuFit(gpu, total, False, room, PERCENT * room / gpu.capacity_bytes, None, None,
                      None, train.shard, None, v)
    n, scheme = min_gpus(model, train, gpu, calib, margin, search=search)
    run_gpus = train.num_gpus if v.fits else n
    cost = cost_per_billion_tokens(model, train, gpu, run_gpus, calib) if run_gpus else None
    return GpuFit(gpu, total, v.fits, room, PERCENT * room / gpu.capacity_bytes,
                  max_seq_len(model, train, gpu, calib, margin, search=search),
                  max_batch(model, train, gpu, calib, margin, search=search), n, scheme, cost, v)


def plan(model: ModelSpec, train: TrainSpec, gpus: Sequence[GpuSpec],
         calib: Mapping[str, Any], margin: Margin = Margin(), catalog: bool = True, *,
         search: Search) -> Plan:
    """Fit every GPU and choose: the smallest-capacity GPU that fits as set up, else the
    multi-GPU option with the least total memory (ties: fewer GPUs, then catalog order)."""
    sharded = per_gpu(model, train, calib)
    fits = tuple(fit_gpu(model, train, g, calib, margin, search=search) for g in gpus)
    best = smallest_fitting((f.gpu, f.verdict) for f in fits)
    if best is not None:
        choice = next(f for f in fits if f.gpu is best)
    else:
        multi = [f for f in fits if f.min_gpus is not None]
        choice = min(multi, key=lambda f: (f.min_gpus * f.gpu.capacity_bytes, f.min_gpus),
                     default=None)
    tight = [f for f in fits if f.verdict and f.verdict.word == TIGHT and
             (choice is None or f.gpu.capacity_bytes < choice.gpu.capacity_bytes)]
    return Plan(model, train, sharded, fits, choice,
                answer_sentence(model, train, sharded, choice, tight, catalog=catalog))


def answer_sentence(model: ModelSpec, train: TrainSpec, sharded: Estimate,
                    choice: GpuFit | None, tight: Sequence[GpuFit] = (),
                    catalog: bool = True) -> str:
    """One sentence: what the setup needs and the GPU(s) to run it on (and the tight ones);
    ``catalog`` False when the user named the GPUs (the sentence speaks of those)."""
    among = "catalog GPU" if catalog else "GPU asked about"
    need = sharded.device_total_bytes / GIB
    setup = f"{model.name} {train.method} (seq {train.seq_len}, batch {train.batch})"
    per = f"{need:.1f} GiB per GPU with {train.shard} over {train.num_gpus}" \
        if train.shard != "none" else f"{need:.1f} GiB"
    if sharded.paged_bytes:
        per += f" (+ {sharded.paged_bytes / GIB:.1f} GiB of paged optimizer states, on the GPU " \
               "while it has room, else in host RAM)"
    if choice is None:
        out = f"{setup} needs {per} and fits no {among}, even sharded over the GPU-count limit."
    elif choice.fits:
        g = choice.gpu
        count = f"{train.num_gpus} × " if train.num_gpus > 1 else \
            ("" if g.gpu_class == "custom" else "one ")
        out = (f"{setup} needs {per}: the smallest GPU that fits is {count}{g.name} "
               f"({g.capacity_bytes / GIB:.1f} GiB usable, {choice.headroom_bytes / GIB:.1f} GiB "
               "headroom).")
    else:
        g = choice.gpu
        out = (f"{setup} needs {per}, more than any single {among}: needs {choice.min_gpus} × "
               f"{g.name} ({g.capacity_bytes / GIB:.1f} GiB usable each) with "
               f"{choice.min_gpus_shard}.")
    return out + tight_clauses(tight)


def tight_clauses(tight: Sequence[GpuFit]) -> str:
    """" Tight on X (...): why." for the three smallest tight GPUs."""
    return "".join(f" Tight on {f.gpu.name} ({f.gpu.capacity_bytes / GIB:.2f} GiB usable, "
                   f"{f.headroom_bytes / GIB:+.2f} GiB headroom): {f.verdict.reason}."
                   for f in sorted(tight, key=lambda f: f.gpu.capacity_bytes)[:3])


def traced_plan(name: str, train: TrainSpec, gpus: Sequence[GpuSpec], calib: Mapping[str, Any],
                margin: Margin = Margin(), catalog: bool = True, *, allocated: int,
                outside: int, device_total: int | None,
                largest: int) -> tuple[tuple[GpuFit, ...], str]:
    """Every GPU against one traced step (the trace engine's levels; one GPU, no sharding) and
    the answer sentence. A trace answers for its own seq_len and batch only: the searches (max
    seq, max batch, GPU count with sharding) and the step-time model need the analytic engine."""
    held = device_total if device_total is not None else allocated + outside
    fits = []
    for g in gpus:
        v = level_verdict(train, g, calib, margin, allocated=allocated, outside=outside,
                          device_total=device_total, largest=largest)
        room = g.capacity_bytes - held
        fits.append(GpuFit(g, held, v.fits, room, PERCENT * room / g.capacity_bytes, None, None,
                           1 if v.fits else None, "none", None, v))
    among = "catalog GPU" if catalog else "GPU asked about"
    setup = f"{name} {train.method} (seq {train.seq_len}, batch {train.batch})"
    if device_total is None:
        could = sorted((f for f in fits if f.verdict.word == TIGHT),
                       key=lambda f: f.gpu.capacity_bytes)
        out = (f"{setup} needs at least {held / GIB:.1f} GiB (traced peak allocated + memory "
               "outside the allocator; its cache was not traced at this depth): ")
        out += (f"the smallest {among} that may hold it is {could[0].gpu.name}; trace every "
                "layer (--trace-depth full) for the device total and a verdict."
                if could else f"no {among} holds even that.")
        return tuple(fits), out
    g = smallest_fitting((f.gpu, f.verdict) for f in fits)
    if g is not None:
        room = g.capacity_bytes - held
        out = (f"{setup} needs {held / GIB:.1f} GiB (traced device total): the smallest "
               f"{among} that fits is {g.name} ({g.capacity_bytes / GIB:.1f} GiB usable, "
               f"{room / GIB:.1f} GiB headroom).")
    else:
        out = (f"{setup} needs {held / GIB:.1f} GiB (traced device total) and fits no single "
               f"{among}; GPU counts with sharding need the analytic engine.")
    tight = [f for f in fits if f.verdict.word == TIGHT and
             (g is None or f.gpu.capacity_bytes < g.capacity_bytes)]
    return tuple(fits), out + tight_clauses(tight)


@dataclass(frozen=True, slots=True)
class Suggestion:
    """One way to fine-tune a model on one GPU: the setup and the most it allows."""

    train: TrainSpec
    max_seq_len: int | None  # at the setup's batch
    max_batch: int | None  # at the setup's seq_len
    verdict: Verdict  # at the setup's own seq_len and batch


#: What people most likely want first: the most trainable capacity (full > LoRA > QLoRA).
QUALITY = {"full": 0, "lora": 1, "qlora": 2}
SUGGEST_RANKS = (64, 16)


def suggest(model: ModelSpec, gpu: GpuSpec, calib: Mapping[str, Any],
            base: TrainSpec = TrainSpec(), margin: Margin = Margin(), *,
            search: Search) -> list[Suggestion]:
    """What runs on ``gpu``: every method x checkpointing (x LoRA rank 64/16) that fits at least
    one sequence, ranked quality first (full > LoRA > QLoRA), then the longest sequence, then
    the larger rank, then without checkpointing (faster). bf16 setups become fp16 on GPUs
    without bf16 (T4, V100)."""
    precision = base.precision
    if not runs_precision(gpu, precision):
        precision = "fp16"
    out = []
    for method in ("full", "lora", "qlora"):
        ranks = (base.lora_r,) if method == "full" else SUGGEST_RANKS
        for r in ranks:
            for ckpt in (True, False):
                t = replace(base, method=method, lora_r=r, grad_ckpt=ckpt, precision=precision,
                            optimizer="" if base.optimizer in ("",) else base.optimizer)
                seq = max_seq_len(model, t, gpu, calib, margin, search=search)
                if seq is None:
                    continue
                out.append(Suggestion(t, seq, max_batch(model, t, gpu, calib, margin,
                                                        search=search),
                                      verdict(per_gpu(model, t, calib), gpu, calib, margin)))
    out.sort(key=lambda s: (QUALITY[s.train.method], -(s.max_seq_len or 0), -s.train.lora_r,
                            s.train.grad_ckpt))
    return out
