"""hparams.py on its own: the spec types' accepted values and bounds, resolve_params' defaults and refusals (one
line, naming the parameter, what was expected and, for a misspelt key, the likely one), model_params, the classic
presets, and machine_precision (PIPELINE_PRECISION)."""

from __future__ import annotations

import math

import pytest

from pipeline.spec import hparams
from pipeline.spec.errors import BadInput, ParamError
from pipeline.spec.hparams import Choice, Float, Int, IntList

# --------------------------------------------------------------------------------------------------
# The specs


def test_model_and_trainer_keys_are_disjoint():
    assert not hparams.MODEL_SPECS.keys() & hparams.TRAIN_SPECS.keys()  # a merge would hide one of the two


@pytest.mark.parametrize("value, expected", [(0, 0.0), (1, 1.0), (0.25, 0.25)])
def test_float_accepts_ints_and_floats_in_range_and_gives_a_float(value, expected):
    checked = Float(0.5, 0.0, 1.0).check(value)
    assert checked == expected and type(checked) is float


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], math.nan, math.inf, -0.001, 1.001])
def test_float_refuses_bools_text_non_finite_and_out_of_range(value):
    with pytest.raises(ValueError):
        Float(0.5, 0.0, 1.0).check(value)


def test_float_bounds_are_closed_unless_marked_open():
    half_open = Float(0.0, 0.0, 1.0, high_open=True)
    assert half_open.check(0.0) == 0.0 and half_open.expected() == "a number in [0, 1)"
    with pytest.raises(ValueError):
        half_open.check(1.0)
    low_open = Float(1.0, 0.0, 1.0, low_open=True)
    assert low_open.check(1.0) == 1.0 and low_open.expected() == "a number in (0, 1]"
    with pytest.raises(ValueError):
        low_open.check(0.0)
    assert Float(0.0).expected() == "a number in [-inf, inf]"


@pytest.mark.parametrize("value", [1, 16])
def test_int_accepts_its_inclusive_range(value):
    assert Int(2, 1, 16).check(value) == value


@pytest.mark.parametrize("value", [0, 17, 2.0, True, "2"])
def test_int_refuses_out_of_range_floats_bools_and_text(value):
    with pytest.raises(ValueError):
        Int(2, 1, 16).check(value)


def test_choice_is_exact_about_bools():
    flag = hparams.Bool(True)
    assert flag.check(False) is False and flag.check(True) is True
    for not_a_bool in (1, 0, "true"):  # 1 == True in Python: a Bool must still refuse it
        with pytest.raises(ValueError):
            flag.check(not_a_bool)
    named = Choice("relu", ("relu", "gelu"))
    assert named.check("gelu") == "gelu" and named.expected() == "one of 'relu', 'gelu'"
    for wrong in ("RELU", True, None):
        with pytest.raises(ValueError):
            named.check(wrong)


def test_int_list_gives_a_tuple_and_checks_every_item():
    widths = IntList(low=1, high=64)
    assert widths.check([8, 64]) == (8, 64) and widths.check((1,)) == (1,) and widths.check([]) == ()
    for wrong in ([8, 65], [0], [8, True], [8.0], "8,16", 8, None):
        with pytest.raises(ValueError):
            widths.check(wrong)


# --------------------------------------------------------------------------------------------------
# One-line errors that name the parameter and what it takes


def test_check_value_names_where_the_parameter_and_what_is_allowed():
    with pytest.raises(ParamError) as refused:
        hparams.check_value("dropout", hparams.PARAM_SPECS["dropout"], 1.0)
    assert str(refused.value) == "parameters: dropout = 1.0 is not allowed; expected a number in [0, 1)"
    assert isinstance(refused.value, BadInput)  # the CLI's exit 2
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # no ValueError chained on
    with pytest.raises(ParamError, match=r"^fixed: optimizer = 'lion' is not allowed; expected one of 'adam', "
                                         r"'adamw', 'sgd'$"):
        hparams.check_value("optimizer", hparams.PARAM_SPECS["optimizer"], "lion", where="fixed")


@pytest.mark.parametrize("params, message", [
    ({"lr": 0}, "parameters: lr = 0 is not allowed; expected a number in (0, 1e+06]"),
    ({"batch_size": 0}, "parameters: batch_size = 0 is not allowed; expected an integer in [1, 65536]"),
    ({"schedule": "linear"}, "parameters: schedule = 'linear' is not allowed; expected one of 'onecycle', 'cosine', "
                             "'step', 'plateau', 'none'"),
    ({"cnn_channels": [8, 0]}, "parameters: cnn_channels = [8, 0] is not allowed; expected a list of integers in "
                               "[1, 4096]"),
    ({"compile": "yes"}, "parameters: compile = 'yes' is not allowed; expected one of False, True"),
])
def test_resolve_params_refuses_a_bad_value_in_one_line(params, message):
    with pytest.raises(ParamError) as refused:
        hparams.resolve_params(params)
    assert str(refused.value) == message and "\n" not in message


