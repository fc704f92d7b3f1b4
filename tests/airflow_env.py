"""Environment for Airflow processes a test starts: the pipeline's connections, pointed at the
test's own resources."""

from __future__ import annotations

import json
import os

from pipeline.config import Settings


def mysql_connection_env(settings: Settings, database: str) -> dict[str, str]:
    """The environment variable of the pipeline's MySQL connection, pointed at `database`."""
    conn_id = os.environ.get("PIPELINE_MYSQL_CONN_ID", "imgpipe_mysql")
    m = settings.mysql
    value = json.dumps(
        {
            "conn_type": "mysql",
            "host": m.host,
            "port": m.port,
            "login": m.user,
            "password": m.password,
            "schema": database,
        }
    )
    return {f"AIRFLOW_CONN_{conn_id.upper()}": value}
