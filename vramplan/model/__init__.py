"""The analytic memory model: standard library only, integers in bytes."""
