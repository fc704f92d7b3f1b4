"""The local stack's environment and commands (scripts/stack.py): loopback binds, escaped secrets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.preflight import mlflow_auth_headers, without_credentials

REPO = Path(__file__).resolve().parents[2]
AWKWARD = 'p"a@s/s:w\\o rd%'


@pytest.fixture(scope="module")
def stack():
    spec = importlib.util.spec_from_file_location("stack", REPO / "scripts" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def env(stack, monkeypatch) -> dict[str, str]:
    """stack_env() with secrets holding `"`, `@`, `/`, `:`, `\\`, a space and `%`."""
    for name in list(__import__("os").environ):
        if name.startswith(("AIRFLOW__", "AIRFLOW_CONN_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MYSQL_PASSWORD", AWKWARD)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWKWARD)
    monkeypatch.setenv("AIRFLOW_API_PORT", "18080")
    return stack.stack_env()


def test_airflow_listens_on_loopback_only(stack, env):
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST"] == "127.0.0.1"
    components = stack.airflow_components(env)
    assert set(components) == {"api-server", "scheduler", "dag-processor", "triggerer"}
    api = components["api-server"]
    assert api[api.index("--host") + 1] == "127.0.0.1" and api[api.index("--port") + 1] == "18080"
    # Their log servers bind every interface whatever the settings: not started.
    assert "--skip-serve-logs" in components["scheduler"]
    assert "--skip-serve-logs" in components["triggerer"]
    assert "standalone" not in {arg for argv in components.values() for arg in argv}


def test_mlflow_gets_the_mysql_password_through_its_environment_not_argv(stack, env):
    from sqlalchemy.engine import make_url

    argv, proc_env = stack.mlflow_command(env, Path("/venv/bin/mlflow"), "127.0.0.1", 5000)
    joined = " ".join(argv)
    assert AWKWARD not in joined and "mysql" not in joined and "--backend-store-uri" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    url = make_url(proc_env["MLFLOW_BACKEND_STORE_URI"])
    assert (url.password, url.host, url.database) == (AWKWARD, "127.0.0.1", "mlflow")


@pytest.mark.parametrize(
    ("variable", "conn_type"),
    [
        pytest.param("AIRFLOW_CONN_IMGPIPE_MYSQL", "mysql", id="mysql"),
        pytest.param("AIRFLOW_CONN_IMGPIPE_S3", "aws", id="s3"),
    ],
)
def test_connections_round_trip_a_password_with_quote_at_and_slash(env, variable, conn_type):
    from airflow.models.connection import Connection

    conn = Connection.from_json(env[variable], conn_id=variable.removeprefix("AIRFLOW_CONN_"))
    assert conn.conn_type == conn_type
    assert conn.password == AWKWARD
    assert json.loads(env[variable])["password"] == AWKWARD


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        pytest.param("http://127.0.0.1:5000", "http://127.0.0.1:5000", id="plain"),
        pytest.param("http://u:p%40ss@mlflow:5000/x", "http://mlflow:5000/x", id="user-password"),
        pytest.param("https://token@host", "https://host", id="user-only"),
        pytest.param("http://u:p@[::1]:5000", "http://[::1]:5000", id="ipv6"),
    ],
)
def test_a_tracking_uri_is_shown_without_credentials(uri, shown):
    assert without_credentials(uri) == shown


def test_mlflow_basic_auth_comes_from_the_environment_or_the_uri(monkeypatch):
    import base64

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert mlflow_auth_headers("http://127.0.0.1:5000") == {}
    from_uri = mlflow_auth_headers("http://u:p%40ss@h:5000")["Authorization"]
    assert base64.b64decode(from_uri.split()[1]) == b"u:p@ss"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AWKWARD)
    header = mlflow_auth_headers("http://127.0.0.1:5000")["Authorization"]
    assert base64.b64decode(header.split()[1]).decode() == f"pipeline:{AWKWARD}"
