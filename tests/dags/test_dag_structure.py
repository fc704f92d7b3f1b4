"""DAG integrity, policy, edges and parse cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT
from pipeline.params import RUN_PARAMS

DAG_ID = "image_classification"


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {DAG_ID, "image_classification_inbox"} <= set(dagbag.dags)


@pytest.mark.parametrize("dag_id", [DAG_ID, "image_classification_inbox"])
def test_policy(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "imgpipe" in dag.tags
    assert f"### {dag_id}:" in dag.doc_md  # each DAG documents itself (module docstring)
    assert "connections" in dag.doc_md.lower()
    for task in dag.tasks:
        assert task.owner == "ml-platform"
        assert task.retry_exponential_backoff
        assert task.execution_timeout is not None
        assert task.on_failure_callback


def test_expected_edges(dagbag):
    dag = dagbag.dags[DAG_ID]
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == {
        ("check_services", "scan_images"),
        ("scan_images", "check_dataset"),
        ("check_dataset", "train_model"),
        ("train_model", "promote_model"),
        ("promote_model", "approve_promotion"),
        ("approve_promotion", "publish_champion"),
        ("publish_champion", "plan_scoring"),
        ("plan_scoring", "score_images"),
        ("score_images", "evaluate_model"),
        ("score_images", "check_drift"),
        ("check_drift", "publish_drift"),
    }
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(dag.get_task("score_images"), MappedOperator)


def test_inbox_dag_checks_drift_after_scoring(dagbag):
    dag = dagbag.dags["image_classification_inbox"]
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == {
        ("scan_images", "score_inbox"),
        ("score_inbox", "check_drift"),
        ("check_drift", "publish_drift"),
    }
    assert {a.name for a in dag.get_task("publish_drift").outlets} == {"imgpipe_drift"}


def test_the_approval_form_asks_only_for_a_comment(dagbag):
    from airflow.providers.standard.operators.hitl import HITLOperator

    approval = dagbag.dags[DAG_ID].get_task("approve_promotion")
    assert isinstance(approval, HITLOperator)
    assert approval.options == ["Approve", "Reject"] and not approval.multiple
    assert approval.defaults is None  # no answer is never taken for an answer
    assert set(approval.serialized_params) == {"comment"}
    assert approval.trigger_rule == "none_failed"


def test_params_render_the_form_with_the_spec(dagbag):
    params = dagbag.dags[DAG_ID].params
    assert set(params.keys()) == set(RUN_PARAMS)
    epochs = params.get_param("epochs")
    assert epochs.schema["minimum"] == 1 and epochs.schema["type"] == "integer"
    assert epochs.description


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("epochs", 0),
        ("optimizer", "rmsprop"),
        ("min_accuracy", 1.5),
        ("bucket", "Bad_Bucket"),
        ("shards", "two"),
    ],
)
def test_form_refuses_bad_values(dagbag, name, bad):
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dagbag.dags[DAG_ID].params)
    with pytest.raises(ParamValidationError):
        params[name] = bad
    params[name] = RUN_PARAMS[name].default  # and a good value passes


HEAVY_MODULES = ("torch", "torchvision", "mlflow", "PIL", "sklearn", "onnxruntime", "numpy")


def test_parsing_imports_none_of_the_heavy_libraries():
    # What makes parsing slow is what it imports; its time is a benchmark's business
    # (bench/bench_dag_parse.py), not a test's on a shared machine.
    code = (
        "import sys, importlib.util\n"
        "import airflow\n"
        f"for name in ('image_classification', 'image_classification_inbox'):\n"
        f"    spec = importlib.util.spec_from_file_location(name, r'{REPO_ROOT}/dags/' + name + '.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(' '.join(sorted(m for m in sys.modules if '.' not in m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "pipeline" in loaded  # the DAG files were really executed
    assert loaded.isdisjoint(HEAVY_MODULES), sorted(loaded & set(HEAVY_MODULES))
