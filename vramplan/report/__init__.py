"""Rendering of estimates, tables and plots (matplotlib only inside plots.py, imported lazily)."""
