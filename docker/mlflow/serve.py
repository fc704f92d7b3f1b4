"""Start the MLflow tracking server of docker-compose.airflow.yml, with basic auth.

The backend store URI (with the MySQL password, URL-quoted here) and the admin credentials go
to `mlflow server` through its environment, never its argv (which `ps` and logs show).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import quote

AUTH_CONFIG = "/home/mlflow/basic_auth.ini"


def server_command(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """`mlflow server`'s argv and environment, from the container's environment."""
    backend = (
        f"mysql+pymysql://{quote(env['MYSQL_USER'], safe='')}:"
        f"{quote(env['MYSQL_PASSWORD'], safe='')}@{env.get('MYSQL_HOST', 'mysql')}:"
        f"{env.get('MYSQL_PORT', '3306')}/{env['MLFLOW_DATABASE']}?charset=utf8mb4"
    )
    argv = [
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "0.0.0.0",  # inside the container; the published port binds 127.0.0.1 on the host
        "--port",
        "5000",
        "--artifacts-destination",
        f"s3://{env['MLFLOW_ARTIFACT_BUCKET']}/artifacts",
        "--serve-artifacts",
    ]
    server_env = {
        **env,
        "MLFLOW_BACKEND_STORE_URI": backend,
        "MLFLOW_AUTH_CONFIG_PATH": env.get("MLFLOW_AUTH_CONFIG_PATH", AUTH_CONFIG),
        # Creates the admin on first start; later changes need MLflow's update-password API.
        "MLFLOW_AUTH_ADMIN_USERNAME": env["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": env["MLFLOW_TRACKING_PASSWORD"],
    }
    for name in ("MYSQL_PASSWORD", "MLFLOW_TRACKING_PASSWORD"):
        server_env.pop(name, None)  # each lives on in one variable only
    return argv, server_env


if __name__ == "__main__":
    argv, env = server_command(os.environ)
    os.execvpe(argv[0], argv, env)
