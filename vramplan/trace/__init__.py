"""The trace engine (optional extra, needs torch/transformers/peft/bitsandbytes): the real
training step on fake tensors under a recorder of every storage born and freed.

Public API (import the submodules; nothing is imported here, so ``import vramplan.trace`` stays
cheap and ``vramplan`` / ``vramplan.model`` never load torch through it):

- :func:`vramplan.trace.engine.trace_step` -> :class:`~vramplan.trace.engine.TraceResult`
- :func:`vramplan.trace.depth.trace_depth` -> :class:`~vramplan.trace.depth.DepthExtrapolation`
- :class:`vramplan.trace.recorder.Recorder`, :class:`~vramplan.trace.recorder.Event`,
  :func:`~vramplan.trace.recorder.peaks`, :func:`~vramplan.trace.recorder.live_at`

Not traced: int8 QLoRA counted as on CUDA (its LLM.int8() outlier split has a data-dependent
shape; counted as on CPU it is traced) and fake CUDA devices (``torch.autocast("cuda")``
disables itself on a CPU-only build).
"""
