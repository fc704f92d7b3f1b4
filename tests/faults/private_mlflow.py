"""A private MLflow tracking server (SQLite backend, local artifacts) on a port of its own, to
kill and restart in a test without disturbing the shared one other tests use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PORTS = range(5510, 5520)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        # As the server binds: connections of a killed server in TIME_WAIT don't count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PrivateMlflow:
    """`mlflow server` in a process group of its own; `kill()` SIGKILLs the group, `start()`
    brings it back on the same port and stores (registered models survive)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = next(p for p in PORTS if _is_free(p))
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.argv = [
            str(REPO / ".venv" / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout_s: float = 180) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the child
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private MLflow exited: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        raise RuntimeError(f"private MLflow not healthy in {timeout_s}s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and its workers: no shutdown, connections refused from now on."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "server.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )
