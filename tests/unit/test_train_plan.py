"""What a run is asked to do, without torch: training params, the train CLI's flags, the decision to train."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from pipeline.__main__ import build_parser
from pipeline.params import RUN_PARAMS, validate_params
from pipeline.train_plan import (
    DECISION_PARAMS,
    TrainParams,
    params_from_run,
    training_decision,
)

HEAVY_MODULES = ("torch", "torchvision", "mlflow", "numpy", "PIL")


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import pipeline.train_plan", id="module"),
        pytest.param(
            "from pipeline.__main__ import build_parser; build_parser('train')",
            id="train-cli-flags",
        ),
    ],
)
def test_planning_a_run_imports_none_of_the_heavy_libraries(code):
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if '.' not in m))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert loaded.isdisjoint(HEAVY_MODULES), sorted(loaded & set(HEAVY_MODULES))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"optimizer": "rmsprop"}, "expected one of: adamw, sgd", id="optimizer"),
        pytest.param({"lr_schedule": "poly"}, "expected one of: cosine, step, none", id="schedule"),
        pytest.param({"class_weighting": "x"}, "expected one of: none, balanced", id="weighting"),
        pytest.param({"epochs": 0}, "epochs must be an integer >= 1", id="epochs"),
        pytest.param({"learning_rate": 0}, "learning_rate must be > 0", id="lr"),
        pytest.param({"momentum": 0.9}, "unknown training parameter(s) ['momentum']", id="unknown"),
    ],
)
def test_train_params_refuse_bad_values_with_the_allowed_list(values, message):
    with pytest.raises(ValueError) as err:
        TrainParams.from_dict(values)
    assert message in str(err.value)


def test_every_training_parameter_is_a_run_param_with_the_same_default():
    defaults = TrainParams()
    for f in fields(TrainParams):
        assert f.name in RUN_PARAMS, f.name
        assert RUN_PARAMS[f.name].default == getattr(defaults, f.name), f.name


def test_params_from_run_keeps_only_training_values():
    run = validate_params({"epochs": 3, "shards": 4})
    picked = params_from_run(run)
    assert picked["epochs"] == 3
    assert "shards" not in picked and "bucket" not in picked
    assert TrainParams.from_dict(picked).epochs == 3


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], {"epochs": 8, "augment": True, "num_workers": None}, id="defaults"),
        pytest.param(
            ["--augment", "off", "--epochs", "3"], {"augment": False, "epochs": 3}, id="set"
        ),
        pytest.param(["--compile", "YES"], {"compile": True}, id="bool-words"),
    ],
)
def test_train_cli_flags_become_train_params(argv, expected):
    args = build_parser("train").parse_args(["train", *argv])
    params = TrainParams.from_dict({f.name: getattr(args, f.name) for f in fields(TrainParams)})
    assert {k: getattr(params, k) for k in expected} == expected


def test_train_cli_refuses_a_bool_flag_that_is_no_bool(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--augment", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def _dataset_info(train=None, test=None, version="dv1"):
    counts = {"train": train or {"cat": 10, "dog": 10}, "test": test or {"cat": 3, "dog": 3}}
    return {"dataset_version": version, "counts": counts}


@pytest.mark.parametrize(
    "kwargs, expected, why",
    [
        pytest.param({"champion_dataset_version": None}, True, "no champion", id="first-model"),
        pytest.param({"champion_dataset_version": "dv0"}, True, "changed", id="dataset-changed"),
        pytest.param(
            {"champion_dataset_version": "dv1"}, False, "skipping training", id="unchanged"
        ),
        pytest.param(
            {"champion_dataset_version": "dv1", "force_retrain": True},
            True,
            "force_retrain",
            id="forced",
        ),
        pytest.param(
            {"champion_dataset_version": "dv0", "trained_version": "7"},
            False,
            "already trained: v7",
            id="kept-out-version-of-this-dataset",
        ),
        pytest.param(
            {"champion_dataset_version": "dv0", "trained_version": "7", "force_retrain": True},
            True,
            "force_retrain",
            id="kept-out-forced",
        ),
        pytest.param(
            {"champion_dataset_version": None, "score_only": True}, False, "score_only", id="score"
        ),
        pytest.param(
            {"champion_dataset_version": None, "rollback_to": 2}, False, "rollback_to 2", id="rb"
        ),
    ],
)
def test_training_decision(kwargs, expected, why):
    decision, reason = training_decision(_dataset_info(), **kwargs)
    assert decision is expected
    assert why in reason


def test_training_decision_refuses_an_untrainable_dataset_even_when_unchanged():
    bad = _dataset_info(train={"cat": 10, "dog": 2})
    with pytest.raises(ValueError, match=r"dv1 not trainable: .*'dog' \(2\)"):
        training_decision(bad, champion_dataset_version="dv1")
    # A run that never trains does not look at the dataset.
    assert training_decision(bad, champion_dataset_version="dv1", score_only=True)[0] is False


def test_training_decision_unseen_labels_block_unless_allowed():
    unseen = _dataset_info(test={"cat": 3, "dog": 3, "fox": 1})
    with pytest.raises(ValueError, match=r"\['fox'\].*allow_unseen_labels"):
        training_decision(unseen, champion_dataset_version=None)
    decision, _ = training_decision(unseen, champion_dataset_version=None, allow_unseen_labels=True)
    assert decision is True


def test_decision_params_are_run_params():
    assert set(DECISION_PARAMS) <= set(RUN_PARAMS)
