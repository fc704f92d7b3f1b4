"""Run parameters: the same validation for the trigger form and for unvalidated conf."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pipeline.params import RUN_PARAMS, ParamError, validate_params

REQUIRED_FORM_FIELDS = [
    "bucket",
    "prefix",
    "epochs",
    "batch_size",
    "learning_rate",
    "image_size",
    "weights",
    "min_accuracy",
    "promotion_margin",
    "shards",
    "force_retrain",
    "score_only",
]


def test_form_has_the_fields_users_asked_for():
    assert set(REQUIRED_FORM_FIELDS) <= set(RUN_PARAMS)


def test_defaults_validate_and_fill_everything():
    values = validate_params({})
    assert set(values) == set(RUN_PARAMS)
    assert values["epochs"] == RUN_PARAMS["epochs"].default


@pytest.mark.parametrize(
    ("env", "bucket", "prefix"),
    [
        pytest.param(
            {"S3_BUCKET": "photos", "S3_PREFIX": "/team/a/"}, "photos", "team/a", id="set"
        ),
        pytest.param({"S3_PREFIX": ""}, "images", "", id="root"),
        pytest.param({}, "images", "datasets/demo", id="unset"),
    ],
)
def test_scheduled_runs_look_where_the_deployment_keeps_its_images(env, bucket, prefix):
    """No conf (the nightly schedule): bucket and prefix are S3_BUCKET / S3_PREFIX of the
    environment the DAG is parsed and run in, as for the CLI (a fresh interpreter: the
    defaults are read once, when the DAG file imports the params)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("S3_BUCKET", "S3_PREFIX")}
    code = (
        "import json; from pipeline.params import validate_params as v;"
        " p = v({}); print(json.dumps([p['bucket'], p['prefix']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [bucket, prefix]


def test_integral_float_is_accepted_for_integers():
    assert validate_params({"epochs": 3.0})["epochs"] == 3


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        pytest.param({"epochs": 0}, "epochs=0 is below the minimum", id="epochs-zero"),
        pytest.param({"epochs": "ten"}, "epochs must be a integer", id="epochs-string"),
        pytest.param({"epochs": True}, "epochs must be a integer", id="epochs-bool"),
        pytest.param({"learning_rate": -1}, "learning_rate=-1 is below", id="lr-negative"),
        pytest.param({"min_accuracy": 1.5}, "min_accuracy=1.5 is above", id="accuracy-above-1"),
        pytest.param({"optimizer": "rmsprop"}, "expected one of: adamw, sgd", id="optimizer-enum"),
        pytest.param({"weights": "resnet"}, "weights='resnet' does not match", id="weights"),
        pytest.param({"bucket": "Bad_Bucket"}, "bucket='Bad_Bucket'", id="bucket-name"),
        pytest.param({"shards": 0}, "shards=0 is below", id="shards-zero"),
        pytest.param({"force_retrain": "yes"}, "force_retrain must be a boolean", id="bool"),
        pytest.param({"epohcs": 3}, "unknown parameter(s) ['epohcs']", id="typo"),
        pytest.param({"bucket": "images\n"}, "bucket='images\\n'", id="bucket-newline"),
        pytest.param({"model_name": "m\n"}, "model_name='m\\n'", id="name-newline"),
        pytest.param({"prefix": "data/"}, "prefix='data/'", id="prefix-slash"),
        pytest.param({"prefix": "/"}, "prefix='/'", id="prefix-only-slash"),
        pytest.param({"prefix": "data "}, "prefix='data '", id="prefix-trailing-space"),
    ],
)
def test_bad_values_are_refused_with_the_reason(conf, message):
    with pytest.raises(ParamError) as info:
        validate_params(conf)
    assert message in str(info.value)


@pytest.mark.parametrize("name", sorted(RUN_PARAMS))
def test_form_schema_agrees_with_validation_on_the_default(name):
    spec = RUN_PARAMS[name]
    jsonschema.validate(spec.default, spec.schema())


@pytest.mark.parametrize(
    ("name", "good", "validated"),
    [
        ("prefix", "x", "x"),
        ("prefix", "", ""),
        ("prefix", "a b/c", "a b/c"),
        ("model_name", "", None),  # empty: MODEL_NAME, as the form's emptied field
        ("val_percent", None, None),
    ],
)
def test_form_schema_and_validation_accept_the_same_values(name, good, validated):
    if good != "" or not RUN_PARAMS[name].nullable:
        jsonschema.validate(good, RUN_PARAMS[name].schema())
    assert validate_params({name: good})[name] == validated


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("epochs", 0),
        ("optimizer", "rmsprop"),
        ("min_accuracy", 2),
        ("weights", "x"),
        ("shards", 1000),
        ("prefix", "data/"),
    ],
)
def test_form_schema_refuses_what_validation_refuses(name, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RUN_PARAMS[name].schema())
    with pytest.raises(ParamError):
        validate_params({name: bad})
