"""Term and Breakdown: every number of an estimate is a named term with its formula and source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

GROUPS = ("weights", "gradients", "optimizer", "activations", "overhead")
#: Phases of one training step at which live memory is evaluated (summed per phase in model/estimate.py).
PHASES = ("layer_forward", "loss_forward", "loss_backward", "recompute_forward", "down_backward",
          "layer_backward", "last_layer_backward", "embedding_backward", "optimizer_step")
ALWAYS = PHASES
LEVELS = ("allocated", "reserved", "device", "paged")


_PHASE_SET = frozenset(PHASES)


@dataclass(frozen=True, slots=True)
class Term:
    """One memory term: bytes, the phases in which it is live, its formula and its source."""

    key: str  # "group.name", stable: used in JSON, goldens and plots
    nbytes: int
    formula: str
    ref: str
    phases: tuple[str, ...] = ALWAYS
    #: The first level that sees it: "allocated" | "reserved" | "device"; "paged" is bitsandbytes
    #: managed memory, counted apart from the three levels.
    level: str = "allocated"

    def __post_init__(self) -> None:
        group = self.key.split(".", 1)[0]
        if group not in GROUPS or "." not in self.key:
            raise ValueError(f"term key {self.key!r} must be '<group>.<name>' with group in {GROUPS}")
        if self.nbytes < 0:
            raise ValueError(f"term {self.key} has negative bytes {self.nbytes}")
        if self.level not in LEVELS:
            raise ValueError(f"term {self.key}: unknown level {self.level!r}")
        unknown = set(self.phases) - _PHASE_SET
        if unknown:
            raise ValueError(f"term {self.key}: unknown phases {sorted(unknown)}")


@dataclass(frozen=True, slots=True)
class Breakdown:
    """The terms of one estimate plus its inputs and notes; totals are always derived."""

    terms: tuple[Term, ...]
    inputs: Mapping[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        keys = [t.key for t in self.terms]
        dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) \
            else []
        if dupes:
            raise ValueError(f"duplicate term keys: {dupes}")

    def term(self, key: str) -> Term | None:
        return next((t for t in self.terms if t.key == key), None)

    def group_bytes(self, prefix: str) -> int:
        """Sum of the terms whose key starts with prefix ("activations" -> activations.*)."""
        return sum(t.nbytes for t in self.terms if t.key == prefix or t.key.startswith(prefix + "."))

    def phase_bytes(self, phase: str, level: str = "allocated") -> int:
        """Bytes live in one phase, counting terms visible at `level` or below."""
        order = ("allocated", "reserved", "device")
        upto = order[: order.index(level) + 1]
        return sum(t.nbytes for t in self.terms if phase in t.phases and t.level in upto)

    def counted(self, peak_phase: str) -> tuple[Term, ...]:
        """The terms in the device total: live in the peak phase, or at the reserved or device
        level. Paged terms (bitsandbytes managed memory) are outside it."""
        return tuple(t for t in self.terms if t.level in ("reserved", "device")
                     or (t.level == "allocated" and peak_phase in t.phases))

    def as_records(self) -> list[dict[str, object]]:
        """Plain dicts, one per term (the JSON/CSV shape)."""
        return [{"key": t.key, "bytes": t.nbytes, "formula": t.formula, "ref": t.ref,
                 "phases": list(t.phases), "level": t.level} for t in self.terms]
