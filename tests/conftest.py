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


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path or f"{os.sep}dags{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
