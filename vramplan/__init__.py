"""vramplan: which GPU do I need to fine-tune this model, and the evidence for it.

Public API (pure Python, no torch): :func:`vramplan.model.estimate.estimate`,
:func:`vramplan.profiles.load_model`, :func:`vramplan.profiles.load_gpus`.
"""

__version__ = "0.1.0"
