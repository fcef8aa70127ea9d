"""Study files (`studies/<name>.toml`): load, validate, and turn into Optuna distributions.

A study file is declarative: what is searched, what is fixed, the budgets, the sampler and pruner,
and baseline trials to try first. It holds no code. Every problem is found when the file is
loaded, before anything runs, and reported in one line naming the file, the key, what was found
and what is allowed (`StudyError`, exit 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data import datasets
from pipeline.spec import hparams, sources
from pipeline.spec.errors import BadInput, ParamError
from pipeline.spec.hparams import check_value
from pipeline.spec.paths import STUDIES_DIR

SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")
PRUNERS = ("hyperband", "median", "none")
# Metrics a trial can be judged by: the last-epoch-free ones come from the best epoch.
METRICS = {"val_accuracy": "maximize", "val_loss": "minimize", "parameter_count": "minimize",
           "flops_per_image": "minimize", "latency_ms": "minimize"}
# The metrics a trial has every epoch: what a pruner can judge it on (search.py, pruning.py), in order of preference.
PRUNED_ON = ("val_accuracy", "val_loss")


# FRESH=1 names a study's versions <name>-v2, -v3...: a study file may not be named like one.
VERSION_SUFFIX = re.compile(r"-v(\d+)$")
# A study file nests a few levels ([space] -> a parameter -> its choices -> a list choice); far deeper is no study.
MAX_NESTING = 32


class StudyError(BadInput):
    """A study file is missing, malformed or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = bool | int | float | str
Condition = dict[str, list[Scalar] | Scalar]


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None
    when: Condition | None = None


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1
    when: Condition | None = None


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Scalar | list[int]]
    when: Condition | None = None


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(_Strict):
    metric: str = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = None


