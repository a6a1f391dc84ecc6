"""Run warm-up and measured optimizer steps on random tokens, under a memory probe.

A step is what a training loop does: forward (``model(input_ids=ids, labels=ids).loss``),
``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Precision
"mixed" runs the forward under bf16 autocast, as HF Trainer (accelerate) does with ``bf16=True``;
the other precisions run a plain loop without autocast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from vramplan.specs import TrainSpec

LR = 1e-4


def make_optimizer(params: list[torch.nn.Parameter], name: str) -> torch.optim.Optimizer:
    """The optimizer HF Trainer 5.x builds for ``optim=name`` (``Trainer.get_optimizer_cls_and_
    kwargs``): torch AdamW fused / foreach (asked for explicitly: on CPU foreach is not the
    default) / for-loop, bitsandbytes AdamW and Lion (8-bit, paged), HF Adafactor without
    relative step, SGD without momentum. ``weight_decay`` 0 as in TrainingArguments."""
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    if name in ("adamw_torch", "adamw_loop"):
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=name == "adamw_torch")
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=LR, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    classes = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "lion_8bit": bnb.optim.Lion8bit,
               "paged_lion_8bit": bnb.optim.PagedLion8bit}
    return classes[name](params, lr=LR)


@contextlib.contextmanager
def cpu_autocast_shim() -> Iterator[None]:
    """Make ``torch.is_autocast_enabled()`` (no argument) report CPU autocast, for CPU runs only.

    peft's bitsandbytes LoRA layers decide whether to cast the input to the adapter dtype with
    ``torch.is_autocast_enabled()``, which without an argument asks about CUDA autocast only. On a
    GPU under bf16 autocast it says True and peft leaves the cast to autocast; on CPU it would say
    False and peft would make extra fp32 copies a GPU run never makes. Answering for the CPU here
    emulates the CUDA semantics so the CPU measurement describes the GPU pipeline. Calls with a
    device argument are untouched. The original function is restored on exit.
    """
    original = torch.is_autocast_enabled

    def shim(*args: Any, **kwargs: Any) -> bool:
        """CPU autocast state when asked without a device; else the original answer."""
        if not args and not kwargs:
            return original("cpu")
        return original(*args, **kwargs)

    torch.is_autocast_enabled = shim
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def needs_shim(train: TrainSpec, device: str) -> bool:
    """The CPU autocast shim applies to mixed precision on CPU."""
    return torch.device(device).type == "cpu" and train.precision == "mixed"


def forward_context(train: TrainSpec, device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "mixed" (HF Trainer ``bf16=True``), nothing otherwise."""
    if train.precision == "mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_batch(vocab: int, train: TrainSpec, device: str) -> torch.Tensor:
    """Random token ids of shape (batch, seq_len) on ``device``."""
    return torch.randint(0, vocab, (train.batch, train.seq_len), device=device)


def one_step(model: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, train: TrainSpec,
             device: str, probe: Any, held: dict[str, Any] | None = None) -> float:
    """One optimizer step as HF Trainer runs it, with probe phases: ``grad_accum`` micro-steps
    (forward, ``(loss / grad_accum).backward()``), ``clip_grad_norm_`` when max_grad_norm > 0,
    ``optimizer.step()``, ``zero_grad(set_to_none=True)``. Returns the last micro-step's loss.

    ``loop == "custom"`` is a hand-written loop: ``outputs = model(**batch)`` stays referenced
    (in ``held``, as a loop variable would) through backward and the optimizer step, and is
    replaced when the next forward returns; HF Trainer keeps only the loss."""
    value = 0.0
    held = {} if held is None else held
    for _ in range(train.grad_accum):
        probe.start_phase("forward")
        with forward_context(train, device):
            out = model(input_ids=ids, labels=ids)
            if train.loop == "custom":
                held["outputs"] = out  # the previous step's outputs are released only now
            loss = out.loss
            del out
        probe.end_phase()
        probe.start_phase("backward")
        (loss / train.grad_accum).backward()
        probe.end_phase()
        value = float(loss.detach())
        del loss
    probe.start_phase("optimizer")
    if train.max_grad_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    probe.end_phase()
    return value


class PhaseClock:
    """Stands in for the memory probe while steps are timed: marks phase boundaries without
    synchronising (CUDA events on the stream; wall clock on CPU) and reads them after the step."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.marks: list[tuple[str, Any]] = []

    def _mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def start_phase(self, name: str) -> None:
        self._mark(name)

    def end_phase(self) -> None:
        pass

    def phases(self, end: Any) -> dict[str, float]:
        """Seconds per phase (summed over micro-steps), from each mark to the next."""
        out: dict[str, float] = {}
        marks = self.marks + [("end", end)]
        for (name, a), (_, b) in zip(marks, marks[1:]):
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out


def timed_steps(model: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, train: TrainSpec,
                device: str, count: int, held: dict[str, Any]) -> dict[str, Any]:
    """Step time without the memory probe: each step runs from a synchronised start to a
    synchronised end with no synchronisation inside it (as in training); the median over
    ``count`` steps, tokens/s, and the phase split (CUDA events, read after the step)."""
    from statistics import median

    cuda = device.startswith("cuda")
    steps, phases = [], []
    for _ in range(count):
        clock = PhaseClock(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_step(model, opt, ids, train, device, clock, held)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
        else:
            end = time.perf_counter()
        steps.append(time.perf_counter() - t0)
        phases.append(clock.phases(end))
    step = median(steps)
    tokens = train.seq_len * train.batch * train.grad_accum
    return {"timed_steps": count, "steps_s": [round(x, 4) for x in steps],
            "step_s": round(step, 4), "tokens_per_s": round(tokens / step, 1),
            "phases_s": {k: round(median(p[k] for p in phases), 4) for k in phases[0]},
            "timing_method": "median of unprobed steps; phases from CUDA events" if cuda else
            "median of unprobed steps; phases from the wall clock (CPU: not GPU time)"}


def run_steps(model: Any, train: TrainSpec, device: str, warmup: int, measured: int,
              probe: Any, timed: int = 0) -> dict[str, Any]:
    """Warm-up then measured steps under ``probe``; returns measured levels, losses and timings.

    The input batch is made before the probe starts (a data loader's batch is not part of the
    step). ``probe.begin`` counts what is resident before the first step; ``end_warmup`` resets
    peaks so only the measured steps count, while optimizer states and allocator pools created in
    warm-up stay in place.
    """
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, train.resolved_optimizer)
    ids = random_batch(model.config.get_text_config().vocab_size, train, device)
    shim = needs_shim(train, device)
    losses: list[float] = []
    t0 = time.perf_counter()
    held: dict[str, Any] = {}  # a custom loop's `outputs` variable
    with cpu_autocast_shim() if shim else contextlib.nullcontext():
        probe.begin(model)
        try:
            for _ in range(warmup):
                losses.append(one_step(model, opt, ids, train, device, probe, held))
            t1 = time.perf_counter()
            probe.end_warmup()
            for _ in range(measured):
                losses.append(one_step(model, opt, ids, train, device, probe, held))
        finally:
            probe.stop()
    t2 = time.perf_counter()
    out = {"measured": probe.result(), "losses": losses, "cpu_autocast_shim": shim,
           "trainable_params": sum(p.numel() for p in params),
           "warmup_s": round(t1 - t0, 3), "measured_s": round(t2 - t1, 3)}
    if timed:  # after the memory result is read: these steps cannot move its peaks
        with cpu_autocast_shim() if shim else contextlib.nullcontext():
            out["timed"] = timed_steps(model, opt, ids, train, device, timed, held)
    return out
