"""The tables a study file is made of, as pydantic models: the metrics a trial is judged by and the bounds on them,
the searched parameters of `[space]`, the `[dataset]` of the user's own pictures, and `[champion]`.

The study itself (`StudySpec`) and its loading are in studies.py, the checks across tables in checks.py.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.spec import sources

Direction = Literal["maximize", "minimize"]  # as Optuna takes it
# Metrics a trial can be judged by: the last-epoch-free ones come from the best epoch.
METRICS: dict[str, Direction] = {"val_accuracy": "maximize", "val_loss": "minimize", "parameter_count": "minimize",
           "flops_per_image": "minimize", "latency_ms": "minimize"}
# The metrics a trial has every epoch: what a pruner can judge it on (search/objective.py, search/pruning.py), in
# order of preference.
PRUNED_ON = ("val_accuracy", "val_loss")


class Table(BaseModel):
    """A table of a study file: unknown keys are refused, and a loaded one does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = bool | int | float | str
Condition = dict[str, list[Scalar] | Scalar]


class FloatParam(Table):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None
    when: Condition | None = None


class IntParam(Table):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1
    when: Condition | None = None


class CategoricalParam(Table):
    type: Literal["categorical"]
    choices: list[Scalar | list[int]]
    when: Condition | None = None


Param = FloatParam | IntParam | CategoricalParam
SearchParam = Annotated[Param, Field(discriminator="type")]


def active(param: Param, chosen: dict[str, Any]) -> bool:
    """Whether a conditional parameter exists given the values chosen so far."""
    for other, allowed in (param.when or {}).items():
        options = allowed if isinstance(allowed, list) else [allowed]
        if chosen.get(other) not in options:
            return False
    return True


class Objective(Table):
    metric: str = "val_accuracy"
    direction: Direction | None = None


class Bound(Table):
    """`{ max = ... }`, `{ min = ... }` or both: the values a metric may take."""

    min: float | None = None
    max: float | None = None

    def excess(self, value: float) -> float:
        """How far `value` lies outside the bound (0 or less: inside), as Optuna's constraints want it."""
        return max(self.min - value if self.min is not None else -math.inf,
                   value - self.max if self.max is not None else -math.inf)

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + ([f"<= {self.max:g}"] if self.max is not
                                                                           None else [])
        return " and ".join(parts)


class DatasetTable(Table):
    """`[dataset]`: the user's own pictures (see sources.FolderSource for the meaning of each key)."""

    path: str
    image_size: int = Field(64, ge=4, le=1024)
    channels: sources.Channels = "auto"
    csv: str | None = None
    test_fraction: float = Field(0.1, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    skip_unreadable: bool = False
    max_megapixels: float = Field(sources.DEFAULT_MAX_MEGAPIXELS, gt=0)
    follow_links: bool = False


class ChampionTable(Table):
    """`[champion]`: after the search, the best `top_k` distinct configurations are trained again until each has
    `seeds` runs (the search's own run is one), within `minutes`; the champion is the best mean (champion.py)."""

    top_k: int = Field(3, ge=1, le=20)
    seeds: int = Field(3, ge=2, le=20)  # one run per candidate would be the search's own: nothing confirmed
    minutes: float = Field(12.0, gt=0)


class ParetoTable(Table):
    """`[champion]` of a multi-objective study: which trial of the Pareto front is the champion.

    Among the front's trials within `limits` (metric -> bound) and within `within` (metric -> distance from the
    front's best value of that metric, in its own units: 0.001 is 0.1 points of accuracy), the best by `prefer`.
    "The most accurate with latency_ms at most 2": prefer = "val_accuracy", limits = { latency_ms = { max = 2 } }.
    "The smallest within 0.1 points of the best accuracy": prefer = "parameter_count",
    within = { val_accuracy = 0.001 }.
    """

    prefer: str
    within: dict[str, float] = {}
    limits: dict[str, Bound] = {}
