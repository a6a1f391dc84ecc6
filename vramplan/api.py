"""The notebook API: ``vramplan.table(...)`` and ``vramplan.evidence(...)``.

Both return plain objects with ``.to_pandas()``; pandas is imported only when that is called
(the ``report`` extra), so ``import vramplan`` stays pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vramplan.compare import Comparison
from vramplan.report.tables import MemoryTable


def table(models: Sequence[str] | str, methods: Sequence[str] | str = ("full", "lora", "qlora"),
          calibration: str = "default", **setup: Any) -> MemoryTable:
    """Device total per model × method and the smallest catalog GPU holding it.

    ``models``/``methods``: names or comma strings; ``setup``: any TrainSpec field
    (``seq_len=4096``, ``lora_r=16``, ...). ``.to_pandas()`` gives one row per cell.
    """
    from vramplan.profiles import load_calibration, load_gpus, load_model
    from vramplan.report.tables import memory_table
    from vramplan.specs import TrainSpec

    models = models.split(",") if isinstance(models, str) else list(models)
    methods = methods.split(",") if isinstance(methods, str) else list(methods)
    train = TrainSpec.from_dict({**setup, "method": methods[0]})
    return memory_table([load_model(m.strip()) for m in models], [m.strip() for m in methods],
                        train, list(load_gpus().values()), load_calibration(calibration))


@dataclass(frozen=True, slots=True)
class Evidence:
    """Measured records joined with fresh estimates."""

    comparisons: tuple[Comparison, ...]

    def to_pandas(self):
        """One row per (record, level): measured and predicted bytes and the relative error."""
        from vramplan.report.evidence import frame

        return frame(self.comparisons)

    def summary(self, by: Sequence[str] = ()):
        """Median and max |error| per level and per group (device, family, method, source)."""
        from vramplan.report.evidence import summary

        return summary(self.to_pandas(), tuple(by))


def evidence(*paths: str | Path, calibration: str = "default") -> Evidence:
    """Compare results files (JSONL written by ``vramplan measure``) with the estimate."""
    from vramplan.profiles import load_calibration
    from vramplan.report.evidence import compare_files

    if not paths:
        from vramplan.specs import SpecError

        raise SpecError("evidence() needs at least one results file")
    return Evidence(tuple(compare_files([Path(p) for p in paths], load_calibration(calibration))))
