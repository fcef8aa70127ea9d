"""Typed hyperparameter specs: defaults, allowed values, and one-line errors that name the parameter.

Models and the trainer each declare a table of specs; `resolve` fills defaults and rejects unknown
keys and bad values before anything is built or trained.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ParamError


@dataclass(frozen=True)
class Float:
    default: float | None
    low: float = -math.inf
    high: float = math.inf
    high_open: bool = False  # True for [low, high)
    low_open: bool = False  # True for (low, high]
    help: str = ""

    def expected(self) -> str:
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise ValueError
        return float(value)


@dataclass(frozen=True)
class Int:
    default: int | None
    low: int = 0
    high: int = 2**31 - 1
    help: str = ""

    def expected(self) -> str:
        return f"an integer in [{self.low}, {self.high}]"

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise ValueError
        return value


@dataclass(frozen=True)
class Choice:
    default: Any
    options: tuple
    help: str = ""

    def expected(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) != isinstance(self.options[0], bool) or value not in self.options:
            raise ValueError
        return value


@dataclass(frozen=True)
class IntList:
    """A list of positive integers, e.g. channels per block; empty means "derive it from other keys"."""

    default: tuple[int, ...] = ()
    low: int = 1
    high: int = 4096
    help: str = ""

    def expected(self) -> str:
        return f"a list of integers in [{self.low}, {self.high}]"

    def check(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not self.low <= item <= self.high:
                raise ValueError
        return tuple(value)


def Bool(default: bool, help: str = "") -> Choice:  # noqa: N802 (reads like the other spec types)
    return Choice(default, (False, True), help)


Spec = Float | Int | Choice | IntList


def check_value(name: str, spec: Spec, value: Any, where: str = "parameters") -> Any:
    try:
        return spec.check(value)
    except ValueError:
        raise ParamError(f"{where}: {name} = {value!r} is not allowed; expected {spec.expected()}") from None


def resolve(specs: dict[str, Spec], params: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Defaults overlaid with `params`, every value checked; unknown keys are refused by name."""
    for name in params:
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamError(f"{where}: unknown parameter {name!r}{hint}; allowed: {', '.join(sorted(specs))}")
    resolved = {}
    for name, spec in specs.items():
        value = params.get(name, spec.default)
        resolved[name] = None if value is None else check_value(name, spec, value, where)
    return resolved
