"""The trace engine (optional extra, needs torch/transformers/peft): the real training step on
fake tensors under a recorder of every storage born and freed. See :mod:`vramplan.trace.engine`.

Nothing is imported here: ``import vramplan.trace`` stays cheap, and torch is loaded only by the
submodules.
"""
