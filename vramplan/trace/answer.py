"""The trace engine's answer to `vramplan estimate` / `check`: a traced step (extrapolated in depth
for deep models), cached on disk by (config, setup, library versions).

Depth: a model of more than :data:`FULL_DEPTH_LAYERS` decoder layers is traced at two depths that
differ by whole periods of its layer pattern (2 and 3 layers for a uniform stack; after a dense
prefix and in units of the sliding/full or dense/MoE pattern otherwise, :func:`layer_plan`) and
extrapolated phase by phase (:func:`vramplan.trace.depth.trace_depth`, equal to the byte to a
full-depth trace on the tested models); a stack with no repeating unit, or a shallow one, is
traced whole. Sequence length costs
nothing on fake tensors, so every length is exact.

Cache: ``$VRAMPLAN_CACHE`` (default ``$XDG_CACHE_HOME/vramplan`` or ``~/.cache/vramplan``),
``trace/<sha256>.json``; the key covers the config, every setup field, the trace engine's
version and the installed torch, transformers, peft and bitsandbytes. A cache that cannot be
written is skipped (the answer is still given).

Devices: ``device="cuda"`` (the default of ``estimate``, and for CUDA records) counts as
``torch.cuda.max_memory_allocated`` does (:mod:`vramplan.trace.cuda`: block rounding, bool
dropout masks, paged optimizer states in managed memory, cuBLAS workspaces); ``device="cpu"``
as the harness's CPU probe (see :mod:`vramplan.trace.engine`).

Levels: peak allocated always. On CUDA, a model traced at its full depth (shallow models, or
``depth="full"``) also gets the reserved level, from the trace's own build and step events
replayed through the caching allocator (:mod:`vramplan.trace.reserve`), and the device total
(reserved + the calibrated memory outside the allocator, ``overhead.non_allocator``). Reserved is
not extrapolated in depth: which cached blocks a request finds changes with the number of layers
(Qwen2-0.5B full fine-tuning: +0.1 GiB per layer up to 16 layers, then +3.4 GiB from 16 to its
24), so a shallow trace says nothing of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramplan.specs import SpecError, TrainSpec

#: Bump when the trace's recorded quantities change meaning (invalidates cached answers).
TRACE_VERSION = 4
#: Devices whose count a trace can follow.
DEVICES = ("cuda", "cpu")
#: Depth choices: "auto" extrapolates deep models from shallow traces, "full" traces every layer.
DEPTHS = ("auto", "full")
#: Models up to this many decoder layers are traced at full depth.
FULL_DEPTH_LAYERS = 4
#: The depths a deeper model is traced at before extrapolating.
SHALLOW_LAYERS = (2, 3)


@dataclass(frozen=True, slots=True)
class TraceAnswer:
    """A traced step's peak (allocated level) and where its bytes are, JSON-ready."""

    model: str
    model_type: str
    setup: dict[str, Any]
    peak_allocated_bytes: int
    peak_phase: str
    phase_peaks: dict[str, int]
    groups: dict[str, int]  # resident and step groups at the peak; they sum to the peak
    params_total: int
    params_trainable: int
    num_layers: int
    traced_layers: tuple[int, ...]
    wall_s: float
    cached: bool = False
    notes: tuple[str, ...] = field(default=())
    device: str = "cuda"
    peak_reserved_bytes: int | None = None  # CUDA, full-depth traces only (module docstring)
    device_total_bytes: int | None = None
    largest_alloc_bytes: int = 0  # the measured step's largest single storage

    def verdict_levels(self, calib: dict[str, Any]) -> dict[str, Any]:
        """The keywords of :func:`vramplan.planner.level_verdict`: peak allocated, the memory
        outside the allocator (the device total's share, or the calibrated constant when the
        trace has no device total), the device total (None at extrapolated depth) and the
        largest single allocation."""
        outside = self.device_total_bytes - self.peak_reserved_bytes \
            if self.device_total_bytes is not None else non_allocator_bytes(calib)
        return {"allocated": self.peak_allocated_bytes, "outside": outside,
                "device_total": self.device_total_bytes, "largest": self.largest_alloc_bytes}

    def as_json(self) -> dict[str, Any]:
        """The JSON contract's shape: the analytic keys where the trace has them, null where not."""
        return {"model": self.model, "engine": "trace", "model_type": self.model_type,
                "setup": self.setup,
                "params": {"total": self.params_total, "trainable": self.params_trainable},
                "terms": {f"trace.{k}": v for k, v in self.groups.items()},
                "device": self.device,
                "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes,
                "device_total_bytes": self.device_total_bytes, "peak_phase": self.peak_phase,
                "largest_temporary_bytes": self.largest_alloc_bytes,
                "phase_bytes": self.phase_peaks, "notes": list(self.notes),
                "trace": {"layers": self.num_layers, "traced_layers": list(self.traced_layers),
                          "wall_s": round(self.wall_s, 3), "cached": self.cached}}


