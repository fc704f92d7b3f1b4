"""The compose file's MySQL lets MLflow create its tables as the project's user.

MySQL 8.4 keeps a binary log by default, and MLflow 3's migrations create a trigger (on its
`secrets` table), which a server with a binary log refuses to a user without SUPER (error
1419): MLflow would never start, and every restart would then fail on the half-made schema.
MariaDB refuses it the same way, so a private MariaDB started with `--log-bin`, as MySQL 8.4
runs, and the options of the compose file's `mysql` service shows whether those options let
MLflow's store initialise, as `mlflow server` does on its first start.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pymysql
import pytest
import yaml

from tests.faults.private_s3 import free_port

REPO = Path(__file__).resolve().parents[2]


def _mysql_options() -> list[str]:
    compose = yaml.safe_load((REPO / "docker-compose.airflow.yml").read_text())
    command = compose["services"]["mysql"].get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


@pytest.fixture
def mysql_like_84(tmp_path):
    """A private MariaDB with a binary log and the compose file's server options; yields
    (port, root connection factory)."""
    server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    installer = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
    datadir = tmp_path / "data"
    subprocess.run(
        [
            installer,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=root",
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )
    port = free_port(set())
    proc = subprocess.Popen(
        [
            server,
            "--no-defaults",
            f"--datadir={datadir}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={tmp_path / 'mysqld.sock'}",
            f"--pid-file={tmp_path / 'mysqld.pid'}",
            "--user=root",
            "--server-id=1",
            f"--log-bin={tmp_path / 'binlog'}",  # as MySQL 8.4 runs by default
            *_mysql_options(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "mysqld.log").open("wb"),
    )

    def root():
        return pymysql.connect(host="127.0.0.1", port=port, user="root", autocommit=True)

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                root().close()
                break
            except pymysql.err.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"private MariaDB did not start: {(tmp_path / 'mysqld.log').read_text()[-2000:]}"
                    )
                time.sleep(0.2)
        yield port, root
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_mlflow_creates_its_tables_as_the_project_user_on_the_compose_mysql(
    mysql_like_84, tmp_path
):
    port, root = mysql_like_84
    conn = root()
    with conn.cursor() as cur:
        # What docker/mysql/init/01-databases.sh grants the project's user: its databases only.
        cur.execute("CREATE DATABASE mlflow CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        cur.execute("CREATE USER 'imgpipe'@'127.0.0.1' IDENTIFIED BY 'secret-pw'")
        cur.execute("GRANT ALL PRIVILEGES ON `mlflow`.* TO 'imgpipe'@'127.0.0.1'")
        cur.execute("SELECT @@log_bin")
        log_bin = cur.fetchone()[0]
    conn.close()
    uri = f"mysql+pymysql://imgpipe:secret-pw@127.0.0.1:{port}/mlflow"
    script = (
        "import sys\n"
        "from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore\n"
        "SqlAlchemyStore(sys.argv[1], sys.argv[2])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, uri, str(tmp_path / "artifacts")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (
        f"MLflow could not create its tables (binary log {'on' if log_bin else 'off'}, options"
        f" {_mysql_options()}):\n{result.stderr[-3000:]}"
    )
    conn = root()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'mlflow'"
            " AND table_name IN ('experiments', 'registered_models', 'secrets')"
        )
        assert cur.fetchone()[0] == 3
    conn.close()
