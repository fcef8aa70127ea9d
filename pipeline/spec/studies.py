"""Study files (`studies/<name>.toml`): the study (`StudySpec`), loading and validating it, its fingerprint.

A study file is declarative: what is searched, what is fixed, the budgets, the sampler and pruner,
and baseline trials to try first. It holds no code. Every problem is found when the file is
loaded, before anything runs, and reported in one line naming the file, the key, what was found
and what is allowed (`StudyError`, exit 2). The tables it is made of are in tables.py, the checks across
them in checks.py; the space as a trial samples it in space.py.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from pipeline.spec import sources
from pipeline.spec.checks import check_study
from pipeline.spec.errors import BadInput, ParamError
from pipeline.spec.paths import STUDIES_DIR
from pipeline.spec.tables import (
    METRICS,
    PRUNED_ON,
    Bound,
    ChampionTable,
    DatasetTable,
    Direction,
    Objective,
    ParetoTable,
    SearchParam,
    Table,
)

# A study file nests a few levels ([space] -> a parameter -> its choices -> a list choice); far deeper is no study.
MAX_NESTING = 32
DEFAULT_TRIALS = 20  # an unplanned study's trials when its file does not say


class StudyError(BadInput):
    """A study file is missing, malformed or invalid."""


class StudySpec(Table):
    name: str
    description: str = ""
    dataset: str | DatasetTable
    model: str
    objectives: list[Objective] = Field([Objective()], min_length=1)
    # `minutes` set: the whole run (search, champion phase, report) is planned to it on this machine (search/plan.py),
    # `trials` is then only a cap. Unset: the budget of studies made before it, `trials` (20 unless set) and
    # `timeout_minutes` (no trial starts after it), with the [champion] phase's own minutes after.
    minutes: float | None = Field(None, gt=0, le=7 * 24 * 60)
    trials: int | None = Field(None, ge=1)
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
        if self.minutes is not None:
            if len(self.objectives) > 1 or self.objectives[0].metric not in PRUNED_ON:
                raise ValueError(f"minutes plans a study of one validation objective ({' or '.join(PRUNED_ON)}); "
                                 "budget this one with trials and timeout_minutes instead")
            if self.champion is None:  # a planned run ends by training its best at full fidelity
                object.__setattr__(self, "champion", ChampionTable(top_k=2, seeds=2, minutes=12.0))
        return self

    @property
    def planned(self) -> bool:
        """Is the run planned to the study's `minutes` (else budgeted by trials and timeout_minutes)?"""
        return self.minutes is not None

    @property
    def trial_budget(self) -> int:
        """The trials an unplanned study runs: `trials`, 20 when the file does not say."""
        return self.trials if self.trials is not None else DEFAULT_TRIALS

    @property
    def data(self) -> sources.DatasetRef:
        """What data.prepare takes: a built-in dataset's name, or the folder source."""
        return dataset_ref(self.dataset)

    @property
    def dataset_label(self) -> str:
        return sources.dataset_label(self.data)

    @property
    def directions(self) -> list[Direction]:
        """Each objective's direction: the file's, else its metric's (every metric of a loaded study has one)."""
        return [o.direction or METRICS[o.metric] for o in self.objectives]

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
        if self.planned:  # rungs of complete short runs, not one fidelity: a search of its own (not its minutes)
            definition["planned"] = True
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


def dataset_ref(dataset: str | dict | DatasetTable) -> sources.DatasetRef:
    """A study's dataset (or a recorded definition's) as data.prepare takes it."""
    if isinstance(dataset, str):
        return dataset
    return sources.FolderSource(**(dataset.model_dump() if isinstance(dataset, DatasetTable) else dataset))


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
        check_study(spec, path)
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


