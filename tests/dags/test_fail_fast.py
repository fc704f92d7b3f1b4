"""Refusals no retry can fix fail the task at once (AirflowFailException); outages stay retried."""

from __future__ import annotations

import pytest

from pipeline.errors import Refusal, ServiceUnavailable


def _raising(exc: BaseException):
    def task_body(**context):
        raise exc

    return task_body


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(Refusal("label set differs: give this dataset a model_name"), id="refusal"),
        pytest.param(ValueError("dataset x not trainable: too few images"), id="untrainable"),
        pytest.param(LookupError("unknown dataset_version 'x'"), id="unknown-version"),
    ],
)
def test_a_refusal_fails_the_task_without_retries_keeping_its_message(dagbag, exc):
    import imgpipe_runtime as rt
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=str(exc.args[0])) as info:
        rt.fail_fast(_raising(exc))()
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ServiceUnavailable("MLflow", "http://127.0.0.1:5000", "refused"), id="mlflow"),
        pytest.param(ConnectionError("MySQL at 127.0.0.1:3306: gone"), id="mysql"),
        pytest.param(TimeoutError("lock wait"), id="lock"),
    ],
)
def test_an_outage_is_raised_as_it_is_for_airflow_to_retry(dagbag, exc):
    import imgpipe_runtime as rt

    with pytest.raises(type(exc)) as info:
        rt.fail_fast(_raising(exc))()
    assert info.value is exc


def test_a_bad_param_fails_the_first_task_at_once_naming_it(dagbag):
    from airflow.sdk.exceptions import AirflowFailException

    check = dagbag.dags["image_classification"].get_task("check_services")
    with pytest.raises(AirflowFailException, match="epochs=0 is below the minimum"):
        check.python_callable(params={"epochs": 0})


@pytest.mark.parametrize("dag_id", ["image_classification", "image_classification_inbox"])
def test_both_dags_take_a_model_name_param(dagbag, dag_id):
    params = dagbag.dags[dag_id].params
    assert "model_name" in params.keys()
    assert params.get_param("model_name").value is None  # empty: MODEL_NAME of the environment