def cache_dir() -> Path:
    """Where traced answers are kept (see the module docstring)."""
    root = os.environ.get("VRAMPLAN_CACHE") or \
        os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                     "vramplan")
    return Path(root) / "trace"


def cache_key(cfg: dict[str, Any], train: TrainSpec, device: str = "cuda", depth: str = "auto",
              workspace_bytes: int = 0) -> str:
    """sha256 of the config, the setup, the device, the depth choice, the cuBLAS workspace, the
    engine version and the library versions."""
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    blob = json.dumps({"config": cfg, "setup": train.as_dict(), "engine": TRACE_VERSION,
                       "device": device, "depth": depth, "workspace": workspace_bytes,
                       "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _notes(train: TrainSpec, answer_layers: int, traced: tuple[int, ...],
           device: str) -> tuple[str, ...]:
    count = ("as torch.cuda.max_memory_allocated counts it (512 B blocks, bool dropout masks, "
             "cuBLAS workspaces)" if device == "cuda" else "as the CPU harness counts it")
    notes = [f"trace engine: the model's own transformers/peft/bitsandbytes code run on fake "
             f"tensors; peak allocated {count}"]
    if traced != (answer_layers,):
        notes.append(f"traced at {' and '.join(map(str, traced))} decoder layers and "
                     f"extrapolated to {answer_layers}, phase by phase")
        if device == "cuda":
            notes.append("reserved and device levels need every layer traced (the allocator's "
                         "cache does not grow linearly with depth): --trace-depth full")
    elif device == "cuda":
        notes.append("reserved: the trace's build and step events replayed through the caching "
                     "allocator; device total adds the calibrated memory outside it")
    if train.resolved_optimizer.startswith("paged"):
        notes.append("paged optimizer states are in CUDA managed memory, outside these levels"
                     if device == "cuda" else "paged optimizer states are counted as ordinary "
                     "tensors, as on CPU; on CUDA they live in managed memory")
    return tuple(notes)


def _period(seq: list[Any]) -> int:
    """The shortest p with seq[i] == seq[i % p] for every i (len(seq) when none is shorter)."""
    for p in range(1, len(seq) + 1):
        if all(seq[i] == seq[i % p] for i in range(len(seq))):
            return p
    return max(1, len(seq))


#: Config lists that name layers by index (MoE layers, dense-MLP layers).
INDEX_LISTS = ("moe_layers", "mlp_only_layers")


def per_layer_flags(value: Any, layers: int, key: str) -> list[Any] | None:
    """A config list as one value per layer: per-layer lists as they are, index lists as
    membership flags; None for lists that are neither."""
    if not isinstance(value, (list, tuple)):
        return None
    if key in INDEX_LISTS:
        members = set(value)
        return [i in members for i in range(layers)]
    return list(value) if len(value) == layers else None


def layer_plan(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The two depths to trace so that their difference is whole periods of the layer pattern
    (after a dense prefix), or None to trace the full depth (no repeating unit, or a depth that
    is not a whole number of them). Read from the transformers config: every per-layer list
    (``layer_types``: sliding / full / chunked / linear attention; ``no_rope_layers``), the
    index lists ``moe_layers`` and ``mlp_only_layers``, ``first_k_dense_replace`` (dense layers
    before the MoE ones) and the MoE intervals ``interleave_moe_layer_step``,
    ``decoder_sparse_step`` and ``moe_layer_freq``."""
    from math import lcm

    from vramplan.measure.build import hf_config

    c = hf_config(cfg).get_text_config()
    layers = int(getattr(c, "num_hidden_layers", 0) or 0)
    prefix = int(getattr(c, "first_k_dense_replace", 0) or 0)
    period = 1
    for key, value in c.to_dict().items():
        flags = per_layer_flags(value, layers, key)
        if flags is not None and layers > prefix:
            period = lcm(period, _period(flags[prefix:]))
    for key in ("interleave_moe_layer_step", "decoder_sparse_step", "moe_layer_freq"):
        step = getattr(c, key, None)
        if isinstance(step, int) and step > 1:
            period = lcm(period, step)
    a, b = (prefix + period, prefix + 2 * period) if (prefix, period) != (0, 1) \
        else SHALLOW_LAYERS
    if layers <= max(FULL_DEPTH_LAYERS, b) or (layers - a) % period:
        return None
    return a, b


def depth_plan(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The depths to trace (:func:`layer_plan`), or None to trace a shallow model whole."""
    layers = int(cfg.get("num_hidden_layers") or 0)
    return layer_plan(cfg) if layers > FULL_DEPTH_LAYERS else None


def _trace(cfg: dict[str, Any], train: TrainSpec, plan: tuple[int, int] | None,
           device: str = "cpu", workspace_bytes: int = 0) -> dict[str, Any]:
    """Run the trace (``plan``: two depths to extrapolate from, None for full depth) and
    summarise it as plain data."""
    from vramplan.trace.depth import linear_at, trace_steady
    from vramplan.trace.engine import trace_step

    layers = int(cfg.get("num_hidden_layers") or 0)
    how = {"count_as": device, "workspace_bytes": workspace_bytes if device == "cuda" else 0}
    if plan is not None:
        d = trace_steady(cfg, train, layers=plan, target=layers, **how)
        (a, ta), (b, tb) = zip(d.layers, d.traces)

        def at_depth(fa: int, fb: int) -> int:
            return linear_at(a, fa, b, fb, layers)

        groups = {k: at_depth(ta.terms.get(k, 0), tb.terms.get(k, 0))
                  for k in dict.fromkeys([*ta.terms, *tb.terms])}
        rest = d.peak_allocated_bytes - sum(groups.values())
        if rest:  # the peak's phase changed between the shallow traces and the full depth
            groups["peak_phase_shift"] = rest
        phases = dict(d.phase_peaks)
        return {"peak": d.peak_allocated_bytes, "phase": max(phases, key=phases.get),
                "phases": phases, "groups": groups,
                "params_total": at_depth(ta.params_total, tb.params_total),
                "params_trainable": at_depth(ta.params_trainable, tb.params_trainable),
                "traced": list(d.layers), "wall_s": d.wall_s, "reserved": None,
                "largest": max(ta.largest_step_alloc_bytes, tb.largest_step_alloc_bytes)}
    r = trace_step(cfg, train, **how)
    return {"peak": r.peak_allocated_bytes, "phase": r.peak_phase, "phases": dict(r.phase_peaks),
            "groups": dict(r.terms), "params_total": r.params_total,
            "params_trainable": r.params_trainable, "traced": [r.num_layers], "wall_s": r.wall_s,
            "reserved": r.levels.peak_reserved_bytes if r.levels else None,
            "largest": r.largest_step_alloc_bytes}


def trace_answer(name: str, cfg: dict[str, Any], train: TrainSpec, *, device: str = "cuda",
                 depth: str = "auto", calib: dict[str, Any] | None = None,
                 use_cache: bool = True) -> TraceAnswer:
    """The traced answer for one model config and setup on ``device`` (cached; see the module
    docstring). ``calib`` (default: the shipped calibration) gives the CUDA runtime constants.
    A cached answer is read without importing torch or transformers."""
    if device not in DEVICES:
        raise SpecError(f"the trace engine counts for {' or '.join(DEVICES)}, not {device!r}")
    if depth not in DEPTHS:
        raise SpecError(f"trace depth must be {' or '.join(DEPTHS)}, not {depth!r}")
    if calib is None:
        from vramplan.profiles import load_calibration

        calib = load_calibration()
    workspace = int(calib["cublas_workspace"]["bytes"]) if device == "cuda" else 0
    key = cache_key(cfg, train, device, depth, workspace)
    path = cache_dir() / f"{key}.json"
    data, cached = None, False
    if use_cache and path.is_file():
        try:
            data, cached = json.loads(path.read_text()), True
        except (OSError, ValueError):
            data = None
    if data is None:
        from vramplan.trace.engine import check_model_type, check_traceable

        check_traceable(train, device)
        check_model_type(cfg)
        layers = int(cfg.get("num_hidden_layers") or 0)
        plan = depth_plan(cfg) if depth == "auto" else None
        which = f"from {plan[0]} of {layers} layers until the per-layer growth is steady" \
            if plan else f"all {layers} layers"
        print(f"vramplan: tracing {name} ({cfg.get('model_type')}, {train.method}) on fake tensors, "
              f"{which}, counting as {device}...", file=sys.stderr, flush=True)
        with quiet_libraries():
            try:
                data = _trace(cfg, train, plan, device, workspace)
            except (ValueError, NotImplementedError, RuntimeError, TypeError) as exc:
                if os.environ.get("VRAMPLAN_DEBUG"):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise SpecError(f"{name}: transformers/peft/bitsandbytes refused this setup while "
                                f"tracing: {type(exc).__name__}: {first[:300]}") from None
        if use_cache:
            _write_atomic(path, data)
    layers = int(cfg.get("num_hidden_layers") or 0)
    trainable = int(data["params_trainable"] or 0)
    # the model's own parameters, as `params.total` counts them: LoRA adapters are not among them
    total = int(data["params_total"] or 0) - (trainable if train.method != "full" else 0)
    reserved = data.get("reserved")
    device_total = reserved + non_allocator_bytes(calib) if reserved is not None else None
    return TraceAnswer(name, str(cfg.get("model_type")), train.as_dict(), int(data["peak"]),
                       data["phase"], {k: int(v) for k, v in data["phases"].items()},
                       {k: int(v) for k, v in data["groups"].items()}, total, trainable,
                       layers, tuple(data["traced"]), float(data["wall_s"]), cached,
                       _notes(train, layers, tuple(data["traced"]), device), device,
                       reserved, device_total, int(data.get("largest", 0)))


def non_allocator_bytes(calib: dict[str, Any]) -> int:
    """CUDA memory outside the caching allocator (the analytic engine's
    ``overhead.non_allocator``, a calibrated constant per GPU kind)."""
    from vramplan.model.overhead import non_allocator_term

    return sum(t.nbytes for t in non_allocator_term(calib, "cuda"))


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the libraries' deprecation and CPU-fallback warnings while tracing: they describe
    the fake run, not the user's setup (bitsandbytes' missing optional CPU 4-bit kernel among
    them: fake tensors run no kernel)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb_level = bnb.level
    hf_logging.set_verbosity_error()
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        bnb.setLevel(bnb_level)


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next call its trace

