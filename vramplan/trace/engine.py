"""The trace engine: one real training step on fake tensors, under the event recorder.

The model is the harness's own (:mod:`vramplan.measure.build`): the skeleton on the meta device,
transformers' bitsandbytes quantizer for QLoRA, then every parameter materialised as a *fake*
tensor (``torch._subclasses.fake_tensor.FakeTensorMode``: shape, dtype, device and storage size,
no memory, no values) and :func:`~vramplan.measure.build.finish_model` (k-bit prep, gradient
checkpointing, peft). The step is the harness's step (:mod:`vramplan.measure.steps`): a warm-up
step then a measured step, each forward, backward, optional gradient clipping, ``optimizer.step``
and ``zero_grad(set_to_none=True)``, with bf16 autocast for "mixed".

``peak_allocated_bytes`` is defined as the harness's CPU probe defines it
(``measure/probes.CpuProbe``): resident bytes (every unique storage of parameters, buffers and
bitsandbytes quantisation state when the step begins) plus the peak of the bytes live in storages
created by operators during the measured step, counting from the live bytes left by warm-up
(optimizer states). Kernel-internal workspaces and allocator rounding are not part of it. One
deliberate difference: a resident storage that dies during the step (bitsandbytes' ``Linear4bit``
replaces a bias of another dtype by a cast copy) stops counting here, while the CPU tracker keeps
counting it and can miss a new storage that reuses its address (see ``recorder.Recorder``).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vramplan.specs import SpecError, TrainSpec
from vramplan.trace.cuda import CudaKernels, cuda_bytes, paged_states_outside, workspace
from vramplan.trace.fake import SmallReal, fake_mode, foreach_sees_fake, untraced_transformers
from vramplan.trace.recorder import PHASES, Event, Recorder, live_at, peaks
from vramplan.trace.reserve import BuildLog, Levels, replay_levels

#: Groups of the step's live bytes at the peak (see :func:`step_groups`).
STEP_GROUPS = ("recast_weights", "gradients", "optimizer_states", "activations",
               "backward_transients", "optimizer_transients", "cublas_workspace")


@dataclass(frozen=True, slots=True)
class TraceResult:
    """What one traced step holds, in bytes (allocated level, the harness's CPU definition).

    ``phase_peaks`` include the resident bytes (as a record's ``measured.phases``). ``resident``
    splits the resident bytes, as the step found them, into weights (the base model's parameters,
    packed 4-bit data included), quant_constants (bitsandbytes absmax / code / offset tensors),
    adapters (LoRA parameters) and buffers. ``at_peak`` splits the step's live bytes at the peak
    into :data:`STEP_GROUPS` (``recast_weights``: parameters whose data the step replaced, net of
    the resident storages they replaced); ``activations_by_kind`` splits activations and
    transients at the peak by the ``phase:operator`` that created them.
    """

    peak_allocated_bytes: int
    resident_bytes: int
    peak_phase: str
    phase_peaks: dict[str, int]
    resident: dict[str, int]
    at_peak: dict[str, int]
    activations_by_kind: dict[str, int]
    num_layers: int
    params_total: int
    params_trainable: int
    events: tuple[Event, ...] = field(repr=False)
    wall_s: float = 0.0
    #: the allocator replay of build and steps (CUDA traces only; :mod:`vramplan.trace.reserve`)
    levels: Levels | None = None

    @property
    def largest_step_alloc_bytes(self) -> int:
        """The largest single storage the measured step creates (one failed request of this
        size is an out-of-memory error, whatever the free total)."""
        last = max((e.step for e in self.events), default=0)
        return max((e.nbytes for e in self.events if e.step == last and e.nbytes > 0), default=0)

    @property
    def terms(self) -> dict[str, int]:
        """Every group, resident and step, as ``group -> bytes``; they sum to the peak."""
        return {**self.resident, **self.at_peak}


def check_traceable(train: TrainSpec, count_as: str) -> None:
    """Raise :class:`SpecError` for a setup the trace cannot follow: int8 QLoRA counted as on
    CUDA (bitsandbytes' CUDA LLM.int8() matmul splits off outlier columns chosen by the
    activations' values; the CPU path, ``MatMul8bitFp``, has no such split)."""
    if train.method == "qlora" and train.quant == "int8" and count_as == "cuda":
        raise SpecError("int8 QLoRA is traced as on CPU only: on CUDA bitsandbytes' LLM.int8() "
                        "matmul splits off outlier columns chosen by the activations' values "
                        "(llm_int8_threshold), which fake tensors do not have; use the analytic "
                        "engine, or nf4/fp4")


def check_model_type(cfg: dict[str, Any]) -> None:
    """Raise :class:`SpecError` unless transformers has a built-in config class for the model."""
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not model_type:
        raise SpecError("the model config has no model_type: the trace engine cannot build it")
    if model_type not in CONFIG_MAPPING:
        raise SpecError(f"model_type {model_type!r} is not known to transformers (installed "
                        "version); the trace engine builds only architectures transformers ships "
                        "(no trust_remote_code)")


def with_layers(cfg: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """The config with ``num_hidden_layers`` set to ``layers`` (per-layer lists cut to match)."""
    if layers is None:
        return dict(cfg)
    if layers < 1:
        raise SpecError(f"layers must be a positive integer, got {layers}")
    out = dict(cfg, num_hidden_layers=layers)
    if isinstance(out.get("layer_types"), list):  # per-layer attention kinds (gemma2, qwen2)
        out["layer_types"] = out["layer_types"][:layers]
    return out


def build_fake_model(cfg: dict[str, Any], train: TrainSpec, device: str, mode: Any) -> Any:
    """The harness's model for ``cfg``/``train``, its parameters fake tensors of ``mode``."""
    from vramplan.measure.build import finish_model, load_streaming
    from vramplan.trace.quant import fake_loading

    with fake_loading(mode):
        model = load_streaming(cfg, train, device)
    with mode:
        fake_buffers(model)
        return finish_model(model, train)


def fake_buffers(model: Any) -> None:
    """Replace real buffers (rotary ``inv_freq``, made on the host by the skeleton) with fakes."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and not isinstance(buf, FakeTensor):
                module._buffers[name] = torch.empty_like(buf).copy_(buf)


def trace_step(cfg: dict[str, Any], train: TrainSpec, *, layers: int | None = None,
               device: str = "cpu", warmup: int = 1, count_as: str = "cpu",
               workspace_bytes: int = 0, light_warmup: bool = False) -> TraceResult:
    """Trace one training step of ``cfg`` (an HF config.json dict) under ``train``.

    ``layers`` overrides ``num_hidden_layers`` (see :func:`vramplan.trace.depth.trace_depth` for
    extrapolation to the full depth). ``device`` is the fake device the tensors claim ("cpu":
    the same kernels' shapes and decompositions as the CPU harness). ``warmup`` steps run before
    the measured one, as in the harness (optimizer states are created in warm-up).

    ``count_as`` is whose count the bytes follow: "cpu" (the harness's CPU probe) or "cuda"
    (``torch.cuda.max_memory_allocated``: :mod:`vramplan.trace.cuda`'s block rounding, bool
    dropout masks, paged states in managed memory, and two cuBLAS workspaces of
    ``workspace_bytes`` together, made at the warm-up's first forward and backward matmuls).

    ``light_warmup`` runs each warm-up step as a forward and an optimizer step on zero gradients
    (:func:`run_step`'s ``light``): what the measured step finds (optimizer states, workspaces, the
    first forward's casts) is the same, at about half the cost, but the order of the warm-up's
    allocations is not, so no reserved level is computed (``levels`` is None).
    """
    import torch

    from vramplan.measure.build import hf_config
    from vramplan.measure.probes import resident_storages
    from vramplan.measure.steps import cpu_autocast_shim, make_optimizer, needs_shim

    if count_as not in ("cpu", "cuda"):
        raise SpecError(f"count_as must be 'cpu' or 'cuda', got {count_as!r}")
    check_traceable(train, count_as)
    check_model_type(cfg)
    cfg = with_layers(cfg, layers)
    t0 = time.perf_counter()
    # the batch is real (b x s token ids): transformers' checks on it get real answers
    ids = torch.randint(0, hf_config(cfg).get_text_config().vocab_size,
                        (train.batch, train.seq_len), device=device)
    mode = fake_mode()
    cuda = count_as == "cuda"
    count = cuda_bytes if cuda else None
    # the reserved level replays the build
    build_rec = Recorder(count=count, fake_only=True) if cuda and not light_warmup else None
    with build_rec or contextlib.nullcontext(), \
            kbit_prep_clears_cache(build_rec) if build_rec else contextlib.nullcontext():
        model = build_fake_model(cfg, train, device, mode)
    build = None
    if build_rec is not None:
        gc.collect()  # the build's garbage is not resident
        build = BuildLog(tuple(build_rec.events), tuple(build_rec.calls), build_rec.live_keys())
        build_rec.detach()
    with mode:
        params = [p for p in model.parameters() if p.requires_grad]
        with SmallReal():  # bitsandbytes optimizers build their code tables with .tolist()
            opt = make_optimizer(params, train.resolved_optimizer)
        resident = resident_storages(model)
        rec = Recorder(resident=resident, count=count)
        resident = {k: count(v) for k, v in resident.items()} if count else resident
        rec.watch_resident([t.untyped_storage() for t in resident_tensors(model)])
        groups = resident_groups(model, count)
        tags: dict[int, str] = {}
        shim = needs_shim(train, device)
        runtime = Runtime(workspace_bytes // 2 if cuda else 0)
        with cpu_autocast_shim() if shim else contextlib.nullcontext(), \
                paged_states_outside(rec.outside) if cuda else contextlib.nullcontext(), \
                CudaKernels() if cuda else contextlib.nullcontext(), \
                untraced_transformers(), foreach_sees_fake(), SmallReal(), rec:
            for step in range(warmup + 1):
                rec.start_step(step)
                run_step(model, opt, ids, train, device, rec, tags, runtime,
                         light=light_warmup and step < warmup)
        # a parameter whose data the step replaced (a bias cast by Linear4bit) is a weight
        tag_storages(rec, tags, list(model.parameters()), "recast_weights")
        rec.detach()
        n_total = sum(logical_numel(p) for p in unique_params(model))
        n_train = sum(p.numel() for p in params)
    events = rec.events
    pk = peaks(events, rec.marks, warmup)
    r = sum(resident.values())
    live = live_at(events, pk.index)
    at_peak, kinds = step_groups(live, tags)
    # net change of the weights: replaced resident storages (logged as "resident" deaths) out
    at_peak["recast_weights"] += sum(e.nbytes for e in events[:pk.index] if e.op == "resident")
    phase_peaks = {p: r + pk.phase_peaks[p] for p in PHASES if p in pk.phase_peaks}
    peak_phase = max(phase_peaks, key=phase_peaks.__getitem__) if phase_peaks else ""
    levels = replay_levels(build, events, rec.marks, rec.calls, rec.resident_keys, warmup,
                           train.expandable_segments) if build is not None else None
    return TraceResult(r + pk.peak_bytes, r, peak_phase, phase_peaks, groups, at_peak, kinds,
                       hf_config(cfg).get_text_config().num_hidden_layers, n_total, n_train,
                       tuple(events), round(time.perf_counter() - t0, 3), levels)


@contextlib.contextmanager
def kbit_prep_clears_cache(rec: Recorder) -> Iterator[None]:
    """Log the ``torch.cuda.empty_cache()`` that peft's ``prepare_model_for_kbit_training``
    makes after its fp32 casts (``auto_clear_cache=True``, on CUDA only) as a call of ``rec``."""
    import peft

    original = peft.prepare_model_for_kbit_training

    def prepare(model: Any, *args: Any, **kwargs: Any) -> Any:
        """peft's k-bit preparation, then the cache clear it makes on CUDA."""
        out = original(model, *args, **kwargs)
        if kwargs.get("auto_clear_cache", True):
            rec.call("empty_cache")
        return out

    peft.prepare_model_for_kbit_training = prepare
    try:
        yield
    finally:
        peft.prepare_model_for_kbit_training = original


def logical_numel(p: Any) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight (two per byte) counts the weight it
    quantises (``quant_state.shape``), as transformers' and the analytic parameter counts do."""
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return p.numel()


@dataclass(slots=True)
class Runtime:
    """Allocations of the CUDA runtime a step makes once: the cuBLAS workspace of each of the
    two streams that run matmuls (``workspace_bytes`` each; 0: none, as on CPU)."""

    workspace_bytes: int
    held: dict[str, Any] = field(default_factory=dict)

    def first_matmul(self, phase: str) -> None:
        """Make the workspace of ``phase``'s stream if this is its first matmul."""
        if self.workspace_bytes and phase not in self.held:
            self.held[phase] = workspace(self.workspace_bytes)


def run_step(model: Any, opt: Any, ids: Any, train: TrainSpec, device: str, rec: Recorder,
             tags: dict[int, str], runtime: Runtime | None = None, light: bool = False) -> None:
    """One optimizer step as :func:`vramplan.measure.steps.one_step` runs it (minus reading the
    loss value, which fake tensors do not have); tags gradient and optimizer-state storages.

    ``light`` (a warm-up whose allocation order nobody replays) leaves the same for the next step
    at about half the cost: one forward (the first forward's casts and the forward workspace),
    the backward's workspace, zero gradients in each trainable parameter's own dtype (as
    AccumulateGrad makes them) instead of a backward, no clipping, the optimizer step (its
    states) and ``zero_grad``."""
    import torch

    from vramplan.measure.steps import forward_context

    runtime = runtime or Runtime(0)
    held: dict[str, Any] = {}
    for _ in range(1 if light else train.grad_accum):
        rec.start_phase("forward")
        runtime.first_matmul("forward")
        tag_storages(rec, tags, list(runtime.held.values()), "cublas_workspace")
        with forward_context(train, device):
            out = model(input_ids=ids, labels=ids)
            if train.loop == "custom":
                held["outputs"] = out
            loss = out.loss
            del out
        rec.start_phase("backward")
        runtime.first_matmul("backward")
        tag_storages(rec, tags, list(runtime.held.values()), "cublas_workspace")
        if light:
            del loss
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        else:
            (loss / train.grad_accum).backward()
            del loss
    tag_storages(rec, tags, [p.grad for p in model.parameters() if p.grad is not None],
                 "gradients")
    rec.start_phase("optimizer")
    if train.max_grad_norm > 0 and not light:
        grads = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, train.max_grad_norm)
    opt.step()
    tag_storages(rec, tags, [t for s in opt.state.values() for t in s.values()],
                 "optimizer_states")
    opt.zero_grad(set_to_none=True)


def tag_storages(rec: Recorder, tags: dict[int, str], tensors: list[Any], group: str) -> None:
    """Remember which live storages (by recorder id) belong to ``group``."""
    import torch

    for t in tensors:
        if isinstance(t, torch.Tensor):
            sid = rec.sid_of(t)
            if sid is not None:
                tags.setdefault(sid, group)


def step_groups(live: dict[int, Event], tags: dict[int, str]) -> tuple[dict[str, int],
                                                                         dict[str, int]]:
    """(bytes per step group, bytes per ``phase:operator`` of activations and transients) of the
    storages live at the peak. Untagged storages are activations when born in forward, else the
    transients of their phase."""
    groups = dict.fromkeys(STEP_GROUPS, 0)
    kinds: dict[str, int] = {}
    for sid, e in live.items():
        group = tags.get(sid) or {"forward": "activations", "backward": "backward_transients",
                                  "optimizer": "optimizer_transients"}.get(e.phase, "activations")
        groups[group] += e.nbytes
        if group not in ("recast_weights", "gradients", "optimizer_states", "cublas_workspace"):
            key = f"{e.phase}:{e.op}"
            kinds[key] = kinds.get(key, 0) + e.nbytes
    return groups, dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def unique_params(model: Any) -> list[Any]:
    """Parameters, each once (tied weights are one)."""
    return list({id(p): p for p in model.parameters()}.values())


def resident_tensors(model: Any) -> list[Any]:
    """Parameters, their bitsandbytes quantisation state and buffers (the harness's list)."""
    from vramplan.measure.probes import resident_tensors as harness_resident

    return harness_resident(model)


def resident_groups(model: Any, count: Any = None) -> dict[str, int]:
    """Resident bytes split into weights, quant_constants, adapters and buffers (unique storages,
    the same set :func:`vramplan.measure.probes.resident_storages` counts; ``count`` as the
    recorder's)."""
    from vramplan.measure.probes import quant_state_tensors

    count = count or (lambda n: n)
    seen: set[int] = set()
    out = {"weights": 0, "quant_constants": 0, "adapters": 0, "buffers": 0}

    def add(group: str, t: Any) -> None:
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            out[group] += count(s.nbytes())

    for name, p in model.named_parameters(remove_duplicate=False):
        add("adapters" if ".lora_" in name else "weights", p)
        for q in quant_state_tensors(p):
            add("quant_constants", q)
    for b in model.buffers():
        add("buffers", b)
    return out
