"""A private Airflow on the CeleryExecutor: its own PostgreSQL database, Redis keys, home and port.

A scheduler, a DAG processor, an API server and Celery workers, each started in a process group
of its own. `stop()` ends every process the cluster started; `kill_worker()` SIGKILLs a worker
with everything under it, its task runners included (Airflow puts each in a group of its own),
as when the machine it runs on dies.

Redis (broker) and PostgreSQL (metadata and Celery results) are the ones on 127.0.0.1:6379 and
127.0.0.1:5432 when they answer; otherwise the cluster starts private servers from the
`redis-server` and PostgreSQL binaries of this machine.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(REPO / ".venv" / "bin" / "airflow")
LOOPBACK = "127.0.0.1"
REDIS_PORT = 6379
POSTGRES_PORT = 5432
POSTGRES_USER = "postgres"
ADMIN_USER = "admin"
DAG_ID = "image_classification"
START_TIMEOUT_S = 240


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class ApiError(RuntimeError):
    """The REST API answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """`check()`'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ApiError, KeyError, ValueError) as exc:
            value, last = None, f" (last: {type(exc).__name__}: {exc})"
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{last}")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and every descendant, frozen first so none forks or is reaped unseen."""
    procs = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(procs, timeout=10)
    return [proc.pid for proc in procs]


