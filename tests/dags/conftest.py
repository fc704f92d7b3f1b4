"""DAG tests load the dags folder the way Airflow does (plugins folder on sys.path)."""

from __future__ import annotations

import pytest

from pipeline.config import REPO_ROOT


@pytest.fixture(scope="session")
def dagbag():
    import airflow  # noqa: F401 - initialises settings, puts the plugins folder on sys.path
    from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags"))