class DatasetTable(_Strict):
    """`[dataset]`: the user's own pictures (see sources.FolderSource for the meaning of each key)."""

    path: str
    image_size: int = Field(64, ge=4, le=1024)
    channels: Literal[sources.CHANNELS] = "auto"
    csv: str | None = None
    test_fraction: float = Field(0.1, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    skip_unreadable: bool = False
    max_megapixels: float = Field(sources.DEFAULT_MAX_MEGAPIXELS, gt=0)
    follow_links: bool = False


class ChampionTable(_Strict):
    """`[champion]`: after the search, the best `top_k` distinct configurations are trained again until each has
    `seeds` runs (the search's own run is one), within `minutes`; the champion is the best mean (champion.py)."""

    top_k: int = Field(3, ge=1, le=20)
    seeds: int = Field(3, ge=2, le=20)  # one run per candidate would be the search's own: nothing confirmed
    minutes: float = Field(12.0, gt=0)


class Bound(_Strict):
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


class ParetoTable(_Strict):
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


class StudySpec(_Strict):
    name: str
    description: str = ""
    dataset: str | DatasetTable
    model: str
    objectives: list[Objective] = Field([Objective()], min_length=1)
    trials: int = Field(20, ge=1)
    timeout_minutes: float = Field(30.0, gt=0)
    seed: int = Field(0, ge=0)
    sampler: str = "tpe"
    pruner: str = "hyperband"
    epochs: int = Field(5, ge=1, le=1000)
    val_size: int | None = Field(sources.DEFAULT_VAL_SIZE, ge=1)  # folders: None unless set, their val_fraction decides
    train_limit: int | None = Field(None, ge=1)
    val_limit: int | None = Field(None, ge=1)
    fixed: dict[str, Any] = {}
    space: dict[str, SearchParam] = {}
    baseline: list[dict[str, Any]] = []
    # Neither is part of the search definition: a changed [champion] adds runs or picks another trial, nothing else.
    champion: ChampionTable | ParetoTable | None = None
    constraints: dict[str, Bound] = {}  # metric -> bound; a trial outside one is infeasible (Optuna's constraints)

    @model_validator(mode="after")
    def _fill_directions(self) -> StudySpec:
        if isinstance(self.dataset, DatasetTable) and "val_size" not in self.model_fields_set:
            object.__setattr__(self, "val_size", None)
        for objective in self.objectives:
            if objective.direction is None and objective.metric in METRICS:
                object.__setattr__(objective, "direction", METRICS[objective.metric])
        return self

    @property
    def data(self) -> str | sources.FolderSource:
        """What data.prepare takes: a built-in dataset's name, or the folder source."""
        return dataset_ref(self.dataset.model_dump() if isinstance(self.dataset, DatasetTable) else self.dataset)

    @property
    def dataset_label(self) -> str:
        return self.dataset if isinstance(self.dataset, str) else self.data.name

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def confirmation(self) -> ChampionTable | None:
        """The champion phase over seeds (a single-objective study's [champion]), if declared."""
        return self.champion if isinstance(self.champion, ChampionTable) else None

    @property
    def pareto_choice(self) -> ParetoTable | None:
        """How a multi-objective study picks its champion from the Pareto front, if declared."""
        return self.champion if isinstance(self.champion, ParetoTable) else None

    @property
    def measures_latency(self) -> bool:
        """Does anything read a trial's latency_ms (an objective, a constraint, the champion's choice)?"""
        choice = self.pareto_choice
        used = {*self.metrics, *self.constraints, *((choice.prefer, *choice.within, *choice.limits) if choice else ())}
        return "latency_ms" in used

    def search_definition(self) -> dict[str, Any]:
        """Everything that defines the search; budgets, description and baselines are left out."""
        definition = self.model_dump(include={"dataset", "model", "objectives", "seed", "sampler", "pruner", "epochs",
                                              "val_size", "train_limit", "val_limit", "fixed", "space"})
        if isinstance(self.dataset, DatasetTable) and not self.dataset.follow_links:
            del definition["dataset"]["follow_links"]  # only when set: folder studies made before it keep theirs
        if self.constraints:  # only then: studies made before constraints existed keep their fingerprint
            definition["constraints"] = {k: b.model_dump() for k, b in self.constraints.items()}
        return definition

    def fingerprint(self) -> str:
        """Hash of the search definition: a study whose file changed it needs FRESH=1."""
        return hashlib.sha256(json.dumps(self.search_definition(), sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from e.g. (study seed, trial number): same parts, same seed, any machine.

    Every seed of a study (its trials', its samplers') derives from the study file's `seed` this way.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def with_overrides(spec: StudySpec, **overrides: Any) -> StudySpec:
    """The spec with command-line overrides (trials, timeout_minutes, epochs, subsets) applied; None: the file's."""
    update = {k: v for k, v in overrides.items() if v is not None}
    if not update:
        return spec
    try:  # validated like the file itself: TRIALS=0 or EPOCHS=-1 is refused, not searched
        return StudySpec.model_validate({**spec.model_dump(), **update})
    except ValidationError as exc:
        raise StudyError(f"studies/{spec.name}.toml with the command line's override: {_describe(exc)}") from None


def dataset_ref(recorded: str | dict) -> str | sources.FolderSource:
    """A study's (or a recorded definition's) dataset as data.prepare takes it."""
    return recorded if isinstance(recorded, str) else sources.FolderSource(**recorded)


# --------------------------------------------------------------------------------------------------
# Loading and validation


def study_path(name: str, directory: Path = STUDIES_DIR) -> Path:
    return Path(directory) / f"{name}.toml"


def available(directory: Path = STUDIES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load(name_or_path: str | Path, directory: Path = STUDIES_DIR) -> StudySpec:
    """Load and fully validate a study by name (`cnn`) or path; StudyError names what is wrong."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = study_path(str(name_or_path), directory)
    if not path.is_file():
        names = ", ".join(available(path.parent)) or "none"
        raise StudyError(f"no study {path.stem!r} ({path} does not exist); available studies: {names}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale says
    except UnicodeDecodeError as exc:
        raise StudyError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: malformed TOML: {exc}; fix the syntax") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise StudyError(f"{path}: arrays or inline tables nested too deeply to parse (far more than "
                         f"{MAX_NESTING} levels); a study file needs a few, flatten them") from None
    too_deep = _nested_too_deeply(raw)
    if too_deep:
        raise StudyError(f"{path}: {too_deep}: nested more than {MAX_NESTING} levels deep; a study file needs a "
                         "few, flatten it")
    raw.setdefault("name", path.stem)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"{path}: {_describe(exc)}") from None
    try:
        _check(spec, path)
    except ParamError as exc:
        raise StudyError(str(exc)) from None
    return spec


def _nested_too_deeply(raw: dict) -> str | None:
    """The key of a value nested deeper than MAX_NESTING, or None. Dotted keys (`a.b.c = 1`) nest tables without
    recursion in the parser; this check does not recurse either, and after it nothing recurses that deep."""
    pending: list[tuple[object, str, int]] = [(raw, "", 0)]
    while pending:
        value, key, depth = pending.pop()
        if depth > MAX_NESTING:
            return key if len(key) <= 60 else key[:60] + "..."
        if isinstance(value, dict):
            pending.extend((item, f"{key}.{name}" if key else str(name), depth + 1) for name, item in value.items())
        elif isinstance(value, list):
            pending.extend((item, f"{key}[{index}]", depth + 1) for index, item in enumerate(value))
    return None


def _describe(exc: ValidationError) -> str:
    """The first pydantic error as `key: found X; expected Y`."""
    errors = exc.errors()
    # `dataset` is a name or a table: for a table, the table's own error says more than "not a string".
    error = next((e for e in errors if "str" not in e["loc"][1:]), errors[0])
    loc = [str(part) for part in error["loc"] if not str(part).endswith(("Param", "Table")) and part not in
           ("float", "int", "categorical")]
    key = ".".join(loc) or "(file)"
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}; remove it or check the spelling (the README's \"Searching\" lists the keys)"
    if error["type"] == "missing":
        return f"missing key {key!r}; add it"
    found = error.get("input")
    return f"{key} = {found!r}: {error['msg']}"


def _check(spec: StudySpec, path: Path) -> None:
    """Cross-field checks pydantic cannot express; raise ParamError with the file and key."""
    where = str(path)

    def fail(key: str, message: str) -> None:
        raise ParamError(f"{where}: {key}: {message}")

    if spec.name != path.stem:
        fail("name", f"is {spec.name!r} but the file is {path.name}; make them the same")
    if VERSION_SUFFIX.search(spec.name):
        renamed = VERSION_SUFFIX.sub(r"-\1", spec.name)
        fail("name", f"{spec.name!r} ends like a study version (FRESH=1 makes cnn-v2, version 2 of cnn); "
                     f"rename the file, e.g. {renamed}.toml")
    if ":" in spec.name:
        fail("name", f"{spec.name!r} holds a ':', which names a study's champion phase in the store "
                     f"(cnn:champion); rename the file without it")
    builtin = [*datasets.DATASETS, *sources.CIFAR_DATASETS]  # the IDX registry may hold more (tests, users)
    if isinstance(spec.dataset, str) and spec.dataset not in builtin:
        fail("dataset", f"{spec.dataset!r} is not one of {', '.join(builtin)}; or give your own pictures "
                        "as a [dataset] table with path = \"...\" (README: Your own images)")
    if spec.model not in hparams.FAMILIES:
        fail("model", f"{spec.model!r} is not one of {', '.join(hparams.FAMILIES)}")
    if spec.sampler not in SAMPLERS:
        fail("sampler", f"{spec.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if spec.pruner not in PRUNERS:
        fail("pruner", f"{spec.pruner!r} is not one of {', '.join(PRUNERS)}")
    for i, objective in enumerate(spec.objectives):
        if objective.metric not in METRICS:
            fail(f"objectives[{i}].metric", f"{objective.metric!r} is not one of {', '.join(METRICS)}")
    if len(spec.objectives) > 1 and spec.sampler not in ("nsga2", "tpe", "random"):
        fail("sampler", f"{spec.sampler!r} is single-objective; use nsga2, tpe or random for several objectives")
    several = len(spec.objectives) > 1
    if several and spec.pruner == "hyperband":
        fail("pruner", "Hyperband's brackets need Optuna's single-objective reports; a multi-objective study prunes "
                       "with \"median\" (on its accuracy objective) or \"none\"")
    if several and spec.pruner != "none" and not set(spec.metrics) & set(PRUNED_ON):
        fail("pruner", f"prunes on a validation objective ({' or '.join(PRUNED_ON)}), which this study does not "
                       "have; add one or set pruner = \"none\"")
    if len(set(spec.metrics)) < len(spec.metrics):
        fail("objectives", f"{spec.metrics} names a metric twice; list each once")
    for metric, bound in spec.constraints.items():
        _check_bound("constraints", metric, bound, fail)
    if spec.confirmation is not None and (several or spec.metrics[0] not in PRUNED_ON):
        fail("champion", "with top_k/seeds/minutes confirms a single validation objective (val_accuracy or val_loss) "
                         "over seeds; a multi-objective study's [champion] sets prefer (and within, limits) instead")
    if spec.pareto_choice is not None:
        _check_pareto_choice(spec, spec.pareto_choice, fail)
    if spec.dataset in sources.IDX_DATASETS and spec.val_size >= 60000:
        fail("val_size", f"{spec.val_size} leaves no training images; use fewer than 60000")
    if spec.dataset in sources.CIFAR_DATASETS and spec.val_size >= 50000:
        fail("val_size", f"{spec.val_size} leaves no training images; use fewer than 50000")

    specs = hparams.PARAM_SPECS
    for key in ("model", "epochs"):
        if key in spec.fixed or (key in spec.space and key != "model"):
            fail(f"fixed.{key}" if key in spec.fixed else f"space.{key}",
                 f"set {key!r} at the top level of the study file, not here")
    # Families can compete in one study: `model` may be a categorical of [space] (the top-level one is then
    # only what `make train STUDY=...` falls back to); their own keys carry `when = { model = ... }`.
    if "model" in spec.space and not isinstance(spec.space["model"], CategoricalParam):
        fail("space.model", "must be categorical, e.g. { type = \"categorical\", choices = [\"cnn\", \"resnet18\"] }")
    for key, value in spec.fixed.items():
        if key not in specs:
            fail(f"fixed.{key}", f"unknown parameter; allowed: {', '.join(sorted(specs))}")
        check_value(key, specs[key], value, f"{where}: fixed")
    for key, param in spec.space.items():
        if key not in specs:
            fail(f"space.{key}", f"unknown parameter; allowed: {', '.join(sorted(specs))}")
        if key in spec.fixed:
            fail(f"space.{key}", "is also in [fixed]; a parameter is either searched or fixed")
        _check_search_param(key, param, specs[key], fail, where)
    for key, param in spec.space.items():
        for other, allowed in (param.when or {}).items():
            if other not in spec.space or not isinstance(spec.space[other], CategoricalParam):
                fail(f"space.{key}.when", f"{other!r} must be a categorical parameter of [space]")
            for value in allowed if isinstance(allowed, list) else [allowed]:
                if value not in spec.space[other].choices:
                    choices = spec.space[other].choices
                    fail(f"space.{key}.when.{other}", f"{value!r} is not one of its choices {choices}")
    for i, baseline in enumerate(spec.baseline):
        _check_baseline(spec, i, baseline, fail)


def _check_bound(table: str, metric: str, bound: Bound, fail: Any) -> None:
    if metric not in METRICS:
        fail(f"{table}.{metric}", f"is not a metric; use one of {', '.join(METRICS)}")
    if bound.min is None and bound.max is None:
        fail(f"{table}.{metric}", "sets no bound; write { max = ... } or { min = ... }")
    if bound.min is not None and bound.max is not None and bound.min > bound.max:
        fail(f"{table}.{metric}", f"min = {bound.min:g} is above max = {bound.max:g}; swap them")


def _check_pareto_choice(spec: StudySpec, choice: ParetoTable, fail: Any) -> None:
    """A multi-objective [champion]: `prefer`, `within` and `limits` name metrics the trials record."""
    if len(spec.objectives) == 1:
        fail("champion.prefer", "picks from a Pareto front, which a single-objective study does not have; use "
                                "top_k/seeds/minutes (the champion over seeds) or remove [champion]")
    if choice.prefer not in METRICS:
        fail("champion.prefer", f"{choice.prefer!r} is not one of {', '.join(METRICS)}")
    for metric, distance in choice.within.items():
        if metric not in METRICS:
            fail(f"champion.within.{metric}", f"is not a metric; use one of {', '.join(METRICS)}")
        if not distance >= 0:
            fail(f"champion.within.{metric}", f"= {distance:g}: a distance from the best must be >= 0")
    for metric, bound in choice.limits.items():
        _check_bound("champion.limits", metric, bound, fail)


def _check_search_param(key: str, param: Any, param_spec: Any, fail: Any, where: str) -> None:
    if isinstance(param, CategoricalParam):
        if not param.choices:
            fail(f"space.{key}.choices", "is empty; list at least one value")
        for choice in param.choices:
            check_value(key, param_spec, choice, f"{where}: space.{key}.choices")
        return
    if not param.low < param.high:
        fail(f"space.{key}", f"low = {param.low} must be below high = {param.high}")
    if param.log and param.low <= 0:
        fail(f"space.{key}.low", f"= {param.low}: a log range must be > 0")
    if param.log and isinstance(param, FloatParam) and param.step is not None:
        fail(f"space.{key}.step", "cannot be combined with log = true")
    if param.log and isinstance(param, IntParam) and param.step != 1:
        fail(f"space.{key}.step", f"= {param.step} cannot be combined with log = true (Optuna samples a log range "
                                  "in steps of 1); drop one of them")
    if param.step is not None and param.step <= 0:
        fail(f"space.{key}.step", f"= {param.step} must be > 0")
    for bound in ("low", "high"):
        check_value(key, param_spec, getattr(param, bound), f"{where}: space.{key}.{bound}")


def _check_baseline(spec: StudySpec, i: int, baseline: dict[str, Any], fail: Any) -> None:
    for key, value in baseline.items():
        if key not in spec.space:
            fail(f"baseline[{i}].{key}", "is not in [space]; a baseline sets searched parameters only")
        param = spec.space[key]
        if isinstance(param, CategoricalParam):
            if value not in param.choices:
                fail(f"baseline[{i}].{key}", f"= {value!r} is not one of {param.choices}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not param.low <= value <= param.high:
            fail(f"baseline[{i}].{key}", f"= {value!r} is outside [{param.low}, {param.high}]")
        elif isinstance(param, IntParam) and not isinstance(value, int):
            fail(f"baseline[{i}].{key}", f"= {value!r} must be an integer")
    for key, param in spec.space.items():
        if key not in baseline and active(param, baseline):
            fail(f"baseline[{i}]", f"misses {key!r}; a baseline must set every active searched parameter")


def active(param: Any, chosen: dict[str, Any]) -> bool:
    """Whether a conditional parameter exists given the values chosen so far."""
    for other, allowed in (param.when or {}).items():
        options = allowed if isinstance(allowed, list) else [allowed]
        if chosen.get(other) not in options:
            return False
    return True
