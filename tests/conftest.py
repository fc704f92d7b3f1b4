"""Shared fixtures: settings from `.env`, and throwaway MySQL databases, buckets and MLflow names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline.config import Settings, load_settings


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The project's settings, read from `.env` like the CLI and Airflow do."""
    return load_settings()


@pytest.fixture
def db(settings: Settings) -> Iterator:
    """A fresh, migrated database `<MYSQL_DATABASE>_test_<suffix>`, dropped afterwards."""
    from pipeline.db import create_database, drop_database, migrate

    name = f"{settings.mysql.database}_test_{_suffix()}"
    database = create_database(settings.mysql, name)
    migrate(database)
    try:
        yield database
    finally:
        drop_database(settings.mysql, name)


@pytest.fixture
def store(settings: Settings) -> Iterator:
    """A fresh, empty bucket `test-<suffix>` on the real S3 endpoint, removed afterwards."""
    from pipeline.store import ObjectStore

    bucket = f"test-{_suffix()}"
    s = ObjectStore(settings.s3, bucket)
    s.ensure_bucket()
    try:
        yield s
    finally:
        s.delete_bucket()


@pytest.fixture
def mlflow_names(settings: Settings) -> Iterator[dict[str, str]]:
    """A unique registered-model name and its experiment on the real MLflow server, deleted after."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    # The pipeline trains into the experiment named like the model (the gate checks it).
    name = f"test-model-{_suffix()}"
    names = {"experiment": name, "model_name": name}
    try:
        yield names
    finally:
        client = MlflowClient(settings.mlflow_tracking_uri)
        try:
            client.delete_registered_model(names["model_name"])
        except Exception:  # noqa: BLE001 - the test may not have registered one
            pass
        experiment = client.get_experiment_by_name(names["experiment"])
        if experiment is not None and experiment.lifecycle_stage == "active":
            client.delete_experiment(experiment.experiment_id)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private image cache directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(path))
    return path


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadscope`): each module is
# one unit of work, run whole by one worker, except the modules below, which share what only one
# process at a time may use and so run one after the other on the same worker.
SERIAL_GROUPS = {
    # Airflow's SQLite metadata database in the stack's Airflow home (`airflow dags test`,
    # `tasks test`, the results plugin's API server, `make airflow`), and `stack.py up`.
    "airflow_home": (
        "tests/dags/",
        "tests/integration/test_results_api.py",
        "tests/integration/test_results_page.py",
        "tests/integration/test_airflow_ui_process.py",
        "tests/integration/test_stack_bindings.py",
    ),
    # One CeleryExecutor cluster (package fixtures) for the Celery runs and the approvals.
    "celery": ("tests/celery_executor/",),
}


def work_unit(nodeid: str) -> str:
    """What one xdist worker runs whole: the test's serial group, else its module."""
    module = nodeid.split("::", 1)[0]
    for group, prefixes in SERIAL_GROUPS.items():
        if module.startswith(prefixes):
            return group
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with `work_unit` as the scope. (Not `xdist_group` marks: pytest-xdist
    3.8 tags their node ids through an attribute pytest 9 no longer reads, so they group nothing.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path or f"{os.sep}dags{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