def test_a_misspelt_key_is_refused_with_the_likely_one():
    with pytest.raises(ParamError, match=r"^parameters: unknown parameter 'weight_decy' "
                                         r"\(did you mean 'weight_decay'\?\); allowed: "):
        hparams.resolve_params({"weight_decy": 1})


def test_an_unknown_key_is_refused_with_every_allowed_key_in_order():
    with pytest.raises(ParamError) as refused:
        hparams.resolve_params({"zzz": 1, "lr": -1.0})  # the unknown key is reported before any bad value
    message = str(refused.value)
    assert message == f"parameters: unknown parameter 'zzz'; allowed: {', '.join(sorted(hparams.PARAM_SPECS))}"


# --------------------------------------------------------------------------------------------------
# Resolving


def test_resolve_params_of_nothing_is_every_default():
    resolved = hparams.resolve_params({})
    assert list(resolved) == list(hparams.PARAM_SPECS)  # spec order, every key
    defaults = {k: s.default for k, s in hparams.PARAM_SPECS.items()}
    assert resolved == defaults  # each default checked by its own spec, and left as it is
    assert None not in resolved.values()  # None would skip the check
    assert resolved["model"] == "cnn" and resolved["schedule"] == "onecycle" and resolved["precision"] == "auto"
    assert resolved["grad_accum_steps"] == 1 and resolved["cnn_channels"] == ()  # empty: derived from other keys


def test_resolve_params_overlays_checks_and_normalises_without_touching_its_input():
    params = {"lr": 1, "cnn_channels": [16, 32], "optimizer": "sgd"}
    resolved = hparams.resolve_params(params)
    assert resolved["lr"] == 1.0 and type(resolved["lr"]) is float
    assert resolved["cnn_channels"] == (16, 32) and resolved["optimizer"] == "sgd"
    assert resolved["momentum"] == hparams.TRAIN_SPECS["momentum"].default  # the rest: defaults
    assert params == {"lr": 1, "cnn_channels": [16, 32], "optimizer": "sgd"}


def test_resolving_twice_changes_nothing():
    once = hparams.resolve_params({"mlp_widths": [64, 32], "dropout": 0.1, "model": "mlp"})
    assert hparams.resolve_params(once) == once


def test_model_params_keeps_the_architecture_keys_and_checks_only_them():
    resolved = hparams.model_params({"model": "mlp", "mlp_depth": 3, "lr": "not even checked", "epochs": 0})
    assert resolved.keys() == hparams.MODEL_SPECS.keys()
    assert resolved["model"] == "mlp" and resolved["mlp_depth"] == 3
    with pytest.raises(ParamError, match=r"^model parameters: head = 'mean' is not allowed"):
        hparams.model_params({"head": "mean"})


@pytest.mark.parametrize("family", hparams.FAMILIES)
def test_each_classic_preset_is_a_valid_point_of_its_family(family):
    preset = hparams.CLASSIC[family]
    resolved = hparams.resolve_params(preset)
    assert resolved["model"] == family
    assert hparams.model_params(preset) == {k: resolved[k] for k in hparams.MODEL_SPECS}


# --------------------------------------------------------------------------------------------------
# What "auto" precision means on this machine


@pytest.mark.parametrize("setting, chosen", [(None, "auto"), ("  ", "auto"), ("fp32", "fp32"), (" BF16\n", "bf16")])
def test_machine_precision_reads_pipeline_precision(monkeypatch, setting, chosen):
    if setting is None:
        monkeypatch.delenv("PIPELINE_PRECISION", raising=False)
    else:
        monkeypatch.setenv("PIPELINE_PRECISION", setting)
    assert hparams.machine_precision() == chosen


@pytest.mark.parametrize("setting", ["fp16", "float32", "bf16,fp32"])
def test_a_bad_machine_precision_is_refused_naming_the_variable_and_the_fix(monkeypatch, setting):
    monkeypatch.setenv("PIPELINE_PRECISION", setting)
    with pytest.raises(BadInput) as refused:
        hparams.machine_precision()
    assert not isinstance(refused.value, ParamError)  # the machine's setting, not a study's parameter
    assert str(refused.value) == (f"PIPELINE_PRECISION={setting!r}: expected one of auto, fp32, bf16; unset it to let "
                                  "the machine choose")
