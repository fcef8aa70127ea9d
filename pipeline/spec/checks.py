"""The checks across a study file's tables that pydantic cannot express: names, what each key may name, how
objectives, pruner and [champion] fit together, [fixed] and [space] against the parameters, baselines.

Each check raises ParamError naming the file and the key (`StudyError` once `studies.load` has it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.spec import hparams, sources
from pipeline.spec.errors import ParamError
from pipeline.spec.hparams import check_value
from pipeline.spec.tables import (
    METRICS,
    PRUNED_ON,
    Bound,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    ParetoTable,
    active,
)

if TYPE_CHECKING:  # studies.py imports this module to check what it loads
    from pipeline.spec.studies import StudySpec

SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")
PRUNERS = ("hyperband", "median", "none")
# FRESH=1 names a study's versions <name>-v2, -v3...: a study file may not be named like one.
VERSION_SUFFIX = re.compile(r"-v(\d+)$")

Fail = Callable[[str, str], NoReturn]  # fail(key, message): the file's one-line error about that key


def check_study(spec: StudySpec, path: Path) -> None:
    """Cross-field checks pydantic cannot express; raise ParamError with the file and key."""
    where = str(path)

    def fail(key: str, message: str) -> NoReturn:
        raise ParamError(f"{where}: {key}: {message}")

    _check_name(spec, path, fail)
    _check_choices(spec, fail)
    _check_objectives(spec, fail)
    _check_val_size(spec, fail)
    _check_parameters(spec, fail, where)
    _check_conditions(spec, fail)
    for i, baseline in enumerate(spec.baseline):
        _check_baseline(spec, i, baseline, fail)


def _check_name(spec: StudySpec, path: Path, fail: Fail) -> None:
    if spec.name != path.stem:
        fail("name", f"is {spec.name!r} but the file is {path.name}; make them the same")
    if VERSION_SUFFIX.search(spec.name):
        renamed = VERSION_SUFFIX.sub(r"-\1", spec.name)
        fail("name", f"{spec.name!r} ends like a study version (FRESH=1 makes cnn-v2, version 2 of cnn); "
                     f"rename the file, e.g. {renamed}.toml")
    if ":" in spec.name:
        fail("name", f"{spec.name!r} holds a ':', which names a study's champion phase in the store "
                     f"(cnn:champion); rename the file without it")


def _check_choices(spec: StudySpec, fail: Fail) -> None:
    """The dataset, model, sampler, pruner and metrics are ones the pipeline has."""
    builtin = sources.builtin_names()
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


def _check_objectives(spec: StudySpec, fail: Fail) -> None:
    """Several objectives need a sampler and pruner that handle them; constraints and [champion] fit the study."""
    several = len(spec.objectives) > 1
    if several and spec.sampler not in ("nsga2", "tpe", "random"):
        fail("sampler", f"{spec.sampler!r} is single-objective; use nsga2, tpe or random for several objectives")
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


def _check_val_size(spec: StudySpec, fail: Fail) -> None:
    """The validation images carved from a built-in dataset leave some to train on."""
    if spec.val_size is None:  # a folder's: its val_fraction decides
        return
    if spec.dataset in sources.IDX_DATASETS and spec.val_size >= 60000:
        fail("val_size", f"{spec.val_size} leaves no training images; use fewer than 60000")
    if spec.dataset in sources.CIFAR_DATASETS and spec.val_size >= 50000:
        fail("val_size", f"{spec.val_size} leaves no training images; use fewer than 50000")


def _check_parameters(spec: StudySpec, fail: Fail, where: str) -> None:
    """[fixed] and [space] name known parameters, each in one of them, with values the parameter allows."""
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


def _check_conditions(spec: StudySpec, fail: Fail) -> None:
    """A `when` names categorical parameters of [space] and values among their choices."""
    for key, param in spec.space.items():
        for other, allowed in (param.when or {}).items():
            condition = spec.space.get(other)
            if not isinstance(condition, CategoricalParam):
                fail(f"space.{key}.when", f"{other!r} must be a categorical parameter of [space]")
            for value in allowed if isinstance(allowed, list) else [allowed]:
                if value not in condition.choices:
                    fail(f"space.{key}.when.{other}", f"{value!r} is not one of its choices {condition.choices}")


def _check_bound(table: str, metric: str, bound: Bound, fail: Fail) -> None:
    if metric not in METRICS:
        fail(f"{table}.{metric}", f"is not a metric; use one of {', '.join(METRICS)}")
    if bound.min is None and bound.max is None:
        fail(f"{table}.{metric}", "sets no bound; write { max = ... } or { min = ... }")
    if bound.min is not None and bound.max is not None and bound.min > bound.max:
        fail(f"{table}.{metric}", f"min = {bound.min:g} is above max = {bound.max:g}; swap them")


def _check_pareto_choice(spec: StudySpec, choice: ParetoTable, fail: Fail) -> None:
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


def _check_search_param(key: str, param: Param, param_spec: hparams.Spec, fail: Fail, where: str) -> None:
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


def _check_baseline(spec: StudySpec, i: int, baseline: dict[str, Any], fail: Fail) -> None:
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
