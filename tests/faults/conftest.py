"""Fault fixtures: private servers to kill and restart without disturbing the shared stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.private_mlflow import PrivateMlflow


@pytest.fixture
def private_mlflow(tmp_path, monkeypatch) -> Iterator[PrivateMlflow]:
    """A private MLflow server, the tracking URI of this test; killed afterwards.

    MLflow's own HTTP retries stay on but short (one retry, no backoff), so a call against a
    killed server fails in a second instead of after MLflow's default four minutes.
    """
    import mlflow

    server = PrivateMlflow(tmp_path / "mlflow")
    server.start()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(server.uri)
    try:
        yield server
    finally:
        mlflow.set_tracking_uri(before)
        server.kill()
