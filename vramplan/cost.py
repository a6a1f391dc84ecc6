"""Training time and cost of a job from the step-time model (:mod:`vramplan.model.steptime`).

    step        = seconds of one optimizer step on one GPU (its own micro-batches)
    tokens/s    = tokens per step · N / step            (N data-parallel GPUs)
    hours       = tokens / (tokens/s) / 3600
    USD         = hours · price per GPU-hour · N

The step time is MEASURED-based on a GPU whose own records fitted the time constants
(``profiles/calibration/*.toml`` ``[time]``), and an ESTIMATE elsewhere: the same efficiencies
applied to that GPU's datasheet TFLOPS and bandwidth. Communication between GPUs (all-reduce,
ZeRO/FSDP gathers) is not modelled: multi-GPU times are a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vramplan.model.steptime import StepTime, peak_tflops, rates_for, step_time, step_work
from vramplan.specs import GpuSpec, ModelSpec, TrainSpec

TOKENS_PER_BILLION = 10**9
SECONDS_PER_HOUR = 3600


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Time and money per 10^9 training tokens on n_gpus data-parallel GPUs."""

    n_gpus: int
    step: StepTime | None  # one GPU's optimizer step (None: no rates for this GPU)
    measured: bool  # the rates were fitted on this GPU's own records
    basis: str
    hours_per_billion_tokens: float | None
    usd_per_billion_tokens: float | None
    flops_per_token: int
    mfu: float | None  # achieved: model FLOP/s over the dense peak (an output, not an input)

    @property
    def label(self) -> str:
        return "MEASURED" if self.measured else "ESTIMATE"

    def job(self, tokens: float) -> tuple[float | None, float | None]:
        """(hours, USD) for ``tokens`` training tokens."""
        scale = tokens / TOKENS_PER_BILLION
        h, usd = self.hours_per_billion_tokens, self.usd_per_billion_tokens
        return (None if h is None else h * scale), (None if usd is None else usd * scale)


def cost_per_billion_tokens(m: ModelSpec, t: TrainSpec, gpu: GpuSpec, n_gpus: int,
                            calib: Mapping[str, Any]) -> CostEstimate:
    """Hours and USD per billion tokens (None where the GPU has no peaks, no price, or the
    calibration has no ``[time]`` section)."""
    work = step_work(m, t)
    flops_per_token = work.flops // work.tokens
    rates = rates_for(gpu, calib)
    if rates is None:
        return CostEstimate(n_gpus, None, False, "no step-time rates for this GPU", None, None,
                            flops_per_token, None)
    st = step_time(work, rates)
    hours = TOKENS_PER_BILLION / (st.tokens_per_s * n_gpus) / SECONDS_PER_HOUR
    usd = hours * gpu.price_usd_per_hour * n_gpus if gpu.price_usd_per_hour is not None else None
    peak = peak_tflops(gpu)
    mfu = work.flops / st.seconds / (peak * 1e12) if peak else None
    return CostEstimate(n_gpus, st, rates.measured, rates.basis, hours, usd, flops_per_token, mfu)


# --- a dataset of variable lengths --------------------------------------------------------------

#: Padded lengths are priced at the next multiple of this many tokens (bounds the number of
#: distinct step-time evaluations; at most 63 extra tokens a batch, a small overestimate).
LENGTH_BUCKET = 64


@dataclass(frozen=True, slots=True)
class DatasetCost:
    """Time and money for one pass over a dataset (× epochs) in one batching mode."""

    mode: str  # "padding" (each batch padded to its longest) or "packing" (rows of seq_len)
    tokens: int  # real tokens
    computed_tokens: int  # tokens the GPUs process, padding included
    steps: int  # optimizer steps (all GPUs together count once)
    hours: float | None
    usd: float | None


def _micro_and_optimizer(m: ModelSpec, t: TrainSpec, seq: int,
                         rates: Any) -> tuple[float, float]:
    """(seconds of one micro-batch's forward + backward, seconds of the optimizer phase)."""
    from dataclasses import replace

    st = step_time(step_work(m, replace(t, seq_len=seq, grad_accum=1)), rates)
    return max(st.phases["forward"]) + max(st.phases["backward"]), max(st.phases["optimizer"])


def padded_length_distribution(lengths: Mapping[int, int], batch: int) -> dict[int, float]:
    """Probability of each batch length when ``batch`` examples drawn at random (a shuffled
    loader, HF Trainer's default) are padded to their longest: P(max = x_j) = F(x_j)^b −
    F(x_{j−1})^b over the sorted distinct lengths, F the empirical CDF."""
    n = sum(lengths.values())
    out, cum, below = {}, 0, 0.0
    for x in sorted(lengths):
        cum += lengths[x]
        at = (cum / n) ** batch
        out[x] = at - below
        below = at
    return out


def dataset_costs(m: ModelSpec, t: TrainSpec, gpu: GpuSpec, n_gpus: int,
                  calib: Mapping[str, Any], lengths: Mapping[int, int], epochs: float = 1.0,
                  packed_seq: int | None = None) -> tuple[DatasetCost, DatasetCost]:
    """Padding and packing over ``lengths`` (token count -> number of examples), × epochs.

    padding: ceil(N / batch) batches of randomly drawn examples, each padded to its longest
      (:func:`padded_length_distribution`), priced at that length rounded up to
      :data:`LENGTH_BUCKET`;
    packing: all tokens concatenated into rows of ``packed_seq`` (default the longest example).
    Both: ``grad_accum`` micro-batches per optimizer step, shared by ``n_gpus`` data-parallel
    GPUs; the optimizer phase once per step.
    """
    rates = rates_for(gpu, calib)
    n_examples = sum(lengths.values())
    total = sum(x * c for x, c in lengths.items())
    seq = packed_seq or max(lengths)
    cache: dict[int, tuple[float, float]] = {}

    def micro(s: int) -> tuple[float, float]:
        s = -(-s // LENGTH_BUCKET) * LENGTH_BUCKET
        if s not in cache:
            cache[s] = _micro_and_optimizer(m, t, s, rates)
        return cache[s]

    b, accum = t.batch, t.grad_accum
    dist = padded_length_distribution(lengths, b)
    modes = {"padding": (-(-n_examples // b), sum(p * x for x, p in dist.items()), dist),
             "packing": (-(-(-(-total // seq)) // b), float(seq), {seq: 1.0})}
    out = []
    for mode, (batches, mean_len, lens) in modes.items():
        steps = -(-batches // accum)
        hours = usd = None
        if rates is not None:
            per_batch = sum(p * micro(x)[0] for x, p in lens.items())
            seconds = batches * per_batch + steps * micro(seq)[1]
            hours = seconds * epochs / n_gpus / SECONDS_PER_HOUR
            if gpu.price_usd_per_hour is not None:
                usd = hours * gpu.price_usd_per_hour * n_gpus
        out.append(DatasetCost(mode, round(total * epochs), round(batches * b * mean_len * epochs),
                               round(steps * epochs / n_gpus), hours, usd))
    return out[0], out[1]
