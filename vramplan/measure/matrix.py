"""Validation matrices: TOML files listing the cases to measure (standard library only, no torch).

```toml
name = "cpu-ci"
description = "..."
[defaults]                 # any TrainSpec field, plus warmup_steps, measured_steps, model, build
warmup_steps = 1
measured_steps = 1
[[case]]
id = "llama-tiny-qlora-ckpt-s256"                  # unique
model = "validation/configs/llama-tiny.json"       # path (relative to the repo root) or profile name
method = "qlora"
build = "pretrained"                               # or "streaming" (meta skeleton, quantised on device)
```
Every problem raises :class:`~vramplan.specs.SpecError` naming the case.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vramplan.specs import SpecError, TrainSpec

BUILDS = ("pretrained", "streaming")
TOP_KEYS = ("name", "description", "defaults", "case")
_TRAIN_DEFAULTS = TrainSpec()
TRAIN_KEYS = tuple(f.name for f in fields(TrainSpec))
CASE_KEYS = ("id", "model", "build", "warmup_steps", "measured_steps", "timed_steps") + TRAIN_KEYS


@dataclass(frozen=True, slots=True)
class Case:
    """One measurement: a model ref, a training setup and how many steps to run."""

    id: str
    model: str
    train: TrainSpec
    warmup_steps: int = 1
    measured_steps: int = 1
    build: str = "pretrained"
    #: steps timed without the memory probe after the measured ones (None: 3 on CUDA, 0 on CPU)
    timed_steps: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what the runner hands to the worker)."""
        return {"case_id": self.id, "model": self.model, "setup": self.train.as_dict(),
                "warmup_steps": self.warmup_steps, "measured_steps": self.measured_steps,
                "timed_steps": self.timed_steps, "build": self.build}


@dataclass(frozen=True, slots=True)
class Matrix:
    """A named list of cases loaded from a TOML file."""

    name: str
    description: str
    cases: list[Case]
    path: str = ""


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file; raises SpecError with the case id on any problem."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read matrix ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML ({exc})") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise SpecError(f"{path}: unknown top-level key(s) {', '.join(unknown)}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SpecError(f"{path}: [defaults] must be a table")
    _check_keys(defaults, "[defaults]", allow_id=False)
    raw_cases = data.get("case", [])
    if not isinstance(raw_cases, list) or not raw_cases:
        raise SpecError(f"{path}: no [[case]] entries")
    cases = [parse_case({**defaults, **raw}, i) for i, raw in enumerate(raw_cases, 1)]
    _check_unique(cases, path)
    return Matrix(name=str(data.get("name") or path.stem), description=str(data.get("description", "")),
                  cases=cases, path=str(path))


def parse_case(raw: dict[str, Any], index: int = 0) -> Case:
    """One case from its merged table (defaults already applied)."""
    case_id = raw.get("id")
    if not isinstance(case_id, str) or not case_id.strip():
        raise SpecError(f"case #{index}: needs an 'id' (a non-empty string)")
    where = f"case {case_id!r}"
    _check_keys(raw, where, allow_id=True)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError(f"{where}: needs a 'model' (config path or profile name)")
    build = raw.get("build", "pretrained")
    if build not in BUILDS:
        raise SpecError(f"{where}: build {build!r} is not one of: {', '.join(BUILDS)}")
    warmup = _int(raw.get("warmup_steps", 1), "warmup_steps", where, minimum=0)
    measured = _int(raw.get("measured_steps", 1), "measured_steps", where, minimum=1)
    timed = None if raw.get("timed_steps") is None else \
        _int(raw["timed_steps"], "timed_steps", where, minimum=0)
    setup = {k: _check_type(k, v, where) for k, v in raw.items() if k in TRAIN_KEYS}
    try:
        train = TrainSpec(**setup)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return Case(id=case_id, model=model, train=train, warmup_steps=warmup,
                measured_steps=measured, build=build, timed_steps=timed)


def _check_keys(table: dict[str, Any], where: str, allow_id: bool) -> None:
    """Reject keys that are neither case fields nor TrainSpec fields."""
    allowed = set(CASE_KEYS) - (set() if allow_id else {"id"})
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(allowed))}")


def _check_type(key: str, value: Any, where: str) -> Any:
    """The value, if it has the type of the TrainSpec default (an int may stand for a float)."""
    expected = type(getattr(_TRAIN_DEFAULTS, key))
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise SpecError(f"{where}: {key} must be {expected.__name__}, got {value!r}")
    return float(value) if expected is float else value


def _int(value: Any, key: str, where: str, minimum: int) -> int:
    """An integer step count >= minimum (bools refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_unique(cases: list[Case], path: Path) -> None:
    """Case ids must be unique within a matrix."""
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise SpecError(f"{path}: duplicate case id {case.id!r}")
        seen.add(case.id)


def select(cases: list[Case], only: list[str] | str | None) -> list[Case]:
    """Cases whose id matches one of ``only`` (ids or fnmatch globs; a string may be a comma list)."""
    if not only:
        return list(cases)
    from fnmatch import fnmatchcase

    patterns = [p.strip() for p in (only.split(",") if isinstance(only, str) else only) if p.strip()]
    return [c for c in cases if any(fnmatchcase(c.id, p) for p in patterns)]
