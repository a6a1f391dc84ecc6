"""The validation harness: the only package that imports torch, transformers, peft and bitsandbytes.

It depends on :mod:`vramplan.specs` and :mod:`vramplan.profiles` only, never on
:mod:`vramplan.model`, so a measurement cannot peek at the estimate.
"""
