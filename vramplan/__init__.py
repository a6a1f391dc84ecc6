"""vramplan: which GPU do I need to fine-tune this model, and the evidence for it.

Public API (pure Python, no torch): :func:`vramplan.model.estimate.estimate`,
:func:`vramplan.profiles.load_model`, :func:`vramplan.profiles.load_gpus`, and for notebooks
``vramplan.table(...)`` and ``vramplan.evidence(...)`` (``.to_pandas()`` with the report extra).
"""

__version__ = "0.1.0"
__all__ = ["evidence", "table"]


def __getattr__(name: str):
    """Load the notebook API on first use, so that ``import vramplan`` stays light."""
    if name in __all__:
        from vramplan import api

        return getattr(api, name)
    raise AttributeError(f"module 'vramplan' has no attribute {name!r}")