def stop_tree(pid: int, timeout: float = 20.0) -> None:
    """TERM `pid`'s process group (Celery's warm shutdown), KILL whatever of its tree is left."""
    procs = process_tree(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive + [p for p in process_tree(pid) if p not in alive]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


@dataclass
class Worker:
    """One `airflow celery worker`: its name (Celery node and task-instance hostname) and queues."""

    name: str
    queues: list[str]
    cache_dir: Path
    proc: subprocess.Popen | None = None


@dataclass
class Backends:
    """Where the broker and the metadata database are, and the private servers started for them."""

    redis_port: int = REDIS_PORT
    postgres_port: int = POSTGRES_PORT
    started: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def ensure(cls, root: Path) -> Backends:
        backends = cls()
        if not port_open(REDIS_PORT):
            backends.redis_port = backends._start_redis(root / "redis")
        if not port_open(POSTGRES_PORT):
            backends.postgres_port = backends._start_postgres(root / "postgres")
        return backends

    def _start_redis(self, root: Path) -> int:
        server = shutil.which("redis-server")
        if server is None:
            raise AssertionError("no Redis on 127.0.0.1:6379 and no redis-server binary")
        root.mkdir(parents=True)
        port = free_port()
        argv = [server, "--bind", LOOPBACK, "--port", str(port), "--save", "", "--dir", str(root)]
        self._spawn(argv, root / "redis.log")
        wait_until(lambda: port_open(port), 30, f"a private redis-server on port {port}", 0.2)
        return port

    def _start_postgres(self, root: Path) -> int:
        bindir = next(
            (
                Path(p).parent
                for p in [
                    shutil.which("initdb"),
                    *sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                ]
                if p
            ),
            None,
        )
        if bindir is None:
            raise AssertionError("no PostgreSQL on 127.0.0.1:5432 and no initdb binary")
        # initdb and postgres refuse to run as root: as root, run them as the `postgres` user.
        run_as: list[str] = []
        root.mkdir(parents=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(POSTGRES_USER)
            os.chown(root, owner.pw_uid, owner.pw_gid)
            run_as = ["runuser", "-u", POSTGRES_USER, "--"]
        data = root / "data"
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "-A", "trust"],
            check=True,
            capture_output=True,
        )
        port = free_port()
        argv = [*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
        argv += ["-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={root}"]
        self._spawn(argv, root / "postgres.log")
        wait_until(lambda: port_open(port), 60, f"a private PostgreSQL on port {port}", 0.2)
        return port

    def _spawn(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self.started.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def stop(self) -> None:
        for proc in self.started:
            stop_tree(proc.pid)

    def postgres_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{POSTGRES_USER}@{LOOPBACK}:{self.postgres_port}/{database}"

    def postgres_admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.postgres_url("postgres"), connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()


class AirflowApi:
    """The public REST API (/api/v2) with a JWT from /auth/token, as a client outside Airflow."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self.base_url, self.user, self.password = base_url, user, password
        self._token: str | None = None

    def _call(self, method: str, path: str, body: Any = None, token: bool = True) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {detail}", exc.code) from None

    def token(self) -> str:
        if self._token is None:
            answer = self._call(
                "POST", "/auth/token", {"username": self.user, "password": self.password}, False
            )
            self._token = answer["access_token"]
        return self._token

    def health(self) -> dict:
        return self._call("GET", "/api/v2/monitor/health", token=False)

    def dag(self, dag_id: str = DAG_ID) -> dict:
        return self._call("GET", f"/api/v2/dags/{dag_id}")

    def unpause(self, dag_id: str = DAG_ID) -> None:
        self._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, conf: dict, dag_id: str = DAG_ID) -> str:
        run_id = f"celery__{secrets.token_hex(4)}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        return self._call("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def dag_run(self, run_id: str, dag_id: str = DAG_ID) -> dict:
        return self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> list[dict]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100"
        return self._call("GET", path)["task_instances"]

    def tries(self, run_id: str, task_id: str, map_index: int, dag_id: str = DAG_ID) -> list[dict]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        return self._call("GET", path)["task_instances"]

    def hitl_detail(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> dict:
        """The human-in-the-loop question of an unmapped task (subject, body, options, answer)."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"
        return self._call("GET", path)

    def answer(
        self, run_id: str, task_id: str, options: list[str], params: dict, dag_id: str = DAG_ID
    ) -> dict:
        """Answer it, as a reviewer's tool would: the chosen options and the form's fields."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"
        return self._call("PATCH", path, {"chosen_options": options, "params_input": params})


class CeleryAirflow:
    """Airflow with the CeleryExecutor in `root`; `env` adds the pipeline's settings to every
    component (connections, MODEL_NAME, queues), `workers` are started with those settings plus
    their own name and image cache."""

    def __init__(self, root: Path, env: dict[str, str], workers: list[Worker]) -> None:
        self.root = root
        self.suffix = secrets.token_hex(4)
        self.workers = {worker.name: worker for worker in workers}
        self.procs: dict[str, subprocess.Popen] = {}
        self.backends: Backends | None = None
        self.database = f"imgpipe_celery_{self.suffix}"
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.api = AirflowApi(f"http://{LOOPBACK}:{self.port}", ADMIN_USER, self.password)
        self.env = dict(env)
        # Every key this cluster writes to Redis starts with this (removed by stop()).
        self.redis_prefix = f"imgpipe-celery-{self.suffix}:"
        self.redis_db = 1 + int(self.suffix, 16) % 15
        self._created_database = False

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.backends = Backends.ensure(self.root)
        self.backends.postgres_admin(f'CREATE DATABASE "{self.database}"')
        self._created_database = True
        self.env = self._airflow_env(self.env)
        self._run("db-migrate", [AIRFLOW, "db", "migrate"], timeout=300)
        self._spawn(
            "api-server", [AIRFLOW, "api-server", "--host", LOOPBACK, "--port", str(self.port)]
        )
        self._spawn("scheduler", [AIRFLOW, "scheduler", "--skip-serve-logs"])
        self._spawn("dag-processor", [AIRFLOW, "dag-processor"])
        for worker in self.workers.values():
            self._start_worker(worker)
        self._wait_healthy()

    def stop(self) -> None:
        """Stop every process started here (also after a failed start), then drop what it made."""
        for proc in reversed(self.procs.values()):  # workers first, the API server last
            stop_tree(proc.pid)
        if self.backends is not None:
            try:
                if self._created_database:
                    self.backends.postgres_admin(
                        f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'
                    )
                self._delete_redis_keys()
            finally:
                self.backends.stop()

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL worker `name`, its pool and every task runner under it; returns their pids."""
        proc = self.workers[name].proc
        assert proc is not None
        pids = kill_tree(proc.pid)
        proc.wait(timeout=10)
        return pids

    def worker_processes(self, name: str) -> list[psutil.Process]:
        proc = self.workers[name].proc
        return process_tree(proc.pid) if proc is not None else []

    # --- Airflow's configuration --------------------------------------------------

    def _airflow_env(self, base: dict[str, str]) -> dict[str, str]:
        home = self.root / "airflow"
        home.mkdir(parents=True, exist_ok=True)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self.password}))
        passwords.chmod(0o600)
        assert self.backends is not None
        return base | {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            # Only the runs a test triggers: no nightly run for the latest interval on unpause.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOOPBACK}:{self.port}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.backends.postgres_url(
                self.database, "postgresql+psycopg2"
            ),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{LOOPBACK}:{self.backends.redis_port}/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+"
            + self.backends.postgres_url(self.database, "postgresql+psycopg2"),
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # Signed by the scheduler, checked by the API server: one secret for all.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": LOOPBACK,
            # A dead worker's task is failed (and retried) 30 s after its last heartbeat,
            # not the default 5 minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            # How often the scheduler ends human-in-the-loop waits past their timeout (15 s).
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "3",
            "PYTHONUNBUFFERED": "1",
        }

    def _worker_env(self, worker: Worker) -> dict[str, str]:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        return self.env | {
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.celery_executor.hostname.worker_hostname",
            "IMGPIPE_WORKER_HOSTNAME": worker.name,
            "PYTHONPATH": pythonpath,
            "PIPELINE_CACHE_DIR": str(worker.cache_dir),
        }

    # --- processes -----------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"({path} missing)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def logs_tail(self, lines: int = 25) -> str:
        return "\n".join(f"--- {name}\n{self.log_tail(name, lines)}" for name in self.procs)

    def _run(self, name: str, argv: list[str], timeout: float) -> None:
        with open(self.log_path(name), "ab") as log:
            result = subprocess.run(
                argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
        assert result.returncode == 0, f"{' '.join(argv[1:])} failed:\n{self.log_tail(name)}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                env=env or self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _start_worker(self, worker: Worker) -> None:
        argv = [AIRFLOW, "celery", "worker", "--celery-hostname", worker.name]
        argv += ["--queues", ",".join(worker.queues), "--concurrency", "1"]
        # Both on one machine: no log server (its port is the same for both), no chatter.
        argv += ["--skip-serve-logs", "--without-mingle", "--without-gossip"]
        self._spawn(f"worker-{worker.name}", argv, self._worker_env(worker))
        worker.proc = self.procs[f"worker-{worker.name}"]

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
                )

    def _wait_healthy(self) -> None:
        def healthy() -> bool:
            self._check_alive()
            status = self.api.health()
            return all(
                (status.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "dag_processor")
            )

        def workers_ready() -> bool:
            self._check_alive()
            return all(
                f"@{name} ready." in self.log_path(f"worker-{name}").read_text(errors="replace")
                for name in self.workers
            )

        try:
            wait_until(healthy, START_TIMEOUT_S, "the API server, scheduler and DAG processor")
            wait_until(lambda: self.api.dag(), START_TIMEOUT_S, f"the DAG {DAG_ID} to be parsed")
            wait_until(workers_ready, START_TIMEOUT_S, "both Celery workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs_tail()}") from None

    def _delete_redis_keys(self) -> None:
        import redis

        assert self.backends is not None
        client = redis.Redis(
            host=LOOPBACK, port=self.backends.redis_port, db=self.redis_db, socket_timeout=5
        )
        keys = list(client.scan_iter(match=f"{self.redis_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
