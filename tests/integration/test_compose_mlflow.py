"""The compose file's MLflow server starts as its container would, and asks for its login.

No Docker here: `docker/mlflow/serve.py` builds the command from the `mlflow` service's
environment (compose's interpolation of `.env.example`), pointed at a throwaway database on the
local MySQL and the local S3 instead of the `mysql` and `minio` containers, on a free port.
MLflow 3 refuses to start its basic-auth app without a static secret key (CSRF), and an admin
password under 12 characters: the static compose tests could see neither.
"""

from __future__ import annotations

import base64
import configparser
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.faults.private_s3 import free_port
from tests.unit.test_compose import COMPOSE_FILE, FERNET_KEY, interpolate

REPO = Path(__file__).resolve().parents[2]


def _mlflow_environment() -> dict[str, str]:
    import yaml

    from pipeline.config import parse_env_text

    env = parse_env_text((REPO / ".env.example").read_text(encoding="utf-8"))
    env["AIRFLOW_FERNET_KEY"] = FERNET_KEY
    compose = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(encoding="utf-8"), env))
    return {k: str(v) for k, v in compose["services"]["mlflow"]["environment"].items()}


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def mlflow_database(settings):
    from pipeline.db import create_database, drop_database

    name = f"{settings.mysql.database}_test_mlflow_{os.getpid()}"
    create_database(settings.mysql, name)
    try:
        yield name
    finally:
        drop_database(settings.mysql, name)


def test_the_compose_mlflow_server_starts_and_asks_for_its_login(
    settings, mlflow_database, store, tmp_path
):
    spec = importlib.util.spec_from_file_location("serve", REPO / "docker" / "mlflow" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)

    service_env = _mlflow_environment()
    # The containers' addresses and accounts, replaced by the local stack's.
    ini = configparser.ConfigParser()
    ini.read(REPO / "docker" / "mlflow" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    with (tmp_path / "basic_auth.ini").open("w") as f:
        ini.write(f)
    local = {
        "MYSQL_HOST": settings.mysql.host,
        "MYSQL_PORT": str(settings.mysql.port),
        "MYSQL_USER": settings.mysql.user,
        "MYSQL_PASSWORD": settings.mysql.password,
        "MLFLOW_DATABASE": mlflow_database,
        "MLFLOW_ARTIFACT_BUCKET": store.bucket,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.s3.secret_access_key,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
    }
    argv, env = serve.server_command({**service_env, **local})
    port = free_port(set())
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[0] = str(Path(sys.executable).parent / "mlflow")
    env["PATH"] = os.environ["PATH"]
    log = (tmp_path / "mlflow.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(f"{base}/health") == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "the compose file's MLflow server did not start:\n"
                    + (tmp_path / "mlflow.log").read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        admin = (service_env["MLFLOW_TRACKING_USERNAME"], service_env["MLFLOW_TRACKING_PASSWORD"])
        assert _get(search) == 401
        assert _get(search, (admin[0], "wrong-password-123")) == 401
        assert _get(search, admin) == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
