"""The one tiny study file the CLI tests search: `study_toml(**overrides)` writes it as TOML.

The defaults are a two-parameter CNN search on the tiny IDX dataset (tests/conftest.py) that trains in
seconds. A test states only what it varies:

    study_toml(trials=2, sampler="random")                      top-level keys replace (None removes one)
    study_toml(fixed={"precision": "fp32", "head": None})        [fixed] and [space] merge (None removes a key)
    study_toml(baseline=[{"lr": 1e-5}], dataset={"path": ...})   lists and tables replace

Key order is kept (defaults first, new keys after them): the space's order is the order Optuna samples in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOP = {
    "description": "tiny study for tests",
    "dataset": "tiny",
    "model": "cnn",
    "trials": 3,
    "timeout_minutes": 10,
    "seed": 7,
    "sampler": "tpe",
    "pruner": "median",
    "epochs": 1,
    "val_size": 100,
}
FIXED = {"cnn_channels": [8, 16], "pool": "every", "head": "gap", "head_units": 0, "batch_size": 50}
SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
}
BASELINE = [{"lr": 3e-3, "dropout": 0.1}]

MERGED = ("fixed", "space")  # tables whose keys merge with the defaults' rather than replace them


def study(**overrides: Any) -> dict[str, Any]:
    """The study file's content as a dict: the defaults with `overrides` applied."""
    content: dict[str, Any] = {**TOP, "fixed": FIXED, "space": SPACE, "baseline": BASELINE}
    for key, value in overrides.items():
        if key in MERGED and value is not None:
            value = {**content[key], **value}
        content[key] = value
    return {key: _pruned(key, value) for key, value in content.items() if value is not None}


def _pruned(key: str, value: Any) -> Any:
    return {k: v for k, v in value.items() if v is not None} if key in MERGED else value


def study_toml(**overrides: Any) -> str:
    """The study file's text (see the module's docstring for the overrides)."""
    content = study(**overrides)
    plain = [f"{key} = {_value(value)}" for key, value in content.items() if not _is_table(value)]
    lines = [*plain]
    for key, value in content.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *(f"{k} = {_value(v)}" for k, v in value.items())]
        elif _is_table(value):
            for item in value:
                lines += ["", f"[[{key}]]", *(f"{k} = {_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def write_study(directory: Path, name: str = "tiny", **overrides: Any) -> Path:
    """`directory/<name>.toml` with the tiny study (plus overrides) in it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(study_toml(**overrides))
    return path


def _is_table(value: Any) -> bool:
    """A [table] or an [[array of tables]] (written after the plain keys, as TOML requires)."""
    return isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                        and all(isinstance(v, dict) for v in value))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")
